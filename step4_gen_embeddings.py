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
run with more responses are removed.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from artifacts import atomic_paths, ensure_writable_dir, write_json
from cli import ArgumentParser, InputError, add_dtype_arg, finite_number, positive_int, run_cli, setup_logging
from data_folder import exclusive_rewrite, split_files
from llm_models import (
    POOLINGS,
    GenerationRun,
    add_generation_args,
    add_reward_model_args,
    check_rm_input_format,
    default_golden_rm,
    dtype_name,
    gguf_source,
    iter_embeddings,
    load_config,
    load_embedding_model,
    load_tokenizer,
    pick_device,
    pick_dtype,
    read_jsonl,
    resolve_model,
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
    parser.add_argument("--batch_size", type=positive_int, default=16, help="texts per forward pass")
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
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


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


def embed_into(paths, model, tokenizer, texts: list[str], args) -> tuple[int, int]:
    """Embed ``texts`` (prompt-major: text p*K + k is response k of prompt p) into K new .npy files
    of ``--embedding_dtype``.

    ``paths`` are the K target files; each is filled as a memory-mapped temporary beside it and
    renamed onto its target only when all K are complete. Returns (D, number of cut texts).
    """
    n_splits = len(paths)
    n_prompts = len(texts) // n_splits
    token_ids, truncated = tokenize_texts(tokenizer, texts, args.max_length, flag="--max_length", logger=log)
    dim = model.config.get_text_config().hidden_size
    with atomic_paths(*paths) as tmp_paths:
        splits = [
            np.lib.format.open_memmap(tmp, mode="w+", dtype=args.embedding_dtype, shape=(n_prompts, dim))
            for tmp in tmp_paths
        ]
        for rows, vectors in iter_embeddings(
            model, tokenizer, token_ids, args.batch_size, model.device, pooling=args.pooling
        ):
            prompt_of, split_of = np.divmod(rows, n_splits)
            for k in np.unique(split_of):
                chosen = split_of == k
                splits[k][prompt_of[chosen]] = vectors[chosen]
        for split in splits:
            split.flush()
        del splits  # close the memory maps before the temporary files are renamed
    return dim, int(truncated.sum())


def main(argv=None):
    args = parse_args(argv)
    setup_logging()
    run = GenerationRun.from_args(args)
    rm_name = args.reward_model or default_golden_rm(args.dataset, args.eval_dataset)

    # ---- inputs, checked before the model loads and the data directory is created ------------
    resolve_model(args.embed_model_name, "--embed_model_name")
    kinds = ("train", "test") if args.train_test == "both" else (args.train_test,)
    if args.train_test == "both" and not run.ranked_path("test", rm_name).is_file():
        log.info("no ranked test responses in %s; embedding train only", run.folder)
        kinds = ("train",)
    ranked = {kind: load_ranked(run.ranked_path(kind, rm_name), args.n_samples, args.rm_input_format) for kind in kinds}
    load_config(args.embed_model_name, "--embed_model_name")
    tokenizer = load_tokenizer(args.embed_model_name, "--embed_model_name")
    data_dir = ensure_writable_dir(args.data_dir, "--data_dir")

    # ---- model ------------------------------------------------------------------------------
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

    # ---- embed and write, one kind at a time, into a folder swapped in whole at the end --------
    summary = []
    replaced = split_files(*kinds)  # an earlier run's splits of these kinds go, whatever their number
    infos = [EMBEDDING_INFO_FILE.format(kind=kind) for kind in kinds]
    with exclusive_rewrite(data_dir, lambda name: replaced(name) or name in infos) as staging:
        for kind, (records, n_splits) in ranked.items():
            emb_pattern, reward_pattern = FILE_PATTERNS[kind]
            texts = [scored_text(r["query"], response) for r in records for response in r["responses_sorted"]]
            started = time.perf_counter()
            paths = [staging / emb_pattern.format(k=k) for k in range(n_splits)]
            dim, n_cut = embed_into(paths, model, tokenizer, texts, args)
            seconds = time.perf_counter() - started
            rewards = np.array([r["rewards_sorted"] for r in records], dtype=np.float64)
            n_empty = sum(not response for r in records for response in r["responses_sorted"])
            for k in range(n_splits):
                write_rewards_jsonl(staging / reward_pattern.format(k=k), rewards[:, k])
            write_json(
                staging / EMBEDDING_INFO_FILE.format(kind=kind),
                {
                    "embed_model_name": args.embed_model_name,
                    "embed_model_path": resolve_model(args.embed_model_name, "--embed_model_name"),
                    "gguf_file": gguf_source(resolve_model(args.embed_model_name, "--embed_model_name"))[1].get(
                        "gguf_file"
                    ),
                    "model_type": model.config.model_type,
                    "source": str(run.ranked_path(kind, rm_name)),
                    "reward_model": rm_name,
                    "generation_model": args.model_name,
                    "adapter_name": args.adapter_name,
                    "dataset": args.dataset,
                    "eval_dataset": args.eval_dataset,
                    "n_prompts": len(records),
                    "n_splits": n_splits,
                    "dim": dim,
                    "embedding_dtype": args.embedding_dtype,
                    "compute_dtype": dtype_name(dtype),
                    "rm_input_format": args.rm_input_format,
                    "n_empty_after_cut": n_empty,
                    "max_length": args.max_length,
                    "n_cut_at_max_length": n_cut,
                    "padding_side": tokenizer.padding_side,
                    "pooling": args.pooling,
                    "order": "ascending golden reward within each prompt",
                },
            )
            summary.append(
                f"{kind}: {len(records)} prompts x {n_splits} splits x D={dim}, {n_empty} responses "
                f"empty after the cut ({len(texts) / max(seconds, 1e-9):.1f} embeddings/s, "
                f"{dtype_name(dtype)} stored as {args.embedding_dtype})"
            )
    print(f"step4: {'; '.join(summary)} -> {data_dir}")


if __name__ == "__main__":
    run_cli(main)
