"""Ranking, best-of-N and calibration metrics (docs/method.md, "Step 6" and "Step 8"), vectorised over prompts.

Every function takes score matrices of shape (P, R): P prompts, R responses per prompt, row p
holding the responses of prompt p. Results carry the number of prompts and responses they rest on.
Randomness comes only from an explicit seed. A metric that is undefined on the data (every
prompt's rewards constant, one prompt, a constant predictor) is ``None`` with a ``reason`` key
beside it, never NaN: results are strict JSON, and tables print it as "n/a" (:func:`fmt`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from cli import positive_int
from random_streams import seed_sequence

BEST_OF_N = (2, 5, 10, 30, 50, 100, 300, 500)
# Elements per vectorised block (prompts x responses x responses booleans, or draws x prompts x
# responses float64: ~32 MB).
_BLOCK_ELEMENTS = 1 << 22


def add_evaluation_draw_flags(parser) -> None:
    """The flags of the seeded evaluation draws (best-of-N subsets, cross-prompt pairs), shared by
    steps 6 and 8 so both evaluate with the same defaults."""
    parser.add_argument(
        "--bon_draws", type=positive_int, default=50, help="random subsets per prompt and N for best-of-N"
    )
    add_cross_pairs_flag(parser)


def add_cross_pairs_flag(parser) -> None:
    """``--n_cross_pairs``: steps 6 and 8's, and step 7's for its out-of-fold ranking reports."""
    parser.add_argument(
        "--n_cross_pairs",
        type=positive_int,
        default=100_000,
        help="random cross-prompt pairs for cross-prompt accuracy",
    )


def rankdata(values: np.ndarray) -> np.ndarray:
    """Average ranks (1-based, ties share their mean rank) within each row of a 2-D array.

    Equal to ``scipy.stats.rankdata(values, axis=1)`` (the tests check it). Written here because
    importing ``scipy.stats`` costs ~0.9 s per step process (measured on the 2-core machine), a
    tenth of steps 6 and 8 on the demo, and these few lines are all they need from it.
    """
    if values.ndim != 2:
        raise ValueError(f"rankdata ranks the rows of a 2-D array, got shape {values.shape}")
    n_cols = values.shape[1]
    order = np.argsort(values, axis=1, kind="stable")
    ordered = np.take_along_axis(values, order, axis=1)
    position = np.broadcast_to(np.arange(n_cols), values.shape)
    starts_group = np.ones(values.shape, dtype=bool)
    starts_group[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    ends_group = np.ones(values.shape, dtype=bool)
    ends_group[:, :-1] = starts_group[:, 1:]
    first = np.maximum.accumulate(np.where(starts_group, position, 0), axis=1)
    last = np.minimum.accumulate(np.where(ends_group, position, n_cols - 1)[:, ::-1], axis=1)[:, ::-1]
    ranks = np.empty(values.shape, dtype=np.float64)
    np.put_along_axis(ranks, order, (first + last) / 2.0 + 1.0, axis=1)
    return ranks


def fmt(value: float | None, width: int, decimals: int = 3) -> str:
    """A table cell: the number right-aligned in ``width``, or "n/a" for an undefined metric."""
    return f"{'n/a':>{width}}" if value is None else f"{value:>{width}.{decimals}f}"


def _with_reason(**fields) -> dict:
    """Drop the ``reason`` of defined metrics: ``{"mean": 0.5, "reason": None}`` -> ``{"mean": 0.5}``."""
    return {key: value for key, value in fields.items() if key != "reason" or value is not None}


def _check(pred: np.ndarray, gold: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, gold = np.asarray(pred, dtype=np.float64), np.asarray(gold, dtype=np.float64)
    if pred.shape != gold.shape or pred.ndim != 2:
        raise ValueError(f"pred and gold must be (P, R) of one shape, got {pred.shape} and {gold.shape}")
    return pred, gold


def _row_correlations(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pearson's r of each row pair of (P, R) arrays where neither row is constant, and the (P,)
    mask of those rows. Constancy is tested on the values (np.ptp), not on the centred sums, which
    rounding can leave a hair above zero for a constant row."""
    valid = (np.ptp(x, axis=1) > 0) & (np.ptp(y, axis=1) > 0)
    x, y = x[valid], y[valid]
    x = x - x.mean(axis=1, keepdims=True)
    y = y - y.mean(axis=1, keepdims=True)
    return (x * y).sum(axis=1) / np.sqrt((x**2).sum(axis=1) * (y**2).sum(axis=1)), valid


