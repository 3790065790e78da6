"""networks.FusedAdam against torch.optim.Adam(W), the stacked scorer against plain forward passes, and the
fit loop's early-stopping schemes and input standardisation."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, STEP5_FAST

import networks
import step5_train_rms as step5


def _config(**fields) -> networks.TrainConfig:
    """Step 5's default training settings (its parser's) with ``fields`` changed."""
    return dataclasses.replace(step5.train_config(step5.parse_args([])), **fields)


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
    stacked = networks.StackedEnsemble(models)(x.numpy())
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
    """fit_models' per-epoch record: train loss = mean of the epoch's mini-batch losses."""
    gen = torch.Generator().manual_seed(0)
    features, targets = torch.randn(64, 12, generator=gen), torch.randn(64, generator=gen)
    model = networks.MLP(12, hidden=(8, 4), generator=gen)
    batch_losses = []

    def batch_loss(batch):
        loss = torch.nn.functional.mse_loss(model(features[batch]), targets[batch])
        batch_losses.append(float(loss.detach()))
        return loss

    def validate():
        with torch.no_grad():
            return float(torch.nn.functional.mse_loss(model(features[:16]), targets[:16])), None

    config = _config(epochs=6, learning_rate=1e-2, batch_size=16, patience=10)
    fit = networks.fit_models([networks.FitProblem(model, 64, batch_loss, validate, gen)], config)[0]
    assert [record["epoch"] for record in fit.history] == list(range(1, 7)) and fit.epochs_run == 6
    for epoch, record in enumerate(fit.history):
        assert record["train_loss"] == pytest.approx(np.mean(batch_losses[4 * epoch : 4 * epoch + 4]), rel=1e-6)
    val = [record["val_loss"] for record in fit.history]
    assert fit.best_epoch == val.index(min(val)) + 1 and fit.best_val_loss == min(val)
    assert validate()[0] == min(val)  # the best weights were restored


def test_min_epoch_steps_repeats_small_passes_each_with_every_item_once():
    """An epoch of 2 mini-batches with min_epoch_steps 5 is 3 reshuffled passes (6 steps), each
    covering every item once; the recorded train loss is the mean over all 6 steps."""
    gen = torch.Generator().manual_seed(0)
    features, targets = torch.randn(30, 6, generator=gen), torch.randn(30, generator=gen)
    model = networks.MLP(6, hidden=(8, 4), generator=gen)
    batches, batch_losses = [], []

    def batch_loss(batch):
        batches.append(batch.tolist())
        loss = torch.nn.functional.mse_loss(model(features[batch]), targets[batch])
        batch_losses.append(float(loss.detach()))
        return loss

    config = _config(epochs=2, learning_rate=1e-2, batch_size=16, min_epoch_steps=5)
    fit = networks.fit_models(
        [networks.FitProblem(model, 30, batch_loss, None, gen, constant_loss=10.0)], config, early_stopping=False
    )[0]
    assert len(batches) == 12 and fit.epochs_run == 2
    passes = [sorted(batches[i] + batches[i + 1]) for i in range(0, 12, 2)]
    assert all(items == list(range(30)) for items in passes)
    assert len({tuple(batches[i]) for i in range(0, 12, 2)}) == 6  # each pass shuffled afresh
    assert fit.history[1]["train_loss"] == pytest.approx(np.mean(batch_losses[6:]), rel=1e-6)


@pytest.mark.parametrize("weight_decay", [1e-2, 0.3])
def test_fused_adam_with_weight_decay_is_bit_identical_to_torch_adamw(weight_decay):
    ours = _train(lambda params: networks.FusedAdam(params, lr=1e-2, weight_decay=weight_decay), steps=100)
    theirs = _train(lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=weight_decay, fused=True), steps=100)
    plain = _train(lambda params: networks.FusedAdam(params, lr=1e-2), steps=100)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    assert sum(float(a.norm()) for a in ours) < sum(float(c.norm()) for c in plain)  # decay shrinks the weights


def _pair_members(n_val: list[int]) -> tuple[list[networks.OrmMember], list[tuple[torch.Tensor, ...]]]:
    """OrmMembers on pairs labelled by a linear score with 20% flips: 40 rows of 12 features,
    60 training pairs and n_val[i] validation pairs per model; also each model's four pair tensors."""
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(40, 12, generator=gen)
    score = features @ torch.randn(12, generator=gen)
    members, pair_sets = [], []
    for i, n in enumerate(n_val):
        first, second = torch.randint(40, (2, 60 + n), generator=gen)
        flip = torch.rand(60 + n, generator=gen) < 0.2
        first_wins = (score[first] > score[second]) ^ flip
        winners, losers = torch.where(first_wins, first, second), torch.where(first_wins, second, first)
        pairs = (winners[:60], losers[:60], winners[60:], losers[60:])
        members.append(networks.OrmMember(features, *pairs, "bt", torch.Generator().manual_seed(100 + i)))
        pair_sets.append(pairs)
    return members, pair_sets


