"""Ensemble members of either kind behind one scoring interface: MLP checkpoints (``networks.py``) and
LightGBM classifiers (step 5's ``--rm_model lgbm``), plus the LightGBM members' training and file checks.

A member's kind is its file's suffix: ``.ckpt`` an MLP ``state_dict``, ``.txt`` a LightGBM model in
LightGBM's own text format (never pickle). :func:`load_members` turns any list of member files into
one scorer, (B, D) float32 rows -> (M, B) float32 scores, which steps 6-8, the score cache and
``reward_model.py`` use whatever the kinds. torch is imported only where an MLP is loaded, lightgbm
only where a tree model is.

LightGBM's own loader does not survive every damaged file (a model cut inside its trees aborts the
process), so a tree file is checked before LightGBM parses it: against the sha256 that step 5's
manifest records, and for the structure LightGBM wrote (its header's ``tree_sizes`` against the tree
blocks, its closing lines).
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from artifacts import file_sha256, write_text
from cli import InputError

log = logging.getLogger(__name__)

RM_MODELS = ("mlp", "lgbm")  # step 5's --rm_model choices; the first is the default
LGBM_SUFFIX = ".txt"


def member_kind(path: str | os.PathLike) -> str:
    """'lgbm' for a LightGBM text model (``.txt``), else 'mlp' (a ``.ckpt`` state_dict)."""
    return "lgbm" if Path(path).suffix == LGBM_SUFFIX else "mlp"


# --------------------------------------------------------------------------------------------
# LightGBM members: training (step 5)
# --------------------------------------------------------------------------------------------
@dataclass
class LgbmConfig:
    """Step 5's ``--lgbm_*`` flags, its ``--stop_metric`` and its threads (docs/method.md, "LightGBM
    members"), built by ``cli.from_flags``; no defaults here, the parser holds them."""

    num_leaves: int
    learning_rate: float
    n_estimators: int  # boosting rounds at most (early stopping usually ends sooner)
    min_child_samples: int
    feature_fraction: float
    bagging_fraction: float
    patience: int  # rounds without a better validation value before stopping
    threads: int
    stop_metric: str  # "loss" or "accuracy" (ties: lower loss), as the MLP members'


def lgbm_params(config: LgbmConfig, objective: str, seed: int) -> dict:
    """LightGBM's parameters of one member. Deterministic at a given ``threads``: same seed, same trees.

    force_col_wise: with D in the thousands and a few thousand rows, the histograms are built per
    feature column (LightGBM's advice for many columns and many bins; it also needs less memory than
    the row-wise layout), and fixing it avoids LightGBM's timing-based choice, which could differ
    between runs.
    """
    return {
        "objective": "binary" if objective == "clf" else "none",  # bt: bt_objective's gradients
        "metric": "binary_logloss" if objective == "clf" else "None",  # training loss (bt: pair_metrics)
        "num_leaves": config.num_leaves,
        "learning_rate": config.learning_rate,
        "min_child_samples": config.min_child_samples,
        "feature_fraction": config.feature_fraction,
        "bagging_fraction": config.bagging_fraction,
        "bagging_freq": 1 if config.bagging_fraction < 1 else 0,
        "seed": seed % 2**31,  # LightGBM takes a signed 32-bit seed; it derives bagging/feature seeds from it
        "deterministic": True,
        "force_col_wise": True,
        "num_threads": config.threads,
        "verbosity": -1,
    }


