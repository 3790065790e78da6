"""Run one study of docs/studies/ and print its tables: steps 5 and 6 (7 and 8) per cell, every resolved flag recorded.

    python3 benchmarks/study.py objectives --data demo=DEMO_DIR minilm=MINILM_DIR smollm2=SMOLLM2_DIR \\
        --reward_scales minilm=1 smollm2=1 --results objectives.jsonl --jobs 2
    python3 benchmarks/study.py defaults --data demo=DEMO_DIR ... --results defaults.jsonl
    python3 benchmarks/study.py objectives --tiny --data demo=SMALL_DIR --results tiny.jsonl   # the CI check

A study (``STUDIES`` below) is a grid: data sets x budgets x annotation qualities x candidates x
split seeds x seeds. Each cell runs step 5 and step 6 in-process, in a temporary folder of its own
(and steps 7 and 8 after them where the study sets ``step7``: calibration, distillation and the
held-out MSEs of the calibrated teacher and student), and appends one JSON line to ``--results``
holding the cell, **every resolved flag of every step it ran** and the metrics; cells already there
are skipped, so an interrupted study resumes. Then it prints, per data set, budget and quality, each
candidate's metrics as mean ± standard error over its runs beside the baselines step 6 scores on the
same prompts (ridge on the golden rewards of the ORM's training prompts; response length where the
data has lengths), and each candidate's difference from the study's reference candidate paired by
run (same seed and split seed: the same pairs and labels).

A study pins what it compares. Each candidate's flags, together with the study's fixed flags, are
resolved through the steps' own parsers and checked against ``study_flags.json`` (beside this file)
before any cell runs: a default that changed since the page was made stops the study with one line
naming the flag, rather than silently changing the comparison. ``--write_lock`` records the flags as
they resolve now (after pinning what must not move, and rerunning the page).

"Beats" (``beats``, the one definition every study page uses): A beats B on a metric when the mean of
A - B over paired runs is more than two standard errors above zero. Baselines are the same for every
seed of one split, so against a baseline it is A's own standard error that counts.

``--tiny`` runs one cell per candidate on the first data set with a few members and epochs, so that
CI runs every study's command on a small stand-in data folder: the command cannot rot.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LOCK_FILE = Path(__file__).resolve().with_name("study_flags.json")
# Flags a cell sets from its axes or its data, not from the candidate: left out of the lock.
CELL_FLAGS = {
    "data_dir",
    "output_dir",
    "n_sample",
    "n_pairs",
    "consider_first_n",
    "annotation_quality",
    "seed",
    "split_seed",
    "reward_scale",
    "task",
}
EVAL_SETS = ("held_out", "test")
METRICS = {
    "spearman_per_prompt": "Spearman (per prompt)",
    "pearson_global": "Pearson (pooled)",
    "acc_same_prompt": "pairwise acc.",
}
TINY_FLAGS = ["--ensemble_number", "2", "--training_epochs", "2", "--lgbm_n_estimators", "5"]
TINY_STEP7 = ["--distill_epochs", "2"]
# Step 8's variants whose error to the golden reward the calibration table shows, beside the constant floor.
CALIBRATION = {"teacher_iso_mse": "Teacher+Isotonic", "student_iso_mse": "Student+Isotonic"}


@dataclass(frozen=True)
class Study:
    """A grid of step-5/6 cells. ``candidates``: name -> step-5 flags that define it (every flag the
    comparison depends on); ``budgets``: name -> (N_SAMPLE, or a share of all prompts capped at what
    the evaluation pool leaves; pairs per prompt); ``qualities``: annotation qualities (step 5's
    --annotation_quality); ``fixed``: step-5 flags of every cell; ``step6``: step 6's flags;
    ``step7``: step 7's flags, or None for cells that stop after step 6; ``step8``: step 8's flags
    (run after step 7)."""

    page: str
    candidates: dict[str, list[str]]
    budgets: dict[str, tuple[float, int]]
    reference: str
    qualities: tuple[float, ...] = (10.0,)
    fixed: list[str] = field(default_factory=lambda: ["--ensemble_number", "3"])
    step6: list[str] = field(default_factory=lambda: ["--bon_draws", "10", "--n_cross_pairs", "10000"])
    split_seeds: tuple[int, ...] = (0,)
    seeds: tuple[int, ...] = (1, 2, 3, 4, 5)
    decide_on: str = "spearman_per_prompt"  # the metric of the paired difference and of "beats"
    only_at: dict[str, tuple[str, ...]] = field(default_factory=dict)  # candidate -> its budgets, if not all

    def order(self, group: tuple) -> tuple:
        """Sort key of (data, budget, ...) groups: data set, then the budgets in the study's order."""
        return (group[0], list(self.budgets).index(group[1]), *group[2:])

    step7: list[str] | None = None
    step8: list[str] = field(default_factory=lambda: ["--bon_draws", "10", "--n_cross_pairs", "10000"])