def test_pooled_stopping_picks_one_epoch_by_the_weighted_validation_loss():
    n_val = [4, 10, 30]
    config = _config(epochs=12, learning_rate=1e-2, batch_size=16, patience=12)
    members, pair_sets = _pair_members(n_val)
    trained = networks.train_orms(members, config)
    histories = [result.history for _, result in trained]
    loss_history = histories[0]
    pooled = [sum(n * h[e]["val_loss"] for n, h in zip(n_val, histories)) / sum(n_val) for e in range(12)]
    best = int(np.argmin(pooled)) + 1
    own_best = [int(np.argmin([r["val_loss"] for r in h])) + 1 for h in histories]
    assert len(set(own_best)) > 1  # the case is informative: the members alone would disagree
    assert {result.best_epoch for _, result in trained} == {best} and all(r.epochs_run == 12 for _, r in trained)
    for member, pairs, (model, result) in zip(members, pair_sets, trained):
        assert result.best_val_loss == result.history[best - 1]["val_loss"]
        loss, _ = networks.evaluate_pairs(model, "bt", member.features, pairs[2], pairs[3])
        assert loss == pytest.approx(result.best_val_loss, rel=1e-6)  # that epoch's weights were restored
    # A model's updates do not depend on the others: trained alone for that many epochs, it is the same.
    alone = networks.OrmMember(members[1].features, *pair_sets[1], "bt", torch.Generator().manual_seed(101))
    [(model, _)] = networks.train_orms(
        [alone], _config(epochs=best, learning_rate=1e-2, batch_size=16), early_stopping=False
    )
    assert torch.equal(model.fc1.weight, trained[1][0].fc1.weight)
    # "accuracy": the highest pooled validation accuracy, ties broken by the pooled loss
    trained = networks.train_orms(
        _pair_members(n_val)[0],
        _config(epochs=12, learning_rate=1e-2, batch_size=16, patience=12, stop_metric="accuracy"),
    )
    histories = [result.history for _, result in trained]
    accuracy = [sum(n * h[e]["val_accuracy"] for n, h in zip(n_val, histories)) / sum(n_val) for e in range(12)]
    keys = [(-accuracy[e], pooled[e]) for e in range(12)]
    assert [record["val_loss"] for record in histories[0]] == [record["val_loss"] for record in loss_history]
    assert {result.best_epoch for _, result in trained} == {keys.index(min(keys)) + 1}


def test_standard_scale_is_scikit_learns_and_treats_negligible_spreads_as_constant():
    from sklearn.preprocessing import StandardScaler

    from rm_data import standard_scale

    rng = np.random.default_rng(0)
    features = rng.standard_normal((500, 5)) * [1.0, 1.0, 1.0, 1e-3, 40.0]
    features[:, 1] = 0.3 + 1e-17 * rng.standard_normal(500)  # constant up to float64 round-off
    features[:, 2] = 2e-33 * rng.standard_normal(500)  # a real embedding set's dimension
    scale = standard_scale(features.mean(axis=0), features.var(axis=0), len(features))
    reference = StandardScaler().fit(features).scale_
    assert scale[1] == reference[1] == 1.0  # scikit-learn's own rule
    assert scale[2] == 1.0 and reference[2] < 1e-32  # negligible against the others: scikit-learn divides
    np.testing.assert_array_equal(scale[[0, 3, 4]], reference[[0, 3, 4]])


