"""Step 5 (pairs, annotator, partition, training) and step 6 (leak-free evaluation)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import STEP5_FAST, STEP5_LGBM
from scipy.special import expit

import networks
import objectives
import rm_data
import run_folder
import step5_train_rms as step5
import step6_eval_rms as step6

# --------------------------------------------------------------------------------------------
# Partition
# --------------------------------------------------------------------------------------------


def test_partition_disjoint_seeded():
    part = rm_data.make_partition(1000, 300, split_seed=7, eval_prompts=700)
    sets = [set(part[role]) for role in rm_data.PROMPT_ROLES]
    assert sum(map(len, sets)) == 1000 and set().union(*sets) == set(range(1000))
    assert [len(s) for s in sets] == [300, 420, 140, 140]
    assert part == rm_data.make_partition(1000, 300, split_seed=7, eval_prompts=700)
    assert part != rm_data.make_partition(1000, 300, split_seed=8, eval_prompts=700)


def test_partition_pool_fixed_and_orm_train_nested_as_n_sample_grows():
    parts = [rm_data.make_partition(3000, n, split_seed=0) for n in (1, 100, 1000, 2000)]
    for part in parts:
        assert [len(part[role]) for role in rm_data.PROMPT_ROLES[1:]] == [600, 200, 200]
        assert all(part[role] == parts[0][role] for role in ("calibration", "student_train", "held_out"))
        assert not set(part["orm_train"]) & set().union(*(part[r] for r in rm_data.PROMPT_ROLES[1:]))
    for small, large in zip(parts, parts[1:]):
        assert set(small["orm_train"]) < set(large["orm_train"])


@pytest.mark.parametrize(("n_prompts", "pool"), [(30, 20), (260, 130), (3000, 1000), (5000, 1250), (40000, 10000)])
def test_default_eval_pool(n_prompts, pool):
    assert rm_data.default_eval_prompts(n_prompts) == pool


def test_partition_refuses_too_few_prompts():
    with pytest.raises(
        rm_data.InputError,
        match=r"--n_sample \(N_SAMPLE\) 990 \+ --eval_prompts \(EVAL_PROMPTS\) 20 "
        "exceed the 1000 prompts",
    ):
        rm_data.make_partition(1000, 990, split_seed=0, eval_prompts=20)
    with pytest.raises(rm_data.InputError, match="need at least 20"):
        rm_data.make_partition(1000, 10, split_seed=0, eval_prompts=19)


# --------------------------------------------------------------------------------------------
# Pairs and the simulated annotator
# --------------------------------------------------------------------------------------------


def test_consider_first_n_chooses_the_right_splits():
    rng = np.random.default_rng(0)
    assert (step5.candidate_splits(5, 10, -1, rng) == [0, 9]).all()
    assert (step5.candidate_splits(5, 10, -2, rng) == [4, 5]).all()
    assert (step5.candidate_splits(5, 4, -2, rng) == [1, 2]).all()
    random_two = step5.candidate_splits(2000, 10, 2, rng)
    assert random_two.shape == (2000, 2) and (random_two[:, 0] != random_two[:, 1]).all()
    counts = np.bincount(random_two.ravel(), minlength=10)
    assert counts.min() > 300  # every split is drawn (expected 400 each)
    with pytest.raises(rm_data.InputError, match="exceeds the 10 responses"):
        step5.candidate_splits(5, 10, 11, rng)


@pytest.mark.parametrize("n_pairs", [1, 3])
def test_cross_prompt_pairs_never_pair_a_prompt_with_itself(n_pairs):
    rng = np.random.default_rng(1)
    prompts = np.arange(100, 160)
    cands = step5.candidate_splits(60, 10, 3, rng)
    first_p, first_k, second_p, second_k = step5.build_pairs(prompts, cands, n_pairs, "xprompt", False, rng)
    assert len(first_p) == 60 * n_pairs
    assert (first_p != second_p).all()
    assert set(first_p) == set(prompts) and set(second_p) <= set(prompts)
    lookup = dict(zip(prompts, cands))
    assert all(k in lookup[p] for p, k in zip(first_p, first_k))
    assert all(k in lookup[p] for p, k in zip(second_p, second_k))
    partners = second_p.reshape(60, n_pairs)
    assert all(len(set(row)) == n_pairs for row in partners)  # distinct partners per prompt
    own = first_k.reshape(60, n_pairs)
    assert all(len(set(row)) == n_pairs for row in own)  # replacement_false: distinct responses


def test_same_prompt_pairs_use_two_distinct_candidates():
    rng = np.random.default_rng(2)
    cands = step5.candidate_splits(40, 10, 4, rng)
    first_p, first_k, second_p, second_k = step5.build_pairs(np.arange(40), cands, 2, "same", False, rng)
    assert (first_p == second_p).all() and (first_k != second_k).all()


@pytest.mark.parametrize("quality,scale", [(10.0, 6.0), (1.0, 1.0), (0.5, 6.0)])
def test_realised_flip_rate_matches_sigmoid_theory(quality, scale):
    rng = np.random.default_rng(3)
    deltas = np.repeat([0.3, 1.0, -2.0, 4.0], 50_000)
    first_wins, prob = step5.simulate_annotator(deltas, np.zeros_like(deltas), quality, scale, rng)
    stats = step5.pair_statistics(deltas, np.zeros_like(deltas), first_wins, prob, scale)
    theory = expit(-quality * np.abs(deltas) / scale).mean()
    assert stats["expected_flip_rate"] == pytest.approx(theory)
    assert stats["label_flip_rate"] == pytest.approx(theory, abs=5 * np.sqrt(theory * (1 - theory) / len(deltas)))


def test_negative_quality_gives_noise_free_labels():
    rng = np.random.default_rng(4)
    first, second = rng.normal(size=1000), rng.normal(size=1000)
    wins, prob = step5.simulate_annotator(first, second, -1.0, 6.0, rng)
    assert (wins == (first > second)).all()
    assert step5.pair_statistics(first, second, wins, prob, 6.0)["label_flip_rate"] == 0.0


def test_tied_pairs_are_counted_and_left_out_of_the_flip_rate():
    first = np.array([1.0, 2.0, 3.0, 0.5, 0.5])
    second = np.array([0.0, 2.0, 4.0, 0.5, 0.0])
    wins = np.array([False, True, True, False, True])  # pair 0 flipped, pair 2 flipped, pair 4 right
    prob = np.array([0.9, 0.5, 0.2, 0.5, 0.7])
    stats = step5.pair_statistics(first, second, wins, prob, 1.0)
    assert stats["n_pairs"] == 5 and stats["n_pairs_with_golden_tie"] == 2
    assert stats["label_flip_rate"] == pytest.approx(2 / 3)
    assert stats["expected_flip_rate"] == pytest.approx((0.1 + 0.2 + 0.3) / 3)
    assert "label_flip_rate_reason" not in stats
    tied = step5.pair_statistics(first[[1, 3]], second[[1, 3]], wins[[1, 3]], prob[[1, 3]], 1.0)
    assert tied["label_flip_rate"] is None and tied["expected_flip_rate"] is None
    assert tied["label_flip_rate_reason"] == "every pair ties in golden reward: no pair has a true order to flip"


# --------------------------------------------------------------------------------------------
# Training, checkpoints, determinism
# --------------------------------------------------------------------------------------------


def test_step5_outputs_and_manifest(trained_run, demo_dir):
    manifest = json.loads((trained_run / run_folder.MANIFEST_FILE).read_text())
    assert len(manifest["checkpoints"]) == 2
    assert manifest["checkpoints"][1] == (
        "XPrompt_mlp_bt_1_seed3_firstn_2_n_120_pair_1_replacement_False_epoch3_lr0.0001.ckpt"
    )
    assert manifest["pair_statistics"]["n_pairs"] == 120
    assert 0 <= manifest["pair_statistics"]["label_flip_rate"] < 0.5
    assert manifest["prompt_counts"] == {"orm_train": 120, "calibration": 78, "student_train": 26, "held_out": 26}
    for name in manifest["checkpoints"]:
        model = networks.load_checkpoint(trained_run / name, expected_dim=48)
        assert model.fc1.in_features == 48
    for member in manifest["members"]:  # per-epoch curves: the best epoch is the lowest validation loss
        history = member["history"]
        assert [record["epoch"] for record in history] == list(range(1, member["epochs_run"] + 1))
        val_losses = [record["val_loss"] for record in history]
        assert val_losses.index(min(val_losses)) + 1 == member["best_epoch"]
        assert min(val_losses) == member["val_loss"]
        assert all(0 < record["train_loss"] < 10 for record in history)
        # each epoch's validation pair accuracy; the kept epoch's is the member's (its weights restored)
        assert all(0 <= record["val_accuracy"] <= 1 for record in history)
        assert history[member["best_epoch"] - 1]["val_accuracy"] == member["val_pair_accuracy"]
    partition = json.loads((trained_run / run_folder.PARTITION_FILE).read_text())
    assert partition["orm_train"] == rm_data.make_partition(260, 120, split_seed=0)["orm_train"]
    assert (partition["split_seed"], partition["eval_prompts"], partition["n_prompts"]) == (0, 130, 260)


def test_step5_is_deterministic(trained_run, demo_dir, tmp_path):
    step5.main(["--data_dir", str(demo_dir), "--output_dir", str(tmp_path), *STEP5_FAST])
    for path in sorted(trained_run.iterdir()):
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name
    other = tmp_path / "other_seed"
    step5.main(["--data_dir", str(demo_dir), "--output_dir", str(other), *STEP5_FAST[:-1], "4"])
    a = torch.load(next(trained_run.glob("*_0_seed3_*.ckpt")), weights_only=True)
    b = torch.load(next(other.glob("*_0_seed4_*.ckpt")), weights_only=True)
    assert not torch.equal(a["fc1.weight"], b["fc1.weight"])


def test_bt_loss_feeds_each_pair_once_and_matches_definition():
    winners, losers = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, 2.0])
    expected = -torch.log(torch.sigmoid(winners - losers)).mean()
    assert torch.allclose(objectives.bt_loss(winners, losers), expected)


def test_a_new_objective_is_one_registry_entry(demo_dir, tmp_path, monkeypatch):
    calls = []

    def hinge_loss(winner_scores, loser_scores):
        calls.append(len(winner_scores))
        return torch.relu(1 - (winner_scores - loser_scores)).mean()

    monkeypatch.setitem(
        objectives.OBJECTIVES, "hinge", objectives.Objective("max(0, 1 - r_w + r_l)", hinge_loss, pointwise=False)
    )
    manifest = step5.main(
        ["--data_dir", str(demo_dir), "--output_dir", str(tmp_path), *STEP5_FAST, "--rm_objective", "hinge"]
    )
    assert manifest["config"]["rm_objective"] == "hinge"
    assert all("_mlp_hinge_" in name and (tmp_path / name).is_file() for name in manifest["checkpoints"])
    assert max(calls) == 32  # training batches of --batch_size pairs, plus the validation pairs


def test_checkpoint_input_size_mismatch_is_a_clear_error(trained_run):
    path = next(trained_run.glob("*.ckpt"))
    with pytest.raises(rm_data.InputError, match="D=48, data has D=2048"):
        networks.load_checkpoint(path, expected_dim=2048)


# Measured on this demo (n_sample 1000, 5 epochs, D=48): bt and clf reach held-out ensemble-mean
# Spearman ~0.8; an untrained network gives |rho| < 0.2. 0.6 leaves margin for seeds and BLAS.
@pytest.mark.parametrize("objective", ["bt", "clf"])
def test_objective_learns_the_demo(objective, tmp_path, demo_dir, tmp_path_factory):
    data = tmp_path / "data"
    from generate_demo_data import main as generate

    generate(["--output_dir", str(data), "--n_prompts", "1100", "--emb_dim", "48", "--seed", "2"])
    out = tmp_path / "out"
    step5.main(
        [
            "--data_dir",
            str(data),
            "--output_dir",
            str(out),
            "--rm_objective",
            objective,
            "--n_sample",
            "1000",
            "--eval_prompts",
            "100",
            "--ensemble_number",
            "2",
            "--training_epochs",
            "5",
            "--batch_size",
            "64",
        ]
    )
    results = step6.main(["--output_dir", str(out), "--bon_draws", "5", "--n_cross_pairs", "1000"])
    rho = results["held_out"]["ranking"]["ensemble_mean"]["spearman_per_prompt"]["mean"]
    assert rho > 0.6, rho


# --------------------------------------------------------------------------------------------
# Step 6: leak-free, deterministic
# --------------------------------------------------------------------------------------------


def test_step6_reads_only_held_out_test_and_the_baselines_fit_prompts(trained_run, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(trained_run, out)
    read = {"train": set(), "test": set()}
    original = rm_data.EmbeddingSet.read_rows

    def recording_read_rows(self, split, prompt_ids):
        read[self.kind].update(np.asarray(prompt_ids).tolist())
        return original(self, split, prompt_ids)

    monkeypatch.setattr(rm_data.EmbeddingSet, "read_rows", recording_read_rows)
    results = step6.main(["--output_dir", str(out), "--bon_draws", "5"])
    partition = json.loads((out / run_folder.PARTITION_FILE).read_text())
    # held-out prompts are scored; the ridge baseline is fitted on the ORM's own training prompts
    assert read["train"] == set(partition["held_out"]) | set(partition["orm_train"])
    assert not read["train"] & (set(partition["calibration"]) | set(partition["student_train"]))
    assert read["test"] == set(range(6))
    held = results["held_out"]
    assert held["n_prompts"] == 26 and held["n_responses"] == 260
    assert held["ranking"]["ensemble_first"] == held["ranking"]["member_0"]
    assert results["test"]["best_of_n"]["curves"]["oracle"]["n"] == [2, 5, 10, 30]
    assert (out / "eval_best_of_n_bt.png").stat().st_size > 10_000
    assert (out / "training_curves_bt.png").stat().st_size > 10_000


def test_step6_is_deterministic(trained_run, tmp_path):
    outputs = []
    for name in ("a", "b"):
        out = tmp_path / name
        shutil.copytree(trained_run, out)
        step6.main(["--output_dir", str(out), "--bon_draws", "5"])
        results = json.loads((out / "eval_results_bt.json").read_text())
        results.pop("manifest")
        outputs.append(results)
    assert outputs[0] == outputs[1]


def test_step6_checks_seed_flags_against_manifest(trained_run, capsys):
    from conftest import run_failing

    err = run_failing(step6.main, ["--output_dir", str(trained_run), "--rm_objective", "clf"], capsys)
    assert "--rm_objective clf does not match" in err


def test_ensemble_variants():
    scores = np.array([[[1.0, 2.0]], [[3.0, 0.0]]])
    variants = step6.ensemble_variants(scores)
    assert np.allclose(variants["ensemble_mean"], [[2.0, 1.0]])
    assert np.allclose(variants["ensemble_min"], [[1.0, 0.0]])
    assert np.allclose(variants["ensemble_first"], [[1.0, 2.0]])
    assert np.allclose(variants["ensemble_mean_minus_std"], [[1.0, 0.0]])


def test_score_reads_in_chunks_identically(trained_run, demo_dir):
    data = rm_data.load_embedding_set(demo_dir)
    manifest = run_folder.load_manifest(trained_run)
    models = [networks.load_checkpoint(p) for p in run_folder.checkpoint_paths(trained_run, manifest)]
    prompts = np.array([5, 3, 200, 17, 44])
    whole = data.score(prompts, networks.StackedEnsemble(models))
    chunked = data.score(prompts, networks.StackedEnsemble(models), chunk_rows=2)
    assert whole.shape == (2, 5, 10)
    np.testing.assert_allclose(whole, chunked, rtol=1e-5, atol=1e-6)  # BLAS blocking varies with B
    with torch.no_grad():
        direct = models[1](torch.from_numpy(np.asarray(data.embeddings[7][[200]], dtype=np.float32)))
    assert whole[1, 2, 7] == pytest.approx(float(direct[0]), abs=1e-6)


def test_paths_are_relative_to_output_dir(trained_run):
    manifest = run_folder.load_manifest(trained_run)
    assert all(Path(p).parent == trained_run for p in run_folder.checkpoint_paths(trained_run, manifest))


def test_score_cache_is_reused_and_invalidated(trained_run, demo_dir, tmp_path, monkeypatch):
    data = rm_data.load_embedding_set(demo_dir)
    paths = run_folder.checkpoint_paths(trained_run, run_folder.load_manifest(trained_run))
    members = [tmp_path / p.name for p in paths]
    for src, dst in zip(paths, members):
        shutil.copy(src, dst)
    scorer = networks.StackedEnsemble(networks.load_ensemble(members))
    prompts = np.array([4, 9, 30])
    first = run_folder.score_cached(data, prompts, scorer, tmp_path / "cache", members)
    assert len(list((tmp_path / "cache").glob("scores_train_*.npy"))) == 1

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored again despite a valid cache")

    monkeypatch.setattr(rm_data.EmbeddingSet, "score", no_scoring)
    np.testing.assert_array_equal(run_folder.score_cached(data, prompts, scorer, tmp_path / "cache", members), first)
    monkeypatch.undo()
    # Other weights in one member's file, or other prompts: the cache must not answer.
    networks.save_checkpoint(networks.MLP(48, generator=torch.Generator().manual_seed(9)), members[0])
    changed = networks.StackedEnsemble(networks.load_ensemble(members))
    again = run_folder.score_cached(data, prompts, changed, tmp_path / "cache", members)
    assert not np.array_equal(again[0], first[0]) and np.array_equal(again[1], first[1])
    assert len(list((tmp_path / "cache").glob("scores_train_*.npy"))) == 1  # the stale one is gone
    assert run_folder.score_cached(data, prompts[:2], changed, tmp_path / "cache", members).shape == (2, 2, 10)


# --------------------------------------------------------------------------------------------
# Early-stopping schemes, bagging (docs/method.md, "Early stopping and ensemble options")
# --------------------------------------------------------------------------------------------
def _splits(n_pairs, n_members, min_val_pairs=0, **flags):
    args = step5.parse_args(["--min_val_pairs", str(min_val_pairs), *[f"--{k}={v}" for k, v in flags.items()]])
    generators = [torch.Generator().manual_seed(i) for i in range(n_members)]
    return step5.member_splits(n_pairs, generators, args, np.random.default_rng(0))


def test_member_splits_of_each_scheme():
    everything = set(range(100))
    splits, scheme, decision = _splits(100, 3)  # member: each its own random 10%
    assert scheme == "member" and decision == 10
    for train, val in splits:
        assert len(val) == 10 and set(train.tolist()) | set(val.tolist()) == everything
        assert not set(train.tolist()) & set(val.tolist())
    assert len({tuple(sorted(val.tolist())) for _, val in splits}) == 3
    splits, scheme, decision = _splits(100, 3, early_stopping="pooled")  # pooled: disjoint slices
    vals = [set(val.tolist()) for _, val in splits]
    assert scheme == "pooled" and decision == 30 and len(set().union(*vals)) == 30
    for (train, _), val in zip(splits, vals):
        assert set(train.tolist()) == everything - val and len(train) == 90
    splits, scheme, decision = _splits(100, 12, early_stopping="pooled")  # 12 x 10 > 100: slices wrap
    assert decision == 100 and all(len(val) == 10 for _, val in splits)
    splits, scheme, decision = _splits(100, 3, bagging=1)  # out-of-bag validation
    assert scheme == "member"
    for train, val in splits:
        assert len(train) == 100 and set(val.tolist()) == everything - set(train.tolist())
    assert decision == min(len(val) for _, val in splits) and 20 < decision < 50
    for flags in ({"min_val_pairs": 11}, {"min_val_pairs": 31, "early_stopping": "pooled"}, {"early_stopping": "none"}):
        splits, scheme, decision = _splits(100, 3, **flags)
        assert scheme == "none" and decision == 0
        assert all(torch.equal(train, torch.arange(100)) and len(val) == 0 for train, val in splits)
    splits, scheme, _ = _splits(100, 3, bagging=1, early_stopping="none")
    assert scheme == "none" and all(len(train) == 100 and len(val) == 0 for train, val in splits)
    assert len({tuple(train.tolist()) for train, _ in splits}) == 3  # each its own resample


@pytest.mark.parametrize(
    "flags",
    [
        ["--early_stopping", "pooled", "--bagging", "1", "--standardize", "1", "--weight_decay", "0.1"],
        ["--early_stopping", "none", "--standardize", "1"],
    ],
)
def test_step5_alternatives_are_deterministic_and_recorded(flags, demo_dir, tmp_path):
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        step5.main(["--data_dir", str(demo_dir), "--output_dir", str(out), *STEP5_FAST, *flags])
    for path in sorted(runs[0].iterdir()):
        assert (runs[1] / path.name).read_bytes() == path.read_bytes(), path.name
    manifest = json.loads((runs[0] / run_folder.MANIFEST_FILE).read_text())
    scheme = flags[1]
    assert manifest["early_stopping"]["scheme"] == scheme and manifest["config"]["early_stopping"] == scheme
    members = manifest["members"]
    if scheme == "pooled":  # one stopping epoch, chosen on all members' out-of-bag pairs
        assert len({member["best_epoch"] for member in members}) == 1
        assert manifest["early_stopping"]["decision_validation_pairs"] > max(m["val_pairs"] for m in members)
    else:  # no validation: every epoch trained, the last weights kept
        assert all(
            m["best_epoch"] == m["epochs_run"] == 3 and m["val_pairs"] == 0 and m["val_loss"] is None for m in members
        )
        assert all(record["val_loss"] is None for m in members for record in m["history"])
    for name in manifest["checkpoints"]:  # standardisation folded in: plain MLP checkpoints
        networks.load_checkpoint(runs[0] / name, expected_dim=48)


# --------------------------------------------------------------------------------------------
# LightGBM members (--rm_model lgbm)
# --------------------------------------------------------------------------------------------


def test_lgbm_members_recorded_with_kind_and_hash_and_byte_identical_per_seed(lgbm_run, demo_dir, tmp_path):
    from artifacts import file_sha256

    manifest = json.loads((lgbm_run / run_folder.MANIFEST_FILE).read_text())
    assert manifest["checkpoints"][1] == (
        "XPrompt_lgbm_clf_1_seed3_firstn_2_n_120_pair_1_replacement_False_trees60_lr0.1.txt"
    )
    for member in manifest["members"]:
        assert member["kind"] == "lgbm" and member["sha256"] == file_sha256(lgbm_run / member["checkpoint"])
        val_losses = [record["val_loss"] for record in member["history"]]  # kept: the best round
        assert val_losses.index(min(val_losses)) + 1 == member["best_epoch"] < member["epochs_run"] <= 60
        assert member["val_loss"] == min(val_losses)
    step5.main(["--data_dir", str(demo_dir), "--output_dir", str(tmp_path), *STEP5_LGBM, *STEP5_FAST])
    for path in sorted(lgbm_run.iterdir()):
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name
    other = tmp_path / "other_seed"
    step5.main(["--data_dir", str(demo_dir), "--output_dir", str(other), *STEP5_LGBM, *STEP5_FAST[:-1], "4"])
    first, second = (next(folder.glob("*_0_seed*.txt")).read_text() for folder in (lgbm_run, other))
    assert first.split("end of trees")[0] != second.split("end of trees")[0]


def test_lgbm_members_train_on_the_mlp_members_pairs(lgbm_run, trained_run):
    mlp, lgbm = (json.loads((run / run_folder.MANIFEST_FILE).read_text()) for run in (trained_run, lgbm_run))
    assert mlp["pair_statistics"] == lgbm["pair_statistics"]  # the same pairs and labels
    for a, b in zip(mlp["members"], lgbm["members"]):
        assert (a["seed"], a["train_pairs"], a["val_pairs"]) == (b["seed"], b["train_pairs"], b["val_pairs"])


def test_lgbm_scores_are_the_boosters_raw_scores_and_the_dimension_is_checked(lgbm_run, demo_dir):
    import lightgbm as lgb

    from members import load_members

    manifest = json.loads((lgbm_run / run_folder.MANIFEST_FILE).read_text())
    paths = run_folder.checkpoint_paths(lgbm_run, manifest)
    ensemble = load_members(paths, 48, run_folder.member_hashes(lgbm_run, manifest))
    rows = np.load(demo_dir / "EMBD-TRAIN-split_0.npy")[:50]
    scores = ensemble(rows)
    assert scores.shape == (2, 50) and scores.dtype == np.float32
    for member_scores, path in zip(scores, paths):
        expected = lgb.Booster(model_file=str(path)).predict(rows, raw_score=True)
        np.testing.assert_array_equal(member_scores, expected.astype(np.float32))
    with pytest.raises(rm_data.InputError, match="model expects embeddings of size D=48, data has D=2048"):
        load_members(paths, 2048)


def test_lgbm_bt_gradient_matches_autograd_of_the_bt_loss():
    from members import bt_objective, pair_metrics

    rng = np.random.default_rng(0)
    scores = rng.normal(size=14) * 3
    grad, hess = bt_objective(scores, 7)
    tensor = torch.tensor(scores, requires_grad=True)
    loss = objectives.bt_loss(tensor[:7], tensor[7:]) * 7  # summed over the pairs, as LightGBM's gradients
    (autograd,) = torch.autograd.grad(loss, tensor, create_graph=True)
    np.testing.assert_allclose(grad, autograd.detach().numpy(), rtol=1e-12, atol=1e-15)
    (second,) = torch.autograd.grad(autograd[:7].sum(), tensor)  # pair p's gradient depends on pair p only
    np.testing.assert_allclose(hess[:7], second.numpy()[:7], rtol=1e-12)  # d2 loss / d s_w^2
    np.testing.assert_allclose(hess[7:], hess[:7])
    assert pair_metrics(scores, "bt")[0] == pytest.approx(float(loss.detach()) / 7, rel=1e-12)
    clf = objectives.OBJECTIVES["clf"].pair_loss(torch.tensor(scores[:7]), torch.tensor(scores[7:]))
    assert pair_metrics(scores, "clf")[0] == pytest.approx(float(clf), rel=1e-12)


@pytest.mark.parametrize(
    "flags", [["--rm_objective", "bt"], ["--early_stopping", "pooled", "--stop_metric", "accuracy"]]
)
def test_lgbm_bt_and_pooled_stopping_learn_and_stay_deterministic(flags, demo_dir, tmp_path):
    argv = ["--data_dir", str(demo_dir), *STEP5_LGBM, *flags, *STEP5_FAST]
    runs = [step5.main([*argv, "--output_dir", str(tmp_path / name)]) for name in ("a", "b")]
    assert runs[0]["members"] == runs[1]["members"]
    if "pooled" in flags:  # one stopping round for all members
        assert len({member["best_epoch"] for member in runs[0]["members"]}) == 1
    results = step6.main(["--output_dir", str(tmp_path / "a"), "--bon_draws", "5"])
    assert results["held_out"]["ranking"]["ensemble_mean"]["spearman_per_prompt"]["mean"] > 0.1
