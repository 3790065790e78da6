"""Step 8: validate the four reward variants: Teacher, Teacher+Isotonic, Student, Student+Isotonic.

Story: open step 5's run; read the two isotonic maps (from their JSON sidecars: nothing is
unpickled); take the teacher's and the student's scores of the ``held_out`` prompts (and of the test
set, when the data directory has one) from the score cache that steps 6 and 7 fill, reading a
checkpoint (and importing torch) only for scores it lacks; report every variant's ranking metrics,
best-of-N and error to the golden reward beside a constant predictor, the floor (docs/method.md, "Step 8:
four-variant validation"); write the JSON, table and plots; print the table. Raw teacher scores are
not on the golden scale, so their MSE is reported but marked not meaningful.
"""

from __future__ import annotations

import interrupts  # noqa: F401  (first: signals are handled from here on, before the heavy imports)

# isort: split
import logging
import time
from pathlib import Path

import numpy as np

from artifacts import atomic_paths, json_text
from calibration import (
    IsotonicMap,
    check_map_provenance,
    load_isotonic_map,
    sidecar_path,
)
from cli import ArgumentParser, positive_int, random_seed, run_cli, setup_logging
from metrics import (
    add_evaluation_draw_flags,
    best_of_n,
    binned_calibration,
    calibration_errors,
    fmt,
    prediction_report,
)
from plots import plot_best_of_n, plot_calibration
from reward_variants import GOLDEN_SCALE_VARIANTS, VARIANT_TITLES
from rm_data import EmbeddingSet
from run_folder import (
    ENSEMBLE_SCORES,
    MANIFEST_FILE,
    RUN_IDENTITY_FLAGS,
    SCORE_CACHE_DIR,
    STUDENT_MAP_FILE,
    STUDENT_SCORES,
    TEACHER_MAP_FILE,
    VALIDATION_BEST_OF_N_PLOT,
    VALIDATION_CALIBRATION_PLOT,
    VALIDATION_RESULTS_FILE,
    VALIDATION_TABLE_FILE,
    LazyEnsemble,
    add_run_flags,
    open_run,
    score_cache_entry,
    score_cached,
    student_checkpoint_name,
)

log = logging.getLogger("step8")
GOLDEN_SCALE_TITLES = tuple(VARIANT_TITLES[variant] for variant in GOLDEN_SCALE_VARIANTS)  # MSE meaningful


def build_parser() -> ArgumentParser:
    """The flags: each setting's one home (run_all.sh's variables set them: settings.py)."""
    parser = ArgumentParser(description="Validate teacher, student and their isotonic maps on held-out prompts.")
    parser.add_argument("--output_dir", default="distill_out", help="folder of steps 5 and 7; results go here")
    add_run_flags(parser, teacher=True)
    parser.add_argument(
        "--student_ckpt",
        default=None,
        help="student checkpoint (default: OUTPUT_DIR/distilled_rm_{task}_{objective}.ckpt)",
    )
    parser.add_argument(
        "--isotonic_model",
        default=None,
        help=f"teacher map .joblib; its .json sidecar is read (default: OUTPUT_DIR/{TEACHER_MAP_FILE})",
    )
    parser.add_argument(
        "--student_isotonic_model",
        default=None,
        help=f"student map .joblib; its .json sidecar is read (default: OUTPUT_DIR/{STUDENT_MAP_FILE})",
    )
    for flag in RUN_IDENTITY_FLAGS:
        parser.add_argument(f"--{flag}", default=None, help="step 5's flag, checked against the manifest")
    add_evaluation_draw_flags(parser)
    parser.add_argument(
        "--calibration_bins", type=positive_int, default=15, help="equal-count bins of the calibration plot"
    )
    parser.add_argument(
        "--eval_seed", type=random_seed, default=None, help="seed of evaluation draws (default: step 5's seed)"
    )
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def cached_scores(
    sets: dict[str, tuple[EmbeddingSet, np.ndarray]], model: LazyEnsemble, cache_dir: Path, prefix: str
) -> dict[str, np.ndarray]:
    """Each set's (P, R) float64 mean of the model's scores: from the score cache where step 6 (the
    teacher's members) or step 7 (the student) left them, else scored with ``model``."""
    return {
        name: score_cached(eset, prompts, model, cache_dir, model.paths, prefix).mean(axis=0).astype(np.float64)
        for name, (eset, prompts) in sets.items()
    }


