"""Gather run_all.sh output folders into one table and the paper-style figures.

    python3 summarize_runs.py sweeps/annotation_quality --output_dir sweeps/annotation_quality
    python3 summarize_runs.py 'runs/*' distill_out --output_dir summary

Story: find the runs (folders holding ``orm_manifest.json``, given directly, as globs or anywhere
below a given folder); read each run's own JSON (an unreadable run is left out and named); count
each run once, identified by what it ran, not by its folder (copies are named as duplicates); group
the runs by their configuration minus the seed, refusing to put runs evaluated on different held-out
prompts in one row or one curve; write ``summary.csv``, ``summary.md`` and one figure per swept
setting (README, "Reproducing the paper's comparisons", lists the metrics). Each cell is the mean
over the runs that have its metric, and says how many that is where some runs lack it; summary.md
names the runs left out (no step-6 results, or cells run_sweep.sh recorded as failed) and the runs
that stopped before step 8.
"""

from __future__ import annotations

import interrupts  # noqa: F401  (first: signals are handled from here on, before the heavy imports)

# isort: split
import csv
import glob
import io
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from artifacts import ensure_writable_dir, json_sha256, read_json, write_text
from cli import ArgumentParser, InputError, finite_number, run_cli
from plots import plot_sweep
from run_folder import (
    DISTILLATION_CONFIG_FILE,
    MANIFEST_FILE,
    PARTITION_FILE,
    VALIDATION_RESULTS_FILE,
    eval_results_file,
)
from run_variables import flag_variables
from step5_train_rms import VALUES_BEFORE_FLAGS
from step7_isotonic_distillation import RENAMED_FLAGS

NOT_SETTINGS = {"seed", "data_dir", "output_dir"}  # what varies between the runs of one row
PATHS = {"data_dir", "output_dir"}  # where a run's data and outputs were: not what it ran
STEP7_SETTINGS = ("distill_epochs", "student_learning_rate", "isotonic_variant", "cv_folds")
# Step-5/7 settings under the run_all.sh variable that sets them (run_variables.py); a setting without one
# is named as its flag (:func:`setting_text`).
VARIABLES = {
    flag[2:]: variable
    for script in ("step5_train_rms.py", "step7_isotonic_distillation.py")
    for flag, variable in flag_variables(script).items()
    if flag[2:] not in NOT_SETTINGS and (script.startswith("step5") or flag[2:] in STEP7_SETTINGS)
}
RUN_ALL_VARIABLES = set(VARIABLES.values())
FAILED_CELLS = Path("logs") / "failed_cells.txt"  # run_sweep.sh's list of the cells whose run_all.sh failed
FIGURE_SETTINGS = ("N_SAMPLE", "ANNOTATION_QUALITY", "N_PAIRS")
# The reward model's kind: the table's first columns (RM_OBJECTIVE always, RM_MODEL where it varies), and
# in figure legends by value alone ("clf, lgbm").
SHOWN_BY_VALUE = ("RM_OBJECTIVE", "RM_MODEL")
EVAL_SETS = {"held_out": "held-out", "test": "test"}
# Metric column -> label (read by read_metrics). The ensemble is the members' mean; "mean member"
# is the average of the members' own values (what one member is worth).
METRICS = {
    "spearman_per_prompt": "per-prompt Spearman",
    "spearman_global": "global Spearman",
    "pearson_global": "global Pearson",
    "acc_same_prompt": "same-prompt pairwise acc.",
    "acc_cross_prompt": "cross-prompt pairwise acc.",
    "member_spearman_per_prompt": "per-prompt Spearman, mean member",
    "member_acc_same_prompt": "same-prompt pairwise acc., mean member",
    "bon_gain": "best-of-N gain over random",
    "ridge_spearman_per_prompt": "ridge baseline, per-prompt Spearman",
    "ridge_pearson_global": "ridge baseline, global Pearson",
    "length_spearman_per_prompt": "length baseline, per-prompt Spearman",
    "length_pearson_global": "length baseline, global Pearson",
    "teacher_iso_pearson_global": "Teacher+Isotonic global Pearson",
    "student_pearson_global": "Student global Pearson",
    "student_iso_pearson_global": "Student+Isotonic global Pearson",
    "teacher_iso_mse": "Teacher+Isotonic MSE",
    "student_iso_mse": "Student+Isotonic MSE",
    "ridge_mse": "ridge baseline MSE",
    "constant_mse": "constant-predictor MSE",
}
# The swept-setting figures' panels: the teacher's ranking beside the baselines, and calibration.
FIGURE_METRICS = (
    "spearman_per_prompt",
    "pearson_global",
    "ridge_pearson_global",
    "length_pearson_global",
    "acc_same_prompt",
    "bon_gain",
    "student_iso_mse",
    "constant_mse",
)


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders, globs, or folders to search for runs")
    parser.add_argument("--output_dir", default=".", help="where summary.csv, summary.md and the PNGs go")
    return parser.parse_args(argv)


