"""The data-directory contract of steps 5-8 (README, "Data format" and "Who sees which prompts").

This module is the one door to that data: discovery in numeric split order, validation with one-line
errors naming the file, memory-mapped chunked reading (a 10 GB directory is never copied into
memory), the seeded prompt partition and fingerprints. What steps 5-8 write beside it is run_folder.py's.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from artifacts import read_json, read_text, sampled_blocks, write_text
from cli import InputError, finite_number
from data_folder import hold_shared
from random_streams import seed_sequence

FILE_PATTERNS = {
    "train": ("EMBD-TRAIN-split_{k}.npy", "rewards_split_{k}.json"),
    "test": ("EMBD-TEST-split_{k}.npy", "rewards_test_split_{k}.json"),
}
ALLOWED_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
# Largest embedding value accepted (absolute). LLM hidden states reach a few thousand in their
# "massive activation" dimensions and sentence embeddings are near unit norm; float16 files stop at
# 65504. A value beyond 1e6 is a corrupt or mis-scaled file: fed to the MLP it makes first-layer
# products of ~1e6 x D and gradients that no learning rate tames (3e38 overflows float32 at once),
# so it is refused where it is read, naming file and row, instead of surfacing as divergence.
MAX_ABS_EMBEDDING = 1e6
PROMPT_ROLES = ("orm_train", "calibration", "student_train", "held_out")
# Shares of the evaluation pool (README, "Who sees which prompts").
ROLE_SHARES = {"calibration": 0.6, "student_train": 0.2, "held_out": 0.2}
# 5-fold isotonic CV needs >= 5 calibration prompts, the student an early-stopping slice, the
# evaluation a few held-out prompts; a pool of 20 prompts gives 12/4/4.
MIN_EVAL_PROMPTS = 20
DEFAULT_SPLIT_SEED = 0
EMBEDDING_INFO_FILE = "embedding_info_{kind}.json"  # step 4's record of the model that embedded a set
DEMO_CONFIG_FILE = "demo_config.json"  # marks synthetic demo data (generate_demo_data.py)
# Rows scored per chunk: 2048 x 2048 float32 = 16 MiB in, 2048 x 1024 x M float32 first-layer
# activations (80 MiB for 10 members). The scores do not depend on it; 4096 rows cost ~1 % less time
# and step 7 ~125 MiB more memory (docs/performance.md).
DEFAULT_CHUNK_ROWS = 2048


@dataclass(frozen=True)
class Task:
    """A task of the paper (hh-rlhf helpful or harmless)."""

    golden_rm: str  # the paper's golden reward model, which scored the task's responses
    reward_scale: float  # s of step 5's annotator: golden helpful rewards spread ~6x wider than harmless ones


TASKS = {"helpful": Task("rmmistral7b", 6.0), "harmless": Task("rayharmless", 1.0)}


def write_rewards_jsonl(path: str | os.PathLike, rewards: np.ndarray) -> None:
    """Write one ``{"reward": float}`` line per value, atomically."""
    # repr of a Python float is valid JSON for finite values (the only ones we write); ~5x faster
    # than json.dumps per line on a 1M-reward test set.
    lines = "".join(f'{{"reward": {r!r}}}\n' for r in np.asarray(rewards, dtype=np.float64).ravel().tolist())
    write_text(path, lines)


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------
def read_rewards_jsonl(path: Path, key: str = "reward") -> np.ndarray:
    """Golden rewards from a JSONL file: (N,) float64. Every line must be ``{"reward": number}``
    (``{key: number}``: the same reader serves other per-response values, e.g. lengths)."""
    text = read_text(path, f"{key}s file {path}")
    lines = text.splitlines()
    while lines and not lines[-1].strip():  # trailing blank lines (an editor's, a concatenation's)
        lines.pop()
    # One parse of all lines joined by commas (~6x faster). It can differ from reading line by line
    # only where a line holds "}" followed by ",", so such files, like any that fail here, are read
    # line by line, which names the bad line.
    if not re.search(r"\}\s*,", text):
        try:
            records = json.loads(f"[{','.join(lines)}]")
        except ValueError:
            records = []
        if len(records) == len(lines) and all(isinstance(r, dict) and finite_number(r.get(key)) for r in records):
            return np.array([record[key] for record in records], dtype=np.float64)
    rewards = np.empty(len(lines), dtype=np.float64)
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:
            raise InputError(f"{path} line {i + 1}: not valid JSON") from None
        if not isinstance(record, dict) or key not in record:
            raise InputError(f'{path} line {i + 1}: expected an object with key "{key}"')
        value = record[key]
        if not finite_number(value):
            raise InputError(f"{path} line {i + 1}: {key} must be a finite number, got {value!r}")
        rewards[i] = value
    return rewards


def _open_embeddings(path: Path) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise InputError(
            f"cannot read embeddings {path} (expected a .npy file of float32 or float16 numbers): {err}"
        ) from None
    if array.ndim != 2:
        raise InputError(f"{path}: expected a 2-D (N, D) array, got shape {array.shape}")
    if array.dtype not in ALLOWED_DTYPES:
        raise InputError(f"{path}: expected float32 or float16 embeddings, got {array.dtype}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InputError(f"{path}: empty array of shape {array.shape}")
    return array


def embedding_problem(rows: np.ndarray) -> tuple[int, str] | None:
    """The first row of ``rows`` (B, D) holding a value that is not finite or beyond
    :data:`MAX_ABS_EMBEDDING`, and what it holds; None when every value is fine (checked with one
    min and one max, no temporary, where all are)."""
    if rows.size == 0:
        return None
    if rows.dtype == np.float16:
        # numpy's float16 min/max are ~50x slower than float32's; inf and nan are exactly the
        # float16 values whose exponent bits are all set, and finite ones stay below 65504.
        if (rows.view(np.uint16) & 0x7C00).max() != 0x7C00:
            return None
    else:
        low, high = rows.min(), rows.max()  # they propagate nan and expose +-inf
        if -MAX_ABS_EMBEDDING <= low and high <= MAX_ABS_EMBEDDING:
            return None
    magnitudes = np.abs(rows.astype(np.float32))
    index = int(np.flatnonzero(~(magnitudes <= MAX_ABS_EMBEDDING).all(axis=1))[0])
    row = rows[index].astype(np.float64)
    if not np.isfinite(row).all():
        return index, "non-finite embedding"
    column = int(np.argmax(np.abs(row)))
    return index, (
        f"embedding value {row[column]:.3g} (column {column}, beyond +-{MAX_ABS_EMBEDDING:.0e}: "
        "a corrupt or mis-scaled file)"
    )


def standard_scale(mean: np.ndarray, var: np.ndarray, n_samples: int) -> np.ndarray:
    """Per-feature scale (D,) float64 for standardising ``n_samples`` rows with these means and
    (population) variances: the standard deviation, or 1 for a feature treated as constant.

    Constant is scikit-learn's rule (``StandardScaler``, ``_is_constant_feature``): a variance
    within the round-off bound of its two-pass computation in float64, var <= n eps var +
    (n mean eps)^2. Beyond it, a feature whose standard deviation is below float32's eps times the
    largest feature's is negligible against the others and constant too: embeddings are stored in
    float32 (or float16), and dividing by such a spread (real sets have dimensions with std 2e-33)
    gives first-layer weights ~1e30 that turn to inf in any float16 copy of the checkpoint.
    Step 5's ``--standardize`` and the ridge baseline both scale by this.
    """
    mean, var = np.asarray(mean, dtype=np.float64), np.asarray(var, dtype=np.float64)
    eps = np.finfo(np.float64).eps
    std = np.sqrt(var)
    constant = var <= n_samples * eps * var + (n_samples * mean * eps) ** 2
    constant |= std <= np.finfo(np.float32).eps * std.max(initial=0.0)
    return np.where(constant, 1.0, std)


def discover_splits(data_dir: Path, kind: str) -> list[int]:
    """Split indices present in ``data_dir`` for ``kind`` ('train' or 'test'), numerically sorted.

    Raises on gaps (split_0, split_2 without split_1) and on embeddings without rewards (or the
    reverse). Returns [] when no file of that kind exists.
    """
    emb_pattern, reward_pattern = FILE_PATTERNS[kind]
    found = {}
    for pattern in (emb_pattern, reward_pattern):
        regex = re.compile(re.escape(pattern).replace(re.escape("{k}"), r"(\d+)") + r"\Z")
        found[pattern] = {int(m.group(1)) for name in os.listdir(data_dir) if (m := regex.match(name))}
    for pattern, other in ((emb_pattern, reward_pattern), (reward_pattern, emb_pattern)):
        missing = sorted(found[pattern] - found[other])
        if missing:
            path = data_dir / other.format(k=missing[0])
            raise InputError(f"missing split file {path} (its partner {pattern.format(k=missing[0])} exists)")
    splits = sorted(found[emb_pattern])
    if splits and splits != list(range(len(splits))):
        gap = next(k for k in range(len(splits) + 1) if k not in found[emb_pattern])
        raise InputError(
            f"gap in splits: {data_dir / emb_pattern.format(k=gap)} is missing "
            f"(found split indices {splits[:12]}{'...' if len(splits) > 12 else ''})"
        )
    return splits


@dataclass
class EmbeddingSet:
    """K memory-mapped splits of one data directory ('train' or 'test').

    rewards: (N, K) float64, golden reward of response k of prompt p
    Split k's embeddings, (N, D) float32/float16, are read with :meth:`read_rows`, which maps the
    file afresh for each read: pages of a map that stays open count as resident memory until it is
    closed, so a long-lived map over a 10 GB file would report ~10 GB peak RSS.
    """

    kind: str
    data_dir: Path
    embedding_paths: list[Path]
    rewards: np.ndarray = field(repr=False)
    dim: int
    dtype: np.dtype

    @property
    def n_prompts(self) -> int:
        return self.rewards.shape[0]

    @property
    def n_splits(self) -> int:
        return self.rewards.shape[1]

    @property
    def embeddings(self) -> list[np.ndarray]:
        """Fresh read-only memory maps of all K splits (for inspection; steps use read_rows)."""
        return [_open_embeddings(path) for path in self.embedding_paths]

    def read_rows(self, split: int, prompt_ids: np.ndarray) -> np.ndarray:
        """Embeddings of response ``split`` of ``prompt_ids``: (len, D) float32, checked finite.

        This is the only place embedding values are read, so every row that reaches a model has
        been checked, without a separate pass over a 10 GB directory.
        """
        prompt_ids = np.asarray(prompt_ids, dtype=np.int64)
        order = np.argsort(prompt_ids, kind="stable")  # sorted reads are sequential on disk
        rows = np.empty((len(prompt_ids), self.dim), dtype=np.float32)
        rows[order] = _open_embeddings(self.embedding_paths[split])[prompt_ids[order]]
        if (problem := embedding_problem(rows)) is not None:
            index, what = problem
            raise InputError(f"{self.embedding_paths[split]}: {what} in row {int(prompt_ids[index])}")
        return rows

    def score(
        self, prompt_ids: np.ndarray, score_fn: Callable[[np.ndarray], np.ndarray], chunk_rows: int = DEFAULT_CHUNK_ROWS
    ) -> np.ndarray:
        """Apply ``score_fn`` ((B, D) float32 -> (M, B)) to every response of ``prompt_ids``.

        Returns (M, len(prompt_ids), K) float32. Rows are read one chunk of prompts at a time, all
        K responses of a chunk scored in one call, so batches stay large even for K = 500 test
        splits of a few prompts each.
        """
        prompt_ids = np.asarray(prompt_ids, dtype=np.int64)
        per_chunk = max(1, chunk_rows // self.n_splits)
        out = None
        for start in range(0, len(prompt_ids), per_chunk):
            ids = prompt_ids[start : start + per_chunk]
            rows = np.concatenate([self.read_rows(k, ids) for k in range(self.n_splits)])
            scores = np.asarray(score_fn(rows))  # (M, K * len(ids)), split-major
            if out is None:
                out = np.empty((scores.shape[0], len(prompt_ids), self.n_splits), np.float32)
            out[:, start : start + len(ids)] = scores.reshape(-1, self.n_splits, len(ids)).transpose(0, 2, 1)
        return out


def check_sorted(rewards: np.ndarray, reward_paths: Sequence[Path]) -> None:
    """Each prompt's splits must be sorted ascending by golden reward (split 0 lowest; ties are fine):
    ``--consider_first_n -1`` and ``-2`` pick splits by that order. rewards: (N, K), column k read
    from ``reward_paths[k]``."""
    descending = np.diff(rewards, axis=1) < 0  # (N, K - 1)
    if descending.any():
        prompt, k = np.argwhere(descending)[0]
        raise InputError(
            f"prompt {prompt} (line {prompt + 1}) is not sorted ascending by reward across splits: "
            f"{reward_paths[k]} has {float(rewards[prompt, k])!r}, {reward_paths[k + 1].name} "
            f"{float(rewards[prompt, k + 1])!r} "
            "(split 0 must hold each prompt's lowest reward; convert_embeddings.py sorts them)"
        )


def load_embedding_set(data_dir: str | os.PathLike, kind: str = "train", required: bool = True) -> EmbeddingSet | None:
    """Open and validate the ``kind`` splits of ``data_dir`` (None if absent and not required)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InputError(f"data directory {data_dir} does not exist")
    hold_shared(data_dir)  # until this process exits: no writer swaps the data while it is read
    splits = discover_splits(data_dir, kind)
    emb_pattern, reward_pattern = FILE_PATTERNS[kind]
    if not splits:
        if required:
            raise InputError(
                f"no {emb_pattern.format(k='*')} files in {data_dir} "
                f"(run generate_demo_data.py or convert_embeddings.py)"
            )
        return None
    emb_paths = [data_dir / emb_pattern.format(k=k) for k in splits]
    reward_paths = [data_dir / reward_pattern.format(k=k) for k in splits]
    shapes_dtypes = [(array.shape, array.dtype) for array in map(_open_embeddings, emb_paths)]
    (n, d), dtype = shapes_dtypes[0]
    for path, (shape, _) in zip(emb_paths, shapes_dtypes):
        if shape != (n, d):
            raise InputError(f"{path}: shape {shape} differs from {emb_paths[0].name}'s ({n}, {d})")
    rewards = np.empty((n, len(splits)), dtype=np.float64)
    for k, path in enumerate(reward_paths):
        column = read_rewards_jsonl(path)
        if len(column) != n:
            raise InputError(f"{path}: {len(column)} rewards, expected {n} (rows of {emb_paths[k].name})")
        rewards[:, k] = column
    if len(splits) < 2:
        raise InputError(f"{data_dir}: need at least 2 {kind} splits (responses per prompt), found 1")
    check_sorted(rewards, reward_paths)
    return EmbeddingSet(kind, data_dir, emb_paths, rewards, d, dtype)


