"""Metrics against scipy/sklearn and brute force on small arrays."""

from itertools import combinations

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import mean_absolute_error, mean_squared_error

import metrics


def tied_scores(rng, shape, levels=4):
    """Scores with many ties, to exercise average ranks and half-credit."""
    return rng.integers(levels, size=shape).astype(float)


def test_per_prompt_spearman_matches_scipy_with_ties_and_constant_rows():
    rng = np.random.default_rng(0)
    pred, gold = tied_scores(rng, (30, 7)), rng.normal(size=(30, 7))
    gold[:, 3] = gold[:, 4]  # gold ties
    pred[5] = 2.0  # constant prediction row: rho undefined, excluded
    gold[9] = -1.0  # constant golden row: excluded
    expected = [spearmanr(p, g).statistic for p, g in zip(pred, gold)]
    expected = [rho for rho in expected if np.isfinite(rho)]
    result = metrics.per_prompt_spearman(pred, gold)
    assert result["n_prompts_used"] == 28 == len(expected)
    assert result["mean"] == pytest.approx(np.mean(expected), abs=1e-12)
    assert result["n_prompts"] == 30 and result["n_responses"] == 210


def test_global_spearman_matches_scipy():
    rng = np.random.default_rng(1)
    pred, gold = tied_scores(rng, (12, 5)), rng.normal(size=(12, 5))
    assert metrics.global_spearman(pred, gold) == pytest.approx(spearmanr(pred.ravel(), gold.ravel()).statistic)


def test_per_prompt_and_global_pearson_match_scipy():
    rng = np.random.default_rng(2)
    pred, gold = rng.normal(size=(20, 6)), rng.normal(size=(20, 6))
    pred[3] = 0.1  # constant row whose mean rounds off 0.1: still excluded, not a spurious r
    gold[7] = -2.0
    expected = [pearsonr(p, g).statistic for i, (p, g) in enumerate(zip(pred, gold)) if i not in (3, 7)]
    result = metrics.per_prompt_pearson(pred, gold)
    assert result["n_prompts_used"] == 18 and result["mean"] == pytest.approx(np.mean(expected), abs=1e-12)
    assert metrics.global_pearson(pred, gold) == pytest.approx(pearsonr(pred.ravel(), gold.ravel()).statistic)
    assert metrics.global_pearson(np.full((2, 3), 0.1), gold[:2, :3]) is None
    # Pearson sees the scale, Spearman does not: a monotone distortion changes one only
    assert metrics.global_spearman(np.exp(3 * gold), gold) == pytest.approx(1.0)
    assert metrics.global_pearson(np.exp(3 * gold), gold) < 0.9


def brute_force_pair_accuracy(pairs):
    scores = []
    for (p1, g1), (p2, g2) in pairs:
        if g1 == g2:
            continue
        scores.append(0.5 if p1 == p2 else float((p1 - p2) * (g1 - g2) > 0))
    return np.mean(scores), len(scores)


def test_same_prompt_pairwise_accuracy_brute_force():
    rng = np.random.default_rng(2)
    pred, gold = tied_scores(rng, (9, 6)), tied_scores(rng, (9, 6), levels=3)
    pairs = [
        ((pred[p, i], gold[p, i]), (pred[p, j], gold[p, j])) for p in range(9) for i, j in combinations(range(6), 2)
    ]
    accuracy, count = brute_force_pair_accuracy(pairs)
    result = metrics.same_prompt_pairwise_accuracy(pred, gold)
    assert result["n_pairs"] == count and type(result["n_pairs"]) is int  # JSON-serialisable
    assert result["accuracy"] == pytest.approx(accuracy)


def test_same_prompt_pairwise_accuracy_chunking_is_exact(monkeypatch):
    rng = np.random.default_rng(3)
    pred, gold = rng.normal(size=(50, 8)), rng.normal(size=(50, 8))
    whole = metrics.same_prompt_pairwise_accuracy(pred, gold)
    monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 60)  # forces chunks of one prompt
    assert metrics.same_prompt_pairwise_accuracy(pred, gold) == whole


def test_cross_prompt_pairwise_accuracy_converges_to_all_cross_pairs():
    rng = np.random.default_rng(4)
    pred, gold = tied_scores(rng, (6, 4)), rng.normal(size=(6, 4))
    pairs = [
        ((pred[a, i], gold[a, i]), (pred[b, j], gold[b, j]))
        for a in range(6)
        for b in range(6)
        if a != b
        for i in range(4)
        for j in range(4)
    ]
    exact, _ = brute_force_pair_accuracy(pairs)
    result = metrics.cross_prompt_pairwise_accuracy(pred, gold, n_pairs=400_000, seed=0)
    assert result["accuracy"] == pytest.approx(exact, abs=0.004)  # ~5 standard errors
    # Same-prompt pairs would be included if prompt_b could equal prompt_a: a predictor that only
    # orders responses within a prompt correctly, and cross-prompt wrongly, scores 0.
    gold2 = np.arange(6)[:, None] * 10.0 + np.arange(4)[None, :]
    pred2 = -np.arange(6)[:, None] * 10.0 + np.arange(4)[None, :]
    assert metrics.cross_prompt_pairwise_accuracy(pred2, gold2, 10_000, seed=1)["accuracy"] == 0.0
    assert metrics.cross_prompt_pairwise_accuracy(gold2, gold2, 10_000, seed=1)["accuracy"] == 1.0


