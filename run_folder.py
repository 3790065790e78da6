"""The run folder of steps 5-8 (``OUTPUT_DIR``): every artifact's file name, the manifest's reader,
the score cache, and step 5's run as steps 6-8 open it (docs/method.md, "Code map").

The data it was trained on is rm_data.py's; this module adds what the steps wrote next to it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from artifacts import ensure_writable_dir, read_json, write_npy
from cli import InputError, finite_number
from rm_data import PROMPT_ROLES, EmbeddingSet, fingerprint, load_embedding_set, require_key

# --------------------------------------------------------------------------------------------
# File names (run_all.sh and run_sweep.sh spell some of them: tests/test_run_all.py checks them)
# --------------------------------------------------------------------------------------------
MANIFEST_FILE = "orm_manifest.json"  # step 5: config, data, member checkpoints, pair statistics
DISTILLATION_CONFIG_FILE = "distillation_config.json"  # step 7, written last: marks step 7 complete
VALIDATION_RESULTS_FILE = "validation_results.json"  # step 8
VALIDATION_TABLE_FILE = "validation_table.txt"  # step 8's printed table
VALIDATION_CALIBRATION_PLOT = "validation_calibration.png"
VALIDATION_BEST_OF_N_PLOT = "validation_best_of_n.png"
# The isotonic maps step 7 writes (the original authors' names; calibration.sidecar_path: their JSON).
TEACHER_MAP_FILE = "isotonic_teacher_map.joblib"
STUDENT_MAP_FILE = "isotonic_student_map.joblib"
LEGACY_MAP_FILE = "isotonic_map.joblib"  # the original authors' name for the teacher map
# Scores of the evaluation sets that step 8 reuses: the ensemble's from step 6 (files scores_*), the
# student's from step 7 (student_scores_*).
SCORE_CACHE_DIR = "score_cache"
ENSEMBLE_SCORES, STUDENT_SCORES = "scores", "student_scores"
PARTITION_FILE = "prompt_split.json"  # step 5's prompt partition (README, "Who sees which prompts")


def eval_results_file(objective: str) -> str:
    """Step 6's results of an ensemble trained with ``objective``."""
    return f"eval_results_{objective}.json"


def eval_plot_files(objective: str) -> tuple[str, str]:
    """Step 6's figures: the best-of-N curves and the members' training curves."""
    return f"eval_best_of_n_{objective}.png", f"training_curves_{objective}.png"


def student_checkpoint_name(task: str, objective: str) -> str:
    """Step 7's student checkpoint (the original authors' name)."""
    return f"distilled_rm_{task}_{objective}.ckpt"


def checkpoint_paths(output_dir: str | os.PathLike, manifest: dict) -> list[Path]:
    """The ensemble members' checkpoints that the manifest lists."""
    return [Path(output_dir) / name for name in manifest["checkpoints"]]


def member_hashes(output_dir: str | os.PathLike, manifest: dict) -> dict[Path, str]:
    """Resolved path -> sha256 of the member files whose manifest record lists one (``members.load_members``
    checks a LightGBM model's against it)."""
    records = manifest.get("members") or []
    return {
        (Path(output_dir) / record["checkpoint"]).resolve(): record["sha256"]
        for record in records
        if isinstance(record, dict) and isinstance(record.get("checkpoint"), str) and "sha256" in record
    }


# --------------------------------------------------------------------------------------------
# The manifest
# --------------------------------------------------------------------------------------------
def load_manifest(output_dir: str | os.PathLike) -> dict:
    """The ORM run manifest written by step 5 (config, member checkpoints, pair statistics).

    Every key a later step reads is checked here, so a damaged manifest is one line naming the key.
    """
    path = Path(output_dir) / MANIFEST_FILE
    manifest = read_json(path, "ORM manifest (run step5_train_rms.py first)")
    config = require_key(manifest, "config", dict, path, "an object")
    require_key(config, "seed", int, path, "a non-negative integer seed", lambda v: 0 <= v < 2**32, "config")
    for key in ("task", "rm_objective"):
        require_key(config, key, str, path, "a string", within="config")
    data = require_key(manifest, "data", dict, path, "an object")
    require_key(data, "data_dir", str, path, "a folder name", bool, "data")
    require_key(
        manifest,
        "checkpoints",
        list,
        path,
        "a non-empty list of checkpoint file names",
        lambda names: bool(names) and all(isinstance(n, str) and n and Path(n).name == n for n in names),
    )
    require_key(
        manifest,
        "members",
        list,
        path,
        "a list of member records with numeric per-epoch histories",
        lambda members: all(isinstance(m, dict) and _numeric_history(m.get("history", [])) for m in members),
    )
    return manifest


