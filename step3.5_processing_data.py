"""Step 3.5: merge the scored shards and sort each prompt's responses ascending by golden reward.

    python3 step3.5_processing_data.py --output_dir distill_out --model_name gemma2b \\
        --dataset hh-rlhf-helpful-gpt4 --eval_dataset hh-rlhf-helpful

For each data class (``--data_class train``, ``test`` or ``both``: every class step 3 scored), reads
``{gen_dir}/{data_class}_part{k}.scored_{rm}.jsonl`` for the shards k = 0..n-1 of step 2, in order, and writes
``{gen_dir}/{data_class}_ranked_{rm}.jsonl``: one line per prompt with ``responses_sorted`` and
``rewards_sorted`` (ascending; position k is rank split k, so split 0 is the worst response and
split K-1 the best, README "Data format") and ``original_index`` (each one's response_i in step 2).
Ties keep step 2's order (stable sort). Every scored record must carry ``--rm_input_format``
(records without one were scored raw); the format is copied into the ranked records.

The merge refuses (one line naming the shard, exit 2) unless every shard 0..n-1 of step 2 is present
and finished (its summary written, its record count the summary's), all were made with the same
flags, prompt set and adapter, and each was scored in full by the same reward-model settings
(:func:`check_shards`). The output depends on the prompts' results alone, not on how they were
sharded, and replaces the file atomically, so a rerun leaves identical bytes.
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


# Summary keys that differ from shard to shard; every other key is a setting all shards must share.
PER_SHARD_KEYS = (
    "shard_index",
    "n_prompts_in_part",
    "n_generated",
    "n_skipped_over_length",
    "skipped_ids",
    "n_responses",
    "n_empty_after_cut",
)
# What step 3 records per scored record that must be one value across all shards.
RM_SETTINGS = ("reward_label", "rm_dtype", "rm_max_length")


def shard_settings(summary: dict) -> dict:
    return {key: value for key, value in summary.items() if key not in PER_SHARD_KEYS}


def differences(found: dict, expected: dict) -> str:
    """``key found (shard 0: expected)`` for each key whose values differ."""
    keys = sorted(set(found) | set(expected), key=str)
    return ", ".join(
        f"{k} {found.get(k)!r} (shard 0: {expected.get(k)!r})" for k in keys if found.get(k) != expected.get(k)
    )


def check_shards(run: GenerationRun, data_class: str, rm_name: str) -> list[int]:
    """The shards 0..n-1 of ``data_class``, once each is known present, finished and made like shard 0
    by step 2 (its summary file) and scored in full by step 3; else InputError naming the first bad shard."""
    present = run.parts_present(data_class)
    summaries = {}
    for part in present:
        path = run.summary_path(data_class, part)
        if not path.is_file():
            raise InputError(
                f"{data_class} shard {part}: {run.samples_path(data_class, part).name} has no summary "
                f"{path.name}, so the shard did not finish (run step2_gen_sample.py --shard_index {part} again)"
            )
        summaries[part] = read_json(path, "step 2 summary")
    first = summaries[present[0]]
    num_shards = first.get("num_shards")
    if not isinstance(num_shards, int):
        raise InputError(f"{run.summary_path(data_class, present[0])}: no num_shards (rerun step2_gen_sample.py)")
    expected = shard_settings(first)
    for part, summary in summaries.items():
        if summary.get("num_shards") != num_shards or part >= num_shards:
            raise InputError(
                f"{data_class} shard {part}: {run.summary_path(data_class, part).name} is from a run with "
                f"{summary.get('num_shards')} shards, shard {present[0]} from one with {num_shards} "
                "(remove the other run's part files or rerun every shard with one --num_shards)"
            )
        if shard_settings(summary) != expected:
            raise InputError(
                f"{data_class} shard {part}: {run.summary_path(data_class, part).name} was made with other "
                f"settings or inputs than shard {present[0]}: "
                f"{differences(shard_settings(summary), expected)}"
            )
    missing = [part for part in range(num_shards) if part not in summaries]
    if missing:
        raise InputError(
            f"{data_class} shard {missing[0]} of {num_shards} is missing: no "
            f"{run.samples_path(data_class, missing[0]).name} in {run.folder} "
            f"(run step2_gen_sample.py --data_class {data_class} --shard_index {missing[0]} --num_shards {num_shards})"
        )
    rm_settings = None
    for part in range(num_shards):
        samples, scored = run.samples_path(data_class, part), run.scored_path(data_class, part, rm_name)
        if not scored.is_file():
            raise InputError(
                f"{data_class} shard {part}: {samples.name} has no scores by {rm_name} "
                f"(run step3_reward_annotation.py --data_class {data_class} --shard_index {part})"
            )
        sample_ids = [record.get("id") for _, record in numbered_jsonl(samples)]
        if len(sample_ids) != summaries[part].get("n_generated"):
            raise InputError(
                f"{data_class} shard {part}: {samples.name} holds {len(sample_ids)} prompts, its summary "
                f"{summaries[part].get('n_generated')} (rerun step2_gen_sample.py --shard_index {part})"
            )
        scored_records = [record for _, record in numbered_jsonl(scored)]
        if [record.get("id") for record in scored_records] != sample_ids or any(
            shard_settings(record.get("settings", {})) != expected for record in scored_records
        ):
            raise InputError(
                f"{data_class} shard {part}: {scored.name} does not score the prompts of {samples.name} as "
                f"generated now (rerun step3_reward_annotation.py --data_class {data_class} --shard_index {part})"
            )
        for record in scored_records:
            found = {key: record.get(key) for key in RM_SETTINGS}
            rm_settings = rm_settings or found
            if found != rm_settings:
                raise InputError(
                    f"{data_class} shard {part}: {scored.name} was scored with other settings than shard 0: "
                    f"{differences(found, rm_settings)}"
                )
    return list(range(num_shards))


def rank_class(
    run: GenerationRun, data_class: str, rm_name: str, n_expected: int | None, rm_input_format: str
) -> tuple[list[dict], list]:
    """Sorted records of every shard of ``data_class``, in shard order (:func:`check_shards` first)."""
    scored_parts = check_shards(run, data_class, rm_name)
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
            f"{c}: {len(ranked)} prompts x {len(ranked[0]['rewards_sorted'])} responses from shards "
            f"{','.join(map(str, parts))} ({sum(r['n_empty_after_cut'] for r in ranked)} empty after the cut, "
            f"{sum(len(set(r['rewards_sorted'])) < len(r['rewards_sorted']) for r in ranked)} prompts with "
            f"tied rewards) -> {run.ranked_path(c, rm_name).name}"
            for c, (ranked, parts) in results.items()
        )
        + f" in {run.folder}"
    )


if __name__ == "__main__":
    run_cli(main)
