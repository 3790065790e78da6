"""Step 5's training defaults over seeds, budgets and data sets: the study behind docs/studies/defaults.md.

    python3 benchmarks/study_defaults.py --data demo=data real-smollm2=DIR real-minilm=DIR \\
        --results study_defaults.jsonl --seeds 1 2 3 4 5 --jobs 2

Each cell runs step 5 (``--ensemble_number 3``, one pair per prompt unless the budget says more) and
step 6 in-process, in a folder of its own, and appends one JSON line per (data, budget, candidate,
seed) to ``--results``; cells already there are skipped, so an interrupted study resumes. Then it
prints, per data set and budget, the held-out metrics of every candidate as mean ± standard error
over seeds beside the baselines step 6 scores on the same prompts (ridge on the golden rewards of
the ORM's training prompts, response length where the data has lengths).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> step-5 flags on top of the budget's. "before" is the defaults this study started from.
CANDIDATES = {
    "before (lr 1e-4)": ["--learning_rate", "1e-4", "--min_val_pairs", "20", "--min_epoch_steps", "1"],
    "lr 1e-3": ["--learning_rate", "1e-3", "--min_val_pairs", "20", "--min_epoch_steps", "1"],
    "lr 1e-3, min_val_pairs 0": ["--learning_rate", "1e-3", "--min_val_pairs", "0", "--min_epoch_steps", "1"],
    "lr 1e-4, >=10 steps/epoch": ["--learning_rate", "1e-4", "--min_val_pairs", "20", "--min_epoch_steps", "10"],
    "lr 1e-3, >=10 steps/epoch": ["--learning_rate", "1e-3", "--min_val_pairs", "20", "--min_epoch_steps", "10"],
    "lr 1e-3, standardize": ["--learning_rate", "1e-3", "--min_val_pairs", "20", "--standardize", "1"],
    "lr 1e-4, standardize": ["--learning_rate", "1e-4", "--min_val_pairs", "20", "--standardize", "1"],
}
# budget name -> (N_SAMPLE, or a share of all prompts capped at the most the evaluation pool leaves;
# pairs per prompt). "half" is the reference budget: N_SAMPLE = half the prompts.
BUDGETS = {"n50": (50, 1), "n100": (100, 1), "half": (0.5, 1), "max": (1.0, 1), "max-10pairs": (1.0, 10)}
METRICS = ("pearson_global", "spearman_per_prompt", "acc_same_prompt")


def held_out_metrics(report: dict) -> dict:
    return {
        "pearson_global": report["pearson_global"],
        "spearman_per_prompt": report["spearman_per_prompt"]["mean"],
        "acc_same_prompt": report["pairwise_accuracy_same_prompt"]["accuracy"],
    }


def n_sample_for(data_dir: str, share_or_count: float) -> int:
    from rm_data import default_eval_prompts, load_embedding_set

    if share_or_count >= 2:
        return int(share_or_count)
    n_prompts = load_embedding_set(data_dir).n_prompts  # a share of all prompts, at most what the pool leaves
    return max(1, min(int(n_prompts * share_or_count), n_prompts - default_eval_prompts(n_prompts)))


def run_cell(cell: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    import step5_train_rms
    import step6_eval_rms
    from run_folder import load_manifest

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "run")
        pairs = cell["n_pairs"]
        step5_train_rms.main(
            ["--data_dir", cell["data_dir"], "--output_dir", out, "--n_sample", str(cell["n_sample"])]
            + ["--n_pairs", str(pairs), "--consider_first_n", str(max(2, min(pairs, 10)))]
            + ["--ensemble_number", "3", "--seed", str(cell["seed"]), "--task", cell["task"]]
            + (["--reward_scale", str(cell["reward_scale"])] if cell.get("reward_scale") else [])
            + CANDIDATES[cell["candidate"]]
        )
        results = step6_eval_rms.main(["--output_dir", out, "--bon_draws", "10", "--n_cross_pairs", "10000"])
        manifest = load_manifest(out)
    held = results["held_out"]
    members = manifest["members"]
    return {
        **cell,
        "teacher": held_out_metrics(held["ranking"]["ensemble_mean"]),
        "baselines": {name: held_out_metrics(report) for name, report in held["baselines"].items()},
        "best_epochs": [member.get("best_epoch") for member in members],
        "epochs_run": [member.get("epochs_run") for member in members],
        "n_held_out": held["n_prompts"],
    }


def mean_se(values: list[float | None]) -> str:
    """A table cell of the defined values: summarize_runs' mean ± standard error, as in sweep summaries."""
    from summarize_runs import cell_text
    from summarize_runs import mean_se as mean_se_n

    mean, se, n = mean_se_n(values)
    return cell_text(mean, se, n, n)


