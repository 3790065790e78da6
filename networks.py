"""The reward-model network: MLP, losses, training loop with early stopping, checkpoint I/O.

Nothing here knows the data-directory layout: training takes a feature matrix and index arrays.
Checkpoints are plain ``state_dict``s (keys ``fc1``/``fc2``/``fc3``, as in the original authors' code) and are
loaded with ``torch.load(..., weights_only=True)``, which never runs pickled code.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import io
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import cli
from artifacts import atomic_path
from cli import InputError
from objectives import OBJECTIVES

log = logging.getLogger(__name__)


def flush_denormals() -> None:
    """Compute with float32 denormals (magnitudes below 1.2e-38) flushed to zero, when the step owns
    its process (``cli.OWNS_PROCESS``: run as a script); a caller's process keeps its own setting.

    Training at a learning rate of 1e-3 makes some gradients and Adam moments denormal, and the CPU
    computes with those many times slower (docs/performance.md). Steps 5 and 7 call this first,
    before torch starts its threads, which inherit the setting; their outputs are byte-identical with
    and without it (tests/test_networks.py).
    """
    if cli.OWNS_PROCESS:
        torch.set_flush_denormal(True)


class MLP(nn.Module):
    """input_dim -> 1024 -> 512 -> 1 with ReLU; returns (B,) scores for (B, input_dim) inputs."""

    def __init__(self, input_dim: int, hidden: Sequence[int] = (1024, 512), generator: torch.Generator | None = None):
        super().__init__()
        self.fc1 = nn.Linear(input_dim, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], 1)
        if generator is not None:  # PyTorch's default Linear initialisation, drawn from the generator
            for layer in (self.fc1, self.fc2, self.fc3):
                nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
                bound = 1.0 / math.sqrt(layer.in_features)
                nn.init.uniform_(layer.bias, -bound, bound, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x))))).squeeze(-1)


def mlp_flops_per_sample(input_dim: int, hidden: Sequence[int] = (1024, 512)) -> int:
    """Multiply-add FLOPs of one forward pass (x2 per MAC)."""
    dims = [input_dim, *hidden, 1]
    return 2 * sum(a * b for a, b in zip(dims[:-1], dims[1:]))


def mlp_train_flops_per_sample(input_dim: int, hidden: Sequence[int] = (1024, 512)) -> int:
    """FLOPs of one sample of a train step: the forward, the weight gradients (as many again) and the
    input gradients of every layer but the first (embeddings need none): ~2.2x the forward for D=2048."""
    return 2 * mlp_flops_per_sample(input_dim, hidden) + mlp_flops_per_sample(hidden[0], hidden[1:])


@dataclass
class TrainConfig:
    """How a model trains: step 5's flags of the same names (``epochs`` is ``--training_epochs``), built
    by ``cli.from_flags``; no defaults here, the parser holds them. Step 7's student takes its own."""

    epochs: int
    learning_rate: float
    batch_size: int
    patience: int  # epochs without validation improvement before stopping
    weight_decay: float  # decoupled (AdamW) weight decay; 0 is plain Adam
    stop_metric: str  # early stopping on the validation "loss", or "accuracy" (ties: lower loss)
    # An epoch of fewer mini-batches repeats its pass (freshly shuffled) until it has this many
    # optimizer steps, so the epoch cap and patience are budgets in steps at small data sizes too.
    min_epoch_steps: int


@dataclass
class FitResult:
    """What a fit reports; the fields after ``history`` are set by one trainer each."""

    best_epoch: int  # the epoch whose weights were kept (the last one without early stopping)
    epochs_run: int
    best_val_loss: float | None  # of the returned weights (a student's: MSE on the targets' scale); None: no validation
    samples_per_second: float
    history: list[dict]  # per epoch: epoch, train_loss (mean of its mini-batch losses), val_loss (or None),
    # and for ORMs val_accuracy (validation pairs ranked right)
    val_pair_accuracy: float | None = None  # ORM: validation pairs with r_w > r_l, ties 1/2
    train_mse: float | None = None  # student: on the targets' scale, of the returned weights
    target_mean: float | None = None  # student: the training targets' mean and std (standardisation)
    target_std: float | None = None


