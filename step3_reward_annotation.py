"""Step 3 (GPU): score every generated response with the golden reward model.

    python3 step3_reward_annotation.py --adapter_name sft --model_name gemma2b \\
        --dataset hh-rlhf-helpful-gpt4 --eval_dataset hh-rlhf-helpful --data_class train --n_samples 10

Reads step 2's ``{gen_dir}/{data_class}_part{k}.jsonl`` (shard ``--shard_index k``, alias ``--split``,
or ``all``; in a SLURM job array the array task picks k) and writes
``{gen_dir}/{data_class}_part{k}.scored_{rm}.jsonl``: query, id, the responses cut at their first
"\\n\\nHuman", their rewards (same order as step 2's response_i), the input format, label and dtype,
and the counts of responses cut at ``--max_length`` or empty after the cut. The golden RM defaults
to the paper's for the task; what it reads (``--rm_input_format``), ``--reward_label`` and its
float32 score head: docs/gpu_steps.md. Each prompt's responses are batched among themselves, longest
first, so a reward does not depend on the shard layout.
"""

from __future__ import annotations

import interrupts  # noqa: F401  (first: signals are handled from here on, before the heavy imports)

# isort: split
import logging
import time

import numpy as np
import torch

from artifacts import ensure_writable_dir, read_json, remove_leftover_temps
from cli import ArgumentParser, InputError, add_dtype_arg, positive_int, run_cli, setup_logging
from llm_models import (
    GenerationRun,
    add_generation_args,
    add_reward_model_args,
    add_shard_args,
    cut_response,
    default_golden_rm,
    dtype_name,
    iter_length_batches,
    load_config,
    load_reward_model,
    load_tokenizer,
    pick_device,
    pick_dtype,
    read_jsonl,
    resolve_model,
    resolve_shard,
    reward_label_index,
    rewards_from_logits,
    rm_texts,
    tokenize_texts,
    write_jsonl,
)

log = logging.getLogger("step3_reward_annotation")


def build_parser() -> ArgumentParser:
    """The flags: each setting's one home (run_all.sh's variables set them: settings.py)."""
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_generation_args(parser)
    parser.add_argument("--data_class", choices=("train", "test"), default="train", help="which generations")
    add_shard_args(parser, index_default=0, count_default=None, all_ok=True)
    parser.add_argument(
        "--n_samples",
        type=positive_int,
        help="expected responses per prompt (checked against the file; default: as generated)",
    )
    add_reward_model_args(parser)
    parser.add_argument(
        "--reward_label",
        help="for a golden RM with several labels: the label (index or name) whose log-odds is the reward",
    )
    add_dtype_arg(parser)
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
        help="tokens per scored text; longer texts are cut at the end and counted",
    )
    return parser


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    resolve_shard(args)
    return args


def load_samples(path, n_expected: int | None) -> tuple[list[dict], int]:
    """Step 2 records of one part and their common number of responses (0 for an empty part)."""
    if not path.is_file():
        raise InputError(f"no generations at {path} (run step2_gen_sample.py with the same flags first)")
    records = read_jsonl(path)
    if not records:  # a part whose prompts were all over-length (or tiny runs with fewer prompts than parts)
        return [], 0
    counts = set()
    for line, record in enumerate(records, start=1):
        n = sum(key.startswith("response_") for key in record)
        if any(f"response_{i}" not in record for i in range(n)):
            raise InputError(f"{path} line {line}: response keys are not response_0..response_{{n-1}}")
        counts.add(n)
        if not isinstance(record.get("query"), str) or "id" not in record:
            raise InputError(f"{path} line {line}: expected keys query and id")
    if len(counts) != 1 or 0 in counts:
        raise InputError(f"{path}: records hold different or zero response counts {sorted(counts)}")
    n = counts.pop()
    if n_expected is not None and n != n_expected:
        raise InputError(f"--n_samples {n_expected}: {path} holds {n} responses per prompt")
    return records, n


def check_num_shards(run: GenerationRun, data_class: str, parts: list[int], num_shards: int | None) -> None:
    """``--num_shards``, when given, must be the shard count step 2 cut the prompts into."""
    for part in parts:
        summary = run.summary_path(data_class, part)
        if num_shards is None or not summary.is_file():
            continue
        written = read_json(summary, "step 2 summary").get("num_shards")
        if written != num_shards:
            raise InputError(
                f"--num_shards {num_shards}: {summary.name} is shard {part} of {written} "
                "(run step 2 and step 3 with the same --num_shards)"
            )


def load_parts(run: GenerationRun, args, parts: list[int]) -> tuple[dict[int, tuple[list[dict], int]], int]:
    """Step 2's records of each part with their response count, and the count all non-empty parts
    share (InputError when no part holds responses or the parts' counts differ)."""
    samples = {part: load_samples(run.samples_path(args.data_class, part), args.n_samples) for part in parts}
    if not any(records for records, _ in samples.values()):
        raise InputError(f"no generated responses in {run.folder} for --shard_index {args.shard_index}")
    n_per_prompt = {n for records, n in samples.values() if records}
    if len(n_per_prompt) > 1:
        raise InputError(f"parts {parts} hold different response counts {sorted(n_per_prompt)}; score them one by one")
    return samples, n_per_prompt.pop()