RAW = ["--standardize", "0"]
# Step 5's training when the demo studies were first made: learning rate 1e-3, members stopping on any
# validation slice (--min_val_pairs 0), raw inputs (before --standardize existed).
FIRST_DEMO_TRAINING = ["--learning_rate", "1e-3", "--min_val_pairs", "0", *RAW]
LR_1E4 = ["--learning_rate", "1e-4"]


def stopping(scheme: str, metric: str = "loss", bagging: int = 0) -> list[str]:
    """Step 5's early-stopping flags, every one named."""
    return ["--early_stopping", scheme, "--stop_metric", metric, "--bagging", str(bagging)]


LGBM = ["--rm_model", "lgbm"]
LGBM_RATE_01 = ["--lgbm_learning_rate", "0.1", "--lgbm_n_estimators", "300"]
STUDIES = {
    # docs/studies/defaults.md: step 5's learning rate, validation floor, epoch length and standardisation.
    "defaults": Study(
        page="docs/studies/defaults.md",
        candidates={
            "before (lr 1e-4)": ["--learning_rate", "1e-4", "--min_val_pairs", "20", "--min_epoch_steps", "1", *RAW],
            "lr 1e-3": ["--learning_rate", "1e-3", "--min_val_pairs", "20", "--min_epoch_steps", "1", *RAW],
            "lr 1e-3, min_val_pairs 0": ["--learning_rate", "1e-3", "--min_val_pairs", "0", "--min_epoch_steps", "1"]
            + RAW,
            "lr 1e-4, >=10 steps/epoch": ["--learning_rate", "1e-4", "--min_val_pairs", "20", "--min_epoch_steps"]
            + ["10", *RAW],
            "lr 1e-3, >=10 steps/epoch": ["--learning_rate", "1e-3", "--min_val_pairs", "20", "--min_epoch_steps"]
            + ["10", *RAW],
            "lr 1e-3, standardize": ["--learning_rate", "1e-3", "--min_val_pairs", "20", "--min_epoch_steps", "1"]
            + ["--standardize", "1"],
            "lr 1e-4, standardize": ["--learning_rate", "1e-4", "--min_val_pairs", "20", "--min_epoch_steps", "1"]
            + ["--standardize", "1"],
        },
        budgets={"n50": (50, 1), "n100": (100, 1), "half": (0.5, 1), "max-10pairs": (1.0, 10)},
        reference="before (lr 1e-4)",
        decide_on="pearson_global",
        fixed=["--ensemble_number", "3", "--rm_objective", "bt", "--rm_model", "mlp"],
    ),
    # docs/studies/objectives.md: the paper's headline comparison, BT against classification, the
    # MLP and an off-the-shelf classifier (LightGBM), over annotation quality and two budgets.
    "objectives": Study(
        page="docs/studies/objectives.md",
        candidates={
            "BT-MLP": ["--rm_objective", "bt", "--rm_model", "mlp"],
            "CLF-MLP": ["--rm_objective", "clf", "--rm_model", "mlp"],
            "CLF-LightGBM": ["--rm_objective", "clf", "--rm_model", "lgbm"],
            # Every boosting round on every pair: what CLF-LightGBM does at n100x1 anyway (10 validation
            # pairs < --min_val_pairs), so it runs at n100x5 only.
            "CLF-LightGBM, no early stopping": ["--rm_objective", "clf", "--rm_model", "lgbm", "--early_stopping"]
            + ["none"],
        },
        budgets={"n100x1": (100, 1), "n100x5": (100, 5)},
        only_at={"CLF-LightGBM, no early stopping": ("n100x5",)},
        reference="BT-MLP",
        qualities=(10.0, 1.0, 0.5, 0.1),
        split_seeds=(0, 1, 2),
    ),
    # docs/studies/annotation_quality_demo.md: ranking and calibration (steps 7-8) against annotation noise,
    # bt and clf, as run_sweep.sh's annotation_quality preset ran them with the training of the time.
    "annotation_quality": Study(
        page="docs/studies/annotation_quality_demo.md",
        candidates={"bt": ["--rm_objective", "bt"], "clf": ["--rm_objective", "clf"]},
        budgets={"n1000": (1000, 1)},
        reference="bt",
        qualities=(10.0, 1.0, 0.5, 0.1),
        fixed=["--ensemble_number", "3", "--training_epochs", "10", "--rm_model", "mlp", *stopping("member")]
        + FIRST_DEMO_TRAINING,
        seeds=(1, 2, 3),
        step7=["--distill_epochs", "10", "--student_learning_rate", "1e-3"],
    ),
    # docs/studies/small_budget_demo.md: step 5's early-stopping schemes at the learning rate of the time
    # (1e-3, members stopping on any validation slice), then the learning rate and validation floor that
    # replaced it (1e-4, --min_val_pairs 20), at small budgets and two annotation qualities.
    "small_budget": Study(
        page="docs/studies/small_budget_demo.md",
        candidates={
            "member, lr 1e-3": [*stopping("member"), *FIRST_DEMO_TRAINING],
            "pooled, lr 1e-3": [*stopping("pooled"), *FIRST_DEMO_TRAINING],
            "member + bagging, lr 1e-3": [*stopping("member", bagging=1), *FIRST_DEMO_TRAINING],
            "pooled on accuracy, lr 1e-3": [*stopping("pooled", "accuracy"), *FIRST_DEMO_TRAINING],
            "member, lr 1e-4, min_val_pairs 20": [*stopping("member"), *LR_1E4, "--min_val_pairs", "20", *RAW],
            "member, lr 1e-4, min_val_pairs 0": [*stopping("member"), *LR_1E4, "--min_val_pairs", "0", *RAW],
            "pooled, lr 1e-4, min_val_pairs 0": [*stopping("pooled"), *LR_1E4, "--min_val_pairs", "0", *RAW],
        },
        budgets={"n100": (100, 1), "n300": (300, 1), "n1000": (1000, 1)},
        reference="member, lr 1e-3",
        qualities=(10.0, 1.0),
        fixed=["--ensemble_number", "3", "--training_epochs", "30", "--rm_objective", "bt", "--rm_model", "mlp"],
    ),
    # docs/method.md, "LightGBM members": the LightGBM members' defaults beside the clf MLP on the same pairs.
    # docs/studies/real_n_sample.md: BT-MLP's ranking against the number of annotated prompts, with the
    # prompt draw (split seed) in the error bars.
    "n_sample": Study(
        page="docs/studies/real_n_sample.md",
        candidates={"BT-MLP": ["--rm_objective", "bt", "--rm_model", "mlp"]},
        budgets={"n25": (25, 1), "n50": (50, 1), "n100": (100, 1)},
        reference="BT-MLP",
        split_seeds=(0, 1, 2),
    ),
    "lgbm_defaults": Study(
        page="docs/method.md",
        candidates={
            "lgbm lr 0.1, 300 rounds, features 0.1": [*LGBM, *LGBM_RATE_01, "--lgbm_feature_fraction", "0.1"],
            "mlp (clf)": ["--rm_model", "mlp"],
            "lgbm features 0.5": [*LGBM, *LGBM_RATE_01, "--lgbm_feature_fraction", "0.5"],
            "lgbm lr 0.05, 1000 rounds": [*LGBM, "--lgbm_learning_rate", "0.05", "--lgbm_n_estimators", "1000"]
            + ["--lgbm_feature_fraction", "0.1"],
        },
        budgets={"n1000": (1000, 1)},
        reference="lgbm lr 0.1, 300 rounds, features 0.1",
        fixed=["--ensemble_number", "3", "--rm_objective", "clf"],
    ),
}


