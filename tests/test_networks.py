"""networks.FusedAdam against torch.optim.Adam, and the stacked scorer against plain forward passes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import networks


def _train(make_optimizer, steps: int, batch: int = 32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    model = networks.MLP(24, hidden=(16, 8), generator=gen)
    data = torch.randn(steps, batch, 24, generator=gen)
    targets = torch.randn(steps, batch, generator=gen)
    optimizer = make_optimizer(model.parameters())
    for x, y in zip(data, targets):
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("lr", [1e-3, 3e-2])
def test_fused_adam_is_bit_identical_to_torch_adam(lr):
    ours = _train(lambda params: networks.FusedAdam(params, lr=lr), steps=200)
    theirs = _train(lambda params: torch.optim.Adam(params, lr=lr, fused=True), steps=200)
    reference = _train(lambda params: torch.optim.Adam(params, lr=lr), steps=200)
    for a, b, c in zip(ours, theirs, reference):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)  # and it is Adam (not only the same kernel)


def test_fused_adam_skips_parameters_without_gradient():
    used, unused = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    optimizer = networks.FusedAdam([used, unused], lr=0.1)
    (used * torch.tensor([1.0, -2.0, 0.0])).sum().backward()
    optimizer.step()
    # Adam's first step moves every coordinate with a non-zero gradient by lr against its sign.
    torch.testing.assert_close(used.detach(), torch.tensor([0.9, 1.1, 1.0]))
    assert torch.equal(unused.detach(), torch.ones(2)) and float(optimizer.steps[1]) == 0


def test_stacked_scorer_matches_each_member():
    gen = torch.Generator().manual_seed(1)
    models = [networks.MLP(24, hidden=(16, 8), generator=gen).eval() for _ in range(3)]
    x = torch.randn(50, 24, generator=gen)
    stacked = networks.ensemble_scorer(models)(x.numpy())
    with torch.no_grad():
        expected = np.stack([model(x).numpy() for model in models])
    np.testing.assert_allclose(stacked, expected, rtol=1e-5, atol=1e-6)


def test_flop_counts_match_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    model, x = networks.MLP(64, hidden=(32, 16)), torch.randn(8, 64)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()  # no gradient for the input, as for embeddings in training
    assert counter.get_total_flops() == 8 * networks.mlp_train_flops_per_sample(64, (32, 16))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    assert counter.get_total_flops() == 8 * networks.mlp_flops_per_sample(64, (32, 16))


def test_training_history_records_each_epoch_and_the_best_one():
    """fit_with_early_stopping's per-epoch record: train loss = mean of the epoch's mini-batch losses."""
    gen = torch.Generator().manual_seed(0)
    features, targets = torch.randn(64, 12, generator=gen), torch.randn(64, generator=gen)
    model = networks.MLP(12, hidden=(8, 4), generator=gen)
    batch_losses = []

    def batch_loss(batch):
        loss = torch.nn.functional.mse_loss(model(features[batch]), targets[batch])
        batch_losses.append(float(loss.detach()))
        return loss

    def val_loss():
        with torch.no_grad():
            return float(torch.nn.functional.mse_loss(model(features[:16]), targets[:16]))

    config = networks.TrainConfig(epochs=6, learning_rate=1e-2, batch_size=16, patience=10)
    fit = networks.fit_with_early_stopping(model, 64, batch_loss, val_loss, config, gen)
    assert [record["epoch"] for record in fit.history] == list(range(1, 7)) and fit.epochs_run == 6
    for epoch, record in enumerate(fit.history):
        assert record["train_loss"] == pytest.approx(np.mean(batch_losses[4 * epoch:4 * epoch + 4]), rel=1e-6)
    val = [record["val_loss"] for record in fit.history]
    assert fit.best_epoch == val.index(min(val)) + 1 and fit.best_val_loss == min(val)
    assert val_loss() == min(val)  # the best weights were restored
