"""Score (prompt, response) texts with a trained reward model; optionally keep the best of N per prompt.

    python3 score_responses.py --output_dir distill_out --input responses.jsonl --output rewards.jsonl

Input and output lines and ``--best_of_n``: README, "Using the trained reward model" (scoring is
``reward_model.RewardModel``). The output is written atomically, and bad input stops the run with
one line before any model is loaded. torch and transformers are imported once the flags are read, so
``--help`` and flag errors answer at once.
"""

from __future__ import annotations

import interrupts  # noqa: F401  (first: signals are handled from here on, before the heavy imports)

# isort: split
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from artifacts import STDOUT, ensure_writable_dir, output_target
from cli import (
    ArgumentParser,
    InputError,
    add_dtype_arg,
    positive_int,
    run_cli,
    setup_logging,
)
from reward_variants import DEFAULT_REWARD_VARIANT, GOLDEN_SCALE_VARIANTS, REWARD_VARIANTS

if TYPE_CHECKING:
    import torch


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument(
        "--output_dir",
        default="distill_out",
        help="the finished run to load (run_all.sh's OUTPUT_DIR: manifest, checkpoints, maps)",
    )
    parser.add_argument("--input", required=True, help="JSONL of {prompt, response} or {prompt, responses}")
    parser.add_argument(
        "--output",
        required=True,
        help="JSONL to write (atomically; - for standard output; a symlink is written through)",
    )
    parser.add_argument(
        "--variant",
        choices=REWARD_VARIANTS,
        default=DEFAULT_REWARD_VARIANT,
        help="teacher (raw ensemble mean), teacher_iso, student, or student_iso (student + isotonic map; golden scale)",
    )
    parser.add_argument(
        "--best_of_n",
        action="store_true",
        help="write only the highest-reward response of each prompt (ties: the first)",
    )
    parser.add_argument(
        "--embedding_model",
        help="embedding model: short name, local folder or hub id (default: the one the "
        "manifest records; its hidden size must equal the checkpoints' D)",
    )
    parser.add_argument("--device", default="auto", help="device of the embedding model: auto, cpu, cuda, cuda:1")
    add_dtype_arg(parser)
    parser.add_argument("--batch_size", type=positive_int, default=16, help="texts per forward pass")
    parser.add_argument(
        "--max_length",
        type=positive_int,
        help="tokens per text (default: step 4's recorded --max_length)",
    )
    return parser.parse_args(argv)


def parse_device(text: str) -> torch.device:
    """``--device``: 'auto' (a GPU if present) or a torch device that exists here."""
    import torch

    from llm_models import pick_device

    if text == "auto":
        return pick_device()
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {text}: not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise InputError(f"--device {text}: no such CUDA device here")
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"--device {text}: expected auto, cpu or cuda[:N]")
    return device


def read_requests(path: Path) -> list[tuple[int, dict, list[str]]]:
    """(line number, record, its responses) per non-blank line; every problem names the file and line."""
    from llm_models import numbered_jsonl

    requests = []
    for number, record in numbered_jsonl(path, "--input"):
        if not isinstance(record.get("prompt"), str):
            raise InputError(f'{path} line {number}: expected "prompt" as a string')
        if ("response" in record) == ("responses" in record):
            raise InputError(
                f'{path} line {number}: expected exactly one of "response" (a string) '
                f'and "responses" (a list of strings)'
            )
        key = "response" if "response" in record else "responses"
        responses = [record[key]] if key == "response" else record[key]
        if not isinstance(responses, list) or not responses or not all(isinstance(r, str) for r in responses):
            wanted = "a string" if key == "response" else "a non-empty list of strings"
            raise InputError(f'{path} line {number}: "{key}" must be {wanted}')
        requests.append((number, record, responses))
    if not requests:
        raise InputError(f"--input {path}: no records")
    return requests


def best_per_prompt(requests: list[tuple[int, dict, list[str]]], rewards: np.ndarray) -> list[dict]:
    """One record per distinct prompt (in order of first appearance): its highest-reward response."""
    candidates: dict[str, list[tuple[int, str, dict]]] = {}
    flat = [(record, response) for _, record, responses in requests for response in responses]
    for position, (record, response) in enumerate(flat):
        candidates.setdefault(record["prompt"], []).append((position, response, record))
    best = []
    for prompt, group in candidates.items():
        index = int(np.argmax(rewards[[pos for pos, _, _ in group]]))  # first maximum on ties
        pos, response, record = group[index]
        extra = {k: v for k, v in record.items() if k not in ("prompt", "response", "responses")}
        best.append(
            {
                **extra,
                "prompt": prompt,
                "response": response,
                "reward": float(rewards[pos]),
                "best_index": index,
                "n_candidates": len(group),
            }
        )
    return best


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    from llm_models import write_jsonl  # torch and transformers: after the flags
    from reward_model import RewardModel

    setup_logging(sys.stderr if args.output == STDOUT else None)
    device = parse_device(args.device)
    output = output_target(args.output, "--output")  # None: standard output
    if output is not None:
        ensure_writable_dir(output.parent, "--output")
    requests = read_requests(Path(args.input))
    reward_model = RewardModel.load(args.output_dir, variants=[args.variant])
    prompts = [record["prompt"] for _, record, responses in requests for _ in responses]
    responses = [response for _, _, responses in requests for response in responses]
    reward_model.load_embedder(args.embedding_model, device, args.batch_size, args.max_length, args.dtype)

    start = time.perf_counter()
    rewards = reward_model.score_texts(prompts, responses, args.variant)
    seconds = time.perf_counter() - start
    if args.best_of_n:
        records = best_per_prompt(requests, rewards)
    else:
        per_record = np.split(rewards, np.cumsum([len(texts) for _, _, texts in requests])[:-1])
        records = [
            {**record, "reward": float(values[0])} if "response" in record else {**record, "rewards": values.tolist()}
            for (_, record, _), values in zip(requests, per_record)
        ]
    write_jsonl(args.output, records)
    scale = "golden scale" if args.variant in GOLDEN_SCALE_VARIANTS else "raw ensemble scale"
    print(
        f"score_responses: {len(responses)} responses of {len(set(prompts))} prompts scored with {args.variant} "
        f"({scale}; mean reward {rewards.mean():.4f}; {len(responses) / max(seconds, 1e-9):.1f} texts/s) -> "
        f"{args.output}{' (best of N per prompt)' if args.best_of_n else ''}",
        file=sys.stderr if output is None else sys.stdout,  # standard output holds the records
    )
    return records


if __name__ == "__main__":
    run_cli(main)
