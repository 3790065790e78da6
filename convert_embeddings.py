"""Convert published embedding files into the data directory of steps 5-8 (README, "Data format").

Input: a ``train`` pair of files and optionally a ``test`` pair, in one of two layouts (N prompts,
K responses per prompt, D embedding size; embeddings float32 or float16, rewards any real dtype):
  kn, original:   EMBD_{dataset}_{embed}_{gen}_{split}.npy       (K, N, D)
                   REWARD_{dataset}_{rm}_{gen}_{split}.npy        (K, N)
      dataset = hh-rlhf-{task}-gpt4 (hh-rlhf-{task} with --sft_obj none); rm = rmmistral7b for
      helpful, rayharmless for harmless; e.g. EMBD_hh-rlhf-harmless-gpt4_gemma2b_gemma7b_train.npy
  nk, the embedding-infrastructure repo's:
                   embd_{gen}_{embed}_{task}_{split}.npy          (N, K, D)
                   reward_{gen}_{embed}_{task}_{split}.npy        (N, K, 1)
Files come from --embd_file/--reward_file (and --test_embd_file/--test_reward_file), or are found
in --embd_dir under the names above from --task, --sft_obj, --embed_model and --gen_model.

The layout is --layout kn|nk, or else: a 3-D reward is nk; a 2-D reward is read as the file names
say (EMBD_... kn, embd_... nk) or, under other names, as (K, N) when its first axis is the shorter
and (N, K) when it is the longer (prompts outnumber responses per prompt); K == N under other names
is an error that asks for --layout.

Output (--output_dir), for k = 0..K-1: ``EMBD-TRAIN-split_{k}.npy`` (N, D), same dtype as the
input, and ``rewards_split_{k}.json`` (JSONL ``{"reward": float}``); the test files become
``EMBD-TEST-split_{k}.npy`` and ``rewards_test_split_{k}.json``. Within each prompt the responses
are sorted ascending by reward (stable), so split 0 is the worst and split K-1 the best, as steps
5-8 require. --max_prompts M keeps the first M prompts of each set.

Streaming: every header and all rewards are validated before anything is written. Embeddings are
then copied one chunk of prompts at a time (--chunk_prompts, by default ~96 MiB of input) into
per-split temporary files renamed into place at the end (``copy_embeddings``), so resident memory
stays near one chunk whatever the file size (about 250 MB at the default chunk size).

Reruns: ``conversion.json`` records a fingerprint of the sources and options (``conversion_record``).
A rerun with the same fingerprint, whose output files are all present at their recorded sizes,
does nothing. Otherwise the previous conversion's files are
removed first (a changed K leaves no stale splits, and the disk never holds two copies) and the
data converted afresh. On any error mid-way the new files are removed as well, so a failed run
leaves no split files, never a mix; conversion.json marks a conversion in progress, so the next
run cleans up after a killed one. An output folder holding split files that no conversion.json
lists (a demo, say) is refused rather than overwritten.
"""

from __future__ import annotations

import interrupts  # noqa: F401  (first: signals are handled from here on, before the heavy imports)

# isort: split
import hashlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from artifacts import (
    SAMPLE_BLOCK,
    atomic_paths,
    ensure_writable_dir,
    file_sha256,
    json_sha256,
    read_json,
    sampled_blocks,
    write_json,
)
from cli import ArgumentParser, InputError, positive_int, run_cli, setup_logging
from data_folder import data_dir_claim, rewritten_data_dir, split_files
from progress import progress
from rm_data import ALLOWED_DTYPES, FILE_PATTERNS, TASKS, embedding_problem, write_rewards_jsonl

log = logging.getLogger("convert_embeddings")

CONVERSION_FILE = "conversion.json"
# Bump when the output for the same sources and options changes.
CONVERTER_VERSION = 1
LAYOUTS = ("kn", "nk")
SPLIT_GLOBS = [pattern.format(k="*") for patterns in FILE_PATTERNS.values() for pattern in patterns]
LAYOUT_SHAPES = {"kn": "(K, N, D) embeddings and (K, N) rewards", "nk": "(N, K, D) embeddings and (N, K, 1) rewards"}
# Input bytes per chunk of prompts: large enough for fast sequential I/O, small beside a laptop's RAM.
CHUNK_BYTES = 96 << 20
HASH_BLOCKS = 64  # 64 KiB blocks sampled from a source's embeddings: 4 MiB of a 10 GB file
# Upper bound on one JSONL reward line ('{"reward": -0.12345678901234567}\n' is 34 bytes).
REWARD_LINE_BYTES = 40