def test_a_negligible_spread_leaves_the_checkpoint_usable_in_float16():
    gen = torch.Generator().manual_seed(3)
    features = torch.randn(50, 6, generator=gen)
    features[:, 2] = 2e-33 * torch.randn(50, generator=gen)
    winners, losers = torch.arange(0, 40, 2), torch.arange(1, 40, 2)
    member = networks.OrmMember(
        features, winners, losers, winners[:0], losers[:0], "bt", torch.Generator().manual_seed(0), standardize=True
    )
    assert member.scale[2] == 1.0
    fit = networks.fit_models(
        [member.problem], _config(epochs=2, learning_rate=1e-2, batch_size=8, patience=2), early_stopping=False
    )[0]
    model, _ = member.finish(fit)
    assert all(torch.isfinite(value.half()).all() for value in model.state_dict().values())


def test_standardised_training_is_folded_into_a_plain_first_layer():
    gen = torch.Generator().manual_seed(3)
    features = torch.randn(50, 6, generator=gen) * torch.tensor([1.0, 100.0, 0.01, 5.0, 1.0, 1.0]) + 7.0
    features[:, 4] = 2.5  # a constant column: its std 0 is replaced by 1
    winners, losers = torch.arange(0, 40, 2), torch.arange(1, 40, 2)
    val_winners, val_losers = torch.arange(40, 50, 2), torch.arange(41, 50, 2)
    member = networks.OrmMember(
        features, winners, losers, val_winners, val_losers, "bt", torch.Generator().manual_seed(0), standardize=True
    )
    train_rows = features[:40].double()
    torch.testing.assert_close(member.shift, train_rows.mean(0).float())  # training rows only
    expected_scale = train_rows.std(0, correction=0).float()
    expected_scale[4] = 1.0
    torch.testing.assert_close(member.scale, expected_scale)
    fit = networks.fit_models([member.problem], _config(epochs=5, learning_rate=1e-2, batch_size=8, patience=5))[0]
    with torch.no_grad():
        on_standardised = member.problem.model(member.inputs(torch.arange(50)))
    model, result = member.finish(fit)
    with torch.no_grad():
        on_raw = model(features)
    torch.testing.assert_close(on_raw, on_standardised, rtol=1e-4, atol=1e-4)
    assert set(model.state_dict()) == {f"fc{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")}
    assert result.val_pair_accuracy == networks.evaluate_pairs(model, "bt", features, val_winners, val_losers)[1]


def _noisy_slice_members() -> list[networks.OrmMember]:
    """Three members on clean training pairs; member 0 validates on 4 pairs of which 3 have flipped
    labels (a tiny, unlucky slice), members 1 and 2 on 20 clean pairs each."""
    gen = torch.Generator().manual_seed(5)
    features = torch.randn(60, 16, generator=gen)
    score = features @ torch.randn(16, generator=gen)
    members = []
    for member, (n_val, flipped) in enumerate([(4, True), (20, False), (20, False)]):
        first, second = torch.randint(60, (2, 80 + n_val), generator=gen)
        first_wins = (score[first] > score[second]) ^ (torch.arange(80 + n_val) >= 81 if flipped else False)
        winners, losers = torch.where(first_wins, first, second), torch.where(first_wins, second, first)
        members.append(
            networks.OrmMember(
                features,
                winners[:80],
                losers[:80],
                winners[80:],
                losers[80:],
                "bt",
                torch.Generator().manual_seed(member),
            )
        )
    return members


def test_a_tiny_noisy_validation_slice_no_longer_keeps_a_member_at_epoch_1():
    defaults = step5.parse_args([])  # step 5's defaults: learning rate, patience, --min_val_pairs
    config = dataclasses.replace(step5.train_config(defaults), epochs=10, batch_size=16)
    # Stopping on its own 4 pairs, 3 of them flipped (--min_val_pairs 0), member 0 keeps epoch 1:
    old = networks.fit_models([_noisy_slice_members()[0].problem], config)[0]
    assert old.best_epoch == 1 and old.epochs_run == 1 + defaults.patience
    val = [record["val_loss"] for record in old.history]
    assert val == sorted(val)  # every epoch only made the flipped pairs worse
    # By default step 5 does not stop on so few pairs: the member trains every epoch on every pair.
    splits, scheme, decision_pairs = step5.member_splits(40, [torch.Generator()], defaults, np.random.default_rng(0))
    assert defaults.early_stopping == "member" and len(splits[0][1]) == 0 and (scheme, decision_pairs) == ("none", 0)
    assert defaults.min_val_pairs > 4 == round(defaults.val_fraction * 40)
    member = _noisy_slice_members()[0]
    new = networks.fit_models([member.problem], config, early_stopping=False)[0]
    assert new.best_epoch == new.epochs_run == 10
    train = [record["train_loss"] for record in new.history]
    assert train[-1] < train[0] < math.log(2) + 0.1
    # --early_stopping pooled (with either --stop_metric): one epoch for all, chosen on all 44 pairs.
    for stop_metric in ("loss", "accuracy"):
        pooled_config = dataclasses.replace(config, stop_metric=stop_metric)
        trained = networks.train_orms(_noisy_slice_members(), pooled_config)
        epochs = {result.best_epoch for _, result in trained}
        assert len(epochs) == 1 and epochs.pop() > 1, stop_metric


