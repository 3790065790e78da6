"""Step 7: calibrate the teacher with isotonic regression and distil it into one student MLP.

Story: open step 5's run; the teacher is the mean of the ensemble members (or of ``--teacher_ckpt``).
Cross-validate the isotonic map teacher -> golden reward over folds of ``calibration`` prompts, then
refit it on all of them; train a student MLP by MSE towards isotonic(teacher(x)) on the
``student_train`` prompts; fit the student's own map on the calibration prompts; write the student
checkpoint, the maps (``.joblib`` plus the ``.json`` sidecars that step 8 reads) and
``distillation_config.json``. ``held_out`` prompts reach no fit (docs/method.md, "Step 7: calibration and
distillation" and "Who sees which prompts"): only once all of that is written does the student score
them and the test set, for step 8.
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from artifacts import json_sha256, write_json
from calibration import (
    DEFAULT_VARIANT,
    VARIANTS,
    IsotonicMap,
    cross_validate,
    fit_isotonic,
    save_isotonic_map,
    sidecar_path,
)
from cli import (
    ArgumentParser,
    InputError,
    fraction,
    positive_float,
    positive_int,
    random_seed,
    run_cli,
    setup_logging,
)
from metrics import global_spearman, per_prompt_spearman
from objectives import OBJECTIVES
from random_streams import int_seed, seed_sequence
from rm_data import TASKS, EmbeddingSet
from run_folder import (
    DISTILLATION_CONFIG_FILE,
    LEGACY_MAP_FILE,
    MANIFEST_FILE,
    RUN_IDENTITY_FLAGS,
    SCORE_CACHE_DIR,
    STUDENT_MAP_FILE,
    STUDENT_SCORES,
    TEACHER_MAP_FILE,
    Run,
    add_run_flags,
    open_run,
    score_cached,
    student_checkpoint_name,
)

log = logging.getLogger("step7")


def build_parser() -> ArgumentParser:
    """The flags: each setting's one home (run_all.sh's variables set them: settings.py)."""
    parser = ArgumentParser(description="Isotonic calibration of the ORM teacher and distillation into a student.")
    parser.add_argument("--output_dir", default="distill_out", help="step 5's output folder; artifacts go here")
    add_run_flags(parser, teacher=True)
    parser.add_argument(
        "--task", default=None, choices=TASKS, help="names the student checkpoint (default and check: the manifest's)"
    )
    parser.add_argument(
        "--rm_objective",
        default=None,
        choices=OBJECTIVES,
        help="names the student checkpoint (default and check: the manifest's)",
    )
    for flag in RUN_IDENTITY_FLAGS:
        if flag not in ("task", "rm_objective"):
            parser.add_argument(f"--{flag}", default=None, help="seed flag, checked against the manifest")
    parser.add_argument(
        "--isotonic_variant",
        default=DEFAULT_VARIANT,
        choices=VARIANTS,
        help="standard: sklearn's step function (ties); centered: strictly increasing "
        "through the PAV block centres (keeps the teacher's ranking)",
    )
    parser.add_argument(
        "--cv_folds",
        type=positive_int,
        default=5,
        help="folds over calibration prompts for the out-of-fold calibration error",
    )
    parser.add_argument("--distill_epochs", type=positive_int, default=20, help="maximum student epochs")
    parser.add_argument("--learning_rate", type=positive_float, default=1e-3, help="student Adam learning rate")
    parser.add_argument("--batch_size", type=positive_int, default=256, help="responses per student step")
    parser.add_argument("--patience", type=positive_int, default=3, help="early-stopping patience in epochs")
    parser.add_argument(
        "--val_fraction",
        type=fraction,
        default=0.1,
        help="share of student_train prompts (whole prompts) used for early stopping",
    )
    parser.add_argument(
        "--n_cross_pairs",
        type=positive_int,
        default=100_000,
        help="cross-prompt pairs in the out-of-fold ranking report",
    )
    parser.add_argument(
        "--seed",
        type=random_seed,
        default=None,
        help="seeds folds, student split, init and shuffling (default: step 5's seed)",
    )
    return parser


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if args.cv_folds < 2:
        raise InputError(f"--cv_folds must be at least 2, got {args.cv_folds}")
    return args


def read_prompt_rows(data: EmbeddingSet, prompt_ids: np.ndarray) -> np.ndarray:
    """Every response of ``prompt_ids`` as (P * K, D) float32, row p * K + k = response k of prompt p."""
    features = np.empty((len(prompt_ids), data.n_splits, data.dim), dtype=np.float32)
    for k in range(data.n_splits):
        features[:, k] = data.read_rows(k, prompt_ids)
    return features.reshape(-1, data.dim)


def split_prompts(prompt_ids: np.ndarray, val_fraction: float, rng: np.random.Generator):
    """Seeded split of prompts into (fit, early-stopping) sets of whole prompts, both non-empty."""
    if len(prompt_ids) < 2:
        raise InputError(f"student_train has {len(prompt_ids)} prompt(s); need 2 to early-stop on whole prompts")
    order = rng.permutation(len(prompt_ids))
    n_val = min(max(1, int(round(val_fraction * len(prompt_ids)))), len(prompt_ids) - 1)
    return np.sort(prompt_ids[order[n_val:]]), np.sort(prompt_ids[order[:n_val]])


def prompt_set_record(role: str, prompt_ids: np.ndarray, responses_per_prompt: int) -> dict:
    """Which prompts a fit used: the partition role, the counts and a hash of the sorted ids."""
    ids = np.sort(np.asarray(prompt_ids, dtype=np.int64))
    return {
        "role": role,
        "n_prompts": int(len(ids)),
        "n_responses": int(len(ids) * responses_per_prompt),
        "prompt_ids_sha256": json_sha256(ids.tolist()),
    }


def check_teacher(teacher: np.ndarray, gold: np.ndarray, teacher_map: IsotonicMap) -> dict:
    """How the teacher ranks the calibration prompts, with a warning for each sign of a useless teacher.

    A teacher that ranks backwards (negative Spearman) makes the increasing isotonic map collapse
    towards a constant, which scores every response alike: the student then learns nothing.
    """
    spearman = per_prompt_spearman(teacher, gold)["mean"]
    spearman_global = global_spearman(teacher, gold)
    n_levels = teacher_map.sizes["n_levels"]
    warnings = []
    if n_levels == 1:
        warnings.append(
            f"the teacher's isotonic map is a constant ({teacher_map.y_thresholds[0]:.4g}): it gives "
            "every response the same reward (the teacher does not rank the calibration prompts)"
        )
    for name, value in (("per-prompt", spearman), ("global", spearman_global)):
        if value is not None and value < 0:
            warnings.append(f"the teacher ranks the calibration prompts backwards ({name} Spearman {value:.3f})")
    return {
        "calibration_spearman_per_prompt": spearman,
        "calibration_spearman_global": spearman_global,
        "isotonic_levels": n_levels,
        "warnings": warnings,
    }


def cache_student_scores(
    run: Run, partition: dict[str, np.ndarray], student: Callable[[np.ndarray], np.ndarray], student_path: Path
) -> None:
    """Score the sets step 8 evaluates (held-out prompts, the test set) with the student and keep the
    scores in the score cache, as step 6 keeps the teacher's: step 8 then needs no torch. Run after
    every fit is written, so these scores reach none. A problem with those sets is step 8's to
    report: here it only means that step 8 scores them itself."""
    try:
        for eset, prompts in run.evaluation_sets(partition, run.test_set()).values():
            score_cached(eset, prompts, student, run.output_dir / SCORE_CACHE_DIR, [student_path], STUDENT_SCORES)
    except InputError as err:
        log.info("student scores of the evaluation sets not cached (%s)", err)


def main(argv=None) -> dict:
    args = parse_args(argv)
    # torch is imported once the flags are valid: --help and flag errors return at once.
    import torch

    from networks import (
        StackedEnsemble,
        TrainConfig,
        TrainingDiverged,
        load_ensemble,
        mlp_train_flops_per_sample,
        save_checkpoint,
        train_student,
    )

    setup_logging()
    run = open_run(args, RUN_IDENTITY_FLAGS, seed=args.seed)
    output_dir, data, teacher_paths, seed = run.output_dir, run.data, run.checkpoints, run.seed
    task = args.task or run.manifest["config"]["task"]
    objective = args.rm_objective or run.manifest["config"]["rm_objective"]
    teacher = load_ensemble(teacher_paths, data.dim)
    teacher_scorer = StackedEnsemble(teacher, teacher_paths)  # scores calibration and student_train prompts
    partition = run.partition()
    calibration_prompts, student_prompts = partition["calibration"], partition["student_train"]
    if len(calibration_prompts) < args.cv_folds:
        raise InputError(
            f"--cv_folds {args.cv_folds} needs at least {args.cv_folds} calibration prompts, "
            f"the partition has {len(calibration_prompts)}"
        )

    # --- seeding: each random stream derives from the seed through its own SeedSequence ---
    split_stream, torch_stream = seed_sequence(seed, "distillation").spawn(2)
    split_rng = np.random.default_rng(split_stream)
    generator = torch.Generator().manual_seed(int_seed(torch_stream))

    # --- 1. teacher -> golden isotonic map on calibration prompts, cross-validated over prompts ---
    start = time.perf_counter()
    # scikit-learn's imports (~1 s, isotonic maps and folds) run in a thread while the teacher's matrix
    # products, which release the GIL, score the calibration prompts; the first fit waits for them.
    threading.Thread(target=importlib.import_module, args=("sklearn.model_selection",), daemon=True).start()
    calibration_gold = data.rewards[calibration_prompts]
    calibration_teacher = data.score(calibration_prompts, teacher_scorer).mean(axis=0)  # the members' mean
    variant_comparison = {
        variant: cross_validate(calibration_teacher, calibration_gold, args.cv_folds, seed, variant, args.n_cross_pairs)
        for variant in VARIANTS
    }
    teacher_cv = variant_comparison[args.isotonic_variant]
    teacher_fit = prompt_set_record("calibration", calibration_prompts, data.n_splits)
    teacher_map, teacher_estimator = fit_isotonic(
        calibration_teacher,
        calibration_gold,
        args.isotonic_variant,
        {"input": "teacher", "teacher_checkpoints": [path.name for path in teacher_paths], **teacher_fit},
    )
    log.info(
        "teacher isotonic (%s): out-of-fold MSE %.4f, MAE %.4f over %d calibration prompts (%.2fs)",
        args.isotonic_variant,
        teacher_cv["calibration"]["mse"],
        teacher_cv["calibration"]["mae"],
        len(calibration_prompts),
        time.perf_counter() - start,
    )
    teacher_check = check_teacher(calibration_teacher, calibration_gold, teacher_map)
    for warning in teacher_check["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)

    # --- 2. student: MSE towards isotonic(teacher) on student_train prompts ---
    fit_prompts, stop_prompts = split_prompts(student_prompts, args.val_fraction, split_rng)
    features = torch.from_numpy(read_prompt_rows(data, student_prompts))
    targets = teacher_map.predict(data.score(student_prompts, teacher_scorer).mean(axis=0)).ravel()
    rows = np.arange(len(student_prompts) * data.n_splits).reshape(len(student_prompts), data.n_splits)
    is_fit_prompt = np.isin(student_prompts, fit_prompts)
    start = time.perf_counter()
    try:
        student, result = train_student(
            features,
            torch.from_numpy(targets.astype(np.float32)),
            torch.from_numpy(rows[is_fit_prompt].ravel()),
            torch.from_numpy(rows[~is_fit_prompt].ravel()),
            TrainConfig(args.distill_epochs, args.learning_rate, args.batch_size, args.patience),
            generator,
        )
    except TrainingDiverged as err:
        raise InputError(
            f"student diverged ({err}); lower --learning_rate (DISTILL_LEARNING_RATE in run_all.sh), "
            f"now {args.learning_rate:g}"
        ) from None
    del features
    log.info(
        "student: best epoch %d/%d, early-stopping MSE %.4f (target variance %.4f), %.0f responses/s "
        "(%.1f GFLOP/s), %.2fs",
        result.best_epoch,
        result.epochs_run,
        result.best_val_loss,
        result.target_std**2,
        result.samples_per_second,
        result.samples_per_second * mlp_train_flops_per_sample(data.dim) / 1e9,
        time.perf_counter() - start,
    )

    # --- 3. student -> golden isotonic map on calibration prompts ---
    student_name = student_checkpoint_name(task, objective)
    student_scorer = StackedEnsemble([student], [f"the student just trained ({student_name})"])
    calibration_student = data.score(calibration_prompts, student_scorer)[0]
    student_cv = cross_validate(
        calibration_student, calibration_gold, args.cv_folds, seed, args.isotonic_variant, args.n_cross_pairs
    )
    student_map, student_estimator = fit_isotonic(
        calibration_student,
        calibration_gold,
        args.isotonic_variant,
        {"input": "student", "student_checkpoint": student_name, **teacher_fit},
    )

    # --- write: checkpoint, maps (+ JSON sidecars), then the config, which marks the run complete ---
    save_checkpoint(student, output_dir / student_name)
    for name, imap, estimator in (
        (TEACHER_MAP_FILE, teacher_map, teacher_estimator),
        (LEGACY_MAP_FILE, teacher_map, teacher_estimator),
        (STUDENT_MAP_FILE, student_map, student_estimator),
    ):
        save_isotonic_map(imap, estimator, output_dir / name)
    config = {
        "config": dict(vars(args)),
        "task": task,
        "rm_objective": objective,
        "seed": seed,
        "manifest": str(output_dir / MANIFEST_FILE),
        "data": {
            "data_dir": str(data.data_dir),
            "n_prompts": data.n_prompts,
            "n_splits": data.n_splits,
            "dim": data.dim,
        },
        "teacher": {
            "checkpoints": [str(path) for path in teacher_paths],
            "n_members": len(teacher),
            "source": "--teacher_ckpt" if args.teacher_ckpt else "manifest",
            "rule": "mean",
        },
        "prompt_counts": {role: int(len(ids)) for role, ids in partition.items()},
        "fits": {  # which prompts reached each fit; held_out reaches none
            "teacher_isotonic": teacher_fit,
            "student_training": prompt_set_record("student_train", fit_prompts, data.n_splits),
            "student_early_stopping": prompt_set_record("student_train", stop_prompts, data.n_splits),
            "student_isotonic": teacher_fit,
        },
        "isotonic_variant": args.isotonic_variant,
        "teacher_check": teacher_check,  # warnings: a constant map or a backwards-ranking teacher
        "teacher_isotonic": {"out_of_fold": teacher_cv, **teacher_map.sizes},
        "isotonic_variant_comparison": {
            "measured_on": "out-of-fold teacher predictions on calibration prompts "
            f"({args.cv_folds} folds over prompts)",
            "selected": args.isotonic_variant,
            **variant_comparison,
        },
        "student": {
            "checkpoint": student_name,
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "early_stopping_mse": result.best_val_loss,
            "train_mse": result.train_mse,
            # no throughput here: results are byte-identical across runs (it is logged above)
            "target_mean": result.target_mean,
            "target_variance": result.target_std**2,
            "history": result.history,
        },
        "student_isotonic": {"out_of_fold": student_cv, **student_map.sizes},
        "artifacts": {
            "student_checkpoint": student_name,
            "teacher_map": TEACHER_MAP_FILE,
            "teacher_map_json": sidecar_path(TEACHER_MAP_FILE).name,
            "legacy_teacher_map": LEGACY_MAP_FILE,
            "student_map": STUDENT_MAP_FILE,
            "student_map_json": sidecar_path(STUDENT_MAP_FILE).name,
        },
    }
    write_json(output_dir / DISTILLATION_CONFIG_FILE, config)
    cache_student_scores(run, partition, student_scorer, output_dir / student_name)
    print(
        f"step7: teacher isotonic ({args.isotonic_variant}) out-of-fold MSE "
        f"{teacher_cv['calibration']['mse']:.4f}; student early-stopping MSE {result.best_val_loss:.4f} "
        f"(target variance {result.target_std**2:.4f}) -> {output_dir / student_name}, "
        f"{output_dir / DISTILLATION_CONFIG_FILE}"
    )
    return config


if __name__ == "__main__":
    run_cli(main)
