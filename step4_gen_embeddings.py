"""Step 4 (GPU): embed every scored response and write the data directory that steps 5-8 read.

    python3 step4_gen_embeddings.py --embed_model_name gemma2b --dataset hh-rlhf-helpful-gpt4 \\
        --gen_pref_model_name gemma2b --train_test train --n_samples 10 --data_dir data

Reads step 3.5's ``{gen_dir}/{data_class}_ranked_{rm}.jsonl`` (``--train_test train``, ``test`` or
``both``: train, plus test when it was generated) and embeds the raw hh-rlhf text step 3 scored
(``llm_models.scored_text``) as docs/gpu_steps.md describes: the final hidden state at the
last real token, whatever the padding side (the original code took position -1 after right padding, a pad
token), or with ``--pooling mean`` its masked mean over the real tokens (for encoders such as BERT).
``--embed_model_name`` may also be a local ``.gguf`` file (needs the ``gguf`` package).
Writes README's "Data format" into ``--data_dir`` (row p of split k is the k-th
lowest-reward response of prompt p) and ``embedding_info_{train,test}.json``, where the data came
from. Embeddings are filled into memory-mapped temporary files (a 500-response test set does not fit
in memory) renamed into place only once every split is complete; splits left over from an earlier
run with more responses are removed. Each prompt's responses are embedded in batches of their own, so
an embedding does not depend on the other prompts of the run.

Shards (docs/gpu_steps.md, "Shards on a cluster"): with ``--shard_index i --num_shards n`` (or a SLURM
job array) the run embeds only prompts ``[N*i//n, N*(i+1)//n)`` of each ranked file into
``{gen_dir}/{kind}_embd_{model}.shard{i}of{n}.npy`` (rows, K, D) and its ``.json`` record, written
last (a shard whose record says it was made with these settings is kept, not embedded again, so a
resubmitted array or an interrupted run resumes); ``--merge --num_shards n`` with the same flags
checks that every shard is there, finished and made with these settings from this ranked file, and
writes the data directory byte for byte as one unsharded run would.
"""

from __future__ import annotations

import interrupts  # noqa: F401  (first: signals are handled from here on, before the heavy imports)

# isort: split
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from artifacts import (
    atomic_path,
    atomic_paths,
    ensure_writable_dir,
    file_sha256,
    read_json,
    remove_leftover_temps,
    write_json,
)
from cli import ArgumentParser, InputError, add_dtype_arg, finite_number, positive_int, run_cli, setup_logging
from data_folder import exclusive_rewrite, split_files
from llm_models import (
    POOLINGS,
    GenerationRun,
    add_generation_args,
    add_reward_model_args,
    add_shard_args,
    check_rm_input_format,
    default_golden_rm,
    dtype_name,
    gguf_source,
    iter_embeddings,
    load_config,
    load_embedding_model,
    load_tokenizer,
    model_tag,
    part_bounds,
    pick_device,
    pick_dtype,
    read_jsonl,
    resolve_model,
    resolve_shard,
    scored_text,
    tokenize_texts,
)
from rm_data import EMBEDDING_INFO_FILE, FILE_PATTERNS, write_rewards_jsonl

log = logging.getLogger("step4_gen_embeddings")


