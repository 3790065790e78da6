"""convert_embeddings.py: both repository layouts, streaming, errors, fingerprint; the synthetic repo."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, run_failing

import artifacts
import convert_embeddings as conv
import rm_data
from cli import run_cli

SETUP = {"task": "helpful", "sft_obj": "gpt4", "embed_model": "gemma2b", "gen_model": "gemma7b"}


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def random_set(
    seed: int, n_prompts: int, n_responses: int, dim: int = 6, dtype=np.float32, ties: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings (N, K, D) and rewards (N, K) float32; with ties, rewards repeat within prompts."""
    rng = np.random.default_rng(seed)
    embeddings = rng.standard_normal((n_prompts, n_responses, dim)).astype(dtype)
    if ties:
        rewards = (rng.integers(0, 4, (n_prompts, n_responses)) / 4).astype(np.float32)
    else:
        rewards = rng.standard_normal((n_prompts, n_responses)).astype(np.float32)
    return embeddings, rewards


def write_repo(
    folder: Path,
    layout: str,
    split: str,
    embeddings: np.ndarray,
    rewards: np.ndarray,
    names: tuple[str, str] | None = None,
) -> tuple[Path, Path]:
    """Store (N, K, D) embeddings and (N, K) rewards as a repository pair in ``layout``."""
    folder.mkdir(parents=True, exist_ok=True)
    embd_name, reward_name = names or conv.repo_file_names(layout, split, **SETUP)
    if layout == "kn":
        np.save(folder / embd_name, embeddings.transpose(1, 0, 2))
        np.save(folder / reward_name, rewards.T)
    else:
        np.save(folder / embd_name, embeddings)
        np.save(folder / reward_name, rewards[:, :, None])
    return folder / embd_name, folder / reward_name


def convert(*argv) -> Path:
    return conv.main([str(a) for a in argv])


def check_converted(data_dir: Path, kind: str, embeddings: np.ndarray, rewards: np.ndarray) -> None:
    """The data directory holds exactly the (N, K, D) embeddings, responses sorted (stably)."""
    eset = rm_data.load_embedding_set(data_dir, kind)
    n_prompts, n_responses = rewards.shape
    assert (eset.n_prompts, eset.n_splits, eset.dim) == (n_prompts, n_responses, embeddings.shape[2])
    order = np.argsort(rewards, axis=1, kind="stable")
    for k in range(n_responses):
        split = eset.embeddings[k]
        assert split.dtype == embeddings.dtype
        assert np.array_equal(split, embeddings[np.arange(n_prompts), order[:, k]])
    assert np.array_equal(eset.rewards, np.take_along_axis(rewards.astype(np.float64), order, axis=1))
    assert (np.diff(eset.rewards, axis=1) >= 0).all()


def file_states(folder: Path) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}


def assert_no_output(out: Path) -> None:
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("layout", ["kn", "nk"])
def test_round_trip_sorted_with_test_set(tmp_path, layout, dtype):
    train = random_set(0, 23, 5, dtype=dtype)
    test = random_set(1, 4, 9, dtype=dtype)
    write_repo(tmp_path / "repo", layout, "train", *train)
    write_repo(tmp_path / "repo", layout, "test", *test)
    out = convert("--embd_dir", tmp_path / "repo", "--output_dir", tmp_path / "data")
    check_converted(out, "train", *train)
    check_converted(out, "test", *test)
    record = json.loads((out / conv.CONVERSION_FILE).read_text())
    assert record["status"] == "complete"
    assert record["sets"]["train"] == {
        "n_prompts": 23,
        "n_responses": 5,
        "dim": 6,
        "dtype": np.dtype(dtype).name,
        "layout": layout,
    }
    assert sorted(record["files"]) == sorted(p.name for p in out.iterdir() if p.name != conv.CONVERSION_FILE)


