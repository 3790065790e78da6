"""The simple predictors a reward model must beat, scored on step 6's evaluation sets (docs/method.md,
"Step 6: evaluation").

- ``ridge``: ridge regression from the embedding to the golden reward, fitted on every response of
  the ORM's training prompts (``orm_train``: no evaluation prompt is read for fitting). It sees the
  golden rewards that the ORM only sees through a few noisy preferences, so it is the supervised
  ceiling of a linear head on the same embeddings. Features are standardised (LLM hidden states
  have a few huge dimensions) and the penalty is the one of ``RIDGE_ALPHAS`` with the least
  leave-one-out error (scikit-learn's RidgeCV, computed from one eigendecomposition: see ``ridge_loo``).
- ``length``: the response's length, where the data directory has per-response lengths
  (``lengths_split_{k}.json``, JSONL ``{"length": number}``, rows as the embeddings'). A judge that
  favours long answers makes this a strong baseline on real data; demo data has none.
"""

from __future__ import annotations

import numpy as np

from cli import InputError
from rm_data import EmbeddingSet, read_rewards_jsonl, standard_scale

LENGTH_FILES = {"train": "lengths_split_{k}.json", "test": "lengths_test_split_{k}.json"}
RIDGE_ALPHAS = np.logspace(-2, 6, 17)


def response_lengths(eset: EmbeddingSet) -> np.ndarray | None:
    """(N, K) float64 response lengths of ``eset`` from its length files, or None when it has none."""
    paths = [eset.data_dir / LENGTH_FILES[eset.kind].format(k=k) for k in range(eset.n_splits)]
    present = [path.is_file() for path in paths]
    if not any(present):
        return None
    if not all(present):
        missing = paths[present.index(False)]
        raise InputError(f"missing length file {missing} (other splits of {eset.kind} have one)")
    lengths = np.empty(eset.rewards.shape, dtype=np.float64)
    for k, path in enumerate(paths):
        column = read_rewards_jsonl(path, key="length")
        if len(column) != eset.n_prompts:
            raise InputError(f"{path}: {len(column)} lengths, expected {eset.n_prompts} (rows of the embeddings)")
        if (column < 0).any():
            raise InputError(f"{path} line {int(np.argmax(column < 0)) + 1}: a length must be >= 0")
        lengths[:, k] = column
    return lengths


def ridge_loo(features: np.ndarray, targets: np.ndarray, alphas: np.ndarray) -> tuple[float, np.ndarray, float]:
    """(penalty, coefficients, intercept) of the ridge regression with an intercept whose penalty in
    ``alphas`` has the least mean squared leave-one-out error (the first on ties): the choice and fit
    of scikit-learn's ``RidgeCV(alphas)``, which tests/test_baselines.py checks it against.

    ``features`` (N, D) float64 must have centred columns (overwritten when N >= D). From one
    eigendecomposition of the smaller Gram matrix, every penalty costs O(N min(N, D)):
    - N >= D: X^T X = V S V^T, Q = X V; the fit at penalty a is V diag(1 / (S + a)) Q^T y and
      response i's leverage sum_j Q_ij^2 / (S_j + a);
    - N < D: X X^T = U S U^T; the fit is X^T U diag(1 / (S + a)) U^T y and the leverage
      sum_j U_ij^2 S_j / (S_j + a);
    plus 1 / N for the intercept. scikit-learn's RidgeCV takes the second route for N <= D; for
    N > D it takes an SVD of X (gcv_mode='svd', ~2.5x slower at 10,000 x 2048 on one thread) or
    recomputes an N x D^2 product per penalty (its default there), and the first route for sparse X only.
    """
    n_rows, n_features = features.shape
    mean = targets.mean()
    centred = targets - mean
    alphas = np.asarray(alphas, dtype=np.float64)
    if n_rows >= n_features:
        eigenvalues, basis = np.linalg.eigh(features.T @ features)
        eigenvalues = np.clip(eigenvalues, 0.0, None)[:, None]
        rotated = np.matmul(features, basis, out=features)  # Q, in place of X
        shrink = 1.0 / (eigenvalues + alphas)  # (D, A)
    else:
        eigenvalues, rotated = np.linalg.eigh(features @ features.T)
        eigenvalues = np.clip(eigenvalues, 0.0, None)[:, None]
        basis = features.T @ rotated  # X^T U
        shrink = eigenvalues / (eigenvalues + alphas)  # (N, A)
    projected = rotated.T @ centred
    fitted = rotated @ (projected[:, None] * shrink)  # (N, A)
    leverage = np.square(rotated, out=rotated) @ shrink + 1.0 / n_rows
    errors = np.mean(((centred[:, None] - fitted) / (1.0 - leverage)) ** 2, axis=0)
    best = int(np.argmin(errors))
    return float(alphas[best]), basis @ (projected / (eigenvalues[:, 0] + alphas[best])), float(mean)


def fit_ridge(data: EmbeddingSet, prompts: np.ndarray):
    """Ridge fitted on all K responses of ``prompts``: a scorer (B, D) float32 -> (1, B) float64."""
    features = np.concatenate([data.read_rows(k, prompts) for k in range(data.n_splits)], dtype=np.float64)
    targets = data.rewards[prompts].T.ravel()  # split-major, as the rows
    # Standardised as scikit-learn's StandardScaler does (a constant column keeps scale 1), by the
    # rule step 5's --standardize uses (rm_data.standard_scale).
    offset = features.mean(axis=0)
    scale = standard_scale(offset, features.var(axis=0), len(features))
    features -= offset
    features /= scale
    _, coefficients, intercept = ridge_loo(features, targets, RIDGE_ALPHAS)
    weights = coefficients / scale  # on the raw embedding
    bias = intercept - offset @ weights
    return lambda rows: (rows.astype(np.float64) @ weights + bias)[None, :]


def baseline_scores(
    data: EmbeddingSet, fit_prompts: np.ndarray, sets: dict[str, tuple[EmbeddingSet, np.ndarray]]
) -> dict[str, dict[str, np.ndarray]]:
    """Set name -> baseline name -> (P, K) float64 scores of that set's prompts: ridge fitted on
    ``fit_prompts`` of ``data``, and length where the set's data has length files."""
    ridge = fit_ridge(data, fit_prompts)
    scores = {}
    for name, (eset, prompts) in sets.items():
        scores[name] = {"ridge": eset.score(prompts, ridge)[0].astype(np.float64)}
        lengths = response_lengths(eset)
        if lengths is not None:
            scores[name]["length"] = lengths[prompts]
    return scores