def bt_objective(scores: np.ndarray, n_pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """Gradient and hessian of the summed Bradley-Terry loss sum_p -log sigmoid(s_w - s_l) for rows
    laid out as [winners of the P pairs; their losers]: scores (2P,) -> grad (2P,), hess (2P,)."""
    margin = scores[:n_pairs] - scores[n_pairs:]
    p_win = 1.0 / (1.0 + np.exp(-margin))
    grad_winner = -(1.0 - p_win)
    hess = p_win * (1.0 - p_win)
    return np.concatenate([grad_winner, -grad_winner]), np.concatenate([hess, hess])


def pair_metrics(scores: np.ndarray, objective: str) -> tuple[float, float]:
    """(loss, pair accuracy) of rows laid out as [winners; losers] with raw scores (2P,): the objective's
    mean loss (clf: BCE over the 2P rows, winner 1; bt: -log sigmoid(s_w - s_l) over the P pairs), and the
    fraction of pairs with s_w > s_l, ties 1/2 (as ``networks.evaluate_pairs``)."""
    n_pairs = len(scores) // 2
    winner, loser = scores[:n_pairs], scores[n_pairs:]
    margin = winner - loser
    if objective == "clf":  # BCE with logits: softplus(-s) for winners, softplus(s) for losers
        loss = float(np.mean(np.concatenate([np.logaddexp(0.0, -winner), np.logaddexp(0.0, loser)])))
    else:
        loss = float(np.mean(np.logaddexp(0.0, -margin)))
    return loss, float(np.mean((margin > 0) + 0.5 * (margin == 0)))


class _LgbmMember:
    """One member's booster, its training and validation rows ([winners; losers] each) and history."""

    def __init__(self, features, pairs, objective: str, config: LgbmConfig, seed: int):
        import lightgbm as lgb

        winners, losers, val_winners, val_losers = (np.asarray(p, dtype=np.int64) for p in pairs)
        self.objective, self.n_pairs, self.n_val = objective, len(winners), len(val_winners)
        labels = np.concatenate([np.ones(len(winners)), np.zeros(len(losers))])
        train = lgb.Dataset(features[np.concatenate([winners, losers])], labels, free_raw_data=True)
        self.booster = lgb.Booster(lgbm_params(config, objective, seed), train)
        self.val_features = features[np.concatenate([val_winners, val_losers])] if self.n_val else None
        self.val_scores = np.zeros(2 * self.n_val) if self.n_val else None
        self.history: list[dict] = []

    def boost(self) -> None:
        """One boosting round, then the round's record (training and validation loss and accuracy)."""
        if self.objective == "bt":
            self.booster.update(fobj=lambda scores, _: bt_objective(scores, self.n_pairs))
        else:
            self.booster.update()
        round_ = self.booster.current_iteration()
        if self.objective == "clf":
            train_loss = self.booster.eval_train()[0][2]
        else:  # a custom objective's scores are raw
            train_loss = self.booster.eval_train(lambda scores, _: ("bt", pair_metrics(scores, "bt")[0], False))[0][2]
        record = {"epoch": round_, "train_loss": train_loss, "val_loss": None}
        if self.n_val:  # the new tree's raw output added to the validation scores: one tree, not all, per round
            self.val_scores += self.booster.predict(
                self.val_features, start_iteration=round_ - 1, num_iteration=1, raw_score=True
            )
            record["val_loss"], record["val_accuracy"] = pair_metrics(self.val_scores, self.objective)
        self.history.append(record)


def train_lgbm_members(
    features: np.ndarray,
    member_pairs: Sequence[tuple],
    objective: str,
    seeds: Sequence[int],
    scheme: str,
    config: LgbmConfig,
) -> list[tuple[str, object]]:
    """Train one LightGBM member per ``member_pairs`` entry: (model text, ``networks.FitResult``) each.

    features: (R, D) float32 rows; member_pairs: per member (winners, losers, val_winners, val_losers),
    (P,) and (V,) row indices as step 5 draws them for the MLP members. clf: binary logloss on the pairs'
    responses (winner 1, loser 0); bt: :func:`bt_objective`. Early stopping as the MLP members' (step 5's
    ``scheme``): member, each on its own validation pairs; pooled, one stopping round for all, by the
    validation values weighted by each member's validation pairs; none, ``n_estimators`` rounds. The
    best round's trees are kept.
    """
    from networks import FitResult

    members = [_LgbmMember(features, pairs, objective, config, seed) for pairs, seed in zip(member_pairs, seeds)]
    groups = [members] if scheme == "pooled" else [[member] for member in members]
    results: list[tuple[str, object]] = []
    for group in groups:
        start = time.perf_counter()
        best_round = _boost_group(group, config, early_stopping=scheme != "none")
        seconds = max(time.perf_counter() - start, 1e-9) / len(group)
        for member in group:
            record = member.history[best_round - 1]
            rows_per_second = 2 * member.n_pairs * len(member.history) / seconds
            fit = FitResult(
                best_round, len(member.history), record["val_loss"], rows_per_second, member.history,
                val_pair_accuracy=record.get("val_accuracy"),
            )  # fmt: skip
            results.append((member.booster.model_to_string(num_iteration=best_round), fit))
    return results


def _boost_group(group: list[_LgbmMember], config: LgbmConfig, early_stopping: bool) -> int:
    """Boost the members side by side; the round whose (pooled) validation value was best."""
    weights = np.array([member.n_val for member in group], dtype=np.float64)
    best_key, best_round = (math.inf,), 0
    for round_ in range(1, config.n_estimators + 1):
        for member in group:
            member.boost()
        if not early_stopping:
            best_round = round_
            continue
        loss = float(np.average([m.history[-1]["val_loss"] for m in group], weights=weights))
        key = (loss,)
        if config.stop_metric == "accuracy":
            key = (-float(np.average([m.history[-1]["val_accuracy"] for m in group], weights=weights)), loss)
        if key < best_key:
            best_key, best_round = key, round_
        elif round_ - best_round >= config.patience:
            log.info("early stop at round %d (best %d, val loss %.4f)", round_, best_round, best_key[-1])
            break
    return best_round


def save_booster(model_text: str, path: str | os.PathLike) -> None:
    """Write a LightGBM text model atomically."""
    write_text(path, model_text)


# --------------------------------------------------------------------------------------------
# Loading and scoring members of any kind
# --------------------------------------------------------------------------------------------
def check_lgbm_text(text: str, path: Path) -> None:
    """Refuse a file that is not a complete LightGBM text model before LightGBM parses it (its parser
    aborts the process on a model cut inside its trees): the header, each tree block where the header's
    ``tree_sizes`` puts it, the closing lines."""
    foreign = f"{path}: not a LightGBM text model"
    if not text.startswith("tree\nversion="):
        raise InputError(f"{foreign} (no 'tree' header)")
    sizes = re.search(r"^tree_sizes=([0-9 ]*)$", text, re.MULTILINE)
    end = text.find("\nend of trees\n")
    if sizes is None or end < 0 or "\nend of parameters\n" not in text or not text.rstrip().endswith(":null"):
        raise InputError(f"{path}: incomplete LightGBM model (truncated or damaged; retrain with step 5)")
    offset = text.find("\nTree=0\n") + 1
    for index, size in enumerate(int(s) for s in sizes.group(1).split()):
        if offset <= 0 or not text.startswith(f"Tree={index}\n", offset):
            raise InputError(f"{path}: damaged LightGBM model (tree {index} is not where its header puts it)")
        offset += size
    if offset != end + 1:
        raise InputError(f"{path}: damaged LightGBM model (its trees do not end where its header says)")


def load_booster(path: str | os.PathLike, expected_dim: int | None = None, sha256: str | None = None):
    """A LightGBM member from its text file, checked: the manifest's ``sha256`` where given, the file's
    structure (:func:`check_lgbm_text`), its input size against ``expected_dim``."""
    import lightgbm as lgb

    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path}")
    if sha256 is not None and file_sha256(path) != sha256:
        raise InputError(f"{path}: sha256 differs from the one step 5 recorded in the manifest (damaged or replaced)")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        raise InputError(f"{path}: not a LightGBM text model (not readable text)") from None
    check_lgbm_text(text, path)
    try:
        booster = lgb.Booster(model_str=text)
    except lgb.basic.LightGBMError as err:
        raise InputError(f"{path}: not a readable LightGBM model ({str(err).splitlines()[0]})") from None
    if expected_dim is not None and booster.num_feature() != expected_dim:
        raise InputError(
            f"{path}: model expects embeddings of size D={booster.num_feature()}, data has D={expected_dim}"
        )
    return booster