def test_unsorted_splits_are_refused_naming_the_first_prompt_out_of_order(tmp_path, capsys):
    """Steps 5-8 read split 0 as each prompt's lowest reward (--consider_first_n -1 / -2): data in
    another order is one line naming the prompt and the files; ties are in order."""
    train = random_set(2, 11, 4)
    write_repo(tmp_path / "repo", "nk", "train", *train)
    out = convert("--embd_dir", tmp_path / "repo", "--output_dir", tmp_path / "data")
    assert rm_data.load_embedding_set(out, "test", required=False) is None
    rewards = [rm_data.read_rewards_jsonl(out / f"rewards_split_{k}.json") for k in range(4)]
    rm_data.write_rewards_jsonl(out / "rewards_split_3.json", rewards[2])  # a tie: still sorted
    rm_data.load_embedding_set(out)
    rm_data.write_rewards_jsonl(out / "rewards_split_1.json", rewards[2])
    rm_data.write_rewards_jsonl(out / "rewards_split_2.json", rewards[1])
    first = int(np.flatnonzero(rewards[1] < rewards[2])[0])
    with pytest.raises(rm_data.InputError) as err:
        rm_data.load_embedding_set(out)
    assert str(err.value) == (
        f"prompt {first} (line {first + 1}) is not sorted ascending by reward across splits: "
        f"{out / 'rewards_split_1.json'} has {float(rewards[2][first])!r}, rewards_split_2.json "
        f"{float(rewards[1][first])!r} "
        "(split 0 must hold each prompt's lowest reward; convert_embeddings.py sorts them)"
    )


@pytest.mark.parametrize("layout", ["kn", "nk"])
def test_max_prompts_keeps_the_first_prompts(tmp_path, layout):
    train, test = random_set(3, 20, 4), random_set(4, 12, 6)
    write_repo(tmp_path / "repo", layout, "train", *train)
    write_repo(tmp_path / "repo", layout, "test", *test)
    out = convert("--embd_dir", tmp_path / "repo", "--output_dir", tmp_path / "data", "--max_prompts", 7)
    check_converted(out, "train", train[0][:7], train[1][:7])
    check_converted(out, "test", test[0][:7], test[1][:7])
    out = convert("--embd_dir", tmp_path / "repo", "--output_dir", tmp_path / "all", "--max_prompts", 1000)
    check_converted(out, "train", *train)


@pytest.mark.parametrize("layout", ["kn", "nk"])
def test_small_chunks_give_identical_files(tmp_path, layout):
    train = random_set(5, 31, 5, dtype=np.float16)
    test = random_set(6, 5, 8, dtype=np.float16)
    write_repo(tmp_path / "repo", layout, "train", *train)
    write_repo(tmp_path / "repo", layout, "test", *test)
    whole = convert("--embd_dir", tmp_path / "repo", "--output_dir", tmp_path / "whole")
    chunked = convert("--embd_dir", tmp_path / "repo", "--output_dir", tmp_path / "chunked", "--chunk_prompts", 3)
    names = sorted(p.name for p in whole.iterdir())
    assert names == sorted(p.name for p in chunked.iterdir())
    for name in names:
        assert (whole / name).read_bytes() == (chunked / name).read_bytes(), name


def test_explicit_files_and_layout_from_shapes(tmp_path):
    # Neutral names: a 2-D reward is (K, N) when its first axis is shorter, a 3-D one is (N, K, 1).
    train = random_set(7, 9, 3)
    test = random_set(8, 4, 6)
    emb, rew = write_repo(tmp_path, "kn", "train", *train, names=("a.npy", "b.npy"))
    test_emb, test_rew = write_repo(tmp_path, "nk", "test", *test, names=("c.npy", "d.npy"))
    out = convert(
        "--embd_file",
        emb,
        "--reward_file",
        rew,
        "--test_embd_file",
        test_emb,
        "--test_reward_file",
        test_rew,
        "--output_dir",
        tmp_path / "data",
    )
    check_converted(out, "train", *train)
    check_converted(out, "test", *test)
    layouts = json.loads((out / conv.CONVERSION_FILE).read_text())["options"]["layout"]
    assert layouts == {"train": "kn", "test": "nk"}