@dataclass
class RunSummary:
    path: Path
    seed: int
    settings: dict  # run_all.sh name -> value, seed excluded
    held_out_key: str  # the data and the held-out prompts it was evaluated on
    n_held_out: int
    metrics: dict  # "{set}_{metric}" -> float or None
    bon_n: dict  # set -> largest best-of-N N, or None
    last_step: int  # the last step whose results the folder holds (5 to 8)
    trained: str  # what step 5 ran: its resolved settings (seed included) and the data's fingerprint
    distilled: str | None  # what step 7 ran on top of it (None before step 7)


def find_runs(patterns: list[str]) -> list[Path]:
    """Run folders (holding orm_manifest.json) named by ``patterns``, deduplicated and sorted."""
    found = set()
    for pattern in patterns:
        matches = glob.glob(pattern) or [pattern]
        for match in map(Path, matches):
            if (match / MANIFEST_FILE).is_file():
                found.add(match.resolve())
            elif match.is_dir():
                found.update(manifest.parent.resolve() for manifest in match.rglob(MANIFEST_FILE))
            else:
                raise InputError(f"{match}: not a run folder (no {MANIFEST_FILE}) nor a folder of runs")
    if not found:
        raise InputError(f"no run folders ({MANIFEST_FILE}) in {' '.join(patterns)}")
    return sorted(found)


def number(value) -> float | None:
    """A finite float, or None for a missing, null or non-finite value."""
    return float(value) if finite_number(value) else None


def dig(obj, *keys):
    """obj[k1][k2]..., or None where a level is missing."""
    for key in keys:
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def member_mean(members: list[dict], *keys: str) -> float | None:
    """The mean over ensemble members of one metric; None when any member lacks it."""
    values = [number(dig(member, *keys)) for member in members]
    return None if not values or None in values else float(np.mean(values))


