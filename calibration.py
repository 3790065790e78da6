"""Isotonic calibration maps (score -> golden reward): fitting, cross-validation, safe serialisation.

A map is scikit-learn's ``IsotonicRegression(out_of_bounds="clip")``: piecewise linear through
its thresholds, constant outside the fitted range. Two variants:

- ``standard``: the pool-adjacent-violators (PAV) fit itself, a step function that maps every
  score inside one PAV block to the same value, so it turns the ranking of the scores into ties.
- ``centered``: strictly increasing on the fitted range. Knots sit at the score-centre (mean of the
  block's scores) of each interior PAV block with the block's value; the first and last blocks are
  anchored at the ends of the fitted range, so the map stays within the PAV values (no
  extrapolation) and no two distinct scores inside the range get one value. It keeps the
  teacher's ranking, which best-of-N needs most at the top, where the standard map's last block
  is flat. (After Oron & Flournoy 2017, "Centered isotonic regression".)

Every map is written twice (README, "Reproducibility and safety"): ``name.joblib`` holds a fitted ``IsotonicRegression``
for users who want the sklearn object (for ``centered``, one fitted on its knots, which predicts the
same values), and ``name.json`` beside it holds the thresholds and settings. Our steps read only the
JSON: nothing in this project calls ``joblib.load`` or unpickles anything. :meth:`IsotonicMap.predict`
reproduces ``IsotonicRegression.predict`` bit for bit: for float64 thresholds scikit-learn clips to
[X_min_, X_max_] and calls ``scipy.interpolate.interp1d``, which delegates to ``np.interp``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from artifacts import atomic_path, read_json, write_json
from cli import InputError, finite_number
from metrics import prediction_report
from random_streams import int_seed, seed_sequence

# scikit-learn and joblib are imported where maps are fitted or saved (step 7 only): this module
# loads with numpy alone, so steps' --help stays fast.
if TYPE_CHECKING:
    from sklearn.isotonic import IsotonicRegression

ISOTONIC_VARIANTS = ("standard", "centered")
# Centered: never worse beyond noise out of fold on the demo (docs/method.md, "Step 7: calibration and
# distillation"), and it keeps the teacher's ranking, so calibrating does not change which response
# best-of-N picks.
DEFAULT_ISOTONIC_VARIANT = "centered"
MAP_FORMAT, MAP_FORMAT_VERSION = "isotonic_map", 1


# --------------------------------------------------------------------------------------------
# The map
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IsotonicMap:
    """A monotone piecewise-linear map, constant outside [x_thresholds[0], x_thresholds[-1]].

    x_thresholds: (T,) float64, strictly increasing
    y_thresholds: (T,) float64, non-decreasing (non-increasing if not ``increasing``)
    settings: provenance (what was fitted on which prompts), written to the JSON sidecar
    """

    x_thresholds: np.ndarray
    y_thresholds: np.ndarray
    variant: str
    increasing: bool = True
    settings: dict = field(default_factory=dict)

    def predict(self, scores: np.ndarray) -> np.ndarray:
        """Calibrated values, float64, of ``scores`` (any shape, returned in the same shape)."""
        scores = np.asarray(scores, dtype=np.float64)
        if len(self.x_thresholds) == 1:  # sklearn's constant map for a single distinct score
            return np.full(scores.shape, self.y_thresholds[0])
        clipped = np.clip(scores, self.x_thresholds[0], self.x_thresholds[-1])
        return np.interp(clipped, self.x_thresholds, self.y_thresholds)

    @property
    def sizes(self) -> dict[str, int]:
        """Its number of thresholds and of distinct values (levels)."""
        return {"n_thresholds": len(self.x_thresholds), "n_levels": int(len(np.unique(self.y_thresholds)))}

    def to_json(self) -> dict:
        return {
            "format": MAP_FORMAT,
            "version": MAP_FORMAT_VERSION,
            "variant": self.variant,
            "increasing": self.increasing,
            "out_of_bounds": "clip",
            "dtype": "float64",
            "x_min": float(self.x_thresholds[0]),
            "x_max": float(self.x_thresholds[-1]),
            **self.sizes,
            "x_thresholds": self.x_thresholds.tolist(),
            "y_thresholds": self.y_thresholds.tolist(),
            "settings": self.settings,
        }


def _float_array(record: dict, key: str, path: Path) -> np.ndarray:
    values = record.get(key)
    if (
        not isinstance(values, list)
        or not values
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    ):
        raise InputError(f"{path}: {key!r} must be a non-empty list of numbers")
    if not all(map(finite_number, values)):
        raise InputError(f"{path}: {key!r} holds a non-finite value")
    return np.asarray(values, dtype=np.float64)


def map_from_json(record: dict, path: Path) -> IsotonicMap:
    """Validate a map's JSON record; every problem is an InputError naming ``path``."""
    if record.get("format") != MAP_FORMAT:
        raise InputError(f'{path}: not an isotonic map (expected "format": "{MAP_FORMAT}")')
    if record.get("variant") not in ISOTONIC_VARIANTS:
        raise InputError(f"{path}: variant must be one of {ISOTONIC_VARIANTS}, got {record.get('variant')!r}")
    if not isinstance(record.get("increasing"), bool) or record.get("out_of_bounds") != "clip":
        raise InputError(f'{path}: expected a boolean "increasing" and "out_of_bounds": "clip"')
    x, y = _float_array(record, "x_thresholds", path), _float_array(record, "y_thresholds", path)
    if len(x) != len(y):
        raise InputError(f"{path}: {len(x)} x_thresholds but {len(y)} y_thresholds")
    if not (np.diff(x) > 0).all():
        i = int(np.flatnonzero(np.diff(x) <= 0)[0])
        raise InputError(
            f"{path}: x_thresholds must be strictly increasing "
            f"(x[{i}]={float(x[i])!r} >= x[{i + 1}]={float(x[i + 1])!r})"
        )
    steps = np.diff(y) if record["increasing"] else -np.diff(y)
    if (steps < 0).any():
        raise InputError(
            f"{path}: y_thresholds are not monotone {'non-decreasing' if record['increasing'] else 'non-increasing'}"
        )
    if record.get("x_min") != x[0] or record.get("x_max") != x[-1]:
        raise InputError(f"{path}: x_min/x_max do not match the first and last x_thresholds")
    settings = record.get("settings", {})
    if not isinstance(settings, dict):
        raise InputError(f'{path}: "settings" must be an object')
    return IsotonicMap(x, y, record["variant"], record["increasing"], settings)


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON sidecar of a map: ``name.joblib`` -> ``name.json`` (a ``.json`` path is itself)."""
    return Path(path).with_suffix(".json")


def load_isotonic_map(path: str | os.PathLike, what: str = "isotonic map") -> IsotonicMap:
    """Load a map from the JSON sidecar of ``path`` (``.joblib`` or ``.json``); never unpickles."""
    json_path = sidecar_path(path)
    return map_from_json(read_json(json_path, f"{what} (JSON sidecar)"), json_path)


def save_isotonic_map(imap: IsotonicMap, estimator: IsotonicRegression, path: str | os.PathLike) -> None:
    """Write ``path`` (.joblib, the sklearn object) and its JSON sidecar, each atomically."""
    import joblib

    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        joblib.dump(estimator, handle)
    write_json(sidecar_path(path), imap.to_json())


# --------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------
def _centered_knots(scores: np.ndarray, estimator: IsotonicRegression) -> tuple[np.ndarray, np.ndarray]:
    """Knots of the centered variant from a fitted standard map and its (n,) float64 training scores."""
    unique_scores, counts = np.unique(scores, return_counts=True)
    level = estimator.predict(unique_scores)  # the PAV value of each distinct score, exactly
    starts = np.flatnonzero(np.r_[True, level[1:] != level[:-1]])
    block_values = level[starts]
    if len(starts) == 1:
        ends = np.unique([unique_scores[0], unique_scores[-1]])
        return ends, np.full(len(ends), block_values[0])
    centres = np.add.reduceat(unique_scores * counts, starts) / np.add.reduceat(counts, starts)
    knots_x = np.concatenate([[unique_scores[0]], centres[1:-1], [unique_scores[-1]]])
    return knots_x, block_values


def fit_isotonic(
    scores: np.ndarray, gold: np.ndarray, variant: str, settings: dict | None = None
) -> tuple[IsotonicMap, IsotonicRegression]:
    """Fit a map scores -> gold and the sklearn object that predicts the same values.

    scores, gold: arrays of one shape (e.g. (P, R) prompts x responses), flattened for the fit.
    """
    from sklearn.isotonic import IsotonicRegression

    if variant not in ISOTONIC_VARIANTS:
        raise ValueError(f"variant must be one of {ISOTONIC_VARIANTS}, got {variant!r}")
    scores = np.asarray(scores, dtype=np.float64).ravel()
    gold = np.asarray(gold, dtype=np.float64).ravel()
    estimator = IsotonicRegression(increasing=True, out_of_bounds="clip").fit(scores, gold)
    if variant == "centered":
        knots_x, knots_y = _centered_knots(scores, estimator)
        # PAV on strictly increasing knots changes nothing, so this object's thresholds are the knots.
        estimator = IsotonicRegression(increasing=True, out_of_bounds="clip").fit(knots_x, knots_y)
    imap = IsotonicMap(
        estimator.X_thresholds_.astype(np.float64),
        estimator.y_thresholds_.astype(np.float64),
        variant,
        True,
        dict(settings or {}, n_fit_responses=int(scores.size)),
    )
    return imap, estimator


def out_of_fold_predictions(
    scores: np.ndarray, gold: np.ndarray, n_folds: int, seed: int, variant: str
) -> tuple[np.ndarray, np.ndarray]:
    """Cross-validated calibration: each prompt is predicted by a map fitted on the other folds.

    scores, gold: (P, R) prompts x responses; folds are over prompts (rows), seeded.
    Returns (out-of-fold predictions (P, R) float64, fold index of each prompt (P,) int64).
    """
    from sklearn.model_selection import KFold

    scores, gold = np.asarray(scores, dtype=np.float64), np.asarray(gold, dtype=np.float64)
    oof = np.empty(scores.shape, dtype=np.float64)
    fold_of_prompt = np.empty(scores.shape[0], dtype=np.int64)
    kfold = KFold(n_splits=n_folds, shuffle=True, random_state=int_seed(seed_sequence(seed, "cv_folds")))
    for fold, (fit_prompts, predict_prompts) in enumerate(kfold.split(scores)):
        imap, _ = fit_isotonic(scores[fit_prompts], gold[fit_prompts], variant)
        oof[predict_prompts] = imap.predict(scores[predict_prompts])
        fold_of_prompt[predict_prompts] = fold
    return oof, fold_of_prompt


def cross_validate(
    scores: np.ndarray, gold: np.ndarray, n_folds: int, seed: int, variant: str, n_cross_pairs: int
) -> dict:
    """Out-of-fold report of one variant: the honest calibration error of a map fitted on these prompts."""
    oof, fold_of_prompt = out_of_fold_predictions(scores, gold, n_folds, seed, variant)
    return {
        "variant": variant,
        "n_folds": n_folds,
        "prompts_per_fold": np.bincount(fold_of_prompt, minlength=n_folds).tolist(),
        **prediction_report(oof, gold, seed, n_cross_pairs),
    }


def check_map_provenance(imap: IsotonicMap, map_path: Path, model: str, checkpoints: Sequence[Path]) -> None:
    """A map applied to another model's scores is meaningless: ``imap`` (read from ``map_path``) must map
    ``model`` scores ('teacher' or 'student') and have been fitted on these checkpoints."""
    fitted_input = imap.settings.get("input", model)
    if fitted_input != model:
        raise InputError(f"{sidecar_path(map_path)} maps {fitted_input} scores; expected a {model} map")
    names = [Path(path).name for path in checkpoints]
    fitted = imap.settings.get("teacher_checkpoints" if model == "teacher" else "student_checkpoint")
    expected = names if model == "teacher" else names[0]
    if fitted is not None and fitted != expected:
        hint = " (pass step 7's --teacher_ckpt)" if model == "teacher" else ""
        raise InputError(f"{sidecar_path(map_path)} was fitted on {model} {fitted}, not {expected}{hint}")