@pytest.mark.parametrize("learning_rate", ["1e-3", "1e-4"])
def test_flushing_denormals_leaves_steps_5_and_7_byte_identical(demo_dir, tmp_path, learning_rate):
    """Steps 5 and 7 run as scripts compute with float32 denormals flushed to zero
    (networks.flush_denormals), which is faster; called in a caller's process they leave its setting
    alone. Their outputs are byte for byte the same either way, at both learning rates."""
    code = (
        "import sys, torch, step5_train_rms as s5, step7_isotonic_distillation as s7; from cli import run_cli\n"
        "step7 = ['--output_dir', sys.argv[-1], '--distill_epochs', '2', '--student_learning_rate', sys.argv[-3]]\n"
        "if sys.argv.pop(1) == 'script':\n"
        "    run_cli(s5.main); sys.argv[1:] = step7; run_cli(s7.main)\n"
        "else:\n"
        "    s5.main(sys.argv[1:]); s7.main(step7)\n"
        "print('flushed' if torch.tensor([1e-40]).mul(1.0).item() == 0.0 else 'plain')"
    )
    out = tmp_path / "out"
    argv = ["--data_dir", str(demo_dir), *STEP5_FAST[:-2], "--learning_rate", learning_rate, "--output_dir", str(out)]
    for how, name in (("in-process", "plain"), ("script", "flushed")):
        proc = subprocess.run(
            [sys.executable, "-c", code, how, *argv],
            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True, capture_output=True, text=True,
        )  # fmt: skip
        assert proc.stdout.split()[-1] == name
        out.rename(tmp_path / name)  # both ran in the same folder: the records name it alike
    outputs = sorted(path.name for path in (tmp_path / "flushed").iterdir() if path.is_file())
    assert sum(name.endswith(".ckpt") for name in outputs) == 3 and "distillation_config.json" in outputs
    for name in outputs:
        assert (tmp_path / "flushed" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes(), name


def test_learning_rate_advice_only_where_a_lower_rate_can_help():
    """A student whose untrained loss is already not finite (inputs at 3e38) gets no learning-rate
    advice at any rate; one that diverges by its updates (rate 10) is told to lower it."""
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(64, 8, generator=gen)
    targets = features[:, 0] + 0.1 * torch.randn(64, generator=gen)
    train_rows, val_rows = torch.arange(48), torch.arange(48, 64)
    huge = features.clone()
    huge[:, 3] = 3e38
    for rate in (1e-3, 1e-7):
        with pytest.raises(networks.TrainingDiverged, match="untrained model's validation loss is already") as err:
            networks.train_student(
                huge,
                targets,
                train_rows,
                val_rows,
                _config(epochs=3, learning_rate=rate, batch_size=16, patience=3),
                torch.Generator(),
            )
        assert not err.value.rate_may_help
        assert networks.diverged_advice(err.value, "--learning_rate", rate) == (
            "no learning rate helps: the embeddings or targets are at fault (check their scale)"
        )
    with pytest.raises(networks.TrainingDiverged) as err:
        networks.train_student(
            features * 100,
            targets,
            train_rows,
            val_rows,
            _config(epochs=20, learning_rate=10.0, batch_size=16, patience=20),
            torch.Generator(),
        )
    assert err.value.rate_may_help
    assert networks.diverged_advice(err.value, "--learning_rate", 10.0) == "lower --learning_rate, now 10"