def beats(differences: list[float]) -> bool:
    """A beats B: the mean of the paired differences A - B is more than two standard errors above zero."""
    values = np.asarray([d for d in differences if d is not None and math.isfinite(d)], dtype=float)
    if len(values) < 2:
        return False
    se = values.std(ddof=1) / math.sqrt(len(values))
    return bool(values.mean() > 2 * se)


def verdict(differences: list[float], reference: str) -> str:
    """``yes`` when the candidate beats the reference, ``no`` when neither beats the other, and
    ``no: REFERENCE beats it`` when the reference does (the same rule, paired differences negated)."""
    if beats(differences):
        return "yes"
    return f"no: {reference} beats it" if beats([-d for d in differences if d is not None]) else "no"


def n_sample_for(data_dir: str, share_or_count: float) -> int:
    """A count (>= 2) capped at what the default evaluation pool leaves, or that share of all prompts."""
    from rm_data import default_eval_prompts, load_embedding_set

    n_prompts = load_embedding_set(data_dir).n_prompts
    most = n_prompts - default_eval_prompts(n_prompts)
    if share_or_count >= 2:
        return max(1, min(int(share_or_count), most))
    return max(1, min(int(n_prompts * share_or_count), most))


def step5_argv(study: Study, cell: dict) -> list[str]:
    pairs = cell["n_pairs"]
    argv = ["--data_dir", cell["data_dir"], "--output_dir", cell.get("output_dir", "OUT")]
    argv += ["--n_sample", str(cell["n_sample"]), "--n_pairs", str(pairs)]
    argv += ["--consider_first_n", str(max(2, min(pairs, 10))), "--annotation_quality", str(cell["quality"])]
    argv += ["--seed", str(cell["seed"]), "--split_seed", str(cell["split_seed"])]
    argv += ["--reward_scale", str(cell["reward_scale"])] if cell.get("reward_scale") else []
    return argv + study.fixed + study.candidates[cell["candidate"]] + (TINY_FLAGS if cell.get("tiny") else [])