def build_parser() -> ArgumentParser:
    """The flags: each setting's one home (run_all.sh's variables set them: settings.py)."""
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_generation_args(parser, model_aliases=("--gen_pref_model_name",))
    parser.add_argument(
        "--embed_model_name",
        default="gemma2b",
        help="embedding model: gemma2b, gemma7b, llama38b, a local folder or a hub id",
    )
    parser.add_argument(
        "--train_test",
        choices=("train", "test", "both"),
        default="both",
        help="which responses to embed (both: train, and test when step 3.5 wrote it)",
    )
    add_reward_model_args(parser)
    parser.add_argument(
        "--n_samples",
        type=positive_int,
        help="expected responses per prompt (checked; default: as ranked)",
    )
    parser.add_argument("--data_dir", default="data", help="data directory for steps 5-8")
    parser.add_argument(
        "--batch_size",
        type=positive_int,
        default=16,
        help="texts per forward pass, all of one prompt (a prompt's responses are batched alone)",
    )
    parser.add_argument(
        "--max_length",
        type=positive_int,
        default=1024,
        help="tokens per text; longer texts are cut at the end and counted",
    )
    parser.add_argument(
        "--pooling",
        choices=POOLINGS,
        default="last",
        help="last: the final hidden state at the last real token (the paper's, for causal LMs); "
        "mean: its attention-mask-weighted mean over the real tokens (for encoders such as all-MiniLM-L6-v2)",
    )
    parser.add_argument(
        "--embedding_dtype", choices=("float32", "float16"), default="float32", help="dtype of the stored embeddings"
    )
    add_dtype_arg(parser)
    add_shard_args(parser, index_default=None, count_default=None, all_ok=False)
    parser.add_argument(
        "--merge",
        action="store_true",
        help="merge the --num_shards shards' embeddings into --data_dir (same flags as the shards; no model runs)",
    )
    return parser


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if args.merge:
        args.shard_index = None  # an array task's index means nothing to the one merge job
        if args.num_shards is None:
            raise InputError("--merge needs --num_shards (the shards' count)")
    else:
        resolve_shard(args)
        if args.shard_index is not None and args.num_shards is None:
            raise InputError(f"--shard_index {args.shard_index} needs --num_shards")
    return args


def load_ranked(path, n_expected: int | None, rm_input_format: str) -> tuple[list[dict], int]:
    """Step 3.5's records and their common number of responses K, checked sorted ascending."""
    if not path.is_file():
        raise InputError(f"no ranked responses at {path} (run step3.5_processing_data.py first)")
    records = read_jsonl(path)
    if not records:
        raise InputError(f"{path}: no records")
    for line, record in enumerate(records, start=1):
        responses, rewards = record.get("responses_sorted"), record.get("rewards_sorted")
        if (
            not isinstance(record.get("query"), str)
            or not isinstance(responses, list)
            or not isinstance(rewards, list)
            or len(responses) != len(rewards)
        ):
            raise InputError(
                f"{path} line {line}: expected query, responses_sorted and rewards_sorted "
                "of equal length (a step 3.5 file)"
            )
        if not all(map(finite_number, rewards)) or any(a > b for a, b in zip(rewards, rewards[1:])):
            raise InputError(
                f"{path} line {line}: rewards_sorted must be finite and ascending (rerun step3.5_processing_data.py)"
            )
        check_rm_input_format(record, path, line, rm_input_format)
        n = len(records[0]["rewards_sorted"])  # line 1 is checked by now
        if len(rewards) != n:
            raise InputError(f"{path} line {line}: {len(rewards)} responses, line 1 has {n}")
    if n < 2:
        raise InputError(f"{path}: need at least 2 responses per prompt for the data directory, found {n}")
    if n_expected is not None and n != n_expected:
        raise InputError(f"--n_samples {n_expected}: {path} holds {n} responses per prompt")
    return records, n


def fill_embeddings(splits: list[np.ndarray], model, tokenizer, texts: list[str], args) -> int:
    """Embed ``texts`` (prompt-major: text p*K + k is response k of prompt p) into the K arrays
    ``splits`` (each (P, D), row p = prompt p), each prompt's responses batched among themselves.
    Returns the number of texts cut at ``--max_length``."""
    n_splits = len(splits)
    token_ids, truncated = tokenize_texts(tokenizer, texts, args.max_length, flag="--max_length", logger=log)
    for rows, vectors in iter_embeddings(
        model, tokenizer, token_ids, args.batch_size, model.device, pooling=args.pooling, group_size=n_splits
    ):
        prompt_of, split_of = np.divmod(rows, n_splits)
        for k in np.unique(split_of):
            chosen = split_of == k
            splits[k][prompt_of[chosen]] = vectors[chosen]
    return int(truncated.sum())


@contextmanager
def open_splits(paths: list[Path], n_prompts: int, dim: int, dtype: str) -> Iterator[list[np.ndarray]]:
    """K split arrays (n_prompts, dim) to fill: memory-mapped temporaries beside their targets, renamed
    into place only when the block completes."""
    with atomic_paths(*paths) as tmp_paths:
        splits = [np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(n_prompts, dim)) for tmp in tmp_paths]
        yield splits
        for split in splits:
            split.flush()
        del splits  # close the memory maps before the temporary files are renamed