def test_layout_flag_overrides_and_squeezed_nk_rewards(tmp_path):
    # (N, K) rewards without names that say so: --layout nk reads them as the nk layout.
    train = random_set(9, 3, 5)
    np.save(tmp_path / "e.npy", train[0])
    np.save(tmp_path / "r.npy", train[1])
    out = convert(
        "--embd_file",
        tmp_path / "e.npy",
        "--reward_file",
        tmp_path / "r.npy",
        "--layout",
        "nk",
        "--output_dir",
        tmp_path / "data",
    )
    check_converted(out, "train", *train)
    # K == N is ambiguous without the flag (see the error cases) and fine with it.
    square = random_set(10, 4, 4)
    write_repo(tmp_path, "kn", "train", *square, names=("e.npy", "r.npy"))
    out = convert(
        "--embd_file",
        tmp_path / "e.npy",
        "--reward_file",
        tmp_path / "r.npy",
        "--layout",
        "kn",
        "--output_dir",
        tmp_path / "square",
    )
    check_converted(out, "train", *square)


def test_harmless_none_names():
    assert conv.repo_file_names("kn", "train", "harmless", "gpt4", "gemma2b", "gemma7b") == (
        "EMBD_hh-rlhf-harmless-gpt4_gemma2b_gemma7b_train.npy",
        "REWARD_hh-rlhf-harmless-gpt4_rayharmless_gemma7b_train.npy",
    )
    assert conv.repo_file_names("kn", "test", "helpful", "none", "gemma2b", "gemma7b") == (
        "EMBD_hh-rlhf-helpful_gemma2b_gemma7b_test.npy",
        "REWARD_hh-rlhf-helpful_rmmistral7b_gemma7b_test.npy",
    )
    assert conv.repo_file_names("nk", "train", "helpful", "gpt4", "gemma2b", "gemma7b") == (
        "embd_gemma7b_gemma2b_helpful_train.npy",
        "reward_gemma7b_gemma2b_helpful_train.npy",
    )


# --------------------------------------------------------------------------------------------
# Errors: exit 2, one line, nothing written
# --------------------------------------------------------------------------------------------
def _no_match(repo):
    np.save(repo / "other.npy", np.zeros(3))
    return ["--embd_dir", repo], [
        "looked for EMBD_hh-rlhf-helpful-gpt4_gemma2b_gemma7b_train.npy + REWARD_",
        "embd_gemma7b_gemma2b_helpful_train.npy",
        "holds other.npy",
    ]


def _missing_partner(repo):
    emb, rew = write_repo(repo, "kn", "train", *random_set(0, 5, 3))
    rew.unlink()
    return ["--embd_dir", repo], ["has no partner", rew.name]


def _k_mismatch(repo):
    emb, rew = write_repo(repo, "kn", "train", *random_set(0, 5, 3))
    np.save(rew, np.zeros((4, 5), np.float32))
    return ["--embd_dir", repo], ["K (responses per prompt) is 4 but 3"]


def _n_mismatch(repo):
    emb, rew = write_repo(repo, "nk", "train", *random_set(0, 5, 3))
    np.save(rew, np.zeros((6, 3, 1), np.float32))
    return ["--embd_dir", repo], ["N (prompts) is 6 but 5"]


def _reward_last_dim(repo):
    emb, rew = write_repo(repo, "nk", "train", *random_set(0, 5, 3))
    np.save(rew, np.zeros((5, 3, 2), np.float32))
    return ["--embd_dir", repo], ["reward last dim must be 1", "(5, 3, 2)"]


def _nan_reward(repo):
    embeddings, rewards = random_set(0, 5, 3)
    rewards[2, 1] = np.nan
    write_repo(repo, "kn", "train", embeddings, rewards)
    return ["--embd_dir", repo], ["non-finite reward nan for prompt 2, response 1"]


def _embeddings_2d(repo):
    np.save(repo / "e.npy", np.zeros((5, 4), np.float32))
    np.save(repo / "r.npy", np.zeros((3, 5), np.float32))
    return ["--embd_file", repo / "e.npy", "--reward_file", repo / "r.npy"], ["expected 3-D embeddings"]


