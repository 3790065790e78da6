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

import interrupts  # noqa: F401  (first: signals are handled from here on, before the heavy imports)

# isort: split
import importlib
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from artifacts import json_sha256, write_json
from calibration import (
    DEFAULT_ISOTONIC_VARIANT,
    ISOTONIC_VARIANTS,
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
    from_flags,
    positive_float,
    positive_int,
    random_seed,
    run_cli,
    setup_logging,
)
from metrics import add_cross_pairs_flag, global_spearman, per_prompt_spearman
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

if TYPE_CHECKING:
    import torch
    from sklearn.isotonic import IsotonicRegression

    from networks import TrainConfig

log = logging.getLogger("step7")
# The student's training settings that step 7 takes no flag for: plain Adam (no weight decay), early
# stopping on the validation MSE, an epoch one pass over the training responses.
STUDENT_TRAINING = {"weight_decay": 0.0, "stop_metric": "loss", "min_epoch_steps": 1}
# Flags renamed after runs had been made: the name an older run's distillation_config.json records
# -> the flag's name now (summarize_runs.py reads an older run's settings under today's names).
RENAMED_FLAGS = {"learning_rate": "student_learning_rate"}


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
            parser.add_argument(f"--{flag}", default=None, help="step 5's flag, checked against the manifest")
    parser.add_argument(
        "--isotonic_variant",
        default=DEFAULT_ISOTONIC_VARIANT,
        choices=ISOTONIC_VARIANTS,
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
    parser.add_argument("--student_learning_rate", type=positive_float, default=1e-3, help="student Adam learning rate")
    parser.add_argument("--batch_size", type=positive_int, default=256, help="responses per student step")
    parser.add_argument("--patience", type=positive_int, default=3, help="early-stopping patience in epochs")
    parser.add_argument(
        "--val_fraction",
        type=fraction,
        default=0.1,
        help="share of student_train prompts (whole prompts) used for early stopping",
    )
    add_cross_pairs_flag(parser)  # of the out-of-fold ranking reports
    parser.add_argument(
        "--student_seed",
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


def check_cv_folds(cv_folds: int, n_calibration_prompts: int) -> None:
    if n_calibration_prompts < cv_folds:
        raise InputError(
            f"--cv_folds {cv_folds} needs at least {cv_folds} calibration prompts, "
            f"the partition has {n_calibration_prompts}"
        )


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


@dataclass
class Calibrated:
    """An isotonic map fitted on all calibration prompts, and its out-of-fold report."""

    imap: IsotonicMap
    estimator: IsotonicRegression  # saved beside the map's JSON sidecar
    out_of_fold: dict


def calibrate_teacher(
    scores: np.ndarray, gold: np.ndarray, variant: str, cv_folds: int, seed: int, n_cross_pairs: int, provenance: dict
) -> tuple[Calibrated, dict, dict]:
    """The teacher's ``variant`` map from its calibration ``scores`` (P, K), every variant's out-of-fold
    report (the comparison), and :func:`check_teacher`'s verdict, its warnings printed."""
    start = time.perf_counter()
    comparison = {v: cross_validate(scores, gold, cv_folds, seed, v, n_cross_pairs) for v in ISOTONIC_VARIANTS}
    calibrated = Calibrated(*fit_isotonic(scores, gold, variant, provenance), comparison[variant])
    log.info(
        "teacher isotonic (%s): out-of-fold MSE %.4f, MAE %.4f over %d calibration prompts (%.2fs)",
        variant,
        calibrated.out_of_fold["calibration"]["mse"],
        calibrated.out_of_fold["calibration"]["mae"],
        len(gold),
        time.perf_counter() - start,
    )
    check = check_teacher(scores, gold, calibrated.imap)
    for warning in check["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    return calibrated, comparison, check


def calibrate_student(
    scores: np.ndarray, gold: np.ndarray, variant: str, cv_folds: int, seed: int, n_cross_pairs: int, provenance: dict
) -> Calibrated:
    out_of_fold = cross_validate(scores, gold, cv_folds, seed, variant, n_cross_pairs)
    return Calibrated(*fit_isotonic(scores, gold, variant, provenance), out_of_fold)


def distil(
    data: EmbeddingSet,
    student_prompts: np.ndarray,
    targets: np.ndarray,
    val_fraction: float,
    config: TrainConfig,
    split_rng: np.random.Generator,
    generator: torch.Generator,
):
    """Train the student by MSE towards ``targets`` ((P, K): isotonic(teacher)) on ``student_prompts``,
    early-stopped on a seeded share of whole prompts: (student, result, fit prompts, stopping prompts)."""
    import torch

    from networks import TrainingDiverged, diverged_advice, mlp_train_flops_per_sample, train_student

    fit_prompts, stop_prompts = split_prompts(student_prompts, val_fraction, split_rng)
    rows = np.arange(len(student_prompts) * data.n_splits).reshape(len(student_prompts), data.n_splits)
    is_fit_prompt = np.isin(student_prompts, fit_prompts)
    start = time.perf_counter()
    try:
        student, result = train_student(
            torch.from_numpy(read_prompt_rows(data, student_prompts)),
            torch.from_numpy(targets.ravel().astype(np.float32)),
            torch.from_numpy(rows[is_fit_prompt].ravel()),
            torch.from_numpy(rows[~is_fit_prompt].ravel()),
            config,
            generator,
        )
    except TrainingDiverged as err:
        flag = "--student_learning_rate (DISTILL_LEARNING_RATE in run_all.sh)"
        raise InputError(f"student diverged ({err}); {diverged_advice(err, flag, config.learning_rate)}") from None
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
    return student, result, fit_prompts, stop_prompts


def save_maps(output_dir: Path, teacher: Calibrated, student: Calibrated) -> None:
    """The maps (``.joblib`` plus the JSON sidecars step 8 reads); the teacher's also under its legacy name."""
    for name, calibrated in ((TEACHER_MAP_FILE, teacher), (LEGACY_MAP_FILE, teacher), (STUDENT_MAP_FILE, student)):
        save_isotonic_map(calibrated.imap, calibrated.estimator, output_dir / name)


def teacher_record(paths: list[Path], n_members: int, from_flag: bool) -> dict:
    return {
        "checkpoints": [str(path) for path in paths],
        "n_members": n_members,
        "source": "--teacher_ckpt" if from_flag else "manifest",
        "rule": "mean",
    }


def student_record(checkpoint: str, result) -> dict:
    return {
        "checkpoint": checkpoint,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "early_stopping_mse": result.best_val_loss,
        "train_mse": result.train_mse,
        # no throughput here: results are byte-identical across runs (it is logged by distil)
        "target_mean": result.target_mean,
        "target_variance": result.target_std**2,
        "history": result.history,
    }


def artifacts_record(student_checkpoint: str) -> dict:
    return {
        "student_checkpoint": student_checkpoint,
        "teacher_map": TEACHER_MAP_FILE,
        "teacher_map_json": sidecar_path(TEACHER_MAP_FILE).name,
        "legacy_teacher_map": LEGACY_MAP_FILE,
        "student_map": STUDENT_MAP_FILE,
        "student_map_json": sidecar_path(STUDENT_MAP_FILE).name,
    }


def distillation_record(
    settings: dict,
    run: Run,
    partition: dict[str, np.ndarray],
    teacher: dict,
    fit_prompts: tuple[dict, np.ndarray, np.ndarray],
    teacher_check: dict,
    teacher_map: Calibrated,
    comparison: dict,
    student: dict,
    student_map: Calibrated,
) -> dict:
    """``distillation_config.json``: the resolved settings, the data, which prompts reached each fit,
    and what each fit gave. ``fit_prompts``: the calibration prompts' record, and the student's
    training and early-stopping prompts."""
    data, variant = run.data, settings["isotonic_variant"]
    calibration, training, early_stopping = fit_prompts
    return {
        "config": settings,
        "task": settings["task"],
        "rm_objective": settings["rm_objective"],
        "student_seed": run.seed,
        "manifest": str(run.output_dir / MANIFEST_FILE),
        "data": {
            "data_dir": str(data.data_dir),
            "n_prompts": data.n_prompts,
            "n_splits": data.n_splits,
            "dim": data.dim,
        },
        "teacher": teacher,
        "prompt_counts": {role: int(len(ids)) for role, ids in partition.items()},
        "fits": {  # which prompts reached each fit; held_out reaches none
            "teacher_isotonic": calibration,
            "student_training": prompt_set_record("student_train", training, data.n_splits),
            "student_early_stopping": prompt_set_record("student_train", early_stopping, data.n_splits),
            "student_isotonic": calibration,
        },
        "isotonic_variant": variant,
        "teacher_check": teacher_check,  # warnings: a constant map or a backwards-ranking teacher
        "teacher_isotonic": {"out_of_fold": teacher_map.out_of_fold, **teacher_map.imap.sizes},
        "isotonic_variant_comparison": {
            "measured_on": "out-of-fold teacher predictions on calibration prompts "
            f"({settings['cv_folds']} folds over prompts)",
            "selected": variant,
            **comparison,
        },
        "student": student,
        "student_isotonic": {"out_of_fold": student_map.out_of_fold, **student_map.imap.sizes},
        "artifacts": artifacts_record(student["checkpoint"]),
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    # torch is imported once the flags are valid: --help and flag errors return at once.
    import torch

    from members import load_members
    from networks import StackedEnsemble, TrainConfig, flush_denormals, save_checkpoint

    flush_denormals()
    setup_logging()
    run = open_run(args, RUN_IDENTITY_FLAGS, seed=args.student_seed)
    output_dir, data, teacher_paths, seed = run.output_dir, run.data, run.checkpoints, run.seed
    # The settings step 7 used: step 5's flags (checked equal where given) and seed where not given.
    identity = {flag: run.manifest["config"].get(flag) for flag in RUN_IDENTITY_FLAGS}
    settings = {**vars(args), **identity, "student_seed": seed}
    # MLP or LightGBM members: scores calibration and student_train prompts; the student is an MLP either way
    teacher_scorer = load_members(teacher_paths, data.dim, run.member_hashes())
    partition = run.partition()
    calibration_prompts, student_prompts = partition["calibration"], partition["student_train"]
    check_cv_folds(args.cv_folds, len(calibration_prompts))
    # each random stream derives from the seed through its own SeedSequence
    split_stream, torch_stream = seed_sequence(seed, "distillation").spawn(2)
    split_rng = np.random.default_rng(split_stream)
    generator = torch.Generator().manual_seed(int_seed(torch_stream))
    cv = (args.isotonic_variant, args.cv_folds, seed, args.n_cross_pairs)

    # --- 1. teacher -> golden isotonic map on calibration prompts, cross-validated over prompts ---
    # scikit-learn's imports (~1 s, isotonic maps and folds) run in a thread while the teacher's matrix
    # products, which release the GIL, score the calibration prompts; the first fit waits for them.
    threading.Thread(target=importlib.import_module, args=("sklearn.model_selection",), daemon=True).start()
    gold = data.rewards[calibration_prompts]
    teacher_fit = prompt_set_record("calibration", calibration_prompts, data.n_splits)
    provenance = {"input": "teacher", "teacher_checkpoints": [path.name for path in teacher_paths], **teacher_fit}
    teacher_map, comparison, teacher_check = calibrate_teacher(
        data.score(calibration_prompts, teacher_scorer).mean(axis=0), gold, *cv, provenance
    )

    # --- 2. student: MSE towards isotonic(teacher) on student_train prompts ---
    targets = teacher_map.imap.predict(data.score(student_prompts, teacher_scorer).mean(axis=0))
    train_config = from_flags(
        TrainConfig, args, epochs=args.distill_epochs, learning_rate=args.student_learning_rate, **STUDENT_TRAINING
    )
    student, result, fit_prompts, stop_prompts = distil(
        data, student_prompts, targets, args.val_fraction, train_config, split_rng, generator
    )

    # --- 3. student -> golden isotonic map on calibration prompts ---
    student_name = student_checkpoint_name(settings["task"], settings["rm_objective"])
    student_scorer = StackedEnsemble([student], [f"the student just trained ({student_name})"])
    provenance = {"input": "student", "student_checkpoint": student_name, **teacher_fit}
    student_map = calibrate_student(data.score(calibration_prompts, student_scorer)[0], gold, *cv, provenance)

    # --- write: checkpoint, maps (+ JSON sidecars), then the config, which marks the run complete ---
    save_checkpoint(student, output_dir / student_name)
    save_maps(output_dir, teacher_map, student_map)
    teacher_info = teacher_record(teacher_paths, len(teacher_scorer), bool(args.teacher_ckpt))
    fits, student_info = (teacher_fit, fit_prompts, stop_prompts), student_record(student_name, result)
    config = distillation_record(
        settings, run, partition, teacher_info, fits, teacher_check, teacher_map, comparison, student_info, student_map
    )
    write_json(output_dir / DISTILLATION_CONFIG_FILE, config)
    cache_student_scores(run, partition, student_scorer, output_dir / student_name)
    print(
        f"step7: teacher isotonic ({args.isotonic_variant}) out-of-fold MSE "
        f"{teacher_map.out_of_fold['calibration']['mse']:.4f}; student early-stopping MSE {result.best_val_loss:.4f} "
        f"(target variance {result.target_std**2:.4f}) -> {output_dir / student_name}, "
        f"{output_dir / DISTILLATION_CONFIG_FILE}"
    )
    return config


if __name__ == "__main__":
    run_cli(main)