def build_parser() -> ArgumentParser:
    """The flags: each setting's one home (run_all.sh's variables set them: settings.py)."""
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    explicit = parser.add_argument_group("sources given as files")
    explicit.add_argument("--embd_file", help="training embeddings (.npy, (K, N, D) or (N, K, D))")
    explicit.add_argument("--reward_file", help="training rewards (.npy, (K, N) or (N, K, 1))")
    explicit.add_argument("--test_embd_file", help="test embeddings (optional)")
    explicit.add_argument("--test_reward_file", help="test rewards (optional, with --test_embd_file)")
    found = parser.add_argument_group("sources found in a repository folder (without --embd_file)")
    found.add_argument("--embd_dir", default="embd/RM-Embeddings", help="folder holding the repository's .npy files")
    found.add_argument("--task", choices=TASKS, default="helpful", help="hh-rlhf task")
    found.add_argument(
        "--sft_obj",
        choices=("gpt4", "none"),
        default="gpt4",
        help="SFT objective of the generator; 'none' drops the -gpt4 dataset suffix",
    )
    found.add_argument("--embed_model", default="gemma2b", help="model that produced the embeddings")
    found.add_argument("--gen_model", default="gemma7b", help="model that generated the responses")
    conversion = parser.add_argument_group("conversion")
    conversion.add_argument(
        "--layout",
        choices=("auto", *LAYOUTS),
        default="auto",
        help="kn: (K, N, D) + (K, N); nk: (N, K, D) + (N, K, 1); auto: detect",
    )
    conversion.add_argument(
        "--max_prompts",
        type=positive_int,
        help="keep only the first M prompts of each set (default: all)",
    )
    conversion.add_argument(
        "--chunk_prompts",
        type=positive_int,
        help=f"prompts copied per chunk (default: ~{CHUNK_BYTES >> 20} MiB of input)",
    )
    conversion.add_argument("--output_dir", default="data", help="data directory to write (DATA_DIR)")
    conversion.add_argument(
        "--in_use",
        action="store_true",
        help="other runs read --output_dir: refuse to write it unless it is up to date (run_all.sh sets this)",
    )
    return parser


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    for pair in (("embd_file", "reward_file"), ("test_embd_file", "test_reward_file")):
        given = [flag for flag in pair if getattr(args, flag) is not None]
        if len(given) == 1:
            raise InputError(f"--{given[0]} needs --{(set(pair) - set(given)).pop()}")
    if args.test_embd_file and not args.embd_file:
        raise InputError("--test_embd_file needs --embd_file and --reward_file for the training set")
    return args


# --------------------------------------------------------------------------------------------
# Sources: names, discovery, validation
# --------------------------------------------------------------------------------------------
def repo_file_names(
    layout: str, split: str, task: str, sft_obj: str, embed_model: str, gen_model: str
) -> tuple[str, str]:
    """(embeddings, rewards) file names of one split ('train' or 'test') in a repository layout."""
    if layout == "kn":
        dataset = f"hh-rlhf-{task}" + ("" if sft_obj == "none" else f"-{sft_obj}")
        return (
            f"EMBD_{dataset}_{embed_model}_{gen_model}_{split}.npy",
            f"REWARD_{dataset}_{TASKS[task].golden_rm}_{gen_model}_{split}.npy",
        )
    return (
        f"embd_{gen_model}_{embed_model}_{task}_{split}.npy",
        f"reward_{gen_model}_{embed_model}_{task}_{split}.npy",
    )


@dataclass
class Source:
    kind: str  # 'train' or 'test'
    embd_path: Path
    reward_path: Path


def explicit_sources(args) -> list[Source]:
    for flag in ("embd_file", "reward_file", "test_embd_file", "test_reward_file"):
        path = getattr(args, flag)
        if path is not None and not Path(path).is_file():
            raise InputError(f"--{flag} {Path(path)}: file not found")
    sources = [Source("train", Path(args.embd_file), Path(args.reward_file))]
    if args.test_embd_file:
        sources.append(Source("test", Path(args.test_embd_file), Path(args.test_reward_file)))
    return sources


