"""Comparable experiments: a fixed evaluation pool, the sweep driver and summarize_runs.py."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, run_failing

import settings
import summarize_runs

# Tiny runs: a few seconds per run_all.sh, dominated by Python start-up.
TINY = {
    "N_SAMPLE": "40",
    "EVAL_PROMPTS": "40",
    "DEMO_PROMPTS": "120",
    "DEMO_EMB_DIM": "16",
    "DEMO_TEST_PROMPTS": "3",
    "DEMO_TEST_RESPONSES": "12",
    "ENSEMBLE_NUMBER": "2",
    "TRAINING_EPOCHS": "1",
    "DISTILL_EPOCHS": "1",
    "PYTHON": sys.executable,
}
EVAL_ROLES = ("calibration", "student_train", "held_out")


def run_script(script: str, tmp_path: Path, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "DATA_DIR": str(tmp_path / "data"), **TINY, **env}
    return subprocess.run(
        ["bash", str(ROOT / script)], env=full_env, capture_output=True, text=True, timeout=900, cwd=tmp_path
    )


def split_of(folder: Path) -> dict:
    return json.loads((folder / "prompt_split.json").read_text())


def test_evaluation_prompts_do_not_depend_on_n_sample_or_seed(tmp_path):
    outs = {name: tmp_path / name for name in ("base", "more_prompts", "other_seed")}
    settings = {"base": {}, "more_prompts": {"N_SAMPLE": "70"}, "other_seed": {"SEED": "7"}}
    for name, out in outs.items():
        proc = run_script("run_all.sh", tmp_path, OUTPUT_DIR=str(out), **settings[name])
        assert proc.returncode == 0, proc.stderr[-2000:]
        if name == "base":  # later runs reuse the demo data untouched
            data_files = {path: path.stat().st_mtime_ns for path in (tmp_path / "data").iterdir()}
    assert {path: path.stat().st_mtime_ns for path in (tmp_path / "data").iterdir()} == data_files
    base, more, other = (split_of(out) for out in outs.values())
    for role in EVAL_ROLES:
        assert base[role] == more[role] == other[role], role
    assert [len(base[role]) for role in EVAL_ROLES] == [24, 8, 8]
    assert len(base["orm_train"]) == 40 and len(more["orm_train"]) == 70
    assert set(base["orm_train"]) < set(more["orm_train"])  # nested as N_SAMPLE grows
    assert base["orm_train"] == other["orm_train"]  # SEED draws pairs, labels and weights only
    assert (base["split_seed"], base["eval_prompts"], base["n_prompts"]) == (0, 40, 120)
    base_ckpt = json.loads((outs["base"] / "orm_manifest.json").read_text())["checkpoints"][0]
    other_ckpt = json.loads((outs["other_seed"] / "orm_manifest.json").read_text())["checkpoints"][0]
    assert (outs["base"] / base_ckpt).read_bytes() != (outs["other_seed"] / other_ckpt).read_bytes()
    # summarize_runs.py puts runs with N_SAMPLE 40 and 70 on one curve, but not with other held-out prompts.
    summarize_runs.main([str(outs["base"]), str(outs["more_prompts"]), "--output_dir", str(tmp_path / "s")])
    assert (tmp_path / "s" / "summary_vs_N_SAMPLE.png").stat().st_size > 10_000
    # A run whose held-out prompts moved with N_SAMPLE (as before the fixed pool) cannot join that curve.
    moved = tmp_path / "moved"
    shutil.copytree(outs["more_prompts"], moved)
    (moved / "prompt_split.json").write_text(json.dumps({**more, "held_out": more["held_out"][1:] + [10**6]}))
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "summarize_runs.py"),
            str(outs["base"]),
            str(moved),
            "--output_dir",
            str(tmp_path / "s2"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "were evaluated on different held-out prompts" in proc.stderr
    assert "a curve against N_SAMPLE" in proc.stderr


def ensemble_metrics(run: Path, eval_set: str) -> dict:
    """The summary's metrics, read straight from a run's own JSON files."""
    manifest = json.loads((run / "orm_manifest.json").read_text())
    evaluation = json.loads((run / f"eval_results_{manifest['config']['rm_objective']}.json").read_text())[eval_set]
    validation = json.loads((run / "validation_results.json").read_text())[eval_set]
    ranking, curves = evaluation["ranking"]["ensemble_mean"], evaluation["best_of_n"]["curves"]
    return {
        "spearman_per_prompt": ranking["spearman_per_prompt"]["mean"],
        "spearman_global": ranking["spearman_global"],
        "acc_same_prompt": ranking["pairwise_accuracy_same_prompt"]["accuracy"],
        "acc_cross_prompt": ranking["pairwise_accuracy_cross_prompt"]["accuracy"],
        "member_spearman_per_prompt": np.mean(
            [
                evaluation["ranking"][f"member_{i}"]["spearman_per_prompt"]["mean"]
                for i in range(len(manifest["checkpoints"]))
            ]
        ),
        "member_acc_same_prompt": np.mean(
            [
                evaluation["ranking"][f"member_{i}"]["pairwise_accuracy_same_prompt"]["accuracy"]
                for i in range(len(manifest["checkpoints"]))
            ]
        ),
        "bon_gain": curves["ensemble_mean"]["mean"][-1] - curves["random"]["mean"][-1],
        "pearson_global": ranking["pearson_global"],
        "ridge_spearman_per_prompt": evaluation["baselines"]["ridge"]["spearman_per_prompt"]["mean"],
        "ridge_pearson_global": evaluation["baselines"]["ridge"]["pearson_global"],
        "ridge_mse": evaluation["baselines"]["ridge"]["calibration"]["mse"],
        "teacher_iso_pearson_global": validation["variants"]["Teacher+Isotonic"]["pearson_global"],
        "student_pearson_global": validation["variants"]["Student"]["pearson_global"],
        "student_iso_pearson_global": validation["variants"]["Student+Isotonic"]["pearson_global"],
        "teacher_iso_mse": validation["variants"]["Teacher+Isotonic"]["calibration"]["mse"],
        "student_iso_mse": validation["variants"]["Student+Isotonic"]["calibration"]["mse"],
        "constant_mse": validation["constant_predictor"]["mse"],
    }


def test_sweep_driver_and_summary_match_the_runs(tmp_path):
    grid = {"GRID": "RM_OBJECTIVE=bt,clf ANNOTATION_QUALITY=10,1", "SEEDS": "1 2", "NAME": "aq", "SWEEP_DIR": "sweeps"}
    printed = run_script("run_sweep.sh", tmp_path, PRINT="1", JOBS="2", THREADS="1", **grid)
    assert printed.returncode == 0, printed.stderr
    lines = printed.stdout.splitlines()
    assert len(lines) == 8 and all("OMP_NUM_THREADS=1 MKL_NUM_THREADS=1" in line for line in lines)
    assert "OUTPUT_DIR=" + str(tmp_path / "sweeps" / "aq" / "RM_OBJECTIVE=clf,ANNOTATION_QUALITY=1,SEED=2") in lines[-1]
    assert not (tmp_path / "data").exists()  # printing runs nothing

    proc = run_script("run_sweep.sh", tmp_path, JOBS="2", **grid)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    root = tmp_path / "sweeps" / "aq"
    cells = sorted(path for path in root.iterdir() if (path / "orm_manifest.json").is_file())
    assert [cell.name for cell in cells] == sorted(
        f"RM_OBJECTIVE={o},ANNOTATION_QUALITY={q},SEED={s}" for o in ("bt", "clf") for q in (10, 1) for s in (1, 2)
    )
    assert len({json.dumps([split_of(cell)[role] for role in EVAL_ROLES]) for cell in cells}) == 1
    with open(root / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4
    for row in rows:
        quality = float(row["ANNOTATION_QUALITY"])
        runs = [root / f"RM_OBJECTIVE={row['RM_OBJECTIVE']},ANNOTATION_QUALITY={quality:g},SEED={s}" for s in (1, 2)]
        assert row["n_seeds"] == "2" and row["seeds"] == "1 2"
        for eval_set in ("held_out", "test"):
            per_run = [ensemble_metrics(run, eval_set) for run in runs]
            assert row[f"{eval_set}_length_pearson_global_mean"] == "n/a"  # demo data has no lengths
            for metric in per_run[0]:
                values = np.array([metrics[metric] for metrics in per_run])
                assert float(row[f"{eval_set}_{metric}_mean"]) == pytest.approx(values.mean(), rel=1e-12)
                expected_se = values.std(ddof=1) / np.sqrt(2)
                assert float(row[f"{eval_set}_{metric}_se"]) == pytest.approx(expected_se, rel=1e-9, abs=1e-15)
    summary_md = (root / "summary.md").read_text()
    assert "## held-out prompts" in summary_md and "## test prompts" in summary_md
    assert (root / "summary_vs_ANNOTATION_QUALITY.png").stat().st_size > 10_000
    # A rerun finds every cell up to date and only summarizes again.
    proc = run_script("run_sweep.sh", tmp_path, JOBS="2", **grid)
    assert proc.returncode == 0
    logs = [(root / "logs" / f"{cell.name}.log").read_text() for cell in cells]
    assert all(log.count("up to date]") == 4 for log in logs)


def test_sweep_values_listed_twice_make_one_cell(tmp_path):
    """Grid values are compared as SEEDS are, numbers by value: 10 and 10.0 are one value, N_SAMPLE=40,40
    one cell, which JOBS=2 runs once (two copies side by side would fail on its folder lock). SWEEP with
    GRID says that GRID replaces the preset's grid."""
    env = {"SWEEP_DIR": str(tmp_path / "sweeps"), "PRINT": "1", "SEEDS": "1 01"}
    proc = run_script("run_sweep.sh", tmp_path, GRID="ANNOTATION_QUALITY=10,10.0,1e1,0.5,.5 N_SAMPLE=40,40", **env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "run_sweep.sh: note: SEEDS lists a seed more than once; running each once: 1",
        "run_sweep.sh: note: GRID lists a value of ANNOTATION_QUALITY more than once; running each once: 10,0.5",
        "run_sweep.sh: note: GRID lists a value of N_SAMPLE more than once; running each once: 40",
    ]
    cells = [line.split("OUTPUT_DIR=")[1].split()[0].rsplit("/", 1)[1] for line in proc.stdout.splitlines()]
    assert cells == ["ANNOTATION_QUALITY=10,N_SAMPLE=40,SEED=1", "ANNOTATION_QUALITY=0.5,N_SAMPLE=40,SEED=1"]
    proc = run_script("run_sweep.sh", tmp_path, SWEEP="objective", GRID="RM_OBJECTIVE=bt", **env)
    assert proc.returncode == 0 and proc.stderr.strip().splitlines()[-1] == (
        "run_sweep.sh: note: GRID replaces the grid of SWEEP=objective (RM_OBJECTIVE=bt,clf); SWEEP=objective "
        "still names the sweep and sets its fixed settings"
    )
    env.pop("PRINT")
    proc = run_script("run_sweep.sh", tmp_path, GRID="N_SAMPLE=40,40", JOBS="2", LAST_STEP="6", NAME="twice", **env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = tmp_path / "sweeps" / "twice"
    assert not (root / "logs" / "failed_cells.txt").exists()
    with open(root / "summary.csv") as handle:
        ((row),) = list(csv.DictReader(handle))
    assert (row["n_seeds"], row["seeds"]) == ("1", "1")


def test_sweep_over_rm_model_runs_lightgbm_members_end_to_end_and_tables_them(tmp_path):
    grid = {"GRID": "RM_MODEL=mlp,lgbm", "SEEDS": "1", "NAME": "models", "SWEEP_DIR": "sweeps"}
    proc = run_script("run_sweep.sh", tmp_path, RM_OBJECTIVE="clf", THREADS="1", **grid)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    root = tmp_path / "sweeps" / "models"
    for model in ("mlp", "lgbm"):
        cell = root / f"RM_MODEL={model},SEED=1"
        manifest = json.loads((cell / "orm_manifest.json").read_text())
        assert {member["kind"] for member in manifest["members"]} == {model}
        assert (cell / "validation_results.json").is_file()  # steps 6-8 ran on the members
        student = json.loads((cell / "distillation_config.json").read_text())["student"]["checkpoint"]
        assert student.endswith(".ckpt")  # the student is an MLP whatever the teacher
    with open(root / "summary.csv") as handle:
        rows = {(row["RM_OBJECTIVE"], row["RM_MODEL"]): row for row in csv.DictReader(handle)}
    assert set(rows) == {("clf", "mlp"), ("clf", "lgbm")}
    for (_, model), row in rows.items():
        assert float(row["held_out_spearman_per_prompt_mean"]) == pytest.approx(
            ensemble_metrics(root / f"RM_MODEL={model},SEED=1", "held_out")["spearman_per_prompt"], rel=1e-12
        )
    assert "| clf | lgbm |" in (root / "summary.md").read_text()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"GRID": "ANOTATION_QUALITY=1,10"}, "GRID variable ANOTATION_QUALITY is not a run_all.sh variable"),
        ({"GRID": "SEED=1,2"}, "GRID cannot vary SEED: list the seeds in SEEDS"),
        ({"GRID": "DEMO_PROMPTS=100,200"}, "GRID cannot vary DEMO_PROMPTS"),
        ({"SWEEP": "embedding"}, "SWEEP=embedding compares embedding models: it needs USE_REPO_EMBD=1"),
        (
            {"SWEEP": "nope"},
            "SWEEP must be annotation_quality, n_sample, objective, rm_model, embedding, pairing or small_budget",
        ),
        (
            {"SWEEP": "objective", "SEEDS": "1 x"},
            "SEEDS must be integers from 0 to 4294967295 (the steps' --seed), got 'x'",
        ),
        (
            {"SWEEP": "objective", "SEEDS": "1 -1"},
            "SEEDS must be integers from 0 to 4294967295 (the steps' --seed), got '-1'",
        ),
        ({"SWEEP": "objective", "SEEDS": "4294967296"}, "got '4294967296'"),
        ({"GRID": "N_SAMPLE=40 N_SAMPLE=80"}, "GRID lists N_SAMPLE twice: give all its values in one entry"),
        ({"SWEEP": "objective", "JOBS": "0"}, "JOBS must be a positive integer, got '0'"),
        (
            {"SWEEP": "objective", "PAIR_MODE": "cross"},
            "PAIR_MODE: invalid choice: 'cross' (choose from 'xprompt', 'same')",
        ),
    ],
)
def test_sweep_bad_settings_are_one_line(tmp_path, env, message):
    proc = run_script("run_sweep.sh", tmp_path, **{"SWEEP_DIR": str(tmp_path / "sweeps"), "SEEDS": "1", **env})
    assert proc.returncode == 2, proc.stdout[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr
    assert not any((tmp_path / "sweeps").rglob("orm_manifest.json"))


def fake_run(
    folder: Path, seed: int, held_out: list[int], n_sample: int = 40, metrics: bool = True, last_step: int = 6
) -> Path:
    """A run folder with the JSON summarize_runs.py reads (step 6-8 results optional: none without
    ``metrics``, else those of the steps up to ``last_step``)."""
    folder.mkdir(parents=True)
    config = {
        "rm_objective": "bt",
        "seed": seed,
        "n_sample": n_sample,
        "annotation_quality": 10.0,
        "data_dir": "data",
        "batch_size": 64,
        "replacement": "replacement_false",
    }
    (folder / "orm_manifest.json").write_text(
        json.dumps({"config": config, "data": {"fingerprint": "f" * 64}, "checkpoints": ["a.ckpt"]})
    )
    (folder / "prompt_split.json").write_text(json.dumps({"held_out": held_out, "orm_train": [9]}))
    if metrics:
        ranking = {
            "spearman_per_prompt": {"mean": None if seed == 2 else 0.5 + seed / 10},
            "spearman_global": 0.3,
            "pairwise_accuracy_same_prompt": {"accuracy": 0.6},
            "pairwise_accuracy_cross_prompt": {"accuracy": 0.7},
        }
        (folder / "eval_results_bt.json").write_text(
            json.dumps({"held_out": {"ranking": {"ensemble_mean": ranking}, "best_of_n": {"curves": {}}}})
        )
    if metrics and last_step >= 7:
        step7 = {"distill_epochs": 20, "isotonic_variant": "centered", "cv_folds": 5, "seed": seed}
        (folder / "distillation_config.json").write_text(json.dumps({"config": step7}))
    if metrics and last_step >= 8:
        mse = {"calibration": {"mse": 0.25 + seed}}
        variants = {"Teacher+Isotonic": mse, "Student+Isotonic": mse}
        (folder / "validation_results.json").write_text(json.dumps({"held_out": {"variants": variants}}))
    return folder


def test_summary_shows_missing_metrics_as_na_and_refuses_mixed_held_out(tmp_path, capsys):
    runs = tmp_path / "runs"
    fake_run(runs / "a", 1, [1, 2])
    fake_run(runs / "b", 2, [1, 2])  # its per-prompt Spearman is undefined (null)
    fake_run(runs / "c", 3, [1, 2])
    fake_run(runs / "d", 1, [1, 2], n_sample=80, metrics=False)  # steps 6-8 never ran: left out
    summarize_runs.main([str(runs), "--output_dir", str(tmp_path / "out")])
    with open(tmp_path / "out" / "summary.csv") as handle:
        rows = {row["RM_OBJECTIVE"]: row for row in csv.DictReader(handle)}
    rows["40"] = rows.pop("bt")  # the only row: run d, the only one with N_SAMPLE 80, is left out
    assert list(rows) == ["40"] and rows["40"]["n_seeds"] == "3"
    assert float(rows["40"]["held_out_spearman_per_prompt_mean"]) == pytest.approx(0.7)  # seeds 1 and 3
    assert float(rows["40"]["held_out_spearman_per_prompt_se"]) == pytest.approx(0.1)
    assert rows["40"]["held_out_spearman_per_prompt_n"] == "2"
    assert rows["40"]["held_out_teacher_iso_mse_mean"] == "n/a"
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| bt | 3 | 0.700 ± 0.100 (n=2) | 0.3 ± 0.000 |" in summary.replace("0.300 ± 0.000", "0.3 ± 0.000")
    assert f"- `{runs / 'd'}`: no step-6 results (eval_results_bt.json): the run stopped after step 5" in summary
    fake_run(runs / "e", 4, [1, 3])  # same configuration as a-c, other held-out prompts
    mixed = tmp_path / "mixed"
    err = run_failing(summarize_runs.main, [str(runs / "a"), str(runs / "e"), "--output_dir", str(mixed)], capsys)
    assert "were evaluated on different held-out prompts" in err and "cannot share a row" in err
    assert not mixed.exists()  # nothing written
    err = run_failing(summarize_runs.main, [str(tmp_path / "nothing*"), "--output_dir", str(tmp_path)], capsys)
    assert "not a run folder" in err


def test_a_run_counts_once_whatever_folders_hold_it_and_a_corrupt_run_is_left_out(tmp_path):
    """A run is what it ran (settings, seed, data fingerprint), not its folder: a copy, or a copy that
    stopped earlier, is one run, named as a duplicate in summary.md; an unreadable run is left out and
    named, and the others are summarised."""
    runs = tmp_path / "runs"
    fake_run(runs / "a", 1, [1, 2], last_step=8)
    fake_run(runs / "b", 3, [1, 2], last_step=8)
    shutil.copytree(runs / "a", runs / "a_copy")
    fake_run(runs / "a_step5_copy", 1, [1, 2], metrics=False)  # the same run, copied after step 5
    fake_run(runs / "other_data", 1, [1, 2], last_step=8)
    manifest = json.loads((runs / "other_data" / "orm_manifest.json").read_text())
    manifest["data"]["fingerprint"] = "e" * 64  # the same settings on other data: another run, another row
    (runs / "other_data" / "orm_manifest.json").write_text(json.dumps(manifest))
    fake_run(runs / "broken", 5, [1, 2], last_step=8)
    (runs / "broken" / "orm_manifest.json").write_text('{"config": ')  # cut short
    summarize_runs.main([str(runs), "--output_dir", str(tmp_path / "out")])
    with open(tmp_path / "out" / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((row["n_seeds"], row["seeds"]) for row in rows) == [("1", "1"), ("2", "1 3")]
    row = next(row for row in rows if row["n_seeds"] == "2")
    assert float(row["held_out_spearman_per_prompt_mean"]) == pytest.approx(0.7)  # seeds 1 and 3, once each
    assert float(row["held_out_spearman_per_prompt_se"]) == pytest.approx(0.1)
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "## Duplicate run folders (counted once)" in summary
    for copy in ("a_copy", "a_step5_copy"):
        assert f"- `{runs / copy}`: the same run as `{runs / 'a'}` (same settings, seed and data)" in summary
    assert f"- `{runs / 'broken'}`: unreadable: ORM manifest {runs / 'broken' / 'orm_manifest.json'} is not" in summary


def test_an_objective_sweep_has_a_figure(tmp_path):
    """A sweep of categories only (SWEEP=objective) gets its figure against them, like a numeric sweep."""
    runs = tmp_path / "runs"
    for objective in ("bt", "clf"):
        for seed in (1, 3):
            folder = fake_run(runs / f"{objective}{seed}", seed, [1, 2], last_step=8)
            manifest = json.loads((folder / "orm_manifest.json").read_text())
            manifest["config"]["rm_objective"] = objective
            (folder / "orm_manifest.json").write_text(json.dumps(manifest))
            (folder / "eval_results_bt.json").rename(folder / f"eval_results_{objective}.json")
    summarize_runs.main([str(runs), "--output_dir", str(tmp_path / "out")])
    assert sorted(path.name for path in (tmp_path / "out").glob("*.png")) == ["summary_vs_RM_OBJECTIVE.png"]
    assert (tmp_path / "out" / "summary_vs_RM_OBJECTIVE.png").stat().st_size > 10_000


def test_runs_from_before_the_early_stopping_flags_compare_as_their_defaults(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs / "old", 1, [1, 2])  # no early_stopping, stop_metric, ... in its config
    new = fake_run(runs / "new", 2, [1, 2])
    manifest = json.loads((new / "orm_manifest.json").read_text())
    manifest["config"].update(
        early_stopping="member", stop_metric="loss", min_val_pairs=0, weight_decay=0.0, bagging=0, standardize=0
    )
    (new / "orm_manifest.json").write_text(json.dumps(manifest))
    other = fake_run(runs / "pooled", 3, [1, 2])
    manifest["config"].update(early_stopping="pooled", seed=3)
    (other / "orm_manifest.json").write_text(json.dumps(manifest))
    summarize_runs.main([str(runs), "--output_dir", str(tmp_path / "out")])
    with open(tmp_path / "out" / "summary.csv") as handle:
        rows = {row["EARLY_STOPPING"]: row for row in csv.DictReader(handle)}
    assert rows["member"]["seeds"] == "1 2" and rows["pooled"]["seeds"] == "3"


def test_last_step_stops_run_all_after_step_6_with_the_study_options(tmp_path):
    out = tmp_path / "out"
    proc = run_script(
        "run_all.sh",
        tmp_path,
        OUTPUT_DIR=str(out),
        LAST_STEP="6",
        EARLY_STOPPING="pooled",
        STOP_METRIC="accuracy",
        BAGGING="1",
        STANDARDIZE="1",
        WEIGHT_DECAY="0.01",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(LAST_STEP=6)" in proc.stdout and "Step 7" not in proc.stdout
    assert (out / "eval_results_bt.json").is_file() and not (out / "distillation_config.json").exists()
    config = json.loads((out / "orm_manifest.json").read_text())["config"]
    assert (
        config["early_stopping"],
        config["stop_metric"],
        config["bagging"],
        config["standardize"],
        config["weight_decay"],
    ) == ("pooled", "accuracy", 1, 1, 0.01)


def test_unfinished_runs_count_only_where_they_have_the_metric_and_are_named(tmp_path, capsys):
    """One finished run, one stopped after step 6, one after step 5: one row of the two evaluated runs,
    the MSE from one run (n=1), the step-5 run left out with its reason; settings that run_all.sh
    does not set are named as step flags, and no cell reads None."""
    runs = tmp_path / "sweep"
    fake_run(runs / "done", 1, [1, 2], last_step=8)
    fake_run(runs / "after6", 3, [1, 2], last_step=6)
    fake_run(runs / "after5", 4, [1, 2], metrics=False)
    (runs / "logs").mkdir()
    (runs / "logs" / "failed_cells.txt").write_text("after5\n")
    (runs / "logs" / "after5.log").write_text("=== Step 6 ===\nerror: something broke\n")
    summarize_runs.main([str(runs), "--output_dir", str(tmp_path / "out")])
    with open(tmp_path / "out" / "summary.csv") as handle:
        (row,) = csv.DictReader(handle)
    assert (row["n_seeds"], row["seeds"]) == ("2", "1 3")
    assert float(row["held_out_spearman_per_prompt_mean"]) == pytest.approx(0.7)
    assert row["held_out_spearman_per_prompt_n"] == "2"
    assert (float(row["held_out_teacher_iso_mse_mean"]), row["held_out_teacher_iso_mse_n"]) == (1.25, "1")
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "None" not in summary
    assert (
        "| bt | 2 | 0.700 ± 0.100 | 0.300 ± 0.000 | n/a | 0.600 ± 0.000 | 0.700 ± 0.000 | n/a | n/a | n/a |" in summary
    )
    assert "1.25 (n=1) | 1.25 (n=1) | n/a |" in summary
    common = next(line for line in summary.splitlines() if line.startswith("Common settings: "))
    assert "ANNOTATION_QUALITY=10.0" in common and "REPLACEMENT=0" in common and "N_SAMPLE=40" in common
    assert "step 5 --batch_size 64" in common and "step 7 --cv_folds 5" in common
    assert "step 7 --isotonic_variant centered" in common and "DISTILL_EPOCHS=20" in common
    assert "BATCH_SIZE" not in common and "CV_FOLDS" not in common
    assert f"- `after5`: error: something broke (log {runs / 'logs' / 'after5.log'})" in summary
    assert f"- `{runs / 'after5'}`: run_sweep.sh recorded the cell as failed" in summary
    assert f"- `{runs / 'after6'}`: stopped after step 6 (no validation_results.json)" in summary

    # A folder of step-5-only runs: one line saying why there is nothing to summarise, no files.
    only5 = tmp_path / "only5"
    fake_run(only5 / "a", 1, [1, 2], metrics=False)
    fake_run(only5 / "b", 2, [1, 2], metrics=False)
    err = run_failing(summarize_runs.main, [str(only5), "--output_dir", str(tmp_path / "none")], capsys)
    assert err == (
        f"error: no run to summarise: {only5 / 'a'}: no step-6 results (eval_results_bt.json): the run stopped "
        "after step 5 (and 1 more runs left out)"
    )
    assert not (tmp_path / "none").exists()


def test_an_older_runs_step_7_settings_are_read_under_todays_flag_names(tmp_path):
    """Step 7's --student_learning_rate was --learning_rate: a run that records the old name and one
    that records the new one, at the same rate, are one configuration."""
    runs = tmp_path / "runs"
    for name, seed, key in (("old", 1, "learning_rate"), ("new", 2, "student_learning_rate")):
        path = fake_run(runs / name, seed, [1, 2], last_step=7) / "distillation_config.json"
        record = json.loads(path.read_text())
        record["config"][key] = 0.001
        path.write_text(json.dumps(record))
    summarize_runs.main([str(runs), "--output_dir", str(tmp_path / "out")])
    with open(tmp_path / "out" / "summary.csv") as handle:
        (row,) = csv.DictReader(handle)
    assert row["seeds"] == "1 2"
    summary = (tmp_path / "out" / "summary.md").read_text()
    common = next(line for line in summary.splitlines() if line.startswith("Common settings: "))
    assert "DISTILL_LEARNING_RATE=0.001" in common


def test_summary_names_as_run_all_variables_only_what_run_all_sh_reads():
    known = set(settings.variables())
    assert summarize_runs.RUN_ALL_VARIABLES <= known
    assert {"N_SAMPLE", "EMBED_MODEL_NAME", "STANDARDIZE", "DISTILL_EPOCHS"} <= summarize_runs.RUN_ALL_VARIABLES
    for name in ("BATCH_SIZE", "PATIENCE", "CV_FOLDS", "VAL_FRACTION", "ISOTONIC_VARIANT"):
        assert name not in known and name not in summarize_runs.RUN_ALL_VARIABLES