def report(rows: list[dict], reference: str = "before (lr 1e-4)") -> str:
    lines = []
    keys = sorted({(row["data"], row["budget"], row["n_sample"], row["n_pairs"]) for row in rows})
    for data, budget, n_sample, n_pairs in keys:
        cell_rows = [r for r in rows if (r["data"], r["budget"]) == (data, budget)]
        lines += [
            f"\n#### {data}, N_SAMPLE={n_sample}, N_PAIRS={n_pairs} ({cell_rows[0]['n_held_out']} held-out prompts)\n",
            "| candidate | seeds | Pearson (pooled) | Spearman (per prompt) | pairwise acc. "
            f"| Pearson - {reference}'s (paired by seed) | mean best epoch |",
            "|---|---|---|---|---|---|---|",
        ]
        by_seed = {r["seed"]: r["teacher"]["pearson_global"] for r in cell_rows if r["candidate"] == reference}
        for candidate in CANDIDATES:
            mine = [r for r in cell_rows if r["candidate"] == candidate]
            if not mine:
                continue
            best = np.mean([e for r in mine for e in r["best_epochs"] if e is not None])
            cells = [mean_se([r["teacher"][m] for r in mine]) for m in METRICS]
            # The same seed draws the same pairs and labels for every candidate: compare seed by seed.
            paired = [r["teacher"]["pearson_global"] - by_seed[r["seed"]] for r in mine if r["seed"] in by_seed]
            cells.append("-" if candidate == reference else mean_se(paired))
            lines.append(f"| {candidate} | {len(mine)} | " + " | ".join(cells) + f" | {best:.1f} |")
        for name in cell_rows[0]["baselines"]:
            cells = [mean_se([r["baselines"][name][m] for r in cell_rows]) for m in METRICS]
            lines.append(f"| baseline: {name} | - | " + " | ".join(cells) + " | - | - |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", required=True, help="NAME=DATA_DIR pairs")
    parser.add_argument("--task", default="helpful", help="step 5's --task (sets the annotator's scale)")
    parser.add_argument(
        "--reward_scales", nargs="*", default=[], help="NAME=S: the annotator's s for that data (default: the task's)"
    )
    parser.add_argument("--budgets", nargs="+", default=["n100", "half"], choices=sorted(BUDGETS))
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    parser.add_argument("--results", required=True, help="JSONL file of finished cells (appended, resumed)")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--report_only", action="store_true")
    args = parser.parse_args(argv)
    data = dict(item.split("=", 1) for item in args.data)
    scales = {name: float(scale) for name, scale in (item.split("=", 1) for item in args.reward_scales)}
    results = Path(args.results)
    done = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    done_keys = {(r["data"], r["budget"], r["candidate"], r["seed"]) for r in done}
    cells = []
    for name, data_dir in data.items():
        for budget in args.budgets:
            share, pairs = BUDGETS[budget]
            n_sample = n_sample_for(data_dir, share)
            for candidate in args.candidates:
                for seed in args.seeds:
                    if (name, budget, candidate, seed) not in done_keys:
                        cell = {"data": name, "data_dir": data_dir, "budget": budget, "n_sample": n_sample}
                        cells.append(
                            {**cell, "n_pairs": pairs, "candidate": candidate, "seed": seed, "task": args.task}
                            | ({"reward_scale": scales[name]} if name in scales else {})
                        )
    if cells and not args.report_only:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        with ProcessPoolExecutor(args.jobs) as pool, results.open("a") as handle:
            for i, row in enumerate(pool.map(run_cell, cells)):
                handle.write(json.dumps(row) + "\n")
                handle.flush()
                done.append(row)
                print(
                    f"[{i + 1}/{len(cells)}] {row['data']} {row['budget']} {row['candidate']} seed {row['seed']}: "
                    f"Pearson {row['teacher']['pearson_global']:.3f}",
                    file=sys.stderr,
                )
    wanted = [
        r for r in done if r["data"] in data and r["budget"] in args.budgets and r["candidate"] in args.candidates
    ]
    print(report(wanted))


if __name__ == "__main__":
    main()