def variants_from_scores(
    teacher: np.ndarray, student: np.ndarray, teacher_map: IsotonicMap, student_map: IsotonicMap
) -> dict[str, np.ndarray]:
    """The four variants' scores from the teacher's (the members' mean) and the student's raw scores."""
    values = (teacher, teacher_map.predict(teacher), student, student_map.predict(student))
    return dict(zip(VARIANT_TITLES.values(), values))


def evaluate(
    variants: dict[str, np.ndarray],
    gold: np.ndarray,
    constant: float,
    seed: int,
    n_cross_pairs: int,
    bon_draws: int,
    calibration_bins: int,
) -> dict:
    reports = {name: prediction_report(pred, gold, seed, n_cross_pairs) for name, pred in variants.items()}
    for name, report in reports.items():
        report["calibration"]["meaningful"] = name in GOLDEN_SCALE_TITLES
    reports["Teacher"]["calibration"]["note"] = "raw teacher scores are not on the golden scale"
    calibrated = variants["Teacher+Isotonic"]
    fidelity = calibration_errors(variants["Student"], calibrated)
    return {
        "n_prompts": gold.shape[0],
        "n_responses": gold.size,
        "variants": reports,
        "constant_predictor": {"value": constant, **calibration_errors(np.full(gold.shape, constant), gold)},
        "distillation_fidelity": {  # how well the student reproduces its target, isotonic(teacher)
            "mse_student_vs_teacher_isotonic": fidelity["mse"],
            "mae_student_vs_teacher_isotonic": fidelity["mae"],
            "teacher_isotonic_variance": float(calibrated.var()),
            "relative_mse": fidelity["mse"] / float(calibrated.var()) if calibrated.var() > 0 else None,
            **({} if calibrated.var() > 0 else {"relative_mse_reason": "Teacher+Isotonic is constant"}),
        },
        "best_of_n": best_of_n(gold, variants, bon_draws, seed),
        "calibration_curves": {
            name: binned_calibration(variants[name], gold, calibration_bins) for name in GOLDEN_SCALE_TITLES
        },
    }


# Why a variant's best-of-N curve and its +Isotonic version's coincide (drawn once, "A = B").
MONOTONE_NOTE = (
    "An isotonic map is monotone: X+Isotonic ranks responses as X does, so its best-of-N picks are\n"
    "X's except where the map ties scores; equal curves are drawn once (legend 'X = X+Isotonic')."
)


