"""The LightGBM members' defaults (step 5's ``--lgbm_*`` flags): held-out ranking over seeds, one flag
changed at a time from the defaults, beside the clf MLP on the same pairs (docs/method.md, "LightGBM members").

    python3 generate_demo_data.py --output_dir demo_data
    python3 benchmarks/study_lgbm_defaults.py --data_dir demo_data --results lgbm_study.jsonl --seeds 1 2 3

Each cell runs step 5 (clf, ``--ensemble_number 3``, one pair per prompt) and step 6 in-process in a
folder of its own and appends one JSON line per (budget, candidate, seed) to ``--results``; cells
already there are skipped. Then it prints held-out ensemble-mean Spearman per prompt and same-prompt
pairwise accuracy as mean ± standard error over seeds, and step 5's seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LGBM = ["--rm_model", "lgbm"]
# name -> step-5 flags: the defaults chosen, the MLP, and the LightGBM settings they replaced.
CANDIDATES = {
    "lgbm defaults (lr 0.1, 300 rounds, features 0.1)": LGBM,
    "mlp (clf)": [],
    "lgbm features 0.5": [*LGBM, "--lgbm_feature_fraction", "0.5"],
    "lgbm lr 0.05, 1000 rounds": [*LGBM, "--lgbm_learning_rate", "0.05", "--lgbm_n_estimators", "1000"],
}
# N_SAMPLE -> the candidates run there (at 1000 the members stop early on 100 validation pairs).
BUDGETS = {1000: list(CANDIDATES)}


def run_cell(data_dir: str, n_sample: int, flags: list[str], seed: int) -> dict:
    import step5_train_rms
    import step6_eval_rms

    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        step5_train_rms.main(
            ["--data_dir", data_dir, "--output_dir", out, "--rm_objective", "clf", "--n_sample", str(n_sample),
             "--ensemble_number", "3", "--seed", str(seed), *flags]
        )  # fmt: skip
        seconds = time.perf_counter() - start
        held = step6_eval_rms.main(["--output_dir", out, "--bon_draws", "10"])["held_out"]["ranking"]["ensemble_mean"]
    return {
        "spearman_per_prompt": held["spearman_per_prompt"]["mean"],
        "acc_same_prompt": held["pairwise_accuracy_same_prompt"]["accuracy"],
        "step5_seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--n_samples", type=int, nargs="+", default=list(BUDGETS), choices=list(BUDGETS))
    args = parser.parse_args()
    done = [json.loads(line) for line in args.results.read_text().splitlines()] if args.results.is_file() else []
    keys = {(cell["n_sample"], cell["candidate"], cell["seed"]) for cell in done}
    for n_sample in args.n_samples:
        for name in BUDGETS[n_sample]:
            flags = CANDIDATES[name]
            for seed in args.seeds:
                if (n_sample, name, seed) in keys:
                    continue
                cell = {"n_sample": n_sample, "candidate": name, "seed": seed}
                cell.update(run_cell(args.data_dir, n_sample, flags, seed))
                done.append(cell)
                with open(args.results, "a") as handle:
                    handle.write(json.dumps(cell) + "\n")
    for n_sample in args.n_samples:
        print(f"\nN_SAMPLE {n_sample} (held-out ensemble mean over seeds {args.seeds}; mean ± SE)")
        print(f"{'candidate':<28}{'spearman':>18}{'pair acc':>18}{'step 5 s':>10}")
        for name in BUDGETS[n_sample]:
            cells = [c for c in done if c["n_sample"] == n_sample and c["candidate"] == name]
            if not cells:
                continue
            text = []
            for metric in ("spearman_per_prompt", "acc_same_prompt"):
                values = np.array([c[metric] for c in cells])
                se = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
                text.append(f"{values.mean():.3f} ± {se:.3f}")
            seconds = np.mean([c["step5_seconds"] for c in cells])
            print(f"{name:<28}{text[0]:>18}{text[1]:>18}{seconds:>10.1f}")


if __name__ == "__main__":
    main()