def cut_samples(samples: dict[int, tuple[list[dict], int]]) -> tuple[list[str], dict[int, list[list[str]]]]:
    """The query of every response (prompt-major, parts in order) and each part's responses cut at
    their first "\\n\\nHuman", one row per record."""
    queries, cut_rows = [], {}
    for part, (records, n) in samples.items():
        cut_rows[part] = [[cut_response(r[f"response_{i}"]) for i in range(n)] for r in records]
        queries += [r["query"] for r in records for _ in range(n)]
    return queries, cut_rows


def rm_tokenizer(rm_name: str, rm_input_format: str):
    """The reward model's tokenizer; ``--rm_input_format chat_template`` needs it to have a template."""
    tokenizer = load_tokenizer(rm_name, "--reward_model")
    if rm_input_format == "chat_template" and not tokenizer.chat_template:
        raise InputError(
            f"--rm_input_format chat_template: the tokenizer of {rm_name} has no chat template "
            "(use --rm_input_format raw)"
        )
    return tokenizer


def score(model, tokenizer, token_ids, label, batch_size: int, device, group_size: int) -> np.ndarray:
    """float32 reward of each tokenized text, batched within groups of ``group_size`` (one prompt's
    responses), longest first."""
    rewards = np.empty(len(token_ids), dtype=np.float32)
    with torch.inference_mode():
        for rows, batch in iter_length_batches(
            token_ids,
            tokenizer.pad_token_id,
            tokenizer.padding_side,
            batch_size,
            device,
            desc="scoring",
            group_size=group_size,
        ):
            rewards[rows] = rewards_from_logits(model(**batch).logits, label).cpu().numpy()
    return rewards


def write_scored(run, args, rm_name: str, samples: dict, cut_rows: dict, rm_fields: dict, rewards, truncated) -> None:
    """One scored file per part: each record's cut responses, their rewards and counts, with
    ``rm_fields`` (the reward model's settings); ``rewards`` and ``truncated`` are prompt-major."""
    position = 0
    for part, (records, n) in samples.items():
        scored = []
        for record, cut_row in zip(records, cut_rows[part]):
            scored.append(
                {
                    "query": record["query"],
                    "id": record["id"],
                    "responses": cut_row,
                    "rewards": rewards[position : position + n].tolist(),
                    **rm_fields,
                    "n_cut_at_max_length": int(truncated[position : position + n].sum()),
                    "n_empty_after_cut": sum(not cut for cut in cut_row),
                    "settings": record.get("settings", {}),
                }
            )
            position += n
        write_jsonl(run.scored_path(args.data_class, part, rm_name), scored)


def main(argv=None):
    args = parse_args(argv)
    setup_logging()
    run = GenerationRun.from_args(args)
    rm_name = args.reward_model or default_golden_rm(args.dataset, args.eval_dataset)

    # ---- inputs, checked before the model loads ---------------------------------------------
    resolve_model(rm_name, "--reward_model")
    parts = run.parts_present(args.data_class) if args.shard_index == "all" else [args.shard_index]
    if not parts:
        raise InputError(f"no {args.data_class}_part*.jsonl in {run.folder} (run step2_gen_sample.py first)")
    ensure_writable_dir(run.folder, "--output_dir")
    check_num_shards(run, args.data_class, parts, args.num_shards)
    samples, n_per_prompt = load_parts(run, args, parts)
    for part in parts:  # what a shard killed mid-write left behind
        remove_leftover_temps(run.folder, [run.scored_path(args.data_class, part, rm_name).name])
    queries, cut_rows = cut_samples(samples)
    cuts = [cut for rows in cut_rows.values() for row in rows for cut in row]
    label = reward_label_index(load_config(rm_name, "--reward_model"), rm_name, "--reward_model", args.reward_label)
    tokenizer = rm_tokenizer(rm_name, args.rm_input_format)

    # ---- score ------------------------------------------------------------------------------
    device = pick_device()
    dtype = pick_dtype(device, requested=args.dtype)
    model = load_reward_model(rm_name, "--reward_model", device, dtype, tokenizer)
    texts = rm_texts(tokenizer, queries, cuts, args.rm_input_format)
    token_ids, truncated = tokenize_texts(
        tokenizer, texts, args.max_length, args.rm_input_format == "raw", "--max_length", log
    )
    n_empty = sum(not cut for cut in cuts)
    if n_empty:
        log.warning(
            '%d of %d responses are empty once cut at the first "\\n\\nHuman"; each is scored as its bare prompt',
            n_empty,
            len(cuts),
        )
    started = time.perf_counter()
    rewards = score(model, tokenizer, token_ids, label, args.batch_size, device, n_per_prompt)
    seconds = time.perf_counter() - started
    if not np.isfinite(rewards).all():
        raise RuntimeError(f"{rm_name} returned non-finite rewards; check the model and --max_length")

    # ---- write one scored file per part -----------------------------------------------------
    rm_fields = {
        "reward_model": rm_name,
        "rm_input_format": args.rm_input_format,
        "reward_label": label,
        "rm_dtype": dtype_name(dtype),
        "rm_max_length": args.max_length,
    }
    write_scored(run, args, rm_name, samples, cut_rows, rm_fields, rewards, truncated)
    print(
        f"step3: {len(texts)} responses of {sum(len(r) for r, _ in samples.values())} prompts scored by "
        f"{rm_name} ({args.data_class}, part(s) {','.join(map(str, parts))}, {args.rm_input_format} input, "
        f"{dtype_name(dtype)}); {n_empty} empty after the cut; mean reward "
        f"{rewards.mean():.4f}; {len(texts) / max(seconds, 1e-9):.1f} texts/s"
    )


if __name__ == "__main__":
    run_cli(main)