def _embeddings_float64(repo):
    embeddings, rewards = random_set(0, 5, 3)
    write_repo(repo, "nk", "train", embeddings.astype(np.float64), rewards)
    return ["--embd_dir", repo], ["expected float32 or float16 embeddings, got float64"]


def _bool_rewards(repo):
    embeddings, rewards = random_set(0, 5, 3)
    write_repo(repo, "kn", "train", embeddings, rewards > 0)
    return ["--embd_dir", repo], ["expected real-valued rewards, got dtype bool"]


def _ambiguous_square(repo):
    embeddings, rewards = random_set(0, 4, 4)
    write_repo(repo, "kn", "train", embeddings, rewards, names=("e.npy", "r.npy"))
    return (
        ["--embd_file", repo / "e.npy", "--reward_file", repo / "r.npy"],
        ["cannot tell (K, N) from (N, K)", "pass --layout kn", "--layout nk"],
    )


def _both_layouts(repo):
    write_repo(repo, "kn", "train", *random_set(0, 5, 3))
    write_repo(repo, "nk", "train", *random_set(0, 5, 3))
    return ["--embd_dir", repo], ["train files in both layouts", "pass --layout kn or --layout nk"]


def _named_kn_with_3d_reward(repo):
    emb, rew = write_repo(repo, "kn", "train", *random_set(0, 5, 3))
    np.save(rew, np.zeros((3, 5, 1), np.float32))
    return ["--embd_dir", repo], ["named like the kn layout's", "--layout"]


def _test_dim_differs(repo):
    write_repo(repo, "nk", "train", *random_set(0, 5, 3, dim=6))
    write_repo(repo, "nk", "test", *random_set(1, 5, 3, dim=7))
    return ["--embd_dir", repo], ["D=7 differs from the training embeddings' D=6"]


def _one_response(repo):
    write_repo(repo, "nk", "train", *random_set(0, 5, 1))
    return ["--embd_dir", repo], ["need at least 2 responses per prompt, found K=1"]


def _reward_without_embeddings_flag(repo):
    return ["--reward_file", repo / "r.npy"], ["--reward_file needs --embd_file"]


def _missing_embd_dir(repo):
    return ["--embd_dir", repo / "nowhere"], ["--embd_dir", "does not exist"]


def _npz_embeddings(repo):
    np.savez(repo / "e.npz", x=np.zeros((3, 5, 2), np.float32))
    np.save(repo / "r.npy", np.zeros((3, 5), np.float32))
    return ["--embd_file", repo / "e.npz", "--reward_file", repo / "r.npy"], ["is not a .npy array"]


def _truncated_embeddings(repo):
    emb, rew = write_repo(repo, "nk", "train", *random_set(0, 5, 3))
    emb.write_bytes(emb.read_bytes()[:-10])
    return ["--embd_dir", repo], ["cannot read embeddings", emb.name]


ERROR_CASES = [
    _no_match,
    _missing_partner,
    _k_mismatch,
    _n_mismatch,
    _reward_last_dim,
    _nan_reward,
    _truncated_embeddings,
    _embeddings_2d,
    _embeddings_float64,
    _bool_rewards,
    _ambiguous_square,
    _both_layouts,
    _named_kn_with_3d_reward,
    _test_dim_differs,
    _one_response,
    _reward_without_embeddings_flag,
    _missing_embd_dir,
    _npz_embeddings,
]


@pytest.mark.parametrize("make_case", ERROR_CASES, ids=lambda case: case.__name__.strip("_"))
def test_bad_input_exits_2_with_one_line_and_no_output(tmp_path, capsys, make_case):
    repo = tmp_path / "repo"
    repo.mkdir()
    argv, fragments = make_case(repo)
    out = tmp_path / "data"
    err = run_failing(conv.main, [*map(str, argv), "--output_dir", str(out)], capsys)
    for fragment in fragments:
        assert fragment in err, err
    assert_no_output(out)


def run_failing_after_logs(argv, capsys) -> str:
    """Like conftest.run_failing, for errors found mid-copy (after progress logs): the last line."""
    with pytest.raises(SystemExit) as exc:
        run_cli(conv.main, [str(a) for a in argv])
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], lines
    return lines[-1]