def per_prompt_spearman(pred: np.ndarray, gold: np.ndarray) -> dict:
    """Mean over prompts of Spearman's rho between prediction and golden reward within a prompt.

    Average ranks for ties (as ``scipy.stats.spearmanr``); prompts where either row is constant
    have no defined rho and are excluded, and ``n_prompts_used`` says how many remain.
    """
    pred, gold = _check(pred, gold)
    return per_prompt_pearson(rankdata(pred), rankdata(gold))


def global_spearman(pred: np.ndarray, gold: np.ndarray) -> float | None:
    """Spearman's rho over all responses of all prompts pooled (None if either side is constant)."""
    pred, gold = _check(pred, gold)
    return global_pearson(rankdata(pred.reshape(1, -1)), rankdata(gold.reshape(1, -1)))


def per_prompt_pearson(pred: np.ndarray, gold: np.ndarray) -> dict:
    """Mean over prompts of Pearson's r between prediction and golden reward within a prompt;
    prompts where either row is constant are excluded (``n_prompts_used`` says how many remain)."""
    pred, gold = _check(pred, gold)
    r, valid = _row_correlations(pred, gold)
    return _with_reason(
        mean=float(r.mean()) if valid.any() else None,
        reason=None if valid.any() else "every prompt has constant golden rewards or predictions",
        n_prompts_used=int(valid.sum()),
        n_prompts=pred.shape[0],
        n_responses=pred.size,
    )


def global_pearson(pred: np.ndarray, gold: np.ndarray) -> float | None:
    """Pearson's r over all responses of all prompts pooled (None if either side is constant): the
    correlation most published reward-model tables report."""
    pred, gold = _check(pred, gold)
    r, valid = _row_correlations(pred.reshape(1, -1), gold.reshape(1, -1))
    return float(r[0]) if valid[0] else None


def _accuracy(total: float, count: int, reason: str, pred: np.ndarray) -> dict:
    """A pairwise accuracy: ``total`` pair scores over ``count`` pairs (None, for ``reason``, when none)."""
    return _with_reason(
        accuracy=total / count if count else None,
        reason=None if count else reason,
        n_pairs=count,
        n_prompts=pred.shape[0],
        n_responses=pred.size,
    )