def discover_sources(args) -> list[Source]:
    """The train (required) and test (optional) file pairs in --embd_dir for the chosen setup."""
    embd_dir = Path(args.embd_dir)
    if not embd_dir.is_dir():
        raise InputError(f"--embd_dir {embd_dir} does not exist (or pass --embd_file and --reward_file)")
    layouts = LAYOUTS if args.layout == "auto" else (args.layout,)
    setup = dict(task=args.task, sft_obj=args.sft_obj, embed_model=args.embed_model, gen_model=args.gen_model)
    sources = []
    for kind in ("train", "test"):
        found, wanted = [], []
        for layout in layouts:
            names = repo_file_names(layout, kind, **setup)
            wanted.append(" + ".join(names))
            present = [(embd_dir / name).is_file() for name in names]
            if present[0] != present[1]:
                have, lack = names if present[0] else names[::-1]
                raise InputError(f"{embd_dir / have} has no partner: {lack} is not in {embd_dir}")
            if present[0]:
                found.append(Source(kind, embd_dir / names[0], embd_dir / names[1]))
        if len(found) > 1:
            raise InputError(
                f"{embd_dir} holds {kind} files in both layouts ({found[0].embd_path.name}, "
                f"{found[1].embd_path.name}); pass --layout kn or --layout nk"
            )
        if found:
            sources.append(found[0])
        elif kind == "train":
            listing = sorted(os.listdir(embd_dir))
            shown = ", ".join(listing[:20]) + (f" and {len(listing) - 20} more" if len(listing) > 20 else "")
            raise InputError(
                f"no training embeddings in --embd_dir {embd_dir} for --task {args.task} "
                f"--sft_obj {args.sft_obj} --embed_model {args.embed_model} --gen_model "
                f"{args.gen_model}: looked for {' or '.join(wanted)}; the folder holds "
                f"{shown or 'nothing'}"
            )
    return sources


def open_npy(path: Path, what: str, expected: str, mmap: bool) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise InputError(f"cannot read {what} {path} (expected a .npy file of {expected}): {err}") from None
    if not isinstance(array, np.ndarray):  # an .npz archive
        array.close()
        raise InputError(f"{what} {path} is not a .npy array")
    return array


def detect_layout(forced: str, source: Source, embd_shape: tuple, reward_shape: tuple) -> str:
    if forced != "auto":
        return forced
    by_name = {"EMBD_": "kn", "embd_": "nk"}.get(source.embd_path.name[:5])
    if len(reward_shape) == 3:
        if by_name == "kn":
            raise InputError(
                f"{source.reward_path}: a 3-D reward {reward_shape} is the nk layout's but "
                f"{source.embd_path.name} is named like the kn layout's; pass --layout kn "
                f"or --layout nk"
            )
        return "nk"
    if by_name:
        return by_name
    first, second = reward_shape
    if first == second:
        raise InputError(
            f"{source.reward_path}: cannot tell (K, N) from (N, K) in a 2-D reward of shape "
            f"{reward_shape}; pass --layout kn for {LAYOUT_SHAPES['kn'].split(' and')[0]} "
            f"or --layout nk for {LAYOUT_SHAPES['nk'].split(' and')[0]}"
        )
    return "kn" if first < second else "nk"


@dataclass
class SetPlan:
    """One validated source set, ready to copy.

    rewards: (N, K) float64 in file order (N after --max_prompts)
    order: (N, K) int64; split k of prompt p is file response order[p, k]
    """

    source: Source
    layout: str
    embd_shape: tuple[int, ...]
    dtype: np.dtype
    rewards: np.ndarray
    order: np.ndarray

    @property
    def kind(self) -> str:
        return self.source.kind

    @property
    def n_prompts(self) -> int:
        return self.rewards.shape[0]

    @property
    def n_responses(self) -> int:
        return self.rewards.shape[1]

    @property
    def dim(self) -> int:
        return self.embd_shape[2]

    def output_names(self) -> list[str]:
        emb_pattern, reward_pattern = FILE_PATTERNS[self.kind]
        return [pattern.format(k=k) for k in range(self.n_responses) for pattern in (emb_pattern, reward_pattern)]

    def output_bytes(self) -> int:
        """Upper bound on the size of this set's output files."""
        data = self.n_prompts * self.dim * self.dtype.itemsize + 4096
        return self.n_responses * (data + self.n_prompts * REWARD_LINE_BYTES)