@pytest.mark.parametrize(
    "layout,value,expected",
    [
        ("kn", np.inf, "non-finite embedding"),
        ("nk", np.inf, "non-finite embedding"),
        ("kn", 3e38, "embedding value 3e+38 (column 4, beyond +-1e+06: a corrupt or mis-scaled file)"),
    ],
)
def test_non_finite_or_huge_embedding_mid_copy_leaves_nothing(tmp_path, capsys, layout, value, expected):
    embeddings, rewards = random_set(0, 20, 3)
    embeddings[17, 2, 4] = value
    write_repo(tmp_path / "repo", layout, "train", embeddings, rewards)
    write_repo(tmp_path / "repo", layout, "test", *random_set(1, 4, 5))
    out = tmp_path / "data"
    err = run_failing_after_logs(["--embd_dir", tmp_path / "repo", "--output_dir", out, "--chunk_prompts", 4], capsys)
    assert f"{expected} for prompt 17, response 2" in err
    assert_no_output(out)


def test_output_dir_with_foreign_data_is_refused(tmp_path, capsys):
    write_repo(tmp_path / "repo", "nk", "train", *random_set(0, 5, 3))
    out = tmp_path / "data"
    out.mkdir()
    (out / "EMBD-TRAIN-split_0.npy").write_bytes(b"someone else's")
    err = run_failing(conv.main, ["--embd_dir", str(tmp_path / "repo"), "--output_dir", str(out)], capsys)
    assert "holds split files that no conversion.json lists (EMBD-TRAIN-split_0.npy)" in err
    assert sorted(p.name for p in out.iterdir()) == ["EMBD-TRAIN-split_0.npy"]
    assert (out / "EMBD-TRAIN-split_0.npy").read_bytes() == b"someone else's"


# --------------------------------------------------------------------------------------------
# Fingerprint: no-op reruns, fresh conversions on change
# --------------------------------------------------------------------------------------------
def test_rerun_is_a_no_op_and_changes_reconvert(tmp_path, capsys):
    repo, out = tmp_path / "repo", tmp_path / "data"
    argv = ["--embd_dir", repo, "--output_dir", out]
    embeddings, rewards = random_set(0, 12, 6)
    write_repo(repo, "kn", "train", embeddings, rewards)
    convert(*argv)
    before = file_states(out)
    capsys.readouterr()
    convert(*argv)
    assert "up to date" in capsys.readouterr().out
    assert file_states(out) == before

    # A changed reward: converted afresh.
    rewards[0] = rewards[0][::-1] + 10
    write_repo(repo, "kn", "train", embeddings, rewards)
    convert(*argv)
    assert "converted" in capsys.readouterr().out
    check_converted(out, "train", embeddings, rewards)

    # A changed embedding value.
    embeddings[5, 1, 0] += 1
    write_repo(repo, "kn", "train", embeddings, rewards)
    convert(*argv)
    check_converted(out, "train", embeddings, rewards)

    # A changed option; a prompt limit above N is no change.
    before = file_states(out)
    convert(*argv, "--max_prompts", 12)
    assert file_states(out) == before
    convert(*argv, "--max_prompts", 5)
    check_converted(out, "train", embeddings[:5], rewards[:5])

    # Fewer responses per prompt: the old conversion's extra splits go.
    smaller = random_set(1, 12, 3)
    write_repo(repo, "kn", "train", *smaller)
    convert(*argv)
    check_converted(out, "train", *smaller)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["conversion.json"]
        + [f"EMBD-TRAIN-split_{k}.npy" for k in range(3)]
        + [f"rewards_split_{k}.json" for k in range(3)]
    )

    # A deleted output file: converted again rather than reported up to date.
    (out / "rewards_split_1.json").unlink()
    convert(*argv)
    check_converted(out, "train", *smaller)