def later_argv(study: Study, cell: dict) -> dict[str, list[str]]:
    """The argv of the steps after step 5 that the study's cells run."""
    out = ["--output_dir", cell.get("output_dir", "OUT")]
    argv = {"step6": out + study.step6}
    if study.step7 is not None:
        argv["step7"] = out + study.step7 + (TINY_STEP7 if cell.get("tiny") else [])
        argv["step8"] = out + study.step8
    return argv


def resolved_flags(study: Study, cell: dict) -> dict[str, dict]:
    """Every flag of every step the cell runs, as that step's parser resolves it."""
    import importlib

    modules = {
        "step6": "step6_eval_rms",
        "step7": "step7_isotonic_distillation",
        "step8": "step8_validate_distillation",
    }
    flags = {"step5": vars(importlib.import_module("step5_train_rms").parse_args(step5_argv(study, cell)))}
    for step, argv in later_argv(study, cell).items():
        flags[step] = vars(importlib.import_module(modules[step]).parse_args(argv))
    return flags


def lock_entry(flags: dict[str, dict]) -> dict[str, dict]:
    """The flags a candidate's cells share (the cell's own axes and paths left out)."""
    return {step: {k: v for k, v in values.items() if k not in CELL_FLAGS} for step, values in flags.items()}


def check_lock(name: str, study: Study, cell: dict, lock: dict) -> None:
    """Stop with one line when a flag resolves otherwise than when the study's page was made."""
    from cli import InputError

    recorded = lock.get(name, {}).get(cell["candidate"])
    if recorded is None:
        raise InputError(
            f"{LOCK_FILE.name} has no entry for study {name}, candidate {cell['candidate']!r}: run --write_lock"
        )
    now = lock_entry(resolved_flags(study, {**cell, "tiny": False}))
    if set(now) != set(recorded):
        raise InputError(
            f"study {name}, candidate {cell['candidate']!r} now runs {', '.join(sorted(now))}, the study was made "
            f"running {', '.join(sorted(recorded))}: rerun the page and record the flags with --write_lock"
        )
    for step, values in recorded.items():
        for flag in sorted(set(values) | set(now[step])):
            if values.get(flag, "(absent)") != now[step].get(flag, "(absent)"):
                raise InputError(
                    f"study {name}, candidate {cell['candidate']!r}: {step}'s --{flag} now resolves to "
                    f"{now[step].get(flag, '(absent)')!r}, the study was made with {values.get(flag, '(absent)')!r}; "
                    f"pin it in benchmarks/study.py, or rerun the page and record the flags with --write_lock"
                )