def exact_best_of_n(pred_row, gold_row, n):
    """Expected golden reward of the argmax pick over all N-subsets, ties split uniformly."""
    values = []
    for subset in combinations(range(len(pred_row)), n):
        p = pred_row[list(subset)]
        winners = [subset[i] for i in np.flatnonzero(p == p.max())]
        values.append(np.mean(gold_row[winners]))
    return np.mean(values)


def test_best_of_n_matches_enumeration_of_all_subsets():
    rng = np.random.default_rng(5)
    pred, gold = tied_scores(rng, (4, 6), levels=3), rng.normal(size=(4, 6))
    result = metrics.best_of_n(gold, {"model": pred}, n_draws=20_000, seed=0, ns=(2, 3, 5, 6))
    curves = result["curves"]
    for idx, n in enumerate(curves["model"]["n"]):
        exact_model = np.mean([exact_best_of_n(pred[p], gold[p], n) for p in range(4)])
        exact_oracle = np.mean([exact_best_of_n(gold[p], gold[p], n) for p in range(4)])
        assert curves["model"]["mean"][idx] == pytest.approx(exact_model, abs=0.02)
        assert curves["oracle"]["mean"][idx] == pytest.approx(exact_oracle, abs=0.02)
        assert curves["random"]["mean"][idx] == pytest.approx(gold.mean(), abs=0.02)
    # N = all responses: oracle picks each prompt's maximum exactly, quantile 1.
    assert curves["oracle"]["mean"][-1] == pytest.approx(gold.max(axis=1).mean())
    assert curves["oracle"]["quantile"][-1] == 1.0
    assert np.all(np.diff(curves["oracle"]["mean"]) > 0)
    assert result["n_prompts"] == 4 and result["n_responses"] == 24


def test_best_of_n_is_seeded_and_independent_of_other_predictors():
    rng = np.random.default_rng(6)
    pred, other, gold = rng.normal(size=(20, 12)), rng.normal(size=(20, 12)), rng.normal(size=(20, 12))
    alone = metrics.best_of_n(gold, {"a": pred}, n_draws=30, seed=3)
    together = metrics.best_of_n(gold, {"b": other, "a": pred}, n_draws=30, seed=3)
    assert alone["curves"]["a"] == together["curves"]["a"]
    assert alone["curves"]["a"]["n"] == [2, 5, 10]
    assert metrics.best_of_n(gold, {"a": pred}, 30, seed=4)["curves"]["a"] != alone["curves"]["a"]


def test_calibration_errors_match_sklearn():
    rng = np.random.default_rng(7)
    pred, gold = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    result = metrics.calibration_errors(pred, gold)
    assert result["mse"] == pytest.approx(mean_squared_error(gold.ravel(), pred.ravel()))
    assert result["mae"] == pytest.approx(mean_absolute_error(gold.ravel(), pred.ravel()))


def test_binned_calibration_known_answer():
    pred = np.array([[5.0, 1.0, 3.0], [2.0, 6.0, 4.0]])  # sorted: 1..6, bins of two
    gold = np.array([[50.0, 10.0, 30.0], [20.0, 60.0, 44.0]])
    result = metrics.binned_calibration(pred, gold, n_bins=3)
    assert result["pred_mean"] == [1.5, 3.5, 5.5] and result["count"] == [2, 2, 2]
    assert result["gold_mean"] == [15.0, 37.0, 55.0] and result["n_responses"] == 6
    assert result["gold_stderr"] == pytest.approx(
        [np.std([10, 20], ddof=1) / np.sqrt(2), np.std([30, 44], ddof=1) / np.sqrt(2), 5.0]
    )
    assert metrics.binned_calibration(pred[:1, :1], gold[:1, :1])["gold_stderr"] == [0.0]  # one response, one bin


def test_rankdata_matches_scipy_with_ties():
    from scipy.stats import rankdata as scipy_rankdata

    rng = np.random.default_rng(8)
    for values in (
        tied_scores(rng, (50, 9), levels=3),
        rng.normal(size=(7, 30)),
        np.zeros((2, 4)),
        np.array([[np.inf, -np.inf, 1.0, 1.0]]),
    ):
        np.testing.assert_array_equal(metrics.rankdata(values), scipy_rankdata(values, axis=1))