def fingerprint(eset: EmbeddingSet) -> str:
    """The data fingerprint: a sha256 over the set's file names, shapes, dtypes, all rewards and sampled
    embedding bytes (orm_manifest.json's ``data.fingerprint``, prompt_split.json's ``data_fingerprint``).
    run_state.py's ``data_stat_key``, which decides whether steps rerun, hashes stat information instead.

    Embedding files are sampled (blocks of 64 KiB evenly spaced, first and last included, plus the
    size) rather than hashed whole: hashing 10 GB would cost more than the step it guards. The set
    gets ~640 blocks in all (64 per file for 10 splits, 2 per file for 500 test splits), so a
    fingerprint reads at most ~40 MB whatever the number of files.
    """
    digest = hashlib.sha256()
    digest.update(eset.rewards.tobytes())
    n_blocks = min(64, max(2, 640 // len(eset.embedding_paths)))
    for path in eset.embedding_paths:
        digest.update(f"{path.name}:{path.stat().st_size}".encode())
        for block in sampled_blocks(path, n_blocks):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# The prompt partition (README, "Who sees which prompts")
# --------------------------------------------------------------------------------------------
def default_eval_prompts(n_prompts: int) -> int:
    """Default size of the evaluation pool: a quarter of the prompts, at least min(1000, half of them)
    and 20 (README, "Who sees which prompts", gives examples)."""
    return max(MIN_EVAL_PROMPTS, n_prompts // 4, min(1000, n_prompts // 2))


def make_partition(
    n_prompts: int, n_sample: int, split_seed: int, eval_prompts: int | None = None
) -> dict[str, list[int]]:
    """Split prompt ids 0..n_prompts-1 into the four disjoint roles (README, "Who sees which prompts").

    One permutation drawn from ``split_seed``: its first ``eval_prompts`` prompts (default
    :func:`default_eval_prompts`) are the evaluation pool, split 60/20/20 into ``calibration``,
    ``student_train`` and ``held_out``; ``orm_train`` is the next ``n_sample`` prompts, so the pool
    does not depend on ``n_sample``. Too few prompts is an error, never an overlap.
    """
    pool = default_eval_prompts(n_prompts) if eval_prompts is None else eval_prompts
    if pool < MIN_EVAL_PROMPTS:
        raise InputError(
            f"--eval_prompts (EVAL_PROMPTS) {pool}: need at least {MIN_EVAL_PROMPTS} "
            f"prompts for calibration/student/held-out"
        )
    if n_sample < 1 or n_sample + pool > n_prompts:
        # Advice that can be followed: the pool cannot go below MIN_EVAL_PROMPTS.
        fixes = [f"--n_sample (N_SAMPLE) to at most {n_prompts - pool}"] if n_prompts > pool else []
        if n_prompts - n_sample >= MIN_EVAL_PROMPTS:
            fixes.append(f"--eval_prompts (EVAL_PROMPTS) to at most {n_prompts - n_sample}")
        advice = f"lower {' or '.join(fixes)}, or use more prompts" if fixes else "use more prompts"
        raise InputError(
            f"--n_sample (N_SAMPLE) {n_sample} + --eval_prompts (EVAL_PROMPTS) {pool} exceed "
            f"the {n_prompts} prompts of the data; {advice}"
        )
    rng = np.random.default_rng(seed_sequence(split_seed, "partition"))
    order = rng.permutation(n_prompts)
    n_cal = int(round(pool * ROLE_SHARES["calibration"]))
    n_student = int(round(pool * ROLE_SHARES["student_train"]))
    bounds = {
        "calibration": (0, n_cal),
        "student_train": (n_cal, n_cal + n_student),
        "held_out": (n_cal + n_student, pool),
        "orm_train": (pool, pool + n_sample),
    }
    return {role: sorted(int(p) for p in order[slice(*bounds[role])]) for role in PROMPT_ROLES}


def require_key(
    record: dict,
    key: str,
    expected: type | tuple[type, ...],
    path: Path,
    what: str,
    check: Callable[[object], bool] = lambda value: True,
    within: str = "",
) -> object:
    """``record[key]`` if it is an ``expected`` instance passing ``check``, else an InputError naming
    ``path``, the key (inside object ``within``, if given) and ``what`` was expected."""
    value = record.get(key)
    types = expected if isinstance(expected, tuple) else (expected,)
    if (
        key not in record
        or (isinstance(value, bool) and bool not in types)
        or not isinstance(value, types)
        or not check(value)
    ):
        found = json.dumps(value)[:60] if key in record else "nothing"
        name = f"{within!r} -> {key!r}" if within else repr(key)
        raise InputError(f"{path}: key {name} must be {what}, got {found}")
    return value


def embedding_record(data_dir: str | os.PathLike, claimed_model: str) -> dict:
    """Which model embedded the training set of ``data_dir``: what step 5 stores in its manifest, so the
    trained reward model can embed new text the same way (``reward_model.py``).

    Returns ``{"source", "model", "max_length", "pooling"}``: step 4's record (``embedding_info_train.json``:
    the resolved model, its ``--max_length`` and ``--pooling``, 'last' where it does not record one);
    ``model`` None for synthetic demo data; otherwise ``claimed_model`` (step 5's ``--embed_model_name``,
    which names the model of converted published files, embedded at the last token as in the paper).
    """
    data_dir = Path(data_dir)
    info_path = data_dir / EMBEDDING_INFO_FILE.format(kind="train")
    if info_path.is_file():
        info = read_json(info_path, "step 4 embedding record")
        return {
            "source": str(info_path),
            "model": info.get("embed_model_path") or info.get("embed_model_name"),
            "max_length": info.get("max_length"),
            "pooling": info.get("pooling", "last"),
        }
    if (data_dir / DEMO_CONFIG_FILE).is_file():
        return {"source": "demo data (synthetic vectors)", "model": None, "max_length": None, "pooling": "last"}
    return {"source": "--embed_model_name", "model": claimed_model, "max_length": None, "pooling": "last"}
