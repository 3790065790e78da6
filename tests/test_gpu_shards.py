"""Steps 2, 3 and 4 cut into shards on a CPU with tiny models: 1, 2 and 3 shards (by flags or by a
SLURM job array's variables) merge into files byte-identical to one unsharded run, and the merges
refuse a missing shard, a shard made with other settings and a shard killed mid-write (which a rerun
of that shard alone repairs). Step 1 trains data-parallel in two processes under torchrun."""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
for folder in (REPO, REPO / "tests"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from conftest import run_failing  # noqa: E402

import step2_gen_sample  # noqa: E402
import step3_reward_annotation  # noqa: E402
import step4_gen_embeddings  # noqa: E402
from llm_models import GenerationRun  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
N_TRAIN_PROMPTS, MAX_LEN = 7, 6


def step35_main(argv):
    return runpy.run_path(str(REPO / "step3.5_processing_data.py"))["main"](argv)


def flags(tiny, out: Path) -> dict[str, list[str]]:
    gen = ["--model_name", str(tiny["policy-lm"]), "--adapter_name", "none", "--dataset", "tiny-helpful"]
    gen += ["--eval_dataset", "tiny-helpful", "--max_len", str(MAX_LEN), "--output_dir", str(out)]
    sample = ["--backend", "transformers", "--batch_size", "2"]
    return {
        "gen": gen,
        "train": gen + sample + ["--data_class", "train", "--n_samples", "3"]
        + ["--prompts_file", str(tiny["train_prompts"]), "--max_prompts", str(N_TRAIN_PROMPTS)],
        "test": gen + sample + ["--data_class", "test", "--n_samples", "4"]
        + ["--prompts_file", str(tiny["test_prompts"]), "--max_prompts", "4"],
        "rm": gen + ["--reward_model", str(tiny["golden-rm"])],
        "embed": gen + ["--reward_model", str(tiny["golden-rm"]), "--embed_model_name", str(tiny["embed-left"])]
        + ["--batch_size", "3", "--data_dir", str(out.parent / "data")],
    }  # fmt: skip


def shard_flags(shard: int, n: int) -> list[str]:
    return ["--shard_index", str(shard), "--num_shards", str(n)]


def run_steps(tiny, root: Path, n: int | None, slurm: pytest.MonkeyPatch | None = None) -> Path:
    """Steps 2-4 into root/out and root/data: unsharded (n None), or n shards then the merges (each
    shard's index from a SLURM array 1..n when ``slurm`` is given)."""
    f = flags(tiny, root / "out")
    if n is None:
        for data_class in ("train", "test"):
            step2_gen_sample.main(f[data_class] + ["--shard_index", "all", "--num_shards", "1"])
            step3_reward_annotation.main(f["rm"] + ["--data_class", data_class, "--shard_index", "all"])
        step35_main(f["rm"])
        step4_gen_embeddings.main(f["embed"])
        return root

    def each_shard(main, argv: list[str]) -> None:
        for shard in range(n):
            if slurm is None:
                main(argv + shard_flags(shard, n))
                continue
            # sbatch --array=1-n: the index is TASK_ID - TASK_MIN, the count TASK_COUNT
            slurm.setenv("SLURM_ARRAY_TASK_ID", str(shard + 1))
            slurm.setenv("SLURM_ARRAY_TASK_MIN", "1")
            slurm.setenv("SLURM_ARRAY_TASK_MAX", str(n))
            slurm.setenv("SLURM_ARRAY_TASK_COUNT", str(n))
            main(argv)
            for name in (
                "SLURM_ARRAY_TASK_ID",
                "SLURM_ARRAY_TASK_MIN",
                "SLURM_ARRAY_TASK_MAX",
                "SLURM_ARRAY_TASK_COUNT",
            ):
                slurm.delenv(name)  # the merges are single jobs

    for data_class in ("train", "test"):
        each_shard(step2_gen_sample.main, f[data_class])
        each_shard(step3_reward_annotation.main, f["rm"] + ["--data_class", data_class])
    step35_main(f["rm"])
    each_shard(step4_gen_embeddings.main, f["embed"])
    step4_gen_embeddings.main(f["embed"] + ["--merge", "--num_shards", str(n)])
    return root


def merged_files(root: Path) -> dict[str, bytes]:
    """The merged outputs: step 3.5's ranked files and the data directory (the run's folder, which
    embedding_info_*.json names, written as ROOT)."""
    generations = next((root / "out" / "generations").iterdir())
    files = {p.name: p.read_bytes() for p in generations.glob("*_ranked_*.jsonl")}
    files.update({f"data/{p.name}": p.read_bytes() for p in (root / "data").iterdir()})
    return {name: data.replace(str(root).encode(), b"ROOT") for name, data in files.items()}


@pytest.fixture(scope="module")
def unsharded(tiny, tmp_path_factory):
    return merged_files(run_steps(tiny, tmp_path_factory.mktemp("unsharded"), None))


@pytest.fixture(scope="module")
def two_shards(tiny, tmp_path_factory):
    return run_steps(tiny, tmp_path_factory.mktemp("two_shards"), 2)


def test_one_two_three_shards_merge_to_the_unsharded_bytes(tiny, tmp_path, unsharded, two_shards):
    assert {"train_ranked_golden-rm.jsonl", "test_ranked_golden-rm.jsonl", "data/EMBD-TRAIN-split_2.npy"} <= set(
        unsharded
    )
    assert len([name for name in unsharded if name.startswith("data/EMBD-TEST-split_")]) == 4
    assert merged_files(two_shards) == unsharded
    for n in (1, 3):
        assert merged_files(run_steps(tiny, tmp_path / f"n{n}", n)) == unsharded, f"{n} shards"


def test_slurm_array_variables_pick_the_shard(tiny, tmp_path, unsharded, monkeypatch):
    root = run_steps(tiny, tmp_path, 3, slurm=monkeypatch)
    run = GenerationRun(root / "out", str(tiny["policy-lm"]), "none", "tiny-helpful", "tiny-helpful", MAX_LEN, 1.0)
    assert [json.loads(run.summary_path("train", k).read_text())["n_generated"] for k in range(3)] == [2, 2, 3]
    assert merged_files(root) == unsharded


def copy_run(two_shards: Path, tmp_path: Path) -> tuple[Path, GenerationRun, dict]:
    root = tmp_path / "copy"
    shutil.copytree(two_shards, root)
    shutil.rmtree(root / "data")
    for merged_or_step4 in (*(root / "out").rglob("*_ranked_*.jsonl"), *(root / "out").rglob("*_embd_*")):
        merged_or_step4.unlink()  # (step 4's shard records name the ranked file's folder)
    return root, GenerationRun(root / "out", "policy-lm", "none", "tiny-helpful", "tiny-helpful", MAX_LEN, 1.0)


def test_step35_refuses_a_missing_shard(tiny, tmp_path, two_shards, capsys):
    root, run = copy_run(two_shards, tmp_path)
    for path in run.folder.glob("train_part1.*"):
        path.unlink()
    err = run_failing(step35_main, flags(tiny, root / "out")["rm"], capsys)
    assert "train shard 1 of 2 is missing: no train_part1.jsonl" in err
    assert "--shard_index 1 --num_shards 2" in err
    assert not list(run.folder.glob("*_ranked_*"))


def test_step35_refuses_a_shard_made_with_other_settings(tiny, tmp_path, two_shards, capsys):
    root, run = copy_run(two_shards, tmp_path)
    f = flags(tiny, root / "out")
    step2_gen_sample.main(f["train"] + shard_flags(1, 2) + ["--seed", "7"])
    err = run_failing(step35_main, f["rm"], capsys)
    assert "train shard 1: train_part1.summary.json was made with other settings or inputs than shard 0" in err
    assert "seed 7 (shard 0: 6)" in err
    # every shard regenerated with seed 7, shard 0 scored again, shard 1's scores are stale
    step2_gen_sample.main(f["train"] + shard_flags(0, 2) + ["--seed", "7"])
    step3_reward_annotation.main(f["rm"] + ["--data_class", "train"] + shard_flags(0, 2))
    err = run_failing(step35_main, f["rm"], capsys)
    assert "train shard 1: train_part1.scored_golden-rm.jsonl does not score the prompts of train_part1.jsonl" in err
    assert not list(run.folder.glob("*_ranked_*"))


def test_shard_killed_mid_write_is_refused_then_resumed(tiny, tmp_path, two_shards, unsharded, capsys):
    root, run = copy_run(two_shards, tmp_path)
    f = flags(tiny, root / "out")
    # killed after the samples were renamed into place, before the summary: a temporary file is left
    run.summary_path("train", 1).unlink()
    leftover = run.folder / ".train_part1.summary.json.abc123.tmp"
    leftover.write_text("{")
    err = run_failing(step35_main, f["rm"], capsys)
    assert (
        "train shard 1: train_part1.jsonl has no summary train_part1.summary.json, so the shard did not finish" in err
    )
    step2_gen_sample.main(f["train"] + shard_flags(1, 2))  # that shard alone, again
    assert not leftover.exists()
    step3_reward_annotation.main(f["rm"] + ["--data_class", "train"] + shard_flags(1, 2))
    step35_main(f["rm"])
    # step 4: shard 1's embeddings written, its record not (killed between the two)
    step4_gen_embeddings.main(f["embed"] + shard_flags(0, 2))
    step4_gen_embeddings.main(f["embed"] + shard_flags(1, 2))
    record = next(run.folder.glob("train_embd_*.shard1of2.json"))
    record.unlink()
    err = run_failing(step4_gen_embeddings.main, f["embed"] + ["--merge", "--num_shards", "2"], capsys)
    assert "step 4 train shard 1 of 2 did not finish" in err and not (root / "data").exists()
    step4_gen_embeddings.main(f["embed"] + shard_flags(1, 2))
    step4_gen_embeddings.main(f["embed"] + ["--merge", "--num_shards", "2"])
    assert merged_files(root) == unsharded


def test_step4_merge_refuses_missing_and_mismatched_shards(tiny, tmp_path, two_shards, capsys):
    root, run = copy_run(two_shards, tmp_path)
    f = flags(tiny, root / "out")
    step35_main(f["rm"])
    merge = f["embed"] + ["--merge", "--num_shards", "2"]
    err = run_failing(step4_gen_embeddings.main, f["embed"] + ["--merge", "--num_shards", "3"], capsys)
    assert "step 4 train shard 0 of 3 is missing" in err
    step4_gen_embeddings.main(f["embed"] + shard_flags(0, 2))
    step4_gen_embeddings.main(f["embed"] + shard_flags(1, 2) + ["--max_length", "40"])
    err = run_failing(step4_gen_embeddings.main, merge, capsys)
    assert "step 4 train shard 1: train_embd_embed-left.shard1of2.json was made with other settings" in err
    assert "max_length 40 (this merge: 1024)" in err
    step4_gen_embeddings.main(f["embed"] + shard_flags(1, 2))  # made with other settings: embedded again
    npy = next(run.folder.glob("train_embd_*.shard1of2.npy"))
    made = npy.stat().st_mtime_ns
    capsys.readouterr()
    step4_gen_embeddings.main(f["embed"] + shard_flags(1, 2))  # finished with these settings: kept
    assert "train: shard 1 of 2 was embedded with these settings (kept)" in capsys.readouterr().out
    assert npy.stat().st_mtime_ns == made
    step3_reward_annotation.main(f["rm"] + ["--data_class", "train"] + shard_flags(0, 2) + ["--max_length", "64"])
    err = run_failing(step35_main, f["rm"], capsys)
    assert "train shard 1: train_part1.scored_golden-rm.jsonl was scored with other settings" in err
    assert "rm_max_length 1024 (shard 0: 64)" in err
    assert not (root / "data").exists()


def test_step4_shards_may_be_empty(tiny, tmp_path, two_shards, unsharded):
    """More shards than test prompts (4): shard 0 of 5 has none, and the merge still gives the same bytes."""
    root, _ = copy_run(two_shards, tmp_path)
    f = flags(tiny, root / "out")
    step35_main(f["rm"])
    for shard in range(5):
        step4_gen_embeddings.main(f["embed"] + shard_flags(shard, 5))
    step4_gen_embeddings.main(f["embed"] + ["--merge", "--num_shards", "5"])
    assert merged_files(root) == unsharded


def test_shard_flags_are_checked(tiny, tmp_path, capsys, monkeypatch):
    f = flags(tiny, tmp_path / "out")
    err = run_failing(step2_gen_sample.main, f["train"] + shard_flags(3, 3), capsys)
    assert "--shard_index 3: expected 0..2 (--num_shards 3)" in err
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    err = run_failing(step2_gen_sample.main, f["train"], capsys)
    assert "SLURM_ARRAY_TASK_ID 4: shard 4 is outside 0..3" in err
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_STEP", "2")  # --array=0-6:2
    err = run_failing(step2_gen_sample.main, f["train"], capsys)
    assert "the job array is not one range of consecutive ids" in err
    err = run_failing(step4_gen_embeddings.main, f["embed"] + ["--merge"], capsys)
    assert "--merge needs --num_shards" in err
    assert not (tmp_path / "out").exists()


def test_step1_trains_data_parallel_under_torchrun_and_alone_by_default(tiny, tmp_path):
    """Two processes on the CPU (gloo): one adapter, written once, from 2 x batch examples per step."""
    argv = ["step1_sft.py", "--model_name", str(tiny["policy-lm"]), "--dataset", "tiny-helpful"]
    argv += ["--train_file", str(tiny["train_prompts"]), "--max_steps", "2", "--batch_size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    runs = {}
    for name, launcher in (
        ("one", [sys.executable]),
        ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]),
    ):
        out = tmp_path / name
        proc = subprocess.run(
            [*launcher, *argv, "--output_dir", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("step1: LoRA adapter -> ") == 1, proc.stdout  # process 0 alone writes
        adapter = out / "ckpts_SFT" / "SFT_policy-lm_tiny-helpful"
        runs[name] = json.loads((adapter / "sft_run.json").read_text())
        assert (adapter / "adapter_model.safetensors").is_file()
        assert not [p.name for p in adapter.parent.iterdir() if p.name.startswith(".")]  # no staging left
    assert (runs["one"]["world_size"], runs["two"]["world_size"]) == (1, 2)
    assert runs["one"]["global_steps"] == runs["two"]["global_steps"] == 2