def read_metrics(evaluation: dict | None, validation: dict | None, eval_set: str) -> tuple[dict, int | None]:
    """The summary metrics of one evaluation set of one run, and its largest best-of-N N."""
    ranking = dig(evaluation, eval_set, "ranking", "ensemble_mean")
    curves = dig(evaluation, eval_set, "best_of_n", "curves") or {}
    ensemble, random_pick = curves.get("ensemble_mean") or {}, curves.get("random") or {}
    bon_n, bon_gain = None, None
    if ensemble.get("n") and random_pick.get("n") and ensemble["n"][-1] == random_pick["n"][-1]:
        bon_n = ensemble["n"][-1]
        picked, random_mean = number(ensemble["mean"][-1]), number(random_pick["mean"][-1])
        bon_gain = None if picked is None or random_mean is None else picked - random_mean
    variants = dig(validation, eval_set, "variants")
    baselines = dig(evaluation, eval_set, "baselines")
    members = [
        report for name, report in (dig(evaluation, eval_set, "ranking") or {}).items() if name.startswith("member_")
    ]
    values = {
        "spearman_per_prompt": dig(ranking, "spearman_per_prompt", "mean"),
        "spearman_global": dig(ranking, "spearman_global"),
        "pearson_global": dig(ranking, "pearson_global"),
        "acc_same_prompt": dig(ranking, "pairwise_accuracy_same_prompt", "accuracy"),
        "acc_cross_prompt": dig(ranking, "pairwise_accuracy_cross_prompt", "accuracy"),
        "member_spearman_per_prompt": member_mean(members, "spearman_per_prompt", "mean"),
        "member_acc_same_prompt": member_mean(members, "pairwise_accuracy_same_prompt", "accuracy"),
        "bon_gain": bon_gain,
        "ridge_spearman_per_prompt": dig(baselines, "ridge", "spearman_per_prompt", "mean"),
        "ridge_pearson_global": dig(baselines, "ridge", "pearson_global"),
        "length_spearman_per_prompt": dig(baselines, "length", "spearman_per_prompt", "mean"),
        "length_pearson_global": dig(baselines, "length", "pearson_global"),
        "teacher_iso_pearson_global": dig(variants, "Teacher+Isotonic", "pearson_global"),
        "student_pearson_global": dig(variants, "Student", "pearson_global"),
        "student_iso_pearson_global": dig(variants, "Student+Isotonic", "pearson_global"),
        "teacher_iso_mse": dig(variants, "Teacher+Isotonic", "calibration", "mse"),
        "student_iso_mse": dig(variants, "Student+Isotonic", "calibration", "mse"),
        "ridge_mse": dig(baselines, "ridge", "calibration", "mse"),
        "constant_mse": dig(validation, eval_set, "constant_predictor", "mse"),
    }
    return {f"{eval_set}_{name}": number(value) for name, value in values.items()}, bon_n


def optional_json(path: Path) -> dict | None:
    return read_json(path, "run result") if path.is_file() else None


def load_run(path: Path) -> RunSummary:
    manifest = read_json(path / MANIFEST_FILE, "ORM manifest")
    split = read_json(path / PARTITION_FILE, "prompt partition")
    config = manifest.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("seed"), int) or "rm_objective" not in config:
        raise InputError(f"{path / MANIFEST_FILE}: no step-5 config with an integer seed and rm_objective")
    # A run from before a step-5 flag existed was trained as that flag's value then: compare it as such.
    config = {**{key: value for key, value in VALUES_BEFORE_FLAGS.items() if key not in config}, **config}
    settings = {VARIABLES.get(key, key.upper()): value for key, value in config.items() if key not in NOT_SETTINGS}
    if "REPLACEMENT" in settings:  # run_all.sh's REPLACEMENT=1 is step 5's --replacement replacement_true
        settings["REPLACEMENT"] = int(settings["REPLACEMENT"] == "replacement_true")
    distillation = optional_json(path / DISTILLATION_CONFIG_FILE)
    # An older run's step-7 settings under the flags' names of today.
    step7 = {RENAMED_FLAGS.get(key, key): value for key, value in (dig(distillation, "config") or {}).items()}
    settings.update({VARIABLES.get(key, key.upper()): step7[key] for key in STEP7_SETTINGS if key in step7})
    data_fingerprint = dig(manifest, "data", "fingerprint")
    settings["DATA"] = str(data_fingerprint)[:12]  # runs on other data are other configurations
    held_out = split.get("held_out")
    if not isinstance(held_out, list):
        raise InputError(f"{path / PARTITION_FILE}: no held_out prompt list")
    held_out_key = json_sha256([data_fingerprint, sorted(held_out)])
    evaluation = optional_json(path / eval_results_file(config["rm_objective"]))
    validation = optional_json(path / VALIDATION_RESULTS_FILE)
    metrics, bon_n = {}, {}
    for eval_set in EVAL_SETS:
        values, bon_n[eval_set] = read_metrics(evaluation, validation, eval_set)
        metrics.update(values)
    last_step = 8 if validation else 7 if distillation else 6 if evaluation else 5
    # What the run ran, wherever its folder is: a copied folder is the same run.
    trained = json_sha256([{k: v for k, v in config.items() if k not in PATHS}, data_fingerprint])
    distilled = json_sha256({k: v for k, v in step7.items() if k not in PATHS}) if distillation else None
    return RunSummary(
        path, config["seed"], settings, held_out_key, len(held_out), metrics, bon_n, last_step, trained, distilled
    )