def same_prompt_pairwise_accuracy(pred: np.ndarray, gold: np.ndarray) -> dict:
    """Fraction of same-prompt response pairs with different golden rewards ordered correctly
    (a tied prediction counts 1/2), counted exactly on (R, R) comparison matrices per prompt."""
    pred, gold = _check(pred, gold)
    n_prompts, n_resp = pred.shape
    chunk = max(1, _BLOCK_ELEMENTS // (n_resp * n_resp))
    correct = ties = count = 0
    for start in range(0, n_prompts, chunk):
        p, g = pred[start : start + chunk], gold[start : start + chunk]
        gold_lower = g[:, :, None] < g[:, None, :]  # each pair with different golden rewards, once
        correct += int(np.count_nonzero(gold_lower & (p[:, :, None] < p[:, None, :])))
        ties += int(np.count_nonzero(gold_lower & (p[:, :, None] == p[:, None, :])))
        count += int(np.count_nonzero(gold_lower))
    return _accuracy(correct + 0.5 * ties, count, "no response pair of one prompt has different golden rewards", pred)


def cross_prompt_pairwise_accuracy(pred: np.ndarray, gold: np.ndarray, n_pairs: int, seed: int) -> dict:
    """Accuracy on ``n_pairs`` seeded random pairs of responses from two different prompts."""
    pred, gold = _check(pred, gold)
    n_prompts, n_resp = pred.shape
    if n_prompts < 2:
        return _accuracy(0.0, 0, "needs at least 2 prompts", pred)
    rng = np.random.default_rng(seed_sequence(seed, "cross_prompt_pairs"))
    prompt_a = rng.integers(n_prompts, size=n_pairs)
    prompt_b = (prompt_a + rng.integers(1, n_prompts, size=n_pairs)) % n_prompts  # never == a
    resp_a, resp_b = rng.integers(n_resp, size=n_pairs), rng.integers(n_resp, size=n_pairs)
    pred_diff = pred[prompt_a, resp_a] - pred[prompt_b, resp_b]
    gold_diff = gold[prompt_a, resp_a] - gold[prompt_b, resp_b]
    valid = gold_diff != 0  # pair scores: 1 correct order, 1/2 prediction tie, 0 wrong
    score = np.where(pred_diff * gold_diff > 0, 1.0, np.where(pred_diff == 0, 0.5, 0.0))
    return _accuracy(float(score[valid].sum()), int(valid.sum()), "no sampled pair has different golden rewards", pred)


def _permute(values: np.ndarray, order: np.ndarray) -> np.ndarray:
    """values (P, R) reordered by order (P, draws, R) -> (P, draws, R)."""
    return np.take_along_axis(np.broadcast_to(values[:, None, :], order.shape), order, axis=2)


def best_of_n(
    gold: np.ndarray, predictions: Mapping[str, np.ndarray], n_draws: int, seed: int, ns: Sequence[int] = BEST_OF_N
) -> dict:
    """Best-of-N curves of several predictors on shared random subsets, with oracle and random
    (docs/method.md, "Step 6: evaluation").

    The first N responses of each seeded random ordering are its N-subset, nested across N (common
    random numbers: differences between N are not swamped by resampling noise); tie-break keys are
    shared across predictors, so a predictor's curve does not depend on which others are evaluated
    beside it. Per predictor and N (<= responses per prompt): mean golden reward of the picks, its
    standard error over prompts, and the mean golden quantile of the pick (0 worst, 1 best).
    ``oracle`` picks the golden argmax; ``random`` is the expected reward of a uniform pick.
    """
    gold = np.asarray(gold, dtype=np.float64)
    n_prompts, n_resp = gold.shape
    preds = {name: _check(p, gold)[0] for name, p in predictions.items()}
    preds["oracle"] = gold
    ns = [n for n in ns if n <= n_resp]
    quantile = (rankdata(gold) - 1) / max(n_resp - 1, 1)
    rng = np.random.default_rng(seed_sequence(seed, "best_of_n"))
    names = [*preds, "random"]
    picked_gold = {name: np.empty((len(ns), n_prompts)) for name in names}
    picked_quantile = {name: np.empty((len(ns), n_prompts)) for name in names}
    chunk = max(1, _BLOCK_ELEMENTS // (n_draws * n_resp))
    for start in range(0, n_prompts, chunk):
        rows = slice(start, min(start + chunk, n_prompts))
        shape = (rows.stop - rows.start, n_draws, n_resp)
        order = np.argsort(rng.random(shape), axis=2)  # a random ordering per prompt and draw
        tie_keys = rng.random(shape)
        gold_perm, quantile_perm = _permute(gold[rows], order), _permute(quantile[rows], order)
        for i, n in enumerate(ns):
            picked_gold["random"][i, rows] = gold_perm[..., :n].mean(axis=(1, 2))
            picked_quantile["random"][i, rows] = quantile_perm[..., :n].mean(axis=(1, 2))
        for name, pred in preds.items():
            pred_perm = _permute(pred[rows], order)
            for i, n in enumerate(ns):
                subset = pred_perm[..., :n]
                is_max = subset == subset.max(axis=2, keepdims=True)
                pick = np.argmax(np.where(is_max, tie_keys[..., :n], -1.0), axis=2)[..., None]
                picked_gold[name][i, rows] = np.take_along_axis(gold_perm, pick, axis=2).mean(axis=(1, 2))
                picked_quantile[name][i, rows] = np.take_along_axis(quantile_perm, pick, axis=2).mean(axis=(1, 2))
    curves = {}
    for name in names:
        per_prompt = picked_gold[name]
        stderr = (per_prompt.std(axis=1, ddof=1) / np.sqrt(n_prompts)).tolist() if n_prompts > 1 else [None] * len(ns)
        curves[name] = {
            "n": list(ns),
            "mean": per_prompt.mean(axis=1).tolist(),
            "stderr": stderr,
            "quantile": picked_quantile[name].mean(axis=1).tolist(),
        }
    result = {"curves": curves, "n_draws": n_draws, "n_prompts": n_prompts, "n_responses": gold.size}
    if n_prompts < 2:
        result["stderr_reason"] = "a standard error over prompts needs at least 2 prompts"
    return result


def calibration_errors(pred: np.ndarray, gold: np.ndarray) -> dict:
    """Mean squared and mean absolute error of predictions on the golden scale."""
    pred, gold = np.asarray(pred, np.float64).ravel(), np.asarray(gold, np.float64).ravel()
    err = pred - gold
    return {"mse": float(np.mean(err**2)), "mae": float(np.mean(np.abs(err))), "n_responses": err.size}


def binned_calibration(pred: np.ndarray, gold: np.ndarray, n_bins: int = 15) -> dict:
    """Reliability curve: responses sorted by prediction into ~equal-count bins.

    Returns per bin the mean prediction, mean golden reward, its standard error and the count.
    """
    pred, gold = np.asarray(pred, np.float64).ravel(), np.asarray(gold, np.float64).ravel()
    order = np.argsort(pred, kind="stable")
    bins = [b for b in np.array_split(order, min(n_bins, len(order))) if len(b)]
    return {
        "pred_mean": [float(pred[b].mean()) for b in bins],
        "gold_mean": [float(gold[b].mean()) for b in bins],
        "gold_stderr": [float(gold[b].std(ddof=1) / np.sqrt(len(b))) if len(b) > 1 else 0.0 for b in bins],
        "count": [len(b) for b in bins],
        "n_responses": int(pred.size),
    }


def ranking_report(pred: np.ndarray, gold: np.ndarray, seed: int, n_cross_pairs: int) -> dict:
    """Spearman and Pearson (per prompt and global) and same-/cross-prompt pairwise accuracy of one predictor."""
    report = {
        "spearman_per_prompt": per_prompt_spearman(pred, gold),
        "spearman_global": global_spearman(pred, gold),
        "pearson_per_prompt": per_prompt_pearson(pred, gold),
        "pearson_global": global_pearson(pred, gold),
        "pairwise_accuracy_same_prompt": same_prompt_pairwise_accuracy(pred, gold),
        "pairwise_accuracy_cross_prompt": cross_prompt_pairwise_accuracy(pred, gold, n_cross_pairs, seed),
    }
    for name in ("spearman_global", "pearson_global"):
        if report[name] is None:
            report[f"{name}_reason"] = "the golden rewards or the predictions are all equal"
    return report


def prediction_report(pred: np.ndarray, gold: np.ndarray, seed: int, n_cross_pairs: int) -> dict:
    """Calibration errors, ranking metrics and number of distinct values of (P, R) predictions."""
    ranking = ranking_report(pred, gold, seed, n_cross_pairs)
    return {"calibration": calibration_errors(pred, gold), **ranking, "n_distinct_values": int(len(np.unique(pred)))}
