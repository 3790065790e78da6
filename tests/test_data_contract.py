"""The data-directory contract: numeric split order, validation errors, no partial artifacts."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, run_failing

import rm_data
import run_folder
import step5_train_rms as step5
import step6_eval_rms as step6
from cli import finite_number

STEP5_ARGS = ["--n_sample", "100", "--ensemble_number", "1", "--training_epochs", "1"]


def step5_error(data_dir, tmp_path, capsys) -> str:
    out = tmp_path / "out"
    err = run_failing(step5.main, ["--data_dir", str(data_dir), "--output_dir", str(out), *STEP5_ARGS], capsys)
    assert not out.exists() or not any(out.iterdir()), "a failed run left artifacts"
    return err


def test_splits_sort_numerically(tmp_path):
    for k in range(12):
        np.save(tmp_path / f"EMBD-TRAIN-split_{k}.npy", np.full((3, 2), k, dtype=np.float32))
        rm_data.write_rewards_jsonl(tmp_path / f"rewards_split_{k}.json", np.arange(3) + k)
    data = rm_data.load_embedding_set(tmp_path)
    assert [p.name for p in data.embedding_paths][9:] == [f"EMBD-TRAIN-split_{k}.npy" for k in (9, 10, 11)]
    assert data.rewards[0].tolist() == list(range(12))
    assert data.read_rows(10, np.array([2, 0]))[:, 0].tolist() == [10.0, 10.0]


def test_missing_split_file(demo_copy, tmp_path, capsys):
    (demo_copy / "rewards_split_4.json").unlink()
    err = step5_error(demo_copy, tmp_path, capsys)
    assert f"missing split file {demo_copy / 'rewards_split_4.json'}" in err


def test_gap_in_splits(demo_copy, tmp_path, capsys):
    for name in ("EMBD-TRAIN-split_3.npy", "rewards_split_3.json"):
        (demo_copy / name).unlink()
    err = step5_error(demo_copy, tmp_path, capsys)
    assert "gap in splits" in err and "EMBD-TRAIN-split_3.npy" in err


def test_n_mismatch_between_splits(demo_copy, tmp_path, capsys):
    np.save(demo_copy / "EMBD-TRAIN-split_2.npy", np.zeros((259, 48), dtype=np.float32))
    err = step5_error(demo_copy, tmp_path, capsys)
    assert "EMBD-TRAIN-split_2.npy: shape (259, 48) differs" in err


def test_non_finite_embedding(demo_copy, tmp_path, capsys):
    emb = np.load(demo_copy / "EMBD-TRAIN-split_3.npy")
    emb[:, 5] = np.nan
    np.save(demo_copy / "EMBD-TRAIN-split_3.npy", emb)
    assert "EMBD-TRAIN-split_3.npy: non-finite embedding in row" in step5_error(demo_copy, tmp_path, capsys)


@pytest.mark.parametrize("value", [3e38, -2e6])
def test_a_huge_finite_embedding_is_refused_naming_file_row_and_column(demo_copy, tmp_path, capsys, value):
    path = demo_copy / "EMBD-TRAIN-split_3.npy"
    emb = np.load(path)
    emb[:, 5] = value  # one column of every row, as a mis-scaled dimension would be
    np.save(path, emb)
    err = step5_error(demo_copy, tmp_path, capsys)
    assert re.fullmatch(
        rf"error: {re.escape(str(path))}: embedding value {re.escape(f'{value:.3g}')} \(column 5, beyond "
        r"\+-1e\+06: a corrupt or mis-scaled file\) in row \d+",
        err,
    ), err
    emb[:, 5] = 1e6  # the bound itself is accepted
    np.save(path, emb)
    assert (rm_data.load_embedding_set(demo_copy).read_rows(3, np.arange(260))[:, 5] == 1e6).all()


def test_an_empty_chunk_of_rows_has_no_embedding_problem():
    for dtype in (np.float32, np.float16):
        assert rm_data.embedding_problem(np.empty((0, 4), dtype)) is None
    assert rm_data.embedding_problem(np.array([[1.0, np.nan]], np.float16)) == (0, "non-finite embedding")


def test_finite_number_is_a_json_number_a_float_holds():
    accepted = [0, -3, 1.5, 1e308, 10**308]
    refused = [True, False, None, "1", float("nan"), float("inf"), -float("inf"), 10**400, [1.0]]
    assert [finite_number(v) for v in accepted + refused] == [True] * len(accepted) + [False] * len(refused)


@pytest.mark.parametrize(
    "line,expected",
    [
        ('{"score": 1.0}', 'expected an object with key "reward"'),
        ('{"reward": "high"}', "reward must be a finite number, got 'high'"),
        ('{"reward": NaN}', "reward must be a finite number"),
        ('{"reward": true}', "reward must be a finite number, got True"),
        ('{"reward": 1%s}' % ("0" * 400), "reward must be a finite number"),  # beyond float range
        ("not json", "not valid JSON"),
    ],
)
def test_bad_reward_lines(demo_copy, tmp_path, capsys, line, expected):
    path = demo_copy / "rewards_split_0.json"
    lines = path.read_text().splitlines()
    lines[7] = line
    path.write_text("\n".join(lines) + "\n")
    err = step5_error(demo_copy, tmp_path, capsys)
    assert "rewards_split_0.json line 8" in err and expected in err


@pytest.mark.parametrize(
    "lines",
    [
        ['{"reward": 1}', '{"reward": -2.5e-3, "prompt": "a, b}"}', '{"reward": 3, "meta": {"k": [1, 2]}}'],
        ['{"reward": 1, "meta": {"k": 1}, "n": 2}', '{"reward": 0.1}'],  # "}," inside a line: line by line
    ],
)
def test_rewards_read_in_one_parse_equal_those_read_line_by_line(tmp_path, lines):
    path = tmp_path / "rewards_split_0.json"
    path.write_text("\n".join(lines) + "\n")
    rewards = rm_data.read_rewards_jsonl(path)
    assert rewards.dtype == np.float64
    np.testing.assert_array_equal(rewards, [json.loads(line)["reward"] for line in lines])


@pytest.mark.parametrize("tail", ["", "\n", "\n\n", "\n \n\t\n", "\r\n\r\n"])
def test_trailing_blank_lines_are_accepted_however_many(tmp_path, tail):
    path = tmp_path / "rewards_split_0.json"
    path.write_text('{"reward": 1}\n{"reward": 2}\n' + tail)
    np.testing.assert_array_equal(rm_data.read_rewards_jsonl(path), [1.0, 2.0])


def test_a_byte_that_is_not_utf8_is_one_line_naming_file_and_line(demo_copy, tmp_path, capsys):
    path = demo_copy / "rewards_split_2.json"
    data = path.read_bytes().split(b"\n")
    data[4] = data[4].replace(b"reward", b"rew\xffard")
    path.write_bytes(b"\n".join(data))
    offset = sum(len(line) + 1 for line in data[:4]) + len(b'{"rew')
    assert step5_error(demo_copy, tmp_path, capsys) == (
        f"error: rewards file {path} line 5: not UTF-8 text (byte 0xff at offset {offset})"
    )


def test_an_object_split_across_lines_is_refused_though_the_lines_join_into_valid_json(tmp_path):
    # Joined with commas these two lines parse as two objects, as many as there are lines.
    path = tmp_path / "rewards_split_0.json"
    path.write_text('{"reward": 1, "x": [1\n2]}, {"reward": 2}\n')
    with pytest.raises(rm_data.InputError, match="rewards_split_0.json line 1: not valid JSON"):
        rm_data.read_rewards_jsonl(path)


def test_empty_and_missing_directory(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"no EMBD-TRAIN-split_*.npy files in {empty}" in step5_error(empty, tmp_path, capsys)
    assert "does not exist" in step5_error(tmp_path / "nope", tmp_path, capsys)


def test_step6_on_data_with_other_embedding_size(trained_run, tmp_path, capsys):
    other = tmp_path / "wide"
    from generate_demo_data import main as generate

    generate(["--output_dir", str(other), "--n_prompts", "260", "--emb_dim", "16"])
    err = run_failing(step6.main, ["--output_dir", str(trained_run), "--data_dir", str(other)], capsys)
    assert "checkpoint expects embeddings of size D=48, data has D=16" in err


def test_step6_refuses_data_the_partition_was_not_made_for(trained_run, demo_copy, tmp_path, capsys):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(trained_run, out)
    lowest = rm_data.read_rewards_jsonl(demo_copy / "rewards_split_0.json")
    rm_data.write_rewards_jsonl(demo_copy / "rewards_split_0.json", lowest - 1.0)  # other data, still sorted
    err = run_failing(step6.main, ["--output_dir", str(out), "--data_dir", str(demo_copy)], capsys)
    assert "prompt_split.json was written for other data" in err
    assert not list(out.glob("eval_results*"))


def test_step6_without_manifest(tmp_path, capsys):
    assert "ORM manifest (run step5_train_rms.py first) not found" in run_failing(
        step6.main, ["--output_dir", str(tmp_path)], capsys
    )


def test_corrupt_checkpoint(trained_run, tmp_path, capsys):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(trained_run, out)
    manifest = json.loads((out / run_folder.MANIFEST_FILE).read_text())
    (out / manifest["checkpoints"][0]).write_bytes(b"PK\x03\x04 not a zip")
    err = run_failing(step6.main, ["--output_dir", str(out)], capsys)
    assert "not a readable weights-only PyTorch checkpoint" in err


def test_cli_script_exit_status_and_single_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "step5_train_rms.py"), "--data_dir", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: data directory {tmp_path / 'missing'} does not exist"]