def shard_files(run: GenerationRun, kind: str, embed_model_name: str, shard: int, num_shards: int) -> tuple[Path, Path]:
    """A shard's embeddings (rows, K, D) and its record (written last: it marks the shard finished)."""
    stem = f"{kind}_embd_{model_tag(embed_model_name)}.shard{shard}of{num_shards}"
    return run.folder / f"{stem}.npy", run.folder / f"{stem}.json"


def embedding_settings(args, run: GenerationRun, rm_name: str, kind: str, config, tokenizer, records) -> dict:
    """``embedding_info_{kind}.json`` but for the compute dtype and the count of cut texts: what a
    shard must share with the merge that takes it."""
    embed_path = resolve_model(args.embed_model_name, "--embed_model_name")
    return {
        "embed_model_name": args.embed_model_name,
        "embed_model_path": embed_path,
        "gguf_file": gguf_source(embed_path)[1].get("gguf_file"),
        "model_type": config.model_type,
        "source": str(run.ranked_path(kind, rm_name)),
        "reward_model": rm_name,
        "generation_model": args.model_name,
        "adapter_name": args.adapter_name,
        "dataset": args.dataset,
        "eval_dataset": args.eval_dataset,
        "n_prompts": len(records),
        "n_splits": len(records[0]["rewards_sorted"]),
        "dim": config.get_text_config().hidden_size,
        "embedding_dtype": args.embedding_dtype,
        "rm_input_format": args.rm_input_format,
        "n_empty_after_cut": sum(not response for r in records for response in r["responses_sorted"]),
        "max_length": args.max_length,
        "padding_side": tokenizer.padding_side,
        "pooling": args.pooling,
        "order": "ascending golden reward within each prompt",
    }


# What only shards record: the merge compares these too (the batch size changes a forward pass's bits).
def shard_only_settings(args, run: GenerationRun, rm_name: str, kind: str) -> dict:
    return {
        "ranked_sha256": file_sha256(run.ranked_path(kind, rm_name)),
        "batch_size": args.batch_size,
        "num_shards": args.num_shards,
    }


def finished_shard(npy: Path, record_path: Path, settings: dict, compute_dtype: str) -> bool:
    """Whether the shard's files are there and its record says it was made with ``settings`` in
    ``compute_dtype`` (the merge still checks the array itself)."""
    if not (npy.is_file() and record_path.is_file()):
        return False
    record = read_json(record_path, "step 4 shard record")
    return record.get("compute_dtype") == compute_dtype and {key: record.get(key) for key in settings} == settings


def embed_shard(run, kind, records, settings: dict, compute_dtype: str, model, tokenizer, args) -> str:
    """Embed this shard's prompts of ``kind`` into its own files; returns a summary line."""
    npy, record_path = shard_files(run, kind, args.embed_model_name, args.shard_index, args.num_shards)
    if finished_shard(npy, record_path, settings, compute_dtype):  # a resubmitted array task, a resumed build
        return f"{kind}: shard {args.shard_index} of {args.num_shards} was embedded with these settings (kept)"
    record_path.unlink(missing_ok=True)  # the record marks a finished shard: none until this one is
    remove_leftover_temps(run.folder, [npy.name, record_path.name])
    start, stop = part_bounds(len(records), args.num_shards, args.shard_index)
    n_splits, dim = settings["n_splits"], settings["dim"]
    texts = [scored_text(r["query"], response) for r in records[start:stop] for response in r["responses_sorted"]]
    n_cut = 0
    with atomic_path(npy) as tmp:
        if texts:
            array = np.lib.format.open_memmap(
                tmp, mode="w+", dtype=args.embedding_dtype, shape=(stop - start, n_splits, dim)
            )
            n_cut = fill_embeddings([array[:, k] for k in range(n_splits)], model, tokenizer, texts, args)
            array.flush()
            del array
        else:  # an empty memory map cannot be opened (and np.save given a name would append ".npy")
            with open(tmp, "wb") as handle:
                np.save(handle, np.empty((0, n_splits, dim), dtype=args.embedding_dtype), allow_pickle=False)
    write_json(
        record_path,
        {**settings, "compute_dtype": compute_dtype, "shard_index": args.shard_index, "rows": [start, stop],
         "n_cut_at_max_length": n_cut},
    )  # fmt: skip
    prompts = f"prompts {start}..{stop - 1}" if stop > start else "no prompts"
    return f"{kind}: shard {args.shard_index} of {args.num_shards}, {prompts} -> {npy.name}"


