"""Isotonic maps, cross-validated calibration, step 7 (distillation) and step 8 (validation).

One small pipeline (demo data D=32 -> step 5 -> step 7 -> step 8) is built once per module, with
malicious ``.joblib`` files planted before steps 7 and 8 and every embedding read of step 7
recorded; the tests below check its artifacts and records.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.isotonic import IsotonicRegression

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from conftest import run_failing  # noqa: E402

import calibration  # noqa: E402
import generate_demo_data  # noqa: E402
import networks  # noqa: E402
import run_folder  # noqa: E402
import step5_train_rms  # noqa: E402
import step7_isotonic_distillation as step7  # noqa: E402
import step8_validate_distillation as step8  # noqa: E402
from cli import InputError  # noqa: E402
from networks import load_checkpoint  # noqa: E402
from reward_variants import VARIANT_TITLES  # noqa: E402
from rm_data import EmbeddingSet, load_embedding_set  # noqa: E402
from run_folder import SCORE_CACHE_DIR, load_partition  # noqa: E402

DEMO = [
    "--n_prompts",
    "600",
    "--n_splits",
    "10",
    "--emb_dim",
    "32",
    "--seed",
    "1",
    "--n_test_prompts",
    "5",
    "--n_test_responses",
    "20",
]
STEP5 = [
    "--n_sample",
    "200",
    "--eval_prompts",
    "400",
    "--n_pairs",
    "5",
    "--consider_first_n",
    "10",
    "--ensemble_number",
    "2",
    "--training_epochs",
    "6",
    "--batch_size",
    "64",
    "--seed",
    "3",
]
STEP7 = ["--distill_epochs", "12", "--batch_size", "64"]
MAP_FILES = (run_folder.TEACHER_MAP_FILE, run_folder.STUDENT_MAP_FILE, run_folder.LEGACY_MAP_FILE)


class WritesMarker:
    """Unpickling this object opens (creates) ``marker`` for writing."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_joblib(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(WritesMarker(marker)))


# --------------------------------------------------------------------------------------------
# The maps
# --------------------------------------------------------------------------------------------
def tied_scores(rng, n):
    """Scores with many exact ties (rounded), and golden rewards loosely increasing in them."""
    scores = np.round(rng.normal(size=n), 1)
    return scores, scores + rng.normal(scale=1.0, size=n)


@pytest.mark.parametrize("variant", calibration.ISOTONIC_VARIANTS)
@pytest.mark.parametrize("seed,n", [(0, 1), (1, 2), (2, 7), (3, 200), (4, 3000)])
def test_json_map_reproduces_sklearn_predict_exactly(tmp_path, variant, seed, n):
    rng = np.random.default_rng(seed)
    scores, gold = tied_scores(rng, n)
    imap, estimator = calibration.fit_isotonic(scores, gold, variant)
    calibration.save_isotonic_map(imap, estimator, tmp_path / "map.joblib")
    loaded = calibration.load_isotonic_map(tmp_path / "map.joblib")
    low, high = scores.min(), scores.max()
    queries = np.concatenate(
        [
            rng.uniform(low - 2, high + 2, size=5000),  # inside and outside the fitted range
            scores,
            loaded.x_thresholds,
            [low, high, low - 1e-12, high + 1e-12, -1e300, 1e300],
            np.repeat(rng.uniform(low, high, size=5), 3),
        ]
    )  # ties among the queries
    expected = estimator.predict(queries)
    assert np.array_equal(loaded.predict(queries), expected)
    assert np.array_equal(imap.predict(queries), expected)
    assert loaded.predict(queries.reshape(-1, 1)).shape == (len(queries), 1)
    if variant == "standard":  # the estimator is sklearn's own fit of the data
        reference = IsotonicRegression(out_of_bounds="clip").fit(scores, gold)
        assert np.array_equal(loaded.predict(queries), reference.predict(queries))


def test_centered_map_keeps_the_ranking_and_stays_within_pav_values():
    rng = np.random.default_rng(5)
    scores, gold = tied_scores(rng, 2000)
    standard, _ = calibration.fit_isotonic(scores, gold, "standard")
    centered, _ = calibration.fit_isotonic(scores, gold, "centered")
    distinct = np.unique(scores)
    assert (np.diff(centered.predict(distinct)) > 0).all()  # strictly increasing on the fitted range
    assert len(np.unique(standard.predict(distinct))) < len(distinct) / 2  # the step function ties
    assert centered.y_thresholds.min() == standard.y_thresholds.min()
    assert centered.y_thresholds.max() == standard.y_thresholds.max()
    np.testing.assert_allclose(
        np.mean((centered.predict(scores) - gold) ** 2), np.mean((standard.predict(scores) - gold) ** 2), rtol=0.05
    )