def metrics_of(report: dict) -> dict:
    return {
        "spearman_per_prompt": report["spearman_per_prompt"]["mean"],
        "pearson_global": report["pearson_global"],
        "acc_same_prompt": report["pairwise_accuracy_same_prompt"]["accuracy"],
    }


def run_cell(job: tuple[str, dict]) -> dict:
    name, cell = job
    import torch

    torch.set_num_threads(1)
    import step5_train_rms
    import step6_eval_rms
    import step7_isotonic_distillation
    import step8_validate_distillation
    from run_folder import load_manifest

    study = STUDIES[name]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "run")
        cell = {**cell, "output_dir": out}
        flags, argv = resolved_flags(study, cell), later_argv(study, cell)
        validation = {}
        with contextlib.redirect_stdout(sys.stderr):  # the steps' logs and tables: stdout is the report's
            step5_train_rms.main(step5_argv(study, cell))
            results = step6_eval_rms.main(argv["step6"])
            if "step7" in argv:
                step7_isotonic_distillation.main(argv["step7"])
                validation = step8_validate_distillation.main(argv["step8"])
        manifest = load_manifest(out)
    row = {k: v for k, v in cell.items() if k != "output_dir"} | {"flags": flags}
    for eval_set in EVAL_SETS:
        if eval_set in results:
            report = results[eval_set]
            row[eval_set] = {
                "n_prompts": report["n_prompts"],
                "n_responses": report["n_responses"],
                "teacher": metrics_of(report["ranking"]["ensemble_mean"]),
                "baselines": {b: metrics_of(r) for b, r in report["baselines"].items()},
            }
            if eval_set in validation:
                variants = validation[eval_set]["variants"]
                row[eval_set]["calibration"] = {
                    key: variants[variant]["calibration"]["mse"] for key, variant in CALIBRATION.items()
                } | {"constant_mse": validation[eval_set]["constant_predictor"]["mse"]}
    row["best_epochs"] = [member.get("best_epoch") for member in manifest["members"]]
    for step in row["flags"].values():
        step.pop("output_dir", None)  # a temporary folder
    return row


def cell_key(row: dict) -> tuple:
    return (row["data"], row["budget"], row["quality"], row["candidate"], row["split_seed"], row["seed"], row["tiny"])


def mean_se(values: list) -> str:
    """A table cell of the defined values: summarize_runs' mean ± standard error, as in sweep summaries."""
    from summarize_runs import cell_text
    from summarize_runs import mean_se as mean_se_n

    mean, se, n = mean_se_n(values)
    return cell_text(mean, se, n, n)


def report(study: Study, rows: list[dict], eval_set: str) -> str:
    """Per data set, budget and quality: the candidates, their paired difference from the reference and
    whether they beat it, and the baselines."""
    lines = []
    metric, label = study.decide_on, METRICS[study.decide_on]
    rows = [r for r in rows if eval_set in r]
    groups = sorted(
        {(r["data"], r["budget"], r["n_sample"], r["n_pairs"], r["quality"]) for r in rows}, key=study.order
    )
    for data, budget, n_sample, n_pairs, quality in groups:
        group = [r for r in rows if (r["data"], r["budget"], r["quality"]) == (data, budget, quality)]
        sizes = sorted({(r[eval_set]["n_prompts"], r[eval_set]["n_responses"]) for r in group})
        splits = sorted({r["split_seed"] for r in group})
        lines += [
            f"\n#### {data}, {eval_set}, N_SAMPLE={n_sample}, N_PAIRS={n_pairs}, ANNOTATION_QUALITY={quality:g}, "
            f"split seeds {','.join(map(str, splits))} "
            f"({' / '.join(f'{p} prompts, {n} responses' for p, n in sizes)})\n",
            "| reward model | runs | " + " | ".join(METRICS.values()) + f" | {label} - {study.reference}'s (paired) "
            "| beats it | beats length | mean best epoch (LightGBM: round) |",
            "|---|---|" + "---|" * (len(METRICS) + 4),
        ]
        runs = {(r["candidate"], r["split_seed"], r["seed"]): r for r in group}
        for candidate in study.candidates:
            mine = [r for r in group if r["candidate"] == candidate]
            if not mine:
                continue
            cells = [mean_se([r[eval_set]["teacher"][m] for r in mine]) for m in METRICS]
            paired = paired_differences(mine, runs, study.reference, eval_set, metric)
            versus_length = [
                r[eval_set]["teacher"]["spearman_per_prompt"]
                - r[eval_set]["baselines"]["length"]["spearman_per_prompt"]
                for r in mine
                if "length" in r[eval_set]["baselines"]
            ]
            same = candidate == study.reference
            cells += ["-" if same else mean_se(paired), "-" if same else verdict(paired, study.reference)]
            cells.append(("yes" if beats(versus_length) else "no") if versus_length else "-")
            epochs = [e for r in mine for e in r["best_epochs"] if e is not None]
            cells.append(f"{np.mean(epochs):.1f}" if epochs else "-")
            lines.append(f"| {candidate} | {len(mine)} | " + " | ".join(cells) + " |")
        for baseline in group[0][eval_set]["baselines"]:
            cells = [mean_se([r[eval_set]["baselines"][baseline][m] for r in group]) for m in METRICS]
            lines.append(f"| baseline: {baseline} | - | " + " | ".join(cells) + " | - | - | - | - |")
    return "\n".join(lines)