def check_shards(run, kind: str, settings: dict, args) -> tuple[list[tuple[Path, int, int]], str, int]:
    """Every shard of ``kind`` present, finished and made with ``settings``, else InputError naming the
    first bad one. Returns [(file, start, stop)], their compute dtype and their count of cut texts."""
    shards, compute_dtypes, n_cut = [], set(), 0
    for shard in range(args.num_shards):
        npy, record_path = shard_files(run, kind, args.embed_model_name, shard, args.num_shards)
        rerun = f"(run step4_gen_embeddings.py --shard_index {shard} --num_shards {args.num_shards} with these flags)"
        if not record_path.is_file():
            state = "did not finish" if npy.is_file() else "is missing"
            raise InputError(f"step 4 {kind} shard {shard} of {args.num_shards} {state}: no {record_path} {rerun}")
        record = read_json(record_path, "step 4 shard record")
        found = {key: record.get(key) for key in settings}
        if found != settings:
            diff = ", ".join(f"{k} {found[k]!r} (this merge: {v!r})" for k, v in settings.items() if found[k] != v)
            raise InputError(
                f"step 4 {kind} shard {shard}: {record_path.name} was made with other settings or inputs: {diff}"
            )
        start, stop = part_bounds(settings["n_prompts"], args.num_shards, shard)
        shape = (stop - start, settings["n_splits"], settings["dim"])
        try:
            array = np.load(npy, mmap_mode="r")
        except (OSError, ValueError):
            array = None
        if (
            record.get("rows") != [start, stop]
            or array is None
            or array.shape != shape
            or array.dtype != args.embedding_dtype
        ):
            raise InputError(
                f"step 4 {kind} shard {shard}: {npy.name} is not the {shape} {args.embedding_dtype} array "
                f"its record promises {rerun}"
            )
        shards.append((npy, start, stop))
        compute_dtypes.add(record.get("compute_dtype"))
        n_cut += int(record.get("n_cut_at_max_length", 0))
    if len(compute_dtypes) != 1:
        raise InputError(
            f"step 4 {kind}: the shards were computed in different dtypes {sorted(map(str, compute_dtypes))}"
        )
    return shards, compute_dtypes.pop(), n_cut


def copy_shards(splits: list[np.ndarray], shards: list[tuple[Path, int, int]]) -> None:
    for npy, start, stop in shards:
        array = np.load(npy, mmap_mode="r")
        for k, split in enumerate(splits):
            split[start:stop] = array[:, k]


def kinds_to_embed(run: GenerationRun, rm_name: str, train_test: str) -> tuple[str, ...]:
    """The kinds ``--train_test`` names; for both, train alone when step 3.5 ranked no test responses."""
    if train_test != "both":
        return (train_test,)
    if not run.ranked_path("test", rm_name).is_file():
        log.info("no ranked test responses in %s; embedding train only", run.folder)
        return ("train",)
    return ("train", "test")


def load_embedder(args, tokenizer) -> tuple[object, str]:
    """The embedding model on the device picked, and its compute dtype's name."""
    device = pick_device()
    dtype = pick_dtype(device, requested=args.dtype)
    model = load_embedding_model(args.embed_model_name, "--embed_model_name", device, dtype)
    log.info(
        "embedding with %s on %s in %s (padding side %s, %s pooling)",
        args.embed_model_name,
        device,
        dtype,
        tokenizer.padding_side,
        args.pooling,
    )
    return model, dtype_name(dtype)


def write_kind(staging: Path, kind: str, records, settings: dict, compute_dtype, n_cut: int, how: str, args) -> str:
    """The rewards of ``kind``'s K splits and its ``embedding_info_{kind}.json`` (the settings but
    what only shards record); returns a summary line."""
    _, reward_pattern = FILE_PATTERNS[kind]
    n_splits = settings["n_splits"]
    rewards = np.array([r["rewards_sorted"] for r in records], dtype=np.float64)
    for k in range(n_splits):
        write_rewards_jsonl(staging / reward_pattern.format(k=k), rewards[:, k])
    skipped = ("ranked_sha256", "batch_size", "num_shards")
    info = {key: value for key, value in settings.items() if key not in skipped}
    write_json(
        staging / EMBEDDING_INFO_FILE.format(kind=kind),
        {**info, "compute_dtype": compute_dtype, "n_cut_at_max_length": n_cut},
    )
    return (
        f"{kind}: {len(records)} prompts x {n_splits} splits x D={settings['dim']}, {info['n_empty_after_cut']} "
        f"responses empty after the cut ({how}, {compute_dtype} stored as {args.embedding_dtype})"
    )