def load_runs(paths: list[Path]) -> tuple[list[RunSummary], list[tuple[Path, str]]]:
    """The runs that can be read, and the others with the reason (a damaged or foreign file): one
    unreadable run is left out and named, not a refusal of the whole summary."""
    runs, unreadable = [], []
    for path in paths:
        try:
            runs.append(load_run(path))
        except InputError as err:
            unreadable.append((path, f"unreadable: {err}"))
    return runs, unreadable


def drop_duplicates(runs: list[RunSummary]) -> tuple[list[RunSummary], list[tuple[Path, Path]]]:
    """Each run once, however many folders hold it (a copied run folder is not another seed): runs
    whose step 5 ran the same settings, seed and data are one run, unless both ran step 7 with other
    settings. Of the folders of one run the one that got furthest is kept (the first of equals).
    Returns the runs kept and (duplicate folder, folder kept) pairs."""
    by_training: dict[str, list[RunSummary]] = defaultdict(list)
    for run in sorted(runs, key=lambda run: (-run.last_step, str(run.path))):
        by_training[run.trained].append(run)
    kept, duplicates = [], []
    for same in by_training.values():
        distilled: dict[str | None, RunSummary] = {}
        for run in same:  # furthest first: a run with step 7 comes before its copies without
            twin = distilled.get(run.distilled)
            if twin is None and run.distilled is None and distilled:
                twin = next(iter(distilled.values()))
            if twin is not None:
                duplicates.append((run.path, twin.path))
            else:
                distilled[run.distilled] = run
        kept += distilled.values()
    return sorted(kept, key=lambda run: str(run.path)), sorted(duplicates)