def test_out_of_fold_prediction_of_a_prompt_never_sees_it():
    rng = np.random.default_rng(0)
    n_prompts, n_responses = 40, 6
    scores = rng.normal(size=(n_prompts, n_responses))
    gold = scores + rng.normal(scale=0.5, size=scores.shape)
    oof, folds = calibration.out_of_fold_predictions(scores, gold, 5, seed=11, variant="centered")
    assert np.bincount(folds).tolist() == [8] * 5
    again, same_folds = calibration.out_of_fold_predictions(scores, gold, 5, seed=11, variant="centered")
    assert np.array_equal(oof, again) and np.array_equal(folds, same_folds)
    for prompt in (0, 17, 39):
        # The prompt's own golden rewards cannot move its prediction ...
        poisoned = gold.copy()
        poisoned[prompt] = 1e6
        moved, _ = calibration.out_of_fold_predictions(scores, poisoned, 5, seed=11, variant="centered")
        assert np.array_equal(moved[prompt], oof[prompt])
        # ... while they do move the predictions of prompts in other folds, which fit on it.
        assert not np.array_equal(moved[folds != folds[prompt]], oof[folds != folds[prompt]])
        # It is predicted by the map fitted on exactly the other folds' prompts.
        others = folds != folds[prompt]
        imap, _ = calibration.fit_isotonic(scores[others], gold[others], "centered")
        assert np.array_equal(imap.predict(scores[prompt]), oof[prompt])


def _map_record(**changes):
    imap, _ = calibration.fit_isotonic(np.arange(6.0), np.array([0, 1, 1, 3, 2, 5.0]), "standard")
    return {**imap.to_json(), **changes}


@pytest.mark.parametrize(
    "changes,message",
    [
        (
            {"x_thresholds": [3.0, 2.0, 1.0], "y_thresholds": [0.0, 1.0, 2.0], "x_min": 3.0, "x_max": 1.0},
            "x_thresholds must be strictly increasing",
        ),
        ({"y_thresholds": [0.0]}, "x_thresholds but 1 y_thresholds"),
        ({"x_thresholds": [0.0, float("nan")], "y_thresholds": [0.0, 1.0]}, "non-finite"),
        ({"x_thresholds": [0.0, 1.0], "y_thresholds": [1.0, 0.0], "x_min": 0.0, "x_max": 1.0}, "not monotone"),
        ({"x_thresholds": "0 1"}, "must be a non-empty list of numbers"),
        ({"x_min": -7.0}, "x_min/x_max do not match"),
        ({"variant": "magic"}, "variant must be one of"),
        ({"format": "pickle"}, "not an isotonic map"),
    ],
)
def test_map_json_validation_names_the_file(changes, message):
    with pytest.raises(InputError, match=message) as err:
        calibration.map_from_json(_map_record(**changes), Path("some/map.json"))
    assert str(err.value).startswith("some/map.json: ")