def test_test_set_appearing_or_going_reconverts(tmp_path):
    repo, out = tmp_path / "repo", tmp_path / "data"
    train, test = random_set(0, 8, 3), random_set(1, 4, 7)
    write_repo(repo, "nk", "train", *train)
    convert("--embd_dir", repo, "--output_dir", out)
    assert rm_data.load_embedding_set(out, "test", required=False) is None
    test_files = write_repo(repo, "nk", "test", *test)
    convert("--embd_dir", repo, "--output_dir", out)
    check_converted(out, "test", *test)
    for path in test_files:
        path.unlink()
    convert("--embd_dir", repo, "--output_dir", out)
    assert not list(out.glob("*TEST*")) and not list(out.glob("rewards_test*"))


def test_interrupted_conversion_is_cleaned_up(tmp_path):
    repo, out = tmp_path / "repo", tmp_path / "data"
    train = random_set(0, 8, 4)
    write_repo(repo, "kn", "train", *train)
    # What a killed run leaves: its marker record, some split files, a temporary file.
    out.mkdir()
    for k in range(6):
        (out / f"EMBD-TRAIN-split_{k}.npy").write_bytes(b"partial")
    (out / ".EMBD-TRAIN-split_0.npy.x1y2.tmp").write_bytes(b"partial")
    artifacts.write_json(
        out / conv.CONVERSION_FILE, {"status": "incomplete", "files": [f"EMBD-TRAIN-split_{k}.npy" for k in range(6)]}
    )
    convert("--embd_dir", repo, "--output_dir", out)
    check_converted(out, "train", *train)
    assert not list(out.glob(".*")) and not (out / "EMBD-TRAIN-split_5.npy").exists()


def test_failed_reconversion_leaves_the_previous_conversion_as_it_was(tmp_path, capsys):
    repo, out = tmp_path / "repo", tmp_path / "data"
    embeddings, rewards = random_set(0, 10, 3)
    write_repo(repo, "nk", "train", embeddings, rewards)
    convert("--embd_dir", repo, "--output_dir", out)
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    embeddings[9, 0, 0] = np.nan  # found in the last chunk, after the first chunks were written
    write_repo(repo, "nk", "train", embeddings, rewards)
    run_failing_after_logs(["--embd_dir", repo, "--output_dir", out, "--chunk_prompts", 2], capsys)
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data", "repo"]  # no staging folder left


# --------------------------------------------------------------------------------------------
# benchmarks/make_synthetic_repo.py
# --------------------------------------------------------------------------------------------
def load_synthetic_module():
    spec = importlib.util.spec_from_file_location("make_synthetic_repo", ROOT / "benchmarks" / "make_synthetic_repo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("layout,dtype", [("kn", "float32"), ("nk", "float16")])
def test_synthetic_repo_converts_and_its_reward_is_a_function_of_the_embedding(tmp_path, capsys, layout, dtype):
    synthetic = load_synthetic_module()
    repo = tmp_path / "repo"
    sizes = [
        "--n_prompts",
        "70",
        "--n_responses",
        "4",
        "--n_test_prompts",
        "3",
        "--n_test_responses",
        "9",
        "--emb_dim",
        "40",
        "--seed",
        "5",
        "--layout",
        layout,
        "--dtype",
        dtype,
        "--gen_model",
        "gemma7b",
    ]
    synthetic.main(["--output_dir", str(repo), *sizes])
    before = file_states(repo)
    capsys.readouterr()
    synthetic.main(["--output_dir", str(repo), *sizes])
    assert "up to date" in capsys.readouterr().out and file_states(repo) == before

    out = convert("--embd_dir", repo, "--gen_model", "gemma7b", "--output_dir", tmp_path / "data")
    world = synthetic.SyntheticWorld(5, 40)
    for kind, shape in (("train", (70, 4)), ("test", (3, 9))):
        eset = rm_data.load_embedding_set(out, kind)
        assert eset.rewards.shape == shape and eset.embeddings[0].dtype == np.dtype(dtype)
        assert (np.diff(eset.rewards, axis=1) >= 0).all()
        for k in range(shape[1]):
            recomputed = (
                3.0 * np.tanh(eset.embeddings[k].astype(np.float32) @ world.hidden_weights) @ world.output_weights
            )
            np.testing.assert_allclose(eset.rewards[:, k], recomputed, rtol=1e-5, atol=1e-5)