def _numeric_history(history: object) -> bool:
    """A list of per-epoch records whose epoch and training loss are numbers (validation values numbers
    or null), as step 6 draws them."""
    return isinstance(history, list) and all(
        isinstance(r, dict)
        and finite_number(r.get("epoch"))
        and finite_number(r.get("train_loss"))
        and all(r.get(key) is None or finite_number(r[key]) for key in ("val_loss", "val_accuracy"))
        for r in history
    )


# --------------------------------------------------------------------------------------------
# The score cache
# --------------------------------------------------------------------------------------------
def score_cache_entry(
    eset: EmbeddingSet,
    prompt_ids: np.ndarray,
    cache_dir: str | os.PathLike,
    model_files: list[Path],
    prefix: str = ENSEMBLE_SCORES,
) -> tuple[Path, np.ndarray | None]:
    """The score cache's file for the models' scores of ``prompt_ids`` of ``eset`` and what it holds:
    (M, P, K) float32 scores, or None where it is missing, unreadable, truncated or inconsistent (a miss).

    The key hashes the prompt ids, the rewards and each model and embedding file's name, size,
    mtime and inode, as build tools do: a rewritten file (the atomic writers give it a new inode) or
    a copy is a miss, which costs time; hashing the files' bytes would cost ~0.1 s per step for 10
    checkpoints, and minutes for 10 GB of embeddings. The cache keeps one entry per ``prefix`` and
    kind of set: step 6 scores the held-out and test prompts with the ensemble, step 7 with the
    student (``prefix`` :data:`STUDENT_SCORES`); step 8 reuses both.
    """
    prompt_ids = np.asarray(prompt_ids, dtype=np.int64)
    digest = hashlib.sha256(eset.rewards.tobytes() + prompt_ids.tobytes())
    for path in map(Path, [*model_files, *eset.embedding_paths]):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}".encode())
    cache_file = Path(cache_dir) / f"{prefix}_{eset.kind}_{digest.hexdigest()[:32]}.npy"
    try:
        cached = np.load(cache_file, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return cache_file, None
    usable = (
        isinstance(cached, np.ndarray)
        and cached.shape == (len(model_files), len(prompt_ids), eset.n_splits)
        and cached.dtype == np.float32
        and np.isfinite(cached).all()
    )
    return cache_file, cached if usable else None


def score_cached(
    eset: EmbeddingSet,
    prompt_ids: np.ndarray,
    score_fn: Callable[[np.ndarray], np.ndarray],
    cache_dir: str | os.PathLike,
    model_files: list[Path],
    prefix: str = ENSEMBLE_SCORES,
) -> np.ndarray:
    """``eset.score``, taken from the score cache (:func:`score_cache_entry`) where an earlier step
    left it; a miss is scored and written, replacing the entry of the same ``prefix`` and kind."""
    cache_file, cached = score_cache_entry(eset, prompt_ids, cache_dir, model_files, prefix)
    if cached is not None:
        return cached
    scores = eset.score(prompt_ids, score_fn)
    for stale in cache_file.parent.glob(f"{prefix}_{eset.kind}_*.npy"):
        stale.unlink()
    write_npy(cache_file, scores)
    return scores


class LazyEnsemble:
    """``members.load_members`` of the member files ``paths`` (MLPs, LightGBM models) as a scorer ((B, D)
    rows -> (M, B)), loaded (and torch or lightgbm imported) on first use: step 8 takes the scores from
    the cache that steps 6 and 7 fill and then never imports them. A cache hit means these very files
    were scored on this data, so the checks loading does had passed."""

    def __init__(self, paths: Sequence[Path], expected_dim: int, hashes: dict[Path, str] | None = None):
        for path in paths:
            if not Path(path).is_file():
                raise InputError(f"checkpoint not found: {path}")
        self.paths, self.expected_dim, self.hashes, self._ensemble = list(paths), expected_dim, hashes, None

    def load(self) -> Callable[[np.ndarray], np.ndarray]:
        """The ensemble, read from its member files on the first call."""
        if self._ensemble is None:
            from members import load_members

            self._ensemble = load_members(self.paths, self.expected_dim, self.hashes)
        return self._ensemble

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        return self.load()(rows)


# --------------------------------------------------------------------------------------------
# Opening step 5's run (steps 6-8)
# --------------------------------------------------------------------------------------------
# Step 5 flags that say which run this is: steps 6-8 accept them (as the original authors' command
# lines pass them) and check them against the manifest.
RUN_IDENTITY_FLAGS = ("embed_model_name", "task", "sft_obj", "gen_pref_model_name", "rm_objective")


def load_partition(output_dir: str | os.PathLike, eset: EmbeddingSet) -> dict[str, np.ndarray]:
    """Read ``prompt_split.json`` and check it belongs to ``eset`` and is a true partition."""
    path = Path(output_dir) / PARTITION_FILE
    record = read_json(path, "prompt partition (written by step5_train_rms.py)")
    require_key(record, "n_prompts", int, path, "an integer")
    require_key(record, "data_fingerprint", str, path, "a string")
    roles = {
        role: np.asarray(
            require_key(
                record,
                role,
                list,
                path,
                "a list of integer prompt ids",
                lambda ids: all(isinstance(i, int) and not isinstance(i, bool) for i in ids),
            ),
            dtype=np.int64,
        )
        for role in PROMPT_ROLES
    }
    if record["n_prompts"] != eset.n_prompts or record["data_fingerprint"] != fingerprint(eset):
        raise InputError(
            f"{path} was written for other data than {eset.data_dir} (rerun step5_train_rms.py on this --data_dir)"
        )
    merged = np.concatenate(list(roles.values()))
    if len(np.unique(merged)) != len(merged) or merged.min(initial=0) < 0 or merged.max(initial=0) >= eset.n_prompts:
        raise InputError(f"{path}: roles must be disjoint prompt ids in 0..{eset.n_prompts - 1}")
    return roles


@dataclass
class Run:
    """Step 5's run as steps 6-8 open it (:func:`open_run`).

    checkpoints: the ensemble members' files, or the step's ``--teacher_ckpt`` where given
    seed: the step's own seed flag where given, else step 5's seed
    """

    output_dir: Path
    manifest: dict
    data: EmbeddingSet
    checkpoints: list[Path]
    seed: int

    def member_hashes(self) -> dict[Path, str]:
        """:func:`member_hashes` of this run's manifest."""
        return member_hashes(self.output_dir, self.manifest)

    def partition(self) -> dict[str, np.ndarray]:
        """:func:`load_partition` of this run, read when the step asks for it (each step keeps its order)."""
        return load_partition(self.output_dir, self.data)

    def test_set(self) -> EmbeddingSet | None:
        """The data directory's optional test set (None if absent), checked to have the training set's D."""
        test = load_embedding_set(self.data.data_dir, "test", required=False)
        if test is not None and test.dim != self.data.dim:
            raise InputError(
                f"{test.embedding_paths[0]}: test embeddings have D={test.dim}, the training "
                f"embeddings ({self.data.embedding_paths[0].name}) D={self.data.dim}"
            )
        return test

    def evaluation_sets(
        self, partition: dict[str, np.ndarray], test: EmbeddingSet | None
    ) -> dict[str, tuple[EmbeddingSet, np.ndarray]]:
        """What steps 6 and 8 evaluate, each set with its prompt ids: the held-out prompts and, where
        the data has one, the whole test set."""
        sets = {"held_out": (self.data, partition["held_out"])}
        if test is not None:
            sets["test"] = (test, np.arange(test.n_prompts))
        return sets


def add_run_flags(parser, teacher: bool = False) -> None:
    """The flags :func:`open_run` reads: ``--data_dir`` and, with ``teacher``, ``--teacher_ckpt``."""
    parser.add_argument("--data_dir", help="data folder (default: the one recorded by step 5)")
    if teacher:
        parser.add_argument(
            "--teacher_ckpt",
            nargs="+",
            help="teacher checkpoint(s), averaged (default: every member in the manifest)",
        )


def open_run(args, flags: Iterable[str], seed: int | None = None) -> Run:
    """Open step 5's run in ``args.output_dir`` for steps 6-8.

    Checked in this order, the order in which a user meets the errors: the output folder is writable,
    the manifest's keys (:func:`load_manifest`), the step 5 ``flags`` repeated on the command line
    against the manifest, the training data (``args.data_dir``, by default the folder step 5 recorded).
    The step then loads checkpoints, partition and test set in its own order (tests/test_error_order.py).
    """
    output_dir = ensure_writable_dir(args.output_dir)
    manifest = load_manifest(output_dir)
    for flag in flags:
        given, recorded = getattr(args, flag), manifest["config"].get(flag)
        if given is not None and given != recorded:
            raise InputError(
                f"--{flag} {given} does not match the ensemble in {output_dir / MANIFEST_FILE} ({recorded})"
            )
    data = load_embedding_set(args.data_dir or manifest["data"]["data_dir"], "train")
    teacher = getattr(args, "teacher_ckpt", None)
    checkpoints = [Path(p) for p in teacher] if teacher else checkpoint_paths(output_dir, manifest)
    return Run(output_dir, manifest, data, checkpoints, manifest["config"]["seed"] if seed is None else seed)
