"""Step 3.5: merge the scored parts and sort each prompt's responses ascending by golden reward.

    python3 step3.5_processing_data.py --output_dir distill_out --model_name gemma2b \\
        --dataset hh-rlhf-helpful-gpt4 --eval_dataset hh-rlhf-helpful

For each data class (``--data_class train``, ``test`` or ``both``: every class step 3 scored), reads
``{gen_dir}/{data_class}_part{k}.scored_{rm}.jsonl`` for all parts present, in part order, and writes
``{gen_dir}/{data_class}_ranked_{rm}.jsonl``: one line per prompt with ``responses_sorted`` and
``rewards_sorted`` (ascending; position k is rank split k, so split 0 is the worst response and
split K-1 the best, README "Data format") and ``original_index`` (each one's response_i in step 2).
Ties keep step 2's order (stable sort). Every scored record must carry ``--rm_input_format``
(records without one were scored raw); the format is copied into the ranked records. The output
depends on the inputs alone and replaces the file atomically, so a rerun leaves identical bytes.
"""

from __future__ import annotations

import interrupts  # noqa: F401  (first: signals are handled from here on, before the heavy imports)

# isort: split
import logging

import numpy as np

from artifacts import read_json
from cli import ArgumentParser, InputError, finite_number, positive_int, run_cli, setup_logging
from llm_models import (
    GenerationRun,
    add_generation_args,
    add_reward_model_args,
    check_rm_input_format,
    default_golden_rm,
    numbered_jsonl,
    write_jsonl,
)

log = logging.getLogger("step3.5_processing_data")


def build_parser() -> ArgumentParser:
    """The flags: each setting's one home (run_all.sh's variables set them: settings.py)."""
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_generation_args(parser)
    parser.add_argument(
        "--data_class",
        choices=("train", "test", "both"),
        default="both",
        help="which scored generations to process (both: every class present)",
    )
    add_reward_model_args(parser)
    parser.add_argument(
        "--n_samples",
        type=positive_int,
        help="expected responses per prompt (checked; default: as scored)",
    )
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def check_scored(record: dict, path, line: int) -> int:
    """Validate one step-3 record; return its number of responses."""
    responses, rewards = record.get("responses"), record.get("rewards")
    if not isinstance(record.get("query"), str) or not isinstance(responses, list) or not isinstance(rewards, list):
        raise InputError(f"{path} line {line}: expected keys query, responses and rewards (a step-3 file)")
    if len(responses) != len(rewards) or not rewards:
        raise InputError(f"{path} line {line}: {len(responses)} responses but {len(rewards)} rewards")
    if not all(map(finite_number, rewards)):
        raise InputError(f"{path} line {line}: rewards must be finite numbers")
    return len(rewards)


def rank_class(
    run: GenerationRun, data_class: str, rm_name: str, n_expected: int | None, rm_input_format: str
) -> tuple[list[dict], list]:
    """Sorted records of every scored part of ``data_class``, in part order."""
    scored_parts = run.parts_present(data_class, rm_name)
    unscored = sorted(set(run.parts_present(data_class)) - set(scored_parts))
    if unscored:
        raise InputError(
            f"{run.samples_path(data_class, unscored[0])} has no scores by {rm_name} "
            f"(run step3_reward_annotation.py --data_class {data_class} --split {unscored[0]})"
        )
    summary = run.summary_path(data_class, scored_parts[0])
    n_parts = read_json(summary, "step 2 summary").get("n_parts") if summary.is_file() else None
    if n_parts is not None and scored_parts != list(range(n_parts)):
        log.warning("%s: only parts %s of %d were generated and scored", data_class, scored_parts, n_parts)
    ranked, counts = [], set()
    for part in scored_parts:
        path = run.scored_path(data_class, part, rm_name)
        for line, record in numbered_jsonl(path):
            counts.add(check_scored(record, path, line))
            check_rm_input_format(record, path, line, rm_input_format)
            rewards = np.asarray(record["rewards"], dtype=np.float64)
            order = np.argsort(rewards, kind="stable")
            ranked.append(
                {
                    "query": record["query"],
                    "id": record.get("id"),
                    "part": part,
                    "responses_sorted": [record["responses"][i] for i in order],
                    "rewards_sorted": rewards[order].tolist(),
                    "original_index": order.tolist(),
                    "reward_model": rm_name,
                    "rm_input_format": rm_input_format,
                    "rm_dtype": record.get("rm_dtype"),
                    "n_empty_after_cut": sum(not r for r in record["responses"]),
                }
            )
    if not ranked:
        raise InputError(f"{data_class}: the scored parts {scored_parts} in {run.folder} hold no prompts")
    if len(counts) != 1:
        raise InputError(
            f"{data_class}: scored prompts hold different response counts {sorted(counts)} "
            f"in parts {scored_parts}; regenerate them with one --n_samples"
        )
    if n_expected is not None and counts != {n_expected}:
        raise InputError(f"--n_samples {n_expected}: {data_class} prompts hold {counts.pop()} responses")
    return ranked, scored_parts


def main(argv=None):
    args = parse_args(argv)
    setup_logging()
    run = GenerationRun.from_args(args)
    rm_name = args.reward_model or default_golden_rm(args.dataset, args.eval_dataset)

    classes = ("train", "test") if args.data_class == "both" else (args.data_class,)
    present = [c for c in classes if run.parts_present(c, rm_name)]
    missing = [c for c in classes if c not in present]
    if not present or (args.data_class != "both" and missing):
        raise InputError(
            f"no {'/'.join(missing)}_part*.scored_*.jsonl for {rm_name} in {run.folder} "
            "(run step3_reward_annotation.py first)"
        )

    results = {c: rank_class(run, c, rm_name, args.n_samples, args.rm_input_format) for c in present}
    for data_class, (ranked, _) in results.items():
        write_jsonl(run.ranked_path(data_class, rm_name), ranked)
    print(
        "step3.5: "
        + "; ".join(
            f"{c}: {len(ranked)} prompts x {len(ranked[0]['rewards_sorted'])} responses from parts "
            f"{','.join(map(str, parts))} ({sum(r['n_empty_after_cut'] for r in ranked)} empty after the cut, "
            f"{sum(len(set(r['rewards_sorted'])) < len(r['rewards_sorted']) for r in ranked)} prompts with "
            f"tied rewards) -> {run.ranked_path(c, rm_name).name}"
            for c, (ranked, parts) in results.items()
        )
        + f" in {run.folder}"
    )


if __name__ == "__main__":
    run_cli(main)