def write_data_dir(data_dir: Path, ranked: dict, settings: dict, merged: dict, embedder, args) -> list[str]:
    """README's data directory for each kind of ``ranked``: embedded by ``embedder`` (model,
    tokenizer, compute dtype) or, with ``--merge``, copied from the checked shards of ``merged``.
    Written into a folder swapped in whole at the end (data_folder.py); an earlier run's splits of
    these kinds go, whatever their number. Returns a summary line per kind."""
    model, tokenizer, compute_dtype = embedder
    replaced = split_files(*ranked)
    infos = [EMBEDDING_INFO_FILE.format(kind=kind) for kind in ranked]
    summary = []
    with exclusive_rewrite(data_dir, lambda name: replaced(name) or name in infos) as staging:
        for kind, (records, n_splits) in ranked.items():
            emb_pattern, _ = FILE_PATTERNS[kind]
            started = time.perf_counter()
            paths = [staging / emb_pattern.format(k=k) for k in range(n_splits)]
            with open_splits(paths, len(records), settings[kind]["dim"], args.embedding_dtype) as splits:
                if args.merge:
                    shards, compute_dtype, n_cut = merged[kind]
                    copy_shards(splits, shards)
                else:
                    texts = [scored_text(r["query"], answer) for r in records for answer in r["responses_sorted"]]
                    n_cut = fill_embeddings(splits, model, tokenizer, texts, args)
                del splits  # close the memory maps before the temporary files are renamed
            seconds = time.perf_counter() - started
            how = (
                f"merged from {args.num_shards} shards"
                if args.merge
                else f"{len(records) * n_splits / max(seconds, 1e-9):.1f} embeddings/s"
            )
            summary.append(write_kind(staging, kind, records, settings[kind], compute_dtype, n_cut, how, args))
    return summary


def main(argv=None):
    args = parse_args(argv)
    setup_logging()
    run = GenerationRun.from_args(args)
    rm_name = args.reward_model or default_golden_rm(args.dataset, args.eval_dataset)
    sharded = args.shard_index is not None

    # ---- inputs, checked before the model loads and the data directory is created ------------
    resolve_model(args.embed_model_name, "--embed_model_name")
    kinds = kinds_to_embed(run, rm_name, args.train_test)
    ranked = {kind: load_ranked(run.ranked_path(kind, rm_name), args.n_samples, args.rm_input_format) for kind in kinds}
    config = load_config(args.embed_model_name, "--embed_model_name")
    tokenizer = load_tokenizer(args.embed_model_name, "--embed_model_name")
    settings = {
        kind: embedding_settings(args, run, rm_name, kind, config, tokenizer, ranked[kind][0]) for kind in kinds
    }
    if sharded or args.merge:
        for kind in kinds:
            settings[kind].update(shard_only_settings(args, run, rm_name, kind))
    merged = {kind: check_shards(run, kind, settings[kind], args) for kind in kinds} if args.merge else {}
    data_dir = ensure_writable_dir(
        run.folder if sharded else args.data_dir, "--output_dir" if sharded else "--data_dir"
    )

    # ---- model (none for a merge) ------------------------------------------------------------
    model, compute_dtype = (None, None) if args.merge else load_embedder(args, tokenizer)

    # ---- embed (or merge) and write, one kind at a time ------------------------------------
    # A data directory is written into a folder swapped in whole at the end; a shard's part files
    # go to the run folder, each atomically.
    if sharded:
        summary = [
            embed_shard(run, kind, records, settings[kind], compute_dtype, model, tokenizer, args)
            for kind, (records, _) in ranked.items()
        ]
    else:
        summary = write_data_dir(data_dir, ranked, settings, merged, (model, tokenizer, compute_dtype), args)
    print(f"step4: {'; '.join(summary)} -> {data_dir}")


if __name__ == "__main__":
    run_cli(main)
