"""Step 6's baselines: ridge against an independent scikit-learn fit, lengths read in row order."""

import json
import shutil

import numpy as np
import pytest
from conftest import run_failing
from sklearn.linear_model import RidgeCV
from sklearn.preprocessing import StandardScaler

import baselines
import rm_data
import run_folder
import step6_eval_rms as step6


def write_lengths(data_dir, kind, lengths):
    for k, column in enumerate(lengths.T):
        path = data_dir / baselines.LENGTH_FILES[kind].format(k=k)
        path.write_text("".join(json.dumps({"length": int(v)}) + "\n" for v in column))


@pytest.mark.parametrize("rows, columns", [(300, 40), (40, 90)])
def test_ridge_loo_chooses_and_fits_as_scikit_learns_ridgecv(rows, columns):
    rng = np.random.default_rng(rows)
    features = rng.standard_normal((rows, columns)) * rng.uniform(0.1, 30.0, columns)
    features[:, 3] = features[:, 2]  # a repeated column: a zero eigenvalue
    targets = features[:, :5] @ rng.standard_normal(5) + rng.standard_normal(rows) * 3.0 + 7.0
    # penalties on both sides of the best, so the choice is not an end of the grid
    alphas = np.logspace(-3, 5, 9)
    expected = RidgeCV(alphas=alphas).fit(features, targets)
    centred = features - features.mean(axis=0)
    alpha, coefficients, intercept = baselines.ridge_loo(centred.copy(), targets, alphas)
    assert alphas[0] < alpha == expected.alpha_ < alphas[-1]
    np.testing.assert_allclose(coefficients, expected.coef_, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(centred @ coefficients + intercept, expected.predict(features), rtol=1e-9, atol=1e-9)


def test_ridge_is_fitted_on_orm_train_and_lengths_follow_the_rows(trained_run, demo_copy, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained_run, out)
    data = rm_data.load_embedding_set(demo_copy)
    test = rm_data.load_embedding_set(demo_copy, "test")
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 2000, size=data.rewards.shape)
    write_lengths(demo_copy, "train", lengths)
    write_lengths(demo_copy, "test", rng.integers(1, 2000, size=test.rewards.shape))

    results = step6.main(["--output_dir", str(out), "--data_dir", str(demo_copy), "--bon_draws", "5"])

    partition = json.loads((out / run_folder.PARTITION_FILE).read_text())
    fit, held = np.array(partition["orm_train"]), np.array(partition["held_out"])
    features = np.concatenate([data.read_rows(k, fit) for k in range(data.n_splits)])
    scaler = StandardScaler().fit(features)
    ridge = RidgeCV(alphas=baselines.RIDGE_ALPHAS).fit(scaler.transform(features), data.rewards[fit].T.ravel())
    held_rows = np.concatenate([data.read_rows(k, held) for k in range(data.n_splits)])
    expected = ridge.predict(scaler.transform(held_rows)).reshape(data.n_splits, -1).T
    gold = data.rewards[held]
    report = results["held_out"]["baselines"]
    assert report["ridge"]["calibration"]["mse"] == pytest.approx(np.mean((expected - gold) ** 2), rel=1e-5)
    assert report["ridge"]["pearson_global"] == pytest.approx(np.corrcoef(expected.ravel(), gold.ravel())[0, 1])
    assert report["length"]["pearson_global"] == pytest.approx(np.corrcoef(lengths[held].ravel(), gold.ravel())[0, 1])
    assert "length" in results["test"]["baselines"] and "ridge" in results["test"]["best_of_n"]["curves"]


def test_bad_length_files_are_one_line(trained_run, demo_copy, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(trained_run, out)
    data = rm_data.load_embedding_set(demo_copy)
    write_lengths(demo_copy, "train", np.ones(data.rewards.shape))
    (demo_copy / "lengths_split_3.json").unlink()
    err = run_failing(step6.main, ["--output_dir", str(out), "--data_dir", str(demo_copy)], capsys)
    assert "missing length file" in err and "lengths_split_3.json" in err
    (demo_copy / "lengths_split_3.json").write_text('{"length": 5}\n')
    err = run_failing(step6.main, ["--output_dir", str(out), "--data_dir", str(demo_copy)], capsys)
    assert "lengths_split_3.json: 1 lengths, expected 260" in err
    assert not (out / "eval_results_bt.json").exists()