def plan_set(source: Source, args) -> SetPlan:
    """Validate one source pair from its headers and rewards; nothing is written."""
    embeddings = open_npy(source.embd_path, "embeddings", "float32 or float16 numbers", mmap=True)
    embd_shape, dtype = embeddings.shape, embeddings.dtype
    del embeddings  # only the header was needed
    if len(embd_shape) != 3:
        raise InputError(f"{source.embd_path}: expected 3-D embeddings, (K, N, D) or (N, K, D), got shape {embd_shape}")
    if dtype not in ALLOWED_DTYPES:
        raise InputError(f"{source.embd_path}: expected float32 or float16 embeddings, got {dtype}")
    if 0 in embd_shape:
        raise InputError(f"{source.embd_path}: empty embeddings of shape {embd_shape}")
    rewards = open_npy(source.reward_path, "rewards", "real numbers", mmap=False)
    if rewards.dtype.kind not in "fiu":
        raise InputError(f"{source.reward_path}: expected real-valued rewards, got dtype {rewards.dtype}")
    if rewards.ndim not in (2, 3):
        raise InputError(
            f"{source.reward_path}: expected 2-D (K, N) or 3-D (N, K, 1) rewards, got shape {rewards.shape}"
        )
    layout = detect_layout(args.layout, source, embd_shape, rewards.shape)
    rewards_nk = reward_matrix(source, layout, embd_shape, rewards)
    n_responses = rewards_nk.shape[1]
    if n_responses < 2:
        raise InputError(
            f"{source.embd_path}: need at least 2 responses per prompt, found K={n_responses} "
            f"(reading it as {LAYOUT_SHAPES[layout]}; --layout changes that)"
        )
    rewards_nk = rewards_nk[: args.max_prompts].astype(np.float64)  # all prompts when it is None
    finite = np.isfinite(rewards_nk)
    if not finite.all():
        prompt, response = np.argwhere(~finite)[0]
        raise InputError(
            f"{source.reward_path}: non-finite reward {rewards_nk[prompt, response]} for "
            f"prompt {prompt}, response {response}"
        )
    order = np.argsort(rewards_nk, axis=1, kind="stable")
    return SetPlan(source, layout, tuple(embd_shape), dtype, rewards_nk, order)


def reward_matrix(source: Source, layout: str, embd_shape: tuple, rewards: np.ndarray) -> np.ndarray:
    """The rewards as an (N, K) view, after checking they match the embeddings' K and N."""
    if layout == "kn":
        n_responses, n_prompts = embd_shape[:2]
        if rewards.ndim != 2:
            raise InputError(
                f"{source.reward_path}: the kn layout needs 2-D (K, N) rewards, got shape "
                f"{rewards.shape} (pass --layout nk for (N, K, 1) rewards)"
            )
        matrix = rewards.T
    else:
        n_prompts, n_responses = embd_shape[:2]
        if rewards.ndim == 3 and rewards.shape[2] != 1:
            raise InputError(
                f"{source.reward_path}: reward last dim must be 1 in the nk layout's (N, K, 1), "
                f"got shape {rewards.shape}"
            )
        matrix = rewards.reshape(rewards.shape[:2])
    if matrix.shape != (n_prompts, n_responses):
        what = "K (responses per prompt)" if matrix.shape[1] != n_responses else "N (prompts)"
        got = matrix.shape[1] if matrix.shape[1] != n_responses else matrix.shape[0]
        want = n_responses if matrix.shape[1] != n_responses else n_prompts
        raise InputError(
            f"{source.reward_path}: {what} is {got} but {want} in {source.embd_path.name} "
            f"(rewards {rewards.shape}, embeddings {embd_shape}, "
            f"read as {LAYOUT_SHAPES[layout]})"
        )
    return matrix