def _score_pairs(
    model: MLP, inputs: Callable[[torch.Tensor], torch.Tensor], winners: torch.Tensor, losers: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of both sides of the pairs in one forward pass; inputs(rows) gives the rows' features."""
    scores = model(inputs(torch.cat([winners, losers])))
    return scores[: len(winners)], scores[len(winners) :]


@dataclass
class FitProblem:
    """One model for :func:`fit_models`: its mini-batch loss, validation loss and random stream."""

    model: MLP
    n_items: int
    batch_loss: Callable[[torch.Tensor], torch.Tensor]  # (B,) int64 indices into range(n_items) -> loss
    validate: Callable[[], tuple[float, float | None]] | None  # (loss, pair accuracy or None) of the current
    # weights on validation data, in one pass; None: none held out
    generator: torch.Generator  # shuffling
    val_weight: float = 1.0  # weight of its validation loss in the pooled loss (its number of validation items)
    constant_loss: float = 0.0  # a constant predictor's loss (log 2 for pairs, ~1 for standardised targets)


class OrmMember:
    """One ORM member's training problem (model, losses, optional input standardisation) for :func:`fit_models`.

    features: (R, D) float32 rows referenced by the index arrays
    winners, losers: (P,) int64 row indices of the training pairs (winner preferred); repeats allowed
    val_winners, val_losers: (V,) int64 row indices of the validation pairs (V may be 0)
    objective: a name in :data:`objectives.OBJECTIVES` (pairwise: one sample per pair; pointwise: the
        pairs' responses shuffled as independent samples, winner 1, loser 0)
    generator: seeds initialisation and shuffling
    standardize: train on inputs standardised with the mean and std of the training pairs' responses;
        :meth:`finish` folds the standardisation into the first layer, so the model takes raw embeddings
    """

    def __init__(
        self,
        features: torch.Tensor,
        winners: torch.Tensor,
        losers: torch.Tensor,
        val_winners: torch.Tensor,
        val_losers: torch.Tensor,
        objective: str,
        generator: torch.Generator,
        standardize: bool = False,
    ):
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {tuple(OBJECTIVES)}, got {objective!r}")
        loss = OBJECTIVES[objective].loss
        self.features, self.shift, self.scale = features, None, None
        inputs = features.__getitem__
        if standardize:
            from rm_data import standard_scale  # numpy only; imported here to keep this file free of data layout

            train_rows = features[torch.unique(torch.cat([winners, losers]))].double()
            mean = train_rows.mean(dim=0)
            var = train_rows.var(dim=0, correction=0) if len(train_rows) > 1 else torch.zeros(features.shape[1])
            self.shift = mean.float()
            self.scale = torch.from_numpy(standard_scale(mean.numpy(), var.numpy(), len(train_rows))).float()

            def inputs(rows: torch.Tensor) -> torch.Tensor:
                return (features[rows] - self.shift) / self.scale

        self.inputs = inputs
        model = MLP(features.shape[1], generator=generator)
        if OBJECTIVES[objective].pointwise:
            sample_rows = torch.cat([winners, losers])
            sample_labels = torch.cat([torch.ones(len(winners)), torch.zeros(len(losers))])

            def batch_loss(batch: torch.Tensor) -> torch.Tensor:
                return loss(model(inputs(sample_rows[batch])), sample_labels[batch])

            n_items = len(sample_rows)
        else:

            def batch_loss(batch: torch.Tensor) -> torch.Tensor:
                return loss(*_score_pairs(model, inputs, winners[batch], losers[batch]))

            n_items = len(winners)

        validate = functools.partial(evaluate_pairs, model, objective, inputs, val_winners, val_losers)
        self.problem = FitProblem(
            model,
            n_items,
            batch_loss,
            validate if len(val_winners) else None,
            generator,
            float(len(val_winners)),
            math.log(2),
        )

    def finish(self, fit: FitResult) -> tuple[MLP, FitResult]:
        """The trained model taking raw embeddings (standardisation folded in) and its summary."""
        model = self.problem.model
        if self.scale is not None:
            with torch.no_grad():  # W ((x - m) / s) + b = (W / s) x + (b - (W / s) m)
                model.fc1.weight.div_(self.scale)
                model.fc1.bias.sub_(model.fc1.weight @ self.shift)
        kept = fit.history[fit.best_epoch - 1]  # the kept weights' validation pass, recorded while training
        return model.eval(), dataclasses.replace(fit, val_pair_accuracy=kept.get("val_accuracy"))


def train_orms(
    members: Sequence[OrmMember], config: TrainConfig, early_stopping: bool = True
) -> list[tuple[MLP, FitResult]]:
    """:func:`fit_models` of the members' problems, then each member's :meth:`OrmMember.finish`: several
    members train side by side with one stopping epoch (``--early_stopping pooled``)."""
    fits = fit_models([member.problem for member in members], config, early_stopping)
    return [member.finish(fit) for member, fit in zip(members, fits)]


class FusedAdam:
    """Adam through PyTorch's fused kernel: the update ``torch.optim.Adam(fused=True)`` makes, bit for
    bit, or with ``weight_decay > 0`` that of ``torch.optim.AdamW(fused=True, weight_decay=...)``
    (decoupled weight decay; tests/test_networks.py checks the weights after many steps).

    Constructing any ``torch.optim`` optimizer imports ``torch._dynamo`` (~2.3 s of CPU in every step
    process that trains); calling the kernel itself does not. The fused kernel updates all parameters
    in one call (measured ~1.3x faster per step on CPU than the per-tensor loop).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        self.params = list(params)
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.exp_avgs = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sqs = [torch.zeros_like(p) for p in self.params]
        self.steps = [torch.zeros((), dtype=torch.float32) for _ in self.params]  # torch's fused step dtype

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One Adam update of every parameter that has a gradient (as torch.optim skips the others)."""
        active = [i for i, param in enumerate(self.params) if param.grad is not None]
        if not active:
            return
        steps = [self.steps[i] for i in active]
        torch._foreach_add_(steps, 1)
        kernel = torch._fused_adamw_ if self.weight_decay else torch._fused_adam_
        kernel(
            [self.params[i] for i in active],
            [self.params[i].grad for i in active],
            [self.exp_avgs[i] for i in active],
            [self.exp_avg_sqs[i] for i in active],
            [],
            steps,
            amsgrad=False,
            lr=self.lr,
            beta1=self.betas[0],
            beta2=self.betas[1],
            weight_decay=self.weight_decay,
            eps=self.eps,
            maximize=False,
        )


# Training has diverged when its best validation loss stays above this multiple of the larger of
# the untrained model's and a constant predictor's (the latter for a student whose early-stopping
# targets are nearly constant, where the untrained model is already close). Not 1: on a small
# validation slice (or noisy labels) a sound run's best epoch can be a little worse than the
# untrained model, whose near-constant scores give BT/BCE loss ~log 2. A diverged run is worse by
# orders of magnitude (demo, LEARNING_RATE 0.1 / 1 / 10: 39x, 9000x, 7e6x), while its training loss
# may still fall (huge weights fit the training pairs), so only the validation loss tells.
DIVERGED_LOSS_RATIO = 2.0


class TrainingDiverged(RuntimeError):
    """The loss became non-finite, or the validation loss never fell below the untrained model's.

    Callers turn it into an InputError naming their learning-rate flag: nothing is saved.
    ``index`` is the position of the model that diverged among those trained together (-1: their
    pooled validation loss).
    """

    def __init__(self, message: str, index: int = 0, rate_may_help: bool = True):
        super().__init__(message)
        self.index = index
        # False when the untrained model's loss is already not finite: no step has been taken, so
        # no learning rate changes it (the inputs or targets are at fault).
        self.rate_may_help = rate_may_help


def diverged_advice(err: TrainingDiverged, flag: str, learning_rate: float) -> str:
    """What to do about ``err``: lower the learning rate ``flag`` where that can help, else look at
    the data."""
    if err.rate_may_help:
        return f"lower {flag}, now {learning_rate:g}"
    return "no learning rate helps: the embeddings or targets are at fault (check their scale)"


def _pooled(problems: Sequence[FitProblem], values: Sequence[float]) -> float:
    """The problems' values weighted by their ``val_weight`` (one problem: its value, unchanged)."""
    if len(problems) == 1:
        return values[0]
    weights = [problem.val_weight for problem in problems]
    return sum(weight * value for weight, value in zip(weights, values)) / sum(weights)


def check_diverged(
    loss: float, untrained_loss: float, constant_loss: float, what: str, epochs_run: int, index: int
) -> None:
    """Raise :class:`TrainingDiverged` if ``loss`` is above :data:`DIVERGED_LOSS_RATIO` times the larger
    of the untrained model's and a constant predictor's loss."""
    reference = max(untrained_loss, constant_loss)
    if loss > DIVERGED_LOSS_RATIO * reference:
        whose = "the untrained model's" if reference == untrained_loss else "a constant predictor's"
        raise TrainingDiverged(
            f"{what} {loss:.4g} in {epochs_run} epoch(s), more than {DIVERGED_LOSS_RATIO:g}x {whose} {reference:.4g}",
            index,
        )


class EarlyStopping:
    """The best epoch so far by (pooled) validation loss, or with ``by_accuracy`` by validation accuracy
    (ties broken by the lower loss), its weights, and the patience left."""

    def __init__(self, patience: int, by_accuracy: bool):
        self.patience, self.by_accuracy = patience, by_accuracy
        self.best_key, self.best_epoch, self.best_states = (math.inf,), 0, None
        self.lowest_loss = math.inf  # of any epoch: what divergence is judged on

    def should_stop(self, epoch: int, problems: Sequence[FitProblem], histories: Sequence[list[dict]]) -> bool:
        """Take the epoch's validation values (the histories' last records); True once ``patience``
        epochs have passed without a better one."""
        pooled = _pooled(problems, [history[-1]["val_loss"] for history in histories])
        self.lowest_loss = min(self.lowest_loss, pooled)
        key = (pooled,)
        if self.by_accuracy:
            key = (-_pooled(problems, [history[-1]["val_accuracy"] for history in histories]), pooled)
        if key < self.best_key:
            self.best_key, self.best_epoch = key, epoch
            self.best_states = [copy.deepcopy(problem.model.state_dict()) for problem in problems]
            return False
        if epoch - self.best_epoch < self.patience:
            return False
        log.info("early stop at epoch %d (best %d, val loss %.4f)", epoch, self.best_epoch, self.best_key[-1])
        return True


def _train_epoch(problem: FitProblem, optimizer: FusedAdam, config: TrainConfig) -> tuple[float, int]:
    """One epoch of shuffled mini-batches (passes repeated up to ``config.min_epoch_steps`` steps): the
    mean of its mini-batch losses and the number of samples seen."""
    problem.model.train()
    batches_per_pass = math.ceil(problem.n_items / config.batch_size)
    passes = math.ceil(config.min_epoch_steps / batches_per_pass)
    loss_sum = torch.zeros(())  # checked once per epoch: no per-step synchronisation
    for _ in range(passes):
        order = torch.randperm(problem.n_items, generator=problem.generator)
        for start in range(0, problem.n_items, config.batch_size):
            loss = problem.batch_loss(order[start : start + config.batch_size])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
    return float(loss_sum) / (passes * batches_per_pass), problem.n_items * passes


def _epoch_record(problem: FitProblem, epoch: int, train_loss: float, index: int) -> dict:
    """The epoch's history record, with the validation pass of the trained weights; raises
    :class:`TrainingDiverged` on a non-finite loss."""
    if not math.isfinite(train_loss):
        raise TrainingDiverged(f"non-finite training loss in epoch {epoch}", index)
    loss, accuracy = problem.validate() if problem.validate is not None else (None, None)
    if loss is not None and not math.isfinite(loss):
        raise TrainingDiverged(f"non-finite validation loss in epoch {epoch}", index)
    record = {"epoch": epoch, "train_loss": train_loss, "val_loss": loss}
    if accuracy is not None:  # ORMs: the validation pairs ranked right, ties 1/2
        record["val_accuracy"] = accuracy
    log.debug(
        "epoch %d: train loss %.4f, val loss %s, val accuracy %s",
        epoch,
        train_loss,
        "n/a" if loss is None else f"{loss:.4f}",
        "n/a" if accuracy is None else f"{accuracy:.3f}",
    )
    return record


def fit_models(problems: Sequence[FitProblem], config: TrainConfig, early_stopping: bool = True) -> list[FitResult]:
    """Adam over true epochs of shuffled mini-batches, the models side by side (each its own optimizer
    and random stream, so a model's updates do not depend on the others).

    early_stopping: stop after ``config.patience`` epochs without a lower validation loss (or, with
        ``config.stop_metric`` "accuracy", a higher validation accuracy, ties broken by the loss) and
        restore every model's weights of the best epoch; with several models the loss and accuracy
        are their validation values' mean weighted by ``val_weight`` (one stopping epoch for all). False: train
        ``config.epochs`` epochs and keep the last weights; models need no validation data.
    Models are left in eval mode. Raises :class:`TrainingDiverged` if a training or validation loss
    is not finite, or if the lowest (pooled) validation loss of any epoch, or without early stopping a
    model's last validation loss (training loss without validation data), is above
    :data:`DIVERGED_LOSS_RATIO` times the larger of the untrained models' (pooled) validation loss and
    ``constant_loss``: too high a learning rate, typically.
    """
    if early_stopping and any(problem.validate is None for problem in problems):
        raise ValueError("early stopping needs validation data for every model")
    optimizers = [
        FusedAdam(problem.model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
        for problem in problems
    ]
    untrained = [problem.validate() if problem.validate is not None else (-math.inf, None) for problem in problems]
    for i, (loss, _) in enumerate(untrained):
        if math.isnan(loss) or loss == math.inf:
            raise TrainingDiverged(f"the untrained model's validation loss is already {loss}", i, rate_may_help=False)
    by_accuracy = config.stop_metric == "accuracy"
    if by_accuracy and any(accuracy is None for _, accuracy in untrained):
        raise ValueError("stop_metric 'accuracy' needs a validation pair accuracy for every model")
    stopping = EarlyStopping(config.patience, by_accuracy) if early_stopping else None
    histories: list[list[dict]] = [[] for _ in problems]
    samples, train_seconds = [0] * len(problems), [0.0] * len(problems)
    for epoch in range(1, config.epochs + 1):
        for i, (problem, optimizer) in enumerate(zip(problems, optimizers)):
            start_time = time.perf_counter()
            train_loss, n_samples = _train_epoch(problem, optimizer, config)
            train_seconds[i] += time.perf_counter() - start_time
            samples[i] += n_samples
            histories[i].append(_epoch_record(problem, epoch, train_loss, i))
        if stopping is not None and stopping.should_stop(epoch, problems, histories):
            break
    speeds = [n / max(seconds, 1e-9) for n, seconds in zip(samples, train_seconds)]
    return _finish_fits(problems, histories, [loss for loss, _ in untrained], stopping, speeds)


def _finish_fits(
    problems: Sequence[FitProblem],
    histories: list[list[dict]],
    untrained: list[float],
    stopping: EarlyStopping | None,
    speeds: list[float],
) -> list[FitResult]:
    """Check for divergence, restore the best epoch's weights (early stopping) and report each fit."""
    epochs_run = len(histories[0])
    if stopping is not None:  # on the loss the epoch was chosen on: a tiny slice of one model alone is too noisy
        check_diverged(
            stopping.lowest_loss,
            _pooled(problems, untrained),
            max(problem.constant_loss for problem in problems),
            "best validation loss" if len(problems) == 1 else "best pooled validation loss",
            epochs_run,
            -1 if len(problems) > 1 else 0,
        )
    best_epoch = stopping.best_epoch if stopping is not None else epochs_run
    fits = []
    for i, (problem, history) in enumerate(zip(problems, histories)):
        record = history[best_epoch - 1]
        if stopping is None:
            trained_on = "validation" if record["val_loss"] is not None else "training"
            loss = record["val_loss"] if record["val_loss"] is not None else record["train_loss"]
            check_diverged(loss, untrained[i], problem.constant_loss, f"{trained_on} loss", epochs_run, i)
        else:
            problem.model.load_state_dict(stopping.best_states[i])
        problem.model.eval()
        fits.append(FitResult(best_epoch, epochs_run, record["val_loss"], speeds[i], history))
    return fits


@torch.inference_mode()
def evaluate_pairs(
    model: MLP,
    objective: str,
    features: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
    winners: torch.Tensor,
    losers: torch.Tensor,
) -> tuple[float, float]:
    """(objective loss, fraction of pairs with r_w > r_l, ties counted 1/2) on the given pairs.

    features: (R, D) rows, or a function of row indices giving their (standardised) features
    """
    model.eval()
    inputs = features if callable(features) else features.__getitem__
    winner_scores, loser_scores = _score_pairs(model, inputs, winners, losers)
    loss = float(OBJECTIVES[objective].pair_loss(winner_scores, loser_scores))
    margin = winner_scores - loser_scores
    accuracy = float(((margin > 0).float() + 0.5 * (margin == 0).float()).mean())
    return loss, accuracy


# --------------------------------------------------------------------------------------------
# Checkpoints and scoring
# --------------------------------------------------------------------------------------------
def save_checkpoint(model: MLP, path: str | Path) -> None:
    """Save the model's ``state_dict`` atomically."""
    # Through a buffer: torch.save names the archive after a path's stem, which would embed the
    # random temporary name and break byte-identical reruns; and a plain write turns a full disk or
    # a file-size limit into an OSError, which atomic_path reports (torch's writer raises RuntimeError).
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def load_checkpoint(path: str | Path, expected_dim: int | None = None) -> MLP:
    """Load an MLP ``state_dict`` safely (``weights_only=True``) and check its weights are finite and its
    input size. Every checkpoint any step or ``reward_model.py`` reads comes through here."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt, truncated or foreign file; never unpickled beyond tensors
        raise InputError(f"{path}: not a readable weights-only PyTorch checkpoint ({type(err).__name__})") from None
    expected = {f"fc{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")}
    if (
        not isinstance(state, dict)
        or set(state) != expected
        or not all(isinstance(v, torch.Tensor) for v in state.values())
    ):
        raise InputError(f"{path}: not an MLP checkpoint (expected keys {sorted(expected)})")
    corrupted = next((name for name, tensor in sorted(state.items()) if not torch.isfinite(tensor).all()), None)
    if corrupted is not None:
        raise InputError(f"{path}: non-finite weights (NaN or inf) in {corrupted}; the checkpoint is damaged")
    hidden = (state["fc1.weight"].shape[0], state["fc2.weight"].shape[0])
    input_dim = state["fc1.weight"].shape[1]
    if expected_dim is not None and input_dim != expected_dim:
        raise InputError(f"{path}: checkpoint expects embeddings of size D={input_dim}, data has D={expected_dim}")
    with torch.device("meta"):  # no throw-away random initialisation
        model = MLP(input_dim, hidden)
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError:
        raise InputError(f"{path}: inconsistent layer shapes in checkpoint") from None
    return model.eval()


def load_ensemble(paths: Sequence[str | Path], expected_dim: int | None = None) -> list[MLP]:
    """Load checkpoints scored together (:class:`StackedEnsemble`): they must share one architecture."""
    models = [load_checkpoint(path, expected_dim) for path in paths]
    shapes = [(m.fc1.in_features, m.fc1.out_features, m.fc2.out_features) for m in models]
    for path, shape in zip(paths, shapes):
        if shape != shapes[0]:
            raise InputError(
                f"{path}: layers {'->'.join(map(str, shape))}->1 differ from {Path(paths[0]).name}'s "
                f"{'->'.join(map(str, shapes[0]))}->1; checkpoints scored together must share them"
            )
    return models


class StackedEnsemble:
    """M MLPs of one shape scored together: (B, D) float32 numpy -> (M, B) float32 numpy, in three large
    matrix products. Stacking copies every member's weights: build it once per step and reuse it.

    The first layer, whose input all members share, is one (B, D) x (D, M * H1) product; the other
    two are batched over members. This replaces M small forward passes per chunk.

    Scores are checked finite where they are made, so no metric, map or cache entry is computed from
    NaN or inf: finite weights can still overflow float32 on some embeddings, which is an InputError
    naming the member's ``sources`` entry (its checkpoint file).
    """

    def __init__(self, models: Sequence[MLP], sources: Sequence[str | Path] | None = None):
        self.sources = [str(s) for s in sources] if sources is not None else [f"member {i}" for i in range(len(models))]
        with torch.no_grad():
            self.w1 = torch.cat([m.fc1.weight for m in models]).T.contiguous()  # (D, M * H1)
            self.b1 = torch.cat([m.fc1.bias for m in models])  # (M * H1,)
            self.w2 = torch.stack([m.fc2.weight.T for m in models])  # (M, H1, H2)
            self.b2 = torch.stack([m.fc2.bias for m in models])[:, None, :]  # (M, 1, H2)
            self.w3 = torch.stack([m.fc3.weight.T for m in models])  # (M, H2, 1)
            self.b3 = torch.stack([m.fc3.bias for m in models])[:, None, :]  # (M, 1, 1)
        self.n_members, self.hidden = len(models), models[0].fc1.out_features

    @torch.inference_mode()
    def __call__(self, rows: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(rows)
        h1 = torch.addmm(self.b1, x, self.w1).relu_()  # (B, M * H1); in place: no second (B, M * H1) buffer
        h1 = h1.view(len(x), self.n_members, self.hidden).transpose(0, 1)  # (M, B, H1)
        h2 = torch.baddbmm(self.b2, h1, self.w2).relu_()
        scores = torch.baddbmm(self.b3, h2, self.w3).squeeze(-1).numpy()  # (M, B)
        if not np.isfinite(scores).all():
            member = int(np.flatnonzero(~np.isfinite(scores).all(axis=1))[0])
            raise InputError(
                f"{self.sources[member]}: non-finite scores (the weights overflow float32 on these embeddings)"
            )
        return scores


# --------------------------------------------------------------------------------------------
# Distillation (step 7): regress a student MLP onto calibrated teacher scores
# --------------------------------------------------------------------------------------------
@torch.inference_mode()
def predict_rows(model: MLP, features: torch.Tensor, rows: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Scores (len(rows),) of ``features[rows]``, computed ``chunk`` rows at a time."""
    model.eval()
    return torch.cat([model(features[rows[start : start + chunk]]) for start in range(0, len(rows), chunk)])


def train_student(
    features: torch.Tensor,
    targets: torch.Tensor,
    train_rows: torch.Tensor,
    val_rows: torch.Tensor,
    config: TrainConfig,
    generator: torch.Generator,
) -> tuple[MLP, FitResult]:
    """Train an MLP by mean squared error towards ``targets``; early stopping, best weights restored.

    features: (R, D) float32; targets: (R,) float32 on the golden scale
    train_rows, val_rows: (T,), (V,) int64 row indices (whole prompts on each side: the caller's job)
    generator: seeds initialisation and shuffling

    Targets are standardised with the training rows' mean and std while fitting (so the learning
    rate does not depend on the reward scale) and the last layer is rescaled afterwards, so the
    returned model outputs the targets' scale directly and its checkpoint is a plain MLP. The
    history's losses are MSEs on the standardised targets.
    """
    train_targets = targets[train_rows].double()
    mean = float(train_targets.mean())
    std = float(train_targets.std()) if len(train_rows) > 1 else 0.0
    std = std if std > 0 else 1.0
    scaled = ((targets.double() - mean) / std).float()
    model = MLP(features.shape[1], generator=generator)

    def batch_loss(batch: torch.Tensor) -> torch.Tensor:
        rows = train_rows[batch]
        return F.mse_loss(model(features[rows]), scaled[rows])

    def validate() -> tuple[float, None]:
        return float(F.mse_loss(predict_rows(model, features, val_rows), scaled[val_rows])), None

    fit = fit_models([FitProblem(model, len(train_rows), batch_loss, validate, generator, 1.0, 1.0)], config)[0]
    with torch.no_grad():  # fold the target standardisation into the output layer
        model.fc3.weight.mul_(std)
        model.fc3.bias.mul_(std).add_(mean)
    model.eval()

    def mse(rows: torch.Tensor) -> float:
        return float(F.mse_loss(predict_rows(model, features, rows).double(), targets[rows].double()))

    return model, dataclasses.replace(
        fit, best_val_loss=mse(val_rows), train_mse=mse(train_rows), target_mean=mean, target_std=std
    )
