"""Step 6: evaluate the ranking quality of each ORM member and of the ensemble.

Story: open step 5's run; score the ``held_out`` prompts (and the test set, when the data directory
has one) chunk by chunk with every member; fit the baselines (``baselines.py``: ridge on the ORM's
training prompts, response length); report the ranking metrics and best-of-N curves of each member,
ensemble rule and baseline (docs/method.md, "Step 6: evaluation"); write the JSON and PNGs; print a table.
No evaluation prompt is used for fitting.
"""

from __future__ import annotations

import interrupts  # noqa: F401  (first: signals are handled from here on, before the heavy imports)

# isort: split
import logging
import time

import numpy as np

from artifacts import atomic_paths, json_text
from baselines import baseline_scores
from cli import ArgumentParser, finite_float, random_seed, run_cli, setup_logging
from metrics import add_evaluation_draw_flags, best_of_n, calibration_errors, fmt, ranking_report
from plots import plot_best_of_n, plot_training_curves
from run_folder import (
    MANIFEST_FILE,
    RUN_IDENTITY_FLAGS,
    SCORE_CACHE_DIR,
    add_run_flags,
    eval_plot_files,
    eval_results_file,
    open_run,
    score_cached,
)

log = logging.getLogger("step6")
# Step 5 flags that step 6 accepts, as the original authors' command lines pass them: when given,
# they must match the ensemble recorded in the manifest (a mismatch means the wrong run). Step 5's
# --seed is not among them: step 6's own seed is --eval_seed.
MANIFEST_FLAGS = {
    **dict.fromkeys(RUN_IDENTITY_FLAGS, str),
    "consider_first_n": int,
    "n_sample": int,
    "training_epochs": int,
    "learning_rate": float,
    "annotation_quality": finite_float,
    "ensemble_number": int,
    "replacement": str,
}


def build_parser() -> ArgumentParser:
    """The flags: each setting's one home (run_all.sh's variables set them: settings.py)."""
    parser = ArgumentParser(description="Evaluate ORM ranking quality on held-out prompts.")
    parser.add_argument("--output_dir", default="distill_out", help="step 5's output folder (holds the manifest)")
    add_run_flags(parser)
    add_evaluation_draw_flags(parser)
    parser.add_argument("--eval_seed", type=random_seed, help="seed of evaluation draws (default: run seed)")
    for flag, kind in MANIFEST_FLAGS.items():
        parser.add_argument(f"--{flag}", type=kind, help="checked against the manifest")
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def ensemble_variants(member_scores: np.ndarray) -> dict[str, np.ndarray]:
    """member_scores (M, P, R) -> each member and the ensemble rules, each (P, R)."""
    mean, std = member_scores.mean(axis=0), member_scores.std(axis=0)
    return {
        **{f"member_{i}": scores for i, scores in enumerate(member_scores)},
        "ensemble_mean": mean,
        "ensemble_min": member_scores.min(axis=0),
        "ensemble_first": member_scores[0],
        "ensemble_mean_minus_std": mean - std,
    }


def evaluate(
    member_scores: np.ndarray,
    gold: np.ndarray,
    baselines: dict[str, np.ndarray],
    seed: int,
    n_cross_pairs: int,
    bon_draws: int,
) -> dict:
    """Ranking metrics of every member and ensemble rule and of the ``baselines`` (name -> (P, R)
    scores), best-of-N curves of the ensembles and baselines; ridge's error to the golden reward."""
    variants = ensemble_variants(member_scores)
    ranking = {name: ranking_report(pred, gold, seed, n_cross_pairs) for name, pred in variants.items()}
    ensembles = {name: pred for name, pred in variants.items() if name.startswith("ensemble")}
    baseline_reports = {name: ranking_report(pred, gold, seed, n_cross_pairs) for name, pred in baselines.items()}
    baseline_reports["ridge"]["calibration"] = calibration_errors(baselines["ridge"], gold)  # on the golden scale
    return {
        "n_prompts": gold.shape[0],
        "n_responses": gold.size,
        "ranking": ranking,
        "baselines": baseline_reports,
        "best_of_n": best_of_n(gold, {**ensembles, **baselines}, bon_draws, seed),
    }