class MemberEnsemble:
    """Members of any kinds scored together: (B, D) float32 numpy -> (M, B) float32 numpy, rows in the
    members' order. MLPs go through ``networks.StackedEnsemble`` (one stacked product for all of them);
    each LightGBM member gives its raw score (log-odds for clf), in float64 cast to float32.

    Scores are checked finite where they are made: a non-finite one is an InputError naming the member.
    """

    def __init__(self, paths: Sequence[Path], mlps: list, boosters: list):
        kinds = [member_kind(path) for path in paths]
        self.sources = [str(path) for path in paths]
        self.mlp_rows = [i for i, kind in enumerate(kinds) if kind == "mlp"]
        self.lgbm_rows = [i for i, kind in enumerate(kinds) if kind == "lgbm"]
        self.stacked = None
        if mlps:
            from networks import StackedEnsemble

            self.stacked = StackedEnsemble(mlps, [paths[i] for i in self.mlp_rows])
        self.boosters, self.n_members = boosters, len(paths)

    def __len__(self) -> int:
        return self.n_members

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        scores = np.empty((self.n_members, len(rows)), dtype=np.float32)
        if self.stacked is not None:
            scores[self.mlp_rows] = self.stacked(rows)
        for index, booster in zip(self.lgbm_rows, self.boosters):  # OpenMP threads: THREADS (OMP_NUM_THREADS)
            scores[index] = booster.predict(rows, raw_score=True)
            if not np.isfinite(scores[index]).all():
                raise InputError(f"{self.sources[index]}: non-finite scores (the model file is damaged)")
        return scores


def load_members(
    paths: Sequence[str | os.PathLike], expected_dim: int | None = None, hashes: Mapping[Path, str] | None = None
) -> MemberEnsemble:
    """Load member files of any kind into one :class:`MemberEnsemble`. MLPs must share one architecture
    (``networks.load_ensemble``); a LightGBM file is checked against ``hashes`` (resolved path -> sha256,
    ``run_folder.member_hashes``) where it is listed there."""
    paths = [Path(path) for path in paths]
    mlp_paths = [path for path in paths if member_kind(path) == "mlp"]
    mlps = []
    if mlp_paths:
        from networks import load_ensemble

        mlps = load_ensemble(mlp_paths, expected_dim)
    hashes = hashes or {}
    boosters = [
        load_booster(path, expected_dim, hashes.get(path.resolve())) for path in paths if member_kind(path) == "lgbm"
    ]
    return MemberEnsemble(paths, mlps, boosters)