# --------------------------------------------------------------------------------------------
# Steps 7 and 8 on one small pipeline
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Demo data, step 5, step 7 (embedding reads recorded) and step 8, with planted .joblib files."""
    root = tmp_path_factory.mktemp("calibration")
    data_dir, out = root / "data", root / "out"
    generate_demo_data.main(["--output_dir", str(data_dir), *DEMO])
    step5_train_rms.main(["--data_dir", str(data_dir), "--output_dir", str(out), *STEP5])
    marker = root / "unpickled.marker"
    for name in MAP_FILES:
        plant_joblib(out / name, marker)
    reads = []
    original_read_rows = EmbeddingSet.read_rows

    def recording_read_rows(self, split, prompt_ids):  # after_fits: once the config, written last, exists
        after_fits = (out / run_folder.DISTILLATION_CONFIG_FILE).exists()
        reads.append((self.kind, np.asarray(prompt_ids).copy(), after_fits))
        return original_read_rows(self, split, prompt_ids)

    student_rows = {}

    def recording_train_student(features, targets, train_rows, val_rows, *args):
        student_rows.update(fit=train_rows.numpy().copy(), early_stopping=val_rows.numpy().copy())
        return original_train_student(features, targets, train_rows, val_rows, *args)

    original_train_student = networks.train_student
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(EmbeddingSet, "read_rows", recording_read_rows)
        patch.setattr(networks, "train_student", recording_train_student)
        config = step7.main(["--output_dir", str(out), *STEP7])
    assert not marker.exists()
    for name in MAP_FILES:  # steps read the JSON sidecars; the .joblib files must never be loaded
        plant_joblib(out / name, marker)
    results = step8.main(["--output_dir", str(out)])
    return {
        "data": data_dir,
        "out": out,
        "marker": marker,
        "reads": reads,
        "student_rows": student_rows,
        "config": config,
        "results": results,
    }


def test_planted_joblib_files_are_never_unpickled(pipeline, tmp_path):
    assert not pipeline["marker"].exists()
    sanity = tmp_path / "sanity.marker"  # the planted payload does fire when unpickled
    plant_joblib(tmp_path / "trap.joblib", sanity)
    pickle.loads((tmp_path / "trap.joblib").read_bytes())
    assert sanity.exists()


def test_no_held_out_prompt_reaches_any_fit(pipeline):
    data = load_embedding_set(pipeline["data"])
    partition = load_partition(pipeline["out"], data)
    fitting = [(kind, ids) for kind, ids, after_fits in pipeline["reads"] if not after_fits]
    read = np.unique(np.concatenate([ids for kind, ids in fitting]))
    assert {kind for kind, _ in fitting} == {"train"}  # the fits never open the test set
    assert np.intersect1d(read, partition["held_out"]).size == 0
    assert np.intersect1d(read, partition["orm_train"]).size == 0
    assert set(read) == set(partition["calibration"]) | set(partition["student_train"])
    fits = pipeline["config"]["fits"]
    calibration_record = step7.prompt_set_record("calibration", partition["calibration"], 0)
    for fit in ("teacher_isotonic", "student_isotonic"):
        assert fits[fit]["role"] == "calibration"
        assert fits[fit]["prompt_ids_sha256"] == calibration_record["prompt_ids_sha256"]
    training, stopping = fits["student_training"], fits["student_early_stopping"]
    assert training["role"] == stopping["role"] == "student_train"
    assert training["n_prompts"] + stopping["n_prompts"] == len(partition["student_train"])
    assert stopping["n_prompts"] >= 1 and training["n_responses"] == training["n_prompts"] * data.n_splits
    # Student fit and early-stopping rows: every response of disjoint, whole student_train prompts
    # (row r of the student features is response r % K of student_train prompt r // K).
    student_prompts, n_splits = partition["student_train"], data.n_splits
    used = {}
    for part, rows in pipeline["student_rows"].items():
        prompts = np.unique(student_prompts[rows // n_splits])
        assert len(rows) == len(prompts) * n_splits and len(np.unique(rows)) == len(rows)
        used[part] = prompts
    assert np.intersect1d(used["fit"], used["early_stopping"]).size == 0
    assert np.intersect1d(np.concatenate(list(used.values())), partition["held_out"]).size == 0
    assert step7.prompt_set_record("", used["fit"], 0)["prompt_ids_sha256"] == training["prompt_ids_sha256"]
    assert step7.prompt_set_record("", used["early_stopping"], 0)["prompt_ids_sha256"] == stopping["prompt_ids_sha256"]


def test_step7_scores_only_the_evaluation_sets_for_step8_after_its_fits(pipeline):
    data = load_embedding_set(pipeline["data"])
    held_out = load_partition(pipeline["out"], data)["held_out"]
    after = [(kind, ids) for kind, ids, after_fits in pipeline["reads"] if after_fits]
    assert all(not after_fits for *_, after_fits in pipeline["reads"][: -len(after)])  # the fits read first
    read = {kind: np.unique(np.concatenate([ids for k, ids in after if k == kind])) for kind in ("train", "test")}
    np.testing.assert_array_equal(read["train"], np.sort(held_out))
    np.testing.assert_array_equal(read["test"], np.arange(5))  # DEMO's 5 test prompts
    cached = sorted(path.name.split("_")[2] for path in (pipeline["out"] / SCORE_CACHE_DIR).glob("student_scores_*"))
    assert cached == ["test", "train"]


def test_step8_results_are_the_same_without_step7s_cached_student_scores(pipeline, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(pipeline["out"], out)  # the pipeline's step 8 took the student's scores from step 7
    shutil.rmtree(out / SCORE_CACHE_DIR)
    afresh = step8.main(["--output_dir", str(out)])  # loads and scores both models
    for name in ("held_out", "test"):
        assert afresh[name] == pipeline["results"][name]


def test_student_reproduces_the_calibrated_teacher_on_held_out(pipeline):
    data = load_embedding_set(pipeline["data"])
    held_out = load_partition(pipeline["out"], data)["held_out"]
    manifest = json.loads((pipeline["out"] / "orm_manifest.json").read_text())
    teacher = [load_checkpoint(pipeline["out"] / name, data.dim) for name in manifest["checkpoints"]]
    student = load_checkpoint(pipeline["out"] / "distilled_rm_helpful_bt.ckpt", data.dim)
    teacher_map = calibration.load_isotonic_map(pipeline["out"] / run_folder.TEACHER_MAP_FILE)
    targets = teacher_map.predict(data.score(held_out, networks.StackedEnsemble(teacher)).mean(axis=0))
    predictions = data.score(held_out, networks.StackedEnsemble([student]))[0]
    mse = float(np.mean((predictions - targets) ** 2))
    assert mse < 0.25 * targets.var()
    fidelity = pipeline["results"]["held_out"]["distillation_fidelity"]
    assert fidelity["mse_student_vs_teacher_isotonic"] == pytest.approx(mse, rel=1e-6)


def test_calibrated_variants_beat_the_constant_predictor(pipeline):
    for split in ("held_out", "test"):
        result = pipeline["results"][split]
        constant = result["constant_predictor"]["mse"]
        for name in ("Teacher+Isotonic", "Student", "Student+Isotonic"):
            assert result["variants"][name]["calibration"]["mse"] < 0.6 * constant, (split, name)
            assert result["variants"][name]["calibration"]["meaningful"]
        assert not result["variants"]["Teacher"]["calibration"]["meaningful"]
    held = pipeline["results"]["held_out"]
    assert held["n_prompts"] == 80 and held["n_responses"] == 800
    # The centered map is strictly increasing on the calibration range: it keeps the teacher's
    # ranking (only scores beyond that range are clipped to one value).
    variants = held["variants"]
    assert variants["Teacher+Isotonic"]["n_distinct_values"] >= 0.98 * variants["Teacher"]["n_distinct_values"]
    assert variants["Teacher+Isotonic"]["spearman_per_prompt"]["mean"] == pytest.approx(
        variants["Teacher"]["spearman_per_prompt"]["mean"], abs=0.01
    )


def test_step7_artifacts_and_config(pipeline):
    out, config = pipeline["out"], pipeline["config"]
    written = json.loads((out / run_folder.DISTILLATION_CONFIG_FILE).read_text())
    assert written == json.loads(json.dumps(config))
    teacher_json = json.loads((out / "isotonic_teacher_map.json").read_text())
    assert teacher_json == json.loads((out / "isotonic_map.json").read_text())  # legacy alias
    assert teacher_json["variant"] == calibration.DEFAULT_ISOTONIC_VARIANT
    for name in (
        "distilled_rm_helpful_bt.ckpt",
        *MAP_FILES,
        "validation_results.json",
        "validation_calibration.png",
        "validation_best_of_n.png",
    ):
        assert (out / name).is_file(), name
    oof = config["teacher_isotonic"]["out_of_fold"]
    assert oof["n_folds"] == 5 and sum(oof["prompts_per_fold"]) == config["prompt_counts"]["calibration"] == 240
    assert oof["calibration"]["n_responses"] == 2400 and oof["calibration"]["mse"] > 0
    comparison = config["isotonic_variant_comparison"]
    assert comparison["selected"] == calibration.DEFAULT_ISOTONIC_VARIANT
    assert comparison["centered"]["n_distinct_values"] > comparison["standard"]["n_distinct_values"]
    assert config["student"]["early_stopping_mse"] < config["student"]["target_variance"]


def test_step7_is_reproducible_bit_for_bit(pipeline, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(pipeline["out"], out)
    step7.main(["--output_dir", str(out), *STEP7])
    for name in ("isotonic_teacher_map.json", "isotonic_student_map.json"):
        assert (out / name).read_text() == (pipeline["out"] / name).read_text()
    first = torch.load(pipeline["out"] / "distilled_rm_helpful_bt.ckpt", weights_only=True)
    second = torch.load(out / "distilled_rm_helpful_bt.ckpt", weights_only=True)
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_step8_refuses_bad_inputs_with_one_line(pipeline, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(pipeline["out"], out)
    (out / "validation_results.json").unlink()
    err = run_failing(step8.main, ["--output_dir", str(out), "--student_ckpt", str(out / "missing.ckpt")], capsys)
    assert err == f"error: checkpoint not found: {out / 'missing.ckpt'}"

    sidecar = out / "isotonic_teacher_map.json"
    record = json.loads(sidecar.read_text())
    record["x_thresholds"] = record["x_thresholds"][::-1]
    sidecar.write_text(json.dumps(record))
    err = run_failing(step8.main, ["--output_dir", str(out)], capsys)
    assert err.startswith(f"error: {sidecar}: x_thresholds must be strictly increasing")

    err = run_failing(step8.main, ["--output_dir", str(out), "--isotonic_model", str(out / "nope.joblib")], capsys)
    assert "nope.json" in err and "not found" in err

    student_map = str(out / "isotonic_student_map.joblib")
    err = run_failing(step8.main, ["--output_dir", str(out), "--isotonic_model", student_map], capsys)
    assert err == f"error: {out / 'isotonic_student_map.json'} maps student scores; expected a teacher map"
    assert not (out / "validation_results.json").exists()  # no partial artifacts


def test_step7_refuses_bad_inputs_with_one_line(pipeline, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(pipeline["out"], out, ignore=shutil.ignore_patterns("distill*", "isotonic*"))
    err = run_failing(step7.main, ["--output_dir", str(out), "--cv_folds", "1000"], capsys)
    assert "needs at least 1000 calibration prompts" in err
    err = run_failing(step7.main, ["--output_dir", str(out), "--task", "harmless"], capsys)
    assert "--task harmless does not match" in err
    err = run_failing(step7.main, ["--output_dir", str(out), "--teacher_ckpt", str(out / "gone.ckpt")], capsys)
    assert err == f"error: checkpoint not found: {out / 'gone.ckpt'}"
    assert not any(out.glob("isotonic*")) and not any(out.glob("distill*"))


def test_run_all_runs_steps_5_to_8_and_prints_the_table(tmp_path):
    env = {
        **os.environ,
        "DATA_DIR": str(tmp_path / "data"),
        "OUTPUT_DIR": str(tmp_path / "out"),
        "N_SAMPLE": "100",
        "ENSEMBLE_NUMBER": "2",
        "DEMO_PROMPTS": "300",
        "EVAL_PROMPTS": "200",
        "DEMO_EMB_DIM": "64",
        "DEMO_TEST_PROMPTS": "5",
        "DEMO_TEST_RESPONSES": "20",
        "TRAINING_EPOCHS": "2",
        "DISTILL_EPOCHS": "3",
    }
    proc = subprocess.run(["bash", str(ROOT / "run_all.sh")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index("=== Step 8") :]
    assert "held-out prompts: 40 prompts, 400 responses" in table and "test set: 5 prompts, 100 responses" in table
    rows = [line.split()[0] for line in table.splitlines() if line.split()]
    for variant in ("Teacher", "Teacher+Isotonic", "Student", "Student+Isotonic", "Constant"):
        assert rows.count(variant) == 2, variant  # held-out and test tables
    last_lines = proc.stdout.rstrip().splitlines()[-3:]
    for plot in ("validation_best_of_n.png", "validation_calibration.png"):
        assert str(tmp_path / "out" / plot) in last_lines
    results = json.loads((tmp_path / "out" / "validation_results.json").read_text())
    assert set(results["held_out"]["variants"]) == set(VARIANT_TITLES.values())


def test_step8_takes_the_teacher_from_the_cache_without_loading_it(pipeline, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    shutil.copytree(pipeline["out"], out)  # copies: the cache's entries name the original files
    step8.main(["--output_dir", str(out)])  # scores both models into the cache

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher was loaded although its scores were cached")

    monkeypatch.setattr(networks, "load_ensemble", refuse)
    again = step8.main(["--output_dir", str(out)])
    assert again["held_out"] == pipeline["results"]["held_out"]
    missing = out / json.loads((out / "orm_manifest.json").read_text())["checkpoints"][0]
    missing.unlink()
    assert run_failing(step8.main, ["--output_dir", str(out)], capsys) == f"error: checkpoint not found: {missing}"