def paired_differences(mine: list[dict], runs: dict, reference: str, eval_set: str, metric: str) -> list[float]:
    """``metric`` of each of ``mine`` minus the reference's in the same run (seed and split seed);
    ``runs``: (candidate, split seed, seed) -> row, of one data set, budget and quality."""
    return [
        r[eval_set]["teacher"][metric] - runs[(reference, r["split_seed"], r["seed"])][eval_set]["teacher"][metric]
        for r in mine
        if (reference, r["split_seed"], r["seed"]) in runs
    ]


def differences(study: Study, rows: list[dict], eval_set: str) -> str:
    """One table: per data set and budget, each candidate's paired difference from the reference at
    every quality, marked where one beats the other."""
    rows = [r for r in rows if eval_set in r]
    qualities = sorted({r["quality"] for r in rows}, reverse=True)
    lines = [
        f"| data | budget | reward model - {study.reference} | "
        + " | ".join(f"quality {q:g}" for q in qualities)
        + " |",
        "|---|---|---|" + "---|" * len(qualities),
    ]
    for data, budget in sorted({(r["data"], r["budget"]) for r in rows}, key=study.order):
        for candidate in study.candidates:
            if candidate == study.reference:
                continue
            cells = []
            for quality in qualities:
                group = [r for r in rows if (r["data"], r["budget"], r["quality"]) == (data, budget, quality)]
                runs = {(r["candidate"], r["split_seed"], r["seed"]): r for r in group}
                mine = [r for r in group if r["candidate"] == candidate]
                paired = paired_differences(mine, runs, study.reference, eval_set, study.decide_on)
                if not paired:
                    cells.append("-")
                    continue
                said = verdict(paired, study.reference)
                mark = " (beats it)" if said == "yes" else " (beaten)" if said != "no" else ""
                cells.append(mean_se(paired) + mark)
            if any(c != "-" for c in cells):
                lines.append(f"| {data} | {budget} | {candidate} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def calibration_table(study: Study, rows: list[dict], eval_set: str) -> str:
    """Per data set, budget and quality: each candidate's calibrated error to the golden reward (step 8's
    MSE of the isotonic teacher and student) beside the constant predictor's."""
    rows = [r for r in rows if "calibration" in r.get(eval_set, {})]
    lines = [
        "| data | budget | quality | reward model | runs | "
        + " | ".join(f"{v} MSE" for v in CALIBRATION.values())
        + " | constant-predictor MSE |",
        "|---|---|---|---|---|" + "---|" * (len(CALIBRATION) + 1),
    ]
    for data, budget, quality in sorted(
        {(r["data"], r["budget"], r["quality"]) for r in rows}, key=lambda g: study.order((*g[:2], -g[2]))
    ):
        for candidate in study.candidates:
            setting = (data, budget, quality, candidate)
            mine = [r for r in rows if (r["data"], r["budget"], r["quality"], r["candidate"]) == setting]
            if mine:
                keys = [*CALIBRATION, "constant_mse"]
                cells = [mean_se([r[eval_set]["calibration"][key] for r in mine]) for key in keys]
                lines.append(
                    f"| {data} | {budget} | {quality:g} | {candidate} | {len(mine)} | " + " | ".join(cells) + " |"
                )
    return "\n".join(lines)


def headline(study: Study, rows: list[dict], eval_set: str) -> str:
    """One table: per data set and budget, each candidate's per-prompt Spearman at every quality."""
    rows = [r for r in rows if eval_set in r]
    qualities = sorted({r["quality"] for r in rows}, reverse=True)
    lines = [
        "| data | budget | reward model | " + " | ".join(f"quality {q:g}" for q in qualities) + " |",
        "|---|---|---|" + "---|" * len(qualities),
    ]
    for data, budget in sorted({(r["data"], r["budget"]) for r in rows}, key=study.order):
        for candidate in [*study.candidates, "baseline: ridge", "baseline: length"]:
            cells = []
            for quality in qualities:
                group = [r for r in rows if (r["data"], r["budget"], r["quality"]) == (data, budget, quality)]
                if candidate.startswith("baseline: "):
                    base = candidate.removeprefix("baseline: ")
                    values = [
                        r[eval_set]["baselines"][base]["spearman_per_prompt"]
                        for r in group
                        if base in r[eval_set]["baselines"]
                    ]
                else:
                    values = [
                        r[eval_set]["teacher"]["spearman_per_prompt"] for r in group if r["candidate"] == candidate
                    ]
                cells.append(mean_se(values) if values else "-")
            if any(c != "-" for c in cells):
                lines.append(f"| {data} | {budget} | {candidate} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(study: Study, rows: list[dict], eval_set: str, path: Path) -> None:
    """The paper's Figure 1 in spirit: per data set and budget, per-prompt Spearman against annotation
    quality for every reward model, with the baselines as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if eval_set in r]
    panels = sorted({(r["data"], r["budget"]) for r in rows}, key=study.order)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False, sharey=False)
    for ax, (data, budget) in zip(axes[0], panels):
        group = [r for r in rows if (r["data"], r["budget"]) == (data, budget)]
        qualities = sorted({r["quality"] for r in group})
        positions = np.arange(len(qualities))
        for candidate in study.candidates:
            means, ses = [], []
            for q in qualities:
                values = [
                    r[eval_set]["teacher"]["spearman_per_prompt"]
                    for r in group
                    if (r["candidate"], r["quality"]) == (candidate, q)
                ]
                values = [v for v in values if v is not None]
                means.append(np.mean(values) if values else np.nan)
                ses.append(np.std(values, ddof=1) / math.sqrt(len(values)) if len(values) > 1 else 0.0)
            ax.errorbar(positions, means, yerr=ses, marker="o", capsize=3, label=candidate)
        for baseline, style in (("ridge", ":"), ("length", "--")):
            values = [
                r[eval_set]["baselines"][baseline]["spearman_per_prompt"]
                for r in group
                if baseline in r[eval_set]["baselines"]
            ]
            if values:
                ax.axhline(float(np.mean(values)), color="grey", linestyle=style, label=f"{baseline} baseline")
        ax.set_xticks(positions, [f"{q:g}" for q in qualities])
        ax.set_xlabel("annotation quality")
        ax.set_title(f"{data}, {budget}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"per-prompt Spearman ({eval_set.replace('_', '-')})")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    from artifacts import atomic_paths

    with atomic_paths(path) as (tmp,):
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def cells_of(name: str, study: Study, data: dict, scales: dict, args) -> list[dict]:
    """The study's cells, replicates outermost: a study stopped part-way has every setting at the
    same number of runs."""
    import itertools

    def first_if_tiny(values):
        return list(values)[:1] if args.tiny else list(values)

    n_samples = {
        (data_name, budget): min(n_sample_for(data_dir, share), 40) if args.tiny else n_sample_for(data_dir, share)
        for data_name, data_dir in data.items()
        for budget, (share, _) in study.budgets.items()
    }
    cells = []
    for split_seed, seed, data_name, budget, quality, candidate in itertools.product(
        first_if_tiny(study.split_seeds),
        first_if_tiny(args.seeds or study.seeds),
        first_if_tiny(data),
        args.budgets or study.budgets,
        first_if_tiny(study.qualities),
        study.candidates,
    ):
        allowed = [b for b in args.budgets or study.budgets if b in study.only_at.get(candidate, (b,))]
        if budget not in first_if_tiny(allowed):  # tiny: each candidate at its first budget
            continue
        cell = {"data": data_name, "data_dir": data[data_name], "budget": budget}
        cell |= {"n_sample": n_samples[(data_name, budget)], "n_pairs": study.budgets[budget][1], "quality": quality}
        cell |= {"candidate": candidate, "split_seed": split_seed, "seed": seed, "tiny": args.tiny}
        cells.append(cell | ({"reward_scale": scales[data_name]} if data_name in scales else {}))
    return cells


def main(argv=None) -> None:
    from artifacts import write_text
    from cli import InputError

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", choices=sorted(STUDIES))
    parser.add_argument("--data", nargs="+", required=True, help="NAME=DATA_DIR pairs")
    parser.add_argument("--reward_scales", nargs="*", default=[], help="NAME=S: the annotator's s for that data")
    parser.add_argument("--budgets", nargs="+", default=None, help="a subset of the study's budgets")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="a subset of the study's seeds")
    parser.add_argument("--results", required=True, help="JSONL file of finished cells (appended, resumed)")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="one small cell per candidate (CI)")
    parser.add_argument("--report_only", action="store_true")
    parser.add_argument("--figure", default=None, help="PNG of the study's figure (studies with qualities)")
    parser.add_argument("--write_lock", action="store_true", help="record the flags as they resolve now")
    args = parser.parse_args(argv)
    name, study = args.study, STUDIES[args.study]
    try:
        data = dict(item.split("=", 1) for item in args.data)
        scales = {key: float(value) for key, value in (item.split("=", 1) for item in args.reward_scales)}
    except ValueError as exc:
        raise InputError(f"--data and --reward_scales take NAME=VALUE pairs ({exc})") from None
    unknown = sorted(set(args.budgets or []) - set(study.budgets))
    if unknown:
        raise InputError(
            f"--budgets: study {name} has no budget {', '.join(unknown)} (it has {', '.join(study.budgets)})"
        )
    cells = cells_of(name, study, data, scales, args)
    lock = json.loads(LOCK_FILE.read_text()) if LOCK_FILE.is_file() else {}
    if args.write_lock:
        lock[name] = {c["candidate"]: lock_entry(resolved_flags(study, {**c, "tiny": False})) for c in cells}
        write_text(LOCK_FILE, json.dumps(lock, indent=1, sort_keys=True) + "\n")
        print(f"recorded the resolved flags of study {name} in {LOCK_FILE}", file=sys.stderr)
        return
    for cell in {c["candidate"]: c for c in cells}.values():
        check_lock(name, study, cell, lock)

    results = Path(args.results)
    done = [json.loads(line) for line in results.read_text().splitlines() if line.strip()] if results.is_file() else []
    done_keys = {cell_key(r) for r in done}
    todo = [c for c in cells if cell_key(c) not in done_keys]
    if todo and not args.report_only:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        with ProcessPoolExecutor(args.jobs) as pool, results.open("a") as handle:
            for i, row in enumerate(pool.map(run_cell, [(name, c) for c in todo])):
                handle.write(json.dumps(row) + "\n")
                handle.flush()
                done.append(row)
                print(
                    f"[{i + 1}/{len(todo)}] {row['data']} {row['budget']} q={row['quality']:g} {row['candidate']} "
                    f"split {row['split_seed']} seed {row['seed']}: held-out Spearman "
                    f"{row['held_out']['teacher']['spearman_per_prompt']}",
                    file=sys.stderr,
                )
    wanted = {cell_key(c) for c in cells}
    rows = [r for r in done if cell_key(r) in wanted]
    for eval_set in EVAL_SETS:
        if any(eval_set in r for r in rows):
            print(f"\n### {eval_set.replace('_', '-')} prompts: per-prompt Spearman\n")
            print(headline(study, rows, eval_set))
            if len(study.candidates) > 1:
                print(f"\n### {eval_set.replace('_', '-')} prompts: paired differences from {study.reference}\n")
                print(differences(study, rows, eval_set))
            if any("calibration" in r.get(eval_set, {}) for r in rows):
                print(f"\n### {eval_set.replace('_', '-')} prompts: calibrated error to the golden reward\n")
                print(calibration_table(study, rows, eval_set))
            print(report(study, rows, eval_set))
    if args.figure and rows:
        eval_set = "test" if all("test" in r for r in rows) else "held_out"
        plot(study, rows, eval_set, Path(args.figure))


if __name__ == "__main__":
    from cli import run_cli

    run_cli(main)