# --------------------------------------------------------------------------------------------
# Fingerprint and the previous conversion
# --------------------------------------------------------------------------------------------
def sampled_sha256(path: Path) -> str:
    """sha256 of the file size and 64 evenly spaced 64 KiB blocks (the whole file when small)."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    blocks = [path.read_bytes()] if size <= SAMPLE_BLOCK * HASH_BLOCKS else sampled_blocks(path, HASH_BLOCKS)
    for block in blocks:
        digest.update(block)
    return digest.hexdigest()


def conversion_record(plans: list[SetPlan], args) -> dict:
    """What conversion.json holds for these sources and options (its files are added on success)."""
    sources = {}
    for plan in plans:
        embd, reward = plan.source.embd_path, plan.source.reward_path
        sources[plan.kind] = {
            "embd_file": embd.name,
            "embd_bytes": embd.stat().st_size,
            "embd_shape": list(plan.embd_shape),
            "embd_dtype": str(plan.dtype),
            "embd_sample_sha256": sampled_sha256(embd),
            "reward_file": reward.name,
            "reward_bytes": reward.stat().st_size,
            "reward_sha256": file_sha256(reward),
        }
    # Prompts kept rather than --max_prompts itself: a limit above N changes nothing.
    options = {
        "layout": {plan.kind: plan.layout for plan in plans},
        "n_prompts": {plan.kind: plan.n_prompts for plan in plans},
        "sort": True,  # always (steps 5-8 need sorted splits); kept so earlier records stay current
        "converter_version": CONVERTER_VERSION,
    }
    sets = {
        plan.kind: {
            "n_prompts": plan.n_prompts,
            "n_responses": plan.n_responses,
            "dim": plan.dim,
            "dtype": str(plan.dtype),
            "layout": plan.layout,
        }
        for plan in plans
    }
    return {
        "status": "complete",
        "fingerprint": json_sha256({"sources": sources, "options": options}),
        "sources": sources,
        "options": options,
        "sets": sets,
    }


def previous_conversion(out_dir: Path) -> tuple[dict | None, set[str]]:
    """The existing conversion.json (or None) and the split files it owns."""
    path = out_dir / CONVERSION_FILE
    if not path.exists():
        return None, set()
    record = read_json(path, "conversion record")
    files = record.get("files")
    if not isinstance(files, (dict, list)) or not all(isinstance(name, str) for name in files):
        raise InputError(f"{path}: no valid file list; remove it and the split files beside it")
    return record, set(files)


def is_up_to_date(out_dir: Path, old: dict | None, new: dict) -> bool:
    return (
        old is not None
        and old.get("status") == "complete"
        and old.get("fingerprint") == new["fingerprint"]
        and isinstance(old.get("files"), dict)
        and all(
            (out_dir / name).is_file() and (out_dir / name).stat().st_size == size
            for name, size in old["files"].items()
        )
    )


# --------------------------------------------------------------------------------------------
# Streaming copy
# --------------------------------------------------------------------------------------------
def read_block(path: Path, layout: str, start: int, stop: int) -> np.ndarray:
    """Copy prompts start:stop of a repository embedding file: (stop - start, K, D), file dtype.

    The map is opened per chunk and dropped after the copy, so pages read for one chunk leave the
    resident set before the next (a map held open would keep every page read so far resident).
    """
    mapped = np.load(path, mmap_mode="r", allow_pickle=False)
    block = np.array(mapped[start:stop] if layout == "nk" else mapped[:, start:stop])
    del mapped
    return block if layout == "nk" else block.transpose(1, 0, 2)


def copy_embeddings(plan: SetPlan, out_dir: Path, chunk_prompts: int) -> None:
    """Write the set's EMBD-*-split_{k}.npy files, sorted, one chunk of prompts at a time."""
    emb_pattern = FILE_PATTERNS[plan.kind][0]
    row_bytes = plan.dim * plan.dtype.itemsize
    # every split is renamed into place only if all chunks succeed
    with atomic_paths(*[out_dir / emb_pattern.format(k=k) for k in range(plan.n_responses)]) as split_paths:
        data_offsets = [  # each file created at full size (the maps close at once)
            np.lib.format.open_memmap(path, mode="w+", dtype=plan.dtype, shape=(plan.n_prompts, plan.dim)).offset
            for path in split_paths
        ]
        starts = range(0, plan.n_prompts, chunk_prompts)
        for start in progress(starts, f"convert {plan.kind}", unit="chunk"):
            stop = min(start + chunk_prompts, plan.n_prompts)
            block = read_block(plan.source.embd_path, plan.layout, start, stop)
            prompt_index = np.arange(stop - start)
            responses = plan.order[start:stop].T  # (K, c): file response of each split
            # Files are reopened per chunk: K may exceed the open-file limit (test sets have K=500).
            for path, offset, response in zip(split_paths, data_offsets, responses, strict=True):
                rows = block[prompt_index, response]  # fancy indexing: a new C-contiguous (c, D)
                if (problem := embedding_problem(rows)) is not None:
                    bad, what = problem
                    raise InputError(
                        f"{plan.source.embd_path}: {what} for prompt {start + bad}, response {response[bad]}"
                    )
                with open(path, "r+b") as handle:
                    handle.seek(offset + start * row_bytes)
                    handle.write(rows.data)
            del block, rows  # freed before the next chunk is mapped and copied