def print_table(title: str, result: dict) -> None:
    rows = sorted(result["ranking"], key=lambda name: not name.startswith("ensemble"))  # ensembles first
    curves = result["best_of_n"]["curves"]
    top_n = curves["oracle"]["n"][-1] if curves["oracle"]["n"] else None
    print(f"\n{title}: {result['n_prompts']} prompts, {result['n_responses']} responses")
    print(f"{'variant':<26}{'spearman':>9}{'pearson':>9}{'acc same':>9}{'acc cross':>10}{f'BoN@{top_n}':>10}")
    reports = {**result["ranking"], **{f"baseline: {name}": report for name, report in result["baselines"].items()}}
    for name in [*rows, *(f"baseline: {name}" for name in result["baselines"])]:
        report = reports[name]
        curve = curves.get(name.removeprefix("baseline: "))
        bon = curve["mean"][-1] if curve and top_n else None
        print(
            f"{name:<26}{fmt(report['spearman_per_prompt']['mean'], 9)}{fmt(report['pearson_global'], 9)}"
            f"{fmt(report['pairwise_accuracy_same_prompt']['accuracy'], 9)}"
            f"{fmt(report['pairwise_accuracy_cross_prompt']['accuracy'], 10)}{fmt(bon, 10)}"
        )
    if top_n:
        print(
            f"{'(oracle / random)':<63}{curves['oracle']['mean'][-1]:>10.3f}\n"
            f"{'':<63}{curves['random']['mean'][-1]:>10.3f}"
        )
    print("pearson: over all responses pooled; baselines: ridge on orm_train's golden rewards, response length")


def main(argv=None) -> dict:
    args = parse_args(argv)
    from members import load_members  # torch, lightgbm: after the flags, so --help returns at once

    setup_logging()
    run = open_run(args, MANIFEST_FLAGS, seed=args.eval_seed)
    output_dir, manifest, data, member_paths, seed = run.output_dir, run.manifest, run.data, run.checkpoints, run.seed
    scorer = load_members(member_paths, data.dim, run.member_hashes())
    partition = run.partition()
    sets = run.evaluation_sets(partition, run.test_set())
    objective = manifest["config"]["rm_objective"]

    start = time.perf_counter()
    cache_dir = output_dir / SCORE_CACHE_DIR  # step 8 reuses these ensemble scores
    results = {"manifest": str(output_dir / MANIFEST_FILE), "eval_seed": seed}
    baselines = baseline_scores(data, partition["orm_train"], sets)
    for name, (eset, prompts) in sets.items():
        scores = score_cached(eset, prompts, scorer, cache_dir, member_paths)
        results[name] = evaluate(
            scores, eset.rewards[prompts], baselines[name], seed, args.n_cross_pairs, args.bon_draws
        )
    log.info("evaluated %d members and the baselines in %.2fs", len(scorer), time.perf_counter() - start)

    json_path = output_dir / eval_results_file(objective)
    plot_path, curves_path = (output_dir / name for name in eval_plot_files(objective))
    panels = {f"{name} ({results[name]['n_prompts']} prompts)": results[name]["best_of_n"] for name in sets}
    records = {f"member {record.get('member', i)}": record for i, record in enumerate(manifest.get("members") or [])}
    curves = {name: record.get("history") or [] for name, record in records.items()}
    kept = {name: record.get("best_epoch") for name, record in records.items()}
    with atomic_paths(json_path, plot_path, curves_path) as (json_tmp, plot_tmp, curves_tmp):  # all or none
        json_tmp.write_text(json_text(results))
        plot_best_of_n(panels, plot_tmp, title=f"ORM ensemble ({objective}, {len(scorer)} members)")
        plot_training_curves(
            curves, curves_tmp, title=f"ORM members ({objective}): step 5's training", kept_epochs=kept
        )
    print_table("held-out prompts", results["held_out"])
    if "test" in results:
        print_table("test set", results["test"])
    held = results["held_out"]["ranking"]["ensemble_mean"]
    print(
        f"step6: held-out ensemble-mean Spearman {fmt(held['spearman_per_prompt']['mean'], 0)}, "
        f"Pearson {fmt(held['pearson_global'], 0)} (ridge "
        f"{fmt(results['held_out']['baselines']['ridge']['pearson_global'], 0)}), "
        f"pairwise acc {fmt(held['pairwise_accuracy_same_prompt']['accuracy'], 0)} -> {json_path}, {plot_path}"
    )
    return results


if __name__ == "__main__":
    run_cli(main)