def sort_key(value) -> tuple:
    return (0, value, "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0, str(value))


def check_same_held_out(runs: list[RunSummary], what: str) -> None:
    """One line if ``runs`` (one row or one curve) were evaluated on different held-out prompts."""
    first = runs[0]
    for run in runs[1:]:
        if run.held_out_key != first.held_out_key:
            raise InputError(
                f"{first.path} and {run.path} were evaluated on different held-out prompts "
                f"(other data, SPLIT_SEED or EVAL_PROMPTS, or runs from before the fixed "
                f"evaluation pool); they cannot share {what}"
            )


def mean_se(values: list[float | None]) -> tuple[float | None, float | None, int]:
    """Mean, standard error (sample std / sqrt(n)) and count n of the defined values; SE needs two."""
    defined = np.array([v for v in values if v is not None], dtype=np.float64)
    if len(defined) == 0:
        return None, None, 0
    se = float(defined.std(ddof=1) / np.sqrt(len(defined))) if len(defined) > 1 else None
    return float(defined.mean()), se, len(defined)


def settings_key(settings: dict, leave_out: set[str] = frozenset()) -> str:
    return json.dumps({name: value for name, value in settings.items() if name not in leave_out}, sort_keys=True)


def group_runs(runs: list[RunSummary]) -> list[list[RunSummary]]:
    """The runs of each configuration (every setting but the seed). A run that stopped before step 7
    has no step-7 settings: it joins the one configuration whose other settings are its own."""
    step7_names = {VARIABLES.get(name, name.upper()) for name in STEP7_SETTINGS}
    groups: dict[str, list[RunSummary]] = defaultdict(list)
    for run in runs:
        if run.last_step >= 7:
            groups[settings_key(run.settings)].append(run)
    by_step5 = defaultdict(list)
    for key, members in groups.items():
        by_step5[settings_key(members[0].settings, step7_names)].append(key)
    for run in runs:
        if run.last_step < 7:
            partial = settings_key(run.settings, step7_names)
            matches = by_step5.get(partial, [])
            groups[matches[0] if len(matches) == 1 else partial].append(run)
    return list(groups.values())


def setting_value(runs: list[RunSummary], name: str):
    """The setting's value in the first of ``runs`` that has it (None where none has)."""
    return next((run.settings[name] for run in runs if name in run.settings), None)


def summarize(runs: list[RunSummary]) -> tuple[list[str], list[str], list[dict], dict]:
    """Rows of the summary: (varied settings, metric columns, rows, common settings)."""
    all_names = sorted({name for run in runs for name in run.settings})
    differs = {
        name for name in all_names if len({json.dumps(r.settings[name]) for r in runs if name in r.settings}) > 1
    }
    varied = ["RM_OBJECTIVE", *(name for name in SHOWN_BY_VALUE[1:] if name in differs)]
    varied += [name for name in all_names if name in differs and name not in varied]
    common = {name: setting_value(runs, name) for name in all_names if name not in varied}
    sets = [s for s in EVAL_SETS if any(run.metrics[f"{s}_spearman_per_prompt"] is not None for run in runs)]
    columns = [f"{s}_{metric}" for s in sets for metric in METRICS]
    rows = []
    for members in group_runs(runs):
        check_same_held_out(members, "a row")
        row = {name: setting_value(members, name) for name in varied}
        row["n_seeds"] = len(members)
        row["seeds"] = " ".join(str(seed) for seed in sorted(run.seed for run in members))
        for column in columns:
            row[f"{column}_mean"], row[f"{column}_se"], row[f"{column}_n"] = mean_se(
                [run.metrics[column] for run in members]
            )
        for s in sets:
            ns = {run.bon_n[s] for run in members if run.bon_n[s] is not None}
            row[f"{s}_bon_n"] = ns.pop() if len(ns) == 1 else None
        row["_runs"] = members
        rows.append(row)
    rows.sort(key=lambda row: [sort_key(row[name]) for name in varied])
    return varied, columns, rows, common


def failed_cells(patterns: list[str], runs: list[RunSummary]) -> dict[Path, Path]:
    """Cells that run_sweep.sh recorded as failed (``logs/failed_cells.txt`` of a sweep folder: a
    folder given, or one holding a run): cell folder -> its log."""
    folders = {run.path.parent for run in runs} | {Path(p).resolve() for p in patterns if Path(p).is_dir()}
    failed = {}
    for folder in sorted(folders):
        if (folder / FAILED_CELLS).is_file():
            for cell in filter(None, (folder / FAILED_CELLS).read_text().splitlines()):
                failed[folder / cell] = folder / "logs" / f"{cell}.log"
    return failed


def leave_out(
    runs: list[RunSummary], failed: dict[Path, Path], unreadable: list[tuple[Path, str]] = ()
) -> tuple[list[RunSummary], list[tuple[Path, str]]]:
    """The runs to summarise, and the others (``unreadable`` ones first) with the reason each is left
    out (an error if none is left)."""
    kept, left_out = [], list(unreadable)
    for run in runs:
        if run.path in failed:
            left_out.append((run.path, f"run_sweep.sh recorded the cell as failed (log {failed[run.path]})"))
        elif run.last_step < 6:
            name = eval_results_file(run.settings["RM_OBJECTIVE"])
            left_out.append((run.path, f"no step-6 results ({name}): the run stopped after step 5"))
        else:
            kept.append(run)
    if not kept:
        path, reason = left_out[0]
        others = f" (and {len(left_out) - 1} more runs left out)" if len(left_out) > 1 else ""
        raise InputError(f"no run to summarise: {path}: {reason}{others}")
    return kept, left_out


def run_notes(
    runs: list[RunSummary],
    left_out: list[tuple[Path, str]],
    failed: dict[Path, Path],
    duplicates: list[tuple[Path, Path]] = (),
) -> list[str]:
    """summary.md's closing sections: failed sweep cells, runs left out, duplicate folders, runs
    counted in part."""
    lines = []
    if failed:
        lines += ["## Failed cells (run_sweep.sh)", ""]
        for cell, log in failed.items():
            last = log.read_text(errors="replace").strip().splitlines()[-1:] if log.is_file() else ["(no log)"]
            lines.append(f"- `{cell.name}`: {last[0] if last else '(empty log)'} (log {log})")
        lines.append("")
    if left_out:
        lines += ["## Runs left out", ""] + [f"- `{path}`: {reason}" for path, reason in left_out] + [""]
    if duplicates:
        lines += ["## Duplicate run folders (counted once)", ""]
        lines += [f"- `{path}`: the same run as `{kept}` (same settings, seed and data)" for path, kept in duplicates]
        lines.append("")
    partial = [run for run in runs if run.last_step < 8]
    if partial:
        lines += ["## Runs counted in part", ""]
        lines += [
            f"- `{run.path}`: stopped after step {run.last_step} (no {VALIDATION_RESULTS_FILE}): "
            "counted in the step-6 metrics, not in the MSE columns"
            for run in partial
        ]
        lines.append("")
    return lines


def figure_settings(rows: list[dict], varied: list[str]) -> tuple[list[str], bool]:
    """The swept settings that get a figure, and whether they are numeric: those of FIGURE_SETTINGS that
    vary; else (a sweep of categories, e.g. SWEEP=objective or pairing modes) the first other setting
    that takes several values, the objective last."""
    numeric = [name for name in FIGURE_SETTINGS if name in varied]
    if numeric:
        return numeric, True
    several = [name for name in varied if name != "DATA" and len({json.dumps(row[name]) for row in rows}) > 1]
    several.sort(key=lambda name: name == "RM_OBJECTIVE")
    return several[:1], False


def figure_curves(rows: list[dict], varied: list[str]) -> dict[str, dict[str, list[dict]]]:
    """Swept setting (:func:`figure_settings`) -> curve label -> its rows (equal but in that setting),
    after checking that the runs of each curve share their held-out prompts (a category whose curves
    do not, e.g. embedding models on their own data, gets no figure instead)."""
    names, numeric = figure_settings(rows, varied)
    figures = {}
    for x_name in names:
        others = [name for name in varied if name != x_name]
        curves = defaultdict(list)
        for row in rows:
            label = ", ".join(str(row[n]) if n in SHOWN_BY_VALUE else f"{n}={row[n]}" for n in others)
            curves[label or "ensemble mean"].append(row)
        try:
            for curve_rows in curves.values():
                check_same_held_out([run for row in curve_rows for run in row["_runs"]], f"a curve against {x_name}")
        except InputError:
            if numeric:
                raise
            continue
        figures[x_name] = curves
    return figures


def setting_label(name: str) -> str:
    """How a user sets it: the run_all.sh variable, else the step flag (the data: its fingerprint)."""
    if name in RUN_ALL_VARIABLES:
        return name
    return "data fingerprint" if name == "DATA" else f"--{name.lower()}"


def setting_text(name: str, value) -> str:
    if name in RUN_ALL_VARIABLES:
        return f"{name}={value}"
    if name == "DATA":
        return f"data fingerprint {value}"
    return f"step {7 if name.lower() in STEP7_SETTINGS else 5} --{name.lower()} {value}"


def cell_text(mean: float | None, se: float | None, n: int, n_runs: int) -> str:
    """Mean ± SE; "(n=k)" where only k of the row's runs have the metric."""
    text = "n/a" if mean is None else f"{mean:.4g}" if se is None else f"{mean:.3f} ± {se:.3f}"
    return f"{text} (n={n})" if mean is not None and n < n_runs else text


def write_tables(
    output_dir: Path, varied: list[str], columns: list[str], rows: list[dict], common: dict, notes: list[str]
) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    extra = [f"{s}_bon_n" for s in EVAL_SETS if f"{s}_spearman_per_prompt" in columns]
    stats = [f"{c}_{stat}" for c in columns for stat in ("mean", "se", "n")]
    writer.writerow([*map(setting_label, varied), "n_seeds", "seeds", *stats, *extra])
    for row in rows:  # csv writes a float as its repr, every digit
        writer.writerow(
            ["n/a" if row[name] is None else row[name] for name in [*varied, "n_seeds", "seeds", *stats, *extra]]
        )
    write_text(output_dir / "summary.csv", buffer.getvalue())

    lines = [
        f"# Summary of {sum(row['n_seeds'] for row in rows)} runs",
        "",
        "Mean ± standard error over seeds; the ensemble is the mean of its members. (n=k): only k of the",
        "row's runs have that metric (the others stopped before the step that computes it, or it is undefined).",
        "Common settings: " + ", ".join(setting_text(k, v) for k, v in common.items() if v is not None),
        "",
    ]
    for eval_set, label in EVAL_SETS.items():
        set_columns = [c for c in columns if c.startswith(f"{eval_set}_")]
        if not set_columns:
            continue
        bon_ns = {row[f"{eval_set}_bon_n"] for row in rows} - {None}
        bon = f"@N={bon_ns.pop()}" if len(bon_ns) == 1 else "@largest N"
        names = [
            METRICS[c.removeprefix(f"{eval_set}_")].replace("best-of-N gain", f"BoN{bon} gain") for c in set_columns
        ]
        lines += [
            f"## {label} prompts",
            "",
            "| " + " | ".join([*map(setting_label, varied), "n seeds", *names]) + " |",
            "|" + "---|" * (len(varied) + 1 + len(names)),
        ]
        for row in rows:
            cells = ["n/a" if row[name] is None else str(row[name]) for name in varied] + [str(row["n_seeds"])]
            for column in set_columns:
                stats = (row[f"{column}_{stat}"] for stat in ("mean", "se", "n"))
                cells.append(cell_text(*stats, row["n_seeds"]))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    write_text(output_dir / "summary.md", "\n".join(lines + notes))


def write_figures(output_dir: Path, figures: dict[str, dict[str, list[dict]]], rows: list[dict]) -> list[Path]:
    """One PNG per swept setting (:func:`figure_curves`): held-out metrics against it."""
    paths = []
    for x_name, curves in figures.items():
        xs = [row[x_name] for row in rows]  # numbers (on a log axis where all are positive), else categories
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        log_x = numeric and all(x > 0 for x in xs)
        panels = {}
        for metric in FIGURE_METRICS:
            column, metric_label = f"held_out_{metric}", METRICS[metric]
            panels[metric_label] = {
                label: {
                    "x": [row[x_name] if numeric else str(row[x_name]) for row in curve_rows],
                    "mean": [row.get(f"{column}_mean") for row in curve_rows],
                    "se": [row.get(f"{column}_se") for row in curve_rows],
                }
                for label, curve_rows in curves.items()
            }
        path = output_dir / f"summary_vs_{x_name}.png"
        seeds = sorted({row["n_seeds"] for row in rows})
        seeds_text = f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"
        plot_sweep(
            x_name,
            panels,
            path,
            log_x=log_x,
            title=f"held-out prompts ({rows[0]['_runs'][0].n_held_out} prompts), mean ± SE over "
            f"{seeds_text} seeds per point",
        )
        paths.append(path)
    return paths


def main(argv=None) -> Path:
    args = parse_args(argv)
    found, unreadable = load_runs(find_runs(args.runs))
    failed = failed_cells(args.runs, found)
    found, duplicates = drop_duplicates(found)
    runs, left_out = leave_out(found, failed, unreadable)
    varied, columns, rows, common = summarize(runs)
    curves = figure_curves(rows, varied)
    output_dir = ensure_writable_dir(args.output_dir)  # only once the runs are known to fit together
    write_tables(output_dir, varied, columns, rows, common, run_notes(runs, left_out, failed, duplicates))
    figures = write_figures(output_dir, curves, rows)
    print((output_dir / "summary.md").read_text())
    print(
        f"summarize_runs: {len(runs)} runs in {len(rows)} rows ({len(left_out)} left out, {len(duplicates)} "
        f"duplicate folders, {len(failed)} failed cells) -> {output_dir / 'summary.csv'}, "
        f"{output_dir / 'summary.md'}" + "".join(f", {path}" for path in figures)
    )
    return output_dir


if __name__ == "__main__":
    run_cli(main)