def convert(plans: list[SetPlan], staging: Path, record: dict, chunk_prompts: int | None) -> None:
    """Write this conversion into the empty folder ``staging`` (``data_folder.rewritten_data_dir``
    swaps it in whole, so a failure leaves the previous conversion as it was)."""
    for plan in plans:
        log.info(
            "%s: %s, %s layout, %d prompts x K=%d x D=%d %s%s",
            plan.kind,
            plan.source.embd_path,
            plan.layout,
            plan.n_prompts,
            plan.n_responses,
            plan.dim,
            plan.dtype,
            ", sorting responses by reward",
        )
        per_prompt = plan.n_responses * plan.dim * plan.dtype.itemsize
        copy_embeddings(plan, staging, chunk_prompts or max(1, CHUNK_BYTES // per_prompt))
        sorted_rewards = np.take_along_axis(plan.rewards, plan.order, axis=1)
        for k in range(plan.n_responses):
            write_rewards_jsonl(staging / FILE_PATTERNS[plan.kind][1].format(k=k), sorted_rewards[:, k])
    files = {name: (staging / name).stat().st_size for plan in plans for name in plan.output_names()}
    write_json(staging / CONVERSION_FILE, {**record, "files": files})


def main(argv=None) -> Path:
    args = parse_args(argv)
    setup_logging()
    sources = explicit_sources(args) if args.embd_file else discover_sources(args)
    plans = [plan_set(source, args) for source in sources]
    if len(plans) == 2 and plans[1].dim != plans[0].dim:
        raise InputError(
            f"{plans[1].source.embd_path}: D={plans[1].dim} differs from the training "
            f"embeddings' D={plans[0].dim} ({plans[0].source.embd_path.name})"
        )
    record = conversion_record(plans, args)
    out_dir = ensure_writable_dir(args.output_dir)
    with data_dir_claim(out_dir) as unused:  # no run_all.sh reads the folder meanwhile
        return write_conversion(args, plans, record, out_dir, in_use=args.in_use or not unused)


def write_conversion(args, plans: list[SetPlan], record: dict, out_dir: Path, in_use: bool) -> Path:
    """Convert into ``out_dir`` unless its conversion is up to date; with ``in_use`` (other runs
    read it), refuse to change it."""
    old, old_files = previous_conversion(out_dir)
    foreign = sorted({path.name for pattern in SPLIT_GLOBS for path in out_dir.glob(pattern)} - old_files)
    if foreign:
        raise InputError(
            f"--output_dir {out_dir} holds split files that no {CONVERSION_FILE} lists "
            f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); refusing to "
            f"overwrite them: choose another --output_dir or remove them"
        )
    summary = ", ".join(f"{plan.kind} {plan.n_prompts} prompts x K={plan.n_responses}" for plan in plans)
    if is_up_to_date(out_dir, old, record):
        print(
            f"{out_dir} is up to date ({summary}, D={plans[0].dim} {plans[0].dtype}; "
            f"{CONVERSION_FILE} matches the sources and options): nothing to do"
        )
        return out_dir
    if in_use:
        raise InputError(
            f"--output_dir {out_dir} must be converted again ({CONVERSION_FILE} does not match the sources and "
            f"options) but another run is reading it; wait for that run, or set another --output_dir"
        )
    needed = sum(plan.output_bytes() for plan in plans)
    available = shutil.disk_usage(out_dir).free
    if needed > available:
        raise InputError(
            f"--output_dir {out_dir}: the conversion needs up to {needed / 1e9:.2f} GB beside the old one "
            f"(which stays until the new one is complete), {available / 1e9:.2f} GB are free"
        )

    started = time.perf_counter()
    replaced = split_files("train", "test")
    with rewritten_data_dir(out_dir, lambda name: replaced(name) or name == CONVERSION_FILE) as staging:
        convert(plans, staging, record, args.chunk_prompts)
    seconds = time.perf_counter() - started
    copied = sum(plan.n_prompts * plan.n_responses * plan.dim * plan.dtype.itemsize for plan in plans)
    print(
        f"converted {summary}, D={plans[0].dim} {plans[0].dtype}: {copied / 1e9:.2f} GB in "
        f"{seconds:.1f} s ({copied / 1e6 / max(seconds, 1e-9):.0f} MB/s) -> {out_dir}"
    )
    return out_dir


if __name__ == "__main__":
    run_cli(main)