def format_table(title: str, result: dict) -> str:
    """The four-variant comparison of one evaluation set as printable text."""
    lines = []
    curves = result["best_of_n"]["curves"]
    top_n = curves["oracle"]["n"][-1] if curves["oracle"]["n"] else None
    bon_header = f"BoN@{top_n}" if top_n else "BoN"
    lines.append(f"\n{title}: {result['n_prompts']} prompts, {result['n_responses']} responses")
    lines.append(
        f"{'variant':<18}{'spearman':>9}{'global':>8}{'pearson':>8}{'acc same':>9}{'acc cross':>10}{'MSE':>9}{'MAE':>8}"
        f"{'levels':>8}{bon_header:>9}"
    )
    for name in VARIANT_TITLES.values():
        report = result["variants"][name]
        errors = report["calibration"]
        mark = "" if errors["meaningful"] else "*"
        bon = curves[name]["mean"][-1] if top_n else None
        lines.append(
            f"{name:<18}{fmt(report['spearman_per_prompt']['mean'], 9)}{fmt(report['spearman_global'], 8)}"
            f"{fmt(report['pearson_global'], 8)}"
            f"{fmt(report['pairwise_accuracy_same_prompt']['accuracy'], 9)}"
            f"{fmt(report['pairwise_accuracy_cross_prompt']['accuracy'], 10)}"
            f"{errors['mse']:>8.3f}{mark:1}{errors['mae']:>8.3f}{report['n_distinct_values']:>8d}{fmt(bon, 9)}"
        )
    constant = result["constant_predictor"]
    lines.append(f"{'Constant':<18}{'':>44}{constant['mse']:>8.3f} {constant['mae']:>8.3f}{1:>8d}")
    if top_n:
        lines.append(
            f"{'(oracle / random)':<87}{curves['oracle']['mean'][-1]:>9.3f}\n"
            f"{'':<87}{curves['random']['mean'][-1]:>9.3f}"
        )
    lines.append("pearson: over all responses pooled (spearman: per prompt and pooled)")
    lines.append("* raw teacher scores are not on the golden scale: their MSE is not meaningful")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup_logging()
    run = open_run(args, RUN_IDENTITY_FLAGS, seed=args.eval_seed)
    output_dir, data, teacher_paths, seed = run.output_dir, run.data, run.checkpoints, run.seed
    test = run.test_set()
    student_path = Path(
        args.student_ckpt
        or output_dir / student_checkpoint_name(run.manifest["config"]["task"], run.manifest["config"]["rm_objective"])
    )
    teacher_map_path = Path(args.isotonic_model or output_dir / TEACHER_MAP_FILE)
    student_map_path = Path(args.student_isotonic_model or output_dir / STUDENT_MAP_FILE)
    # Checkpoints are loaded (and torch imported) only for scores the cache lacks.
    teacher = LazyEnsemble(teacher_paths, data.dim, run.member_hashes())
    student = LazyEnsemble([student_path], data.dim)
    teacher_map = load_isotonic_map(teacher_map_path, "teacher isotonic map (run step7_isotonic_distillation.py)")
    student_map = load_isotonic_map(student_map_path, "student isotonic map (run step7_isotonic_distillation.py)")
    check_map_provenance(teacher_map, teacher_map_path, "teacher", teacher_paths)
    check_map_provenance(student_map, student_map_path, "student", [student_path])
    partition = run.partition()
    # The constant floor is fitted where the maps are: the calibration prompts' golden rewards.
    constant = float(data.rewards[partition["calibration"]].mean())

    start = time.perf_counter()
    sets, cache_dir = run.evaluation_sets(partition, test), output_dir / SCORE_CACHE_DIR
    models = {"teacher": (teacher, ENSEMBLE_SCORES), "student": (student, STUDENT_SCORES)}
    for model, prefix in models.values():  # every checkpoint to read is read before any score is written
        if any(score_cache_entry(eset, ids, cache_dir, model.paths, prefix)[1] is None for eset, ids in sets.values()):
            model.load()
    scores = {name: cached_scores(sets, model, cache_dir, prefix) for name, (model, prefix) in models.items()}

    results = {
        "manifest": str(output_dir / MANIFEST_FILE),
        "eval_seed": seed,
        "models": {
            "teacher_checkpoints": [str(path) for path in teacher_paths],
            "student_checkpoint": str(student_path),
            "teacher_map": str(sidecar_path(teacher_map_path)),
            "student_map": str(sidecar_path(student_map_path)),
            "isotonic_variants": {"teacher": teacher_map.variant, "student": student_map.variant},
        },
    }
    for name, (eset, prompts) in sets.items():
        variants = variants_from_scores(scores["teacher"][name], scores["student"][name], teacher_map, student_map)
        draws = (seed, args.n_cross_pairs, args.bon_draws, args.calibration_bins)
        results[name] = evaluate(variants, eset.rewards[prompts], constant, *draws)
    log.info("validated four variants in %.2fs", time.perf_counter() - start)

    json_path, calibration_plot = output_dir / VALIDATION_RESULTS_FILE, output_dir / VALIDATION_CALIBRATION_PLOT
    bon_plot = output_dir / VALIDATION_BEST_OF_N_PLOT
    label = {"held_out": "held-out prompts", "test": "test set"}
    results["artifacts"] = {"calibration_plot": str(calibration_plot), "best_of_n_plot": str(bon_plot)}
    table = "\n".join(format_table(label[name], results[name]) for name in sets)
    titles = {
        name: f"{label[name]} ({results[name]['n_prompts']} prompts, {results[name]['n_responses']} responses)"
        for name in sets
    }
    # All four files or none: a failure in any (a plot, a full disk) leaves no half of the results.
    with atomic_paths(json_path, output_dir / VALIDATION_TABLE_FILE, calibration_plot, bon_plot) as tmp_paths:
        tmp_paths[0].write_text(json_text(results))
        tmp_paths[1].write_text(table + "\n")  # run_all.sh shows it when step 8 is up to date
        plot_calibration(
            {titles[name]: results[name]["calibration_curves"] for name in sets},
            tmp_paths[2],
            title=f"Calibration ({teacher_map.variant} isotonic)",
        )
        plot_best_of_n(
            {titles[name]: results[name]["best_of_n"] for name in sets},
            tmp_paths[3],
            title=f"Teacher ({len(teacher_paths)} members) vs distilled student",
            note=MONOTONE_NOTE,
        )
    print(table)
    held = results["held_out"]
    print(
        f"step8: held-out MSE Teacher+Isotonic {held['variants']['Teacher+Isotonic']['calibration']['mse']:.3f}, "
        f"Student+Isotonic {held['variants']['Student+Isotonic']['calibration']['mse']:.3f}, "
        f"constant {held['constant_predictor']['mse']:.3f} -> {json_path}, {calibration_plot}, {bon_plot}"
    )
    return results


if __name__ == "__main__":
    run_cli(main)
