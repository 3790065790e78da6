"""Every study of docs/studies/ runs from its command (tiny mode), and pins the flags it compares."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import study  # noqa: E402

from cli import InputError  # noqa: E402


def a_cell(name: str, candidate: str) -> dict:
    spec = study.STUDIES[name]
    budget, (n_sample, pairs) = next(iter(spec.budgets.items()))
    return {
        "data": "demo",
        "data_dir": "DATA",
        "budget": budget,
        "n_sample": 10,
        "n_pairs": pairs,
        "quality": spec.qualities[0],
        "candidate": candidate,
        "split_seed": spec.split_seeds[0],
        "seed": spec.seeds[0],
        "tiny": False,
    }


@pytest.mark.parametrize("name", sorted(study.STUDIES))
def test_lock_records_what_every_candidate_resolves_to_now(name):
    """A default changed without pinning it in the study (or recording the lock) fails here."""
    lock = json.loads(study.LOCK_FILE.read_text())
    spec = study.STUDIES[name]
    assert set(lock[name]) == set(spec.candidates)
    for candidate in spec.candidates:
        study.check_lock(name, spec, a_cell(name, candidate), lock)
        entry = lock[name][candidate]["step5"]
        assert not set(entry) & study.CELL_FLAGS  # the cell's own axes are not locked
        import step5_train_rms

        every_flag = {a.dest for a in step5_train_rms.build_parser()._actions if a.dest != "help"}
        assert set(entry) == every_flag - study.CELL_FLAGS
        assert set(lock[name][candidate]) == ({"step5", "step6"} | ({"step7", "step8"} if spec.step7 else set()))


def test_a_study_that_calibrates_locks_steps_7_and_8():
    """The annotation-quality study's cells run steps 7-8: their flags are locked like step 5's."""
    import step7_isotonic_distillation

    lock = json.loads(study.LOCK_FILE.read_text())
    spec = study.STUDIES["annotation_quality"]
    every_flag = {a.dest for a in step7_isotonic_distillation.build_parser()._actions if a.dest != "help"}
    for candidate in spec.candidates:
        entry = lock["annotation_quality"][candidate]
        assert set(entry["step7"]) == every_flag - study.CELL_FLAGS
        assert (entry["step7"]["distill_epochs"], entry["step7"]["student_learning_rate"]) == (10, 1e-3)
        assert (entry["step5"]["learning_rate"], entry["step5"]["standardize"]) == (1e-3, 0)
    moved = copy.deepcopy(lock)
    moved["annotation_quality"]["bt"]["step7"]["cv_folds"] = 3
    with pytest.raises(InputError, match=r"step7's --cv_folds now resolves to 5, the study was made with 3"):
        study.check_lock("annotation_quality", spec, a_cell("annotation_quality", "bt"), moved)
    del moved["annotation_quality"]["bt"]["step7"]
    with pytest.raises(InputError, match=r"now runs step5, step6, step7, step8, the study was made running step5"):
        study.check_lock("annotation_quality", spec, a_cell("annotation_quality", "bt"), moved)


def test_a_default_that_moved_stops_the_study_naming_the_flag():
    lock = json.loads(study.LOCK_FILE.read_text())
    moved = copy.deepcopy(lock)
    candidate = "lr 1e-4, standardize"
    moved["defaults"][candidate]["step5"]["patience"] = 999  # as if the default had been 999
    with pytest.raises(InputError, match=r"--patience now resolves to .*, the study was made with 999"):
        study.check_lock("defaults", study.STUDIES["defaults"], a_cell("defaults", candidate), moved)


def test_the_defaults_study_pins_standardisation_in_every_candidate():
    """The page's deciding column compares raw with standardised inputs: each candidate says which."""
    for flags in study.STUDIES["defaults"].candidates.values():
        assert "--standardize" in flags


def test_beats_is_two_standard_errors_of_the_paired_differences():
    assert study.beats([0.10, 0.12, 0.11, 0.09, 0.13])  # mean 0.11, SE 0.007
    assert not study.beats([0.10, -0.08, 0.12, -0.05, 0.02])  # mean 0.022, SE 0.04
    assert not study.beats([0.5])  # one run has no standard error
    assert not study.beats([-0.1, -0.2, -0.15])
    assert study.verdict([0.10, 0.12, 0.11, 0.09, 0.13], "BT") == "yes"
    assert study.verdict([0.10, -0.08, 0.12, -0.05, 0.02], "BT") == "no"
    assert study.verdict([-0.1, -0.2, -0.15], "BT") == "no: BT beats it"


@pytest.mark.parametrize("name", sorted(study.STUDIES))
def test_every_study_command_runs_in_tiny_mode(name, demo_dir, tmp_path):
    """CI runs each page's command on a small stand-in data folder, so the commands cannot rot."""
    results = tmp_path / "results.jsonl"
    figure = tmp_path / "figure.png"
    command = [sys.executable, str(ROOT / "benchmarks" / "study.py"), name, "--tiny", "--data", f"demo={demo_dir}"]
    command += ["--results", str(results), "--figure", str(figure)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    spec = study.STUDIES[name]
    assert [row["candidate"] for row in rows] == list(spec.candidates)
    for row in rows:
        assert row["flags"]["step5"]["ensemble_number"] == 2  # the tiny override, recorded as resolved
        assert row["flags"]["step5"]["seed"] == row["seed"]
        assert row["flags"]["step6"]["bon_draws"] == 10
        assert -1 <= row["held_out"]["teacher"]["spearman_per_prompt"] <= 1
        assert row["test"]["n_prompts"] == 6
        if spec.step7 is not None:  # calibrated and distilled: step 8's held-out errors recorded
            assert row["flags"]["step7"]["distill_epochs"] == 2  # the tiny override
            calibration = row["held_out"]["calibration"]
            assert set(calibration) == {"teacher_iso_mse", "student_iso_mse", "constant_mse"}
            assert all(0 < value < 100 for value in calibration.values())
    assert f"| {spec.reference} | 1 |" in done.stdout
    assert "baseline: ridge" in done.stdout
    assert ("Student+Isotonic MSE" in done.stdout) == (spec.step7 is not None)
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A rerun finds every cell done and reports the same tables.
    again = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert again.returncode == 0 and again.stdout == done.stdout
    assert len(results.read_text().splitlines()) == len(rows)
