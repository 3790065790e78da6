"""GPU steps 1 -> 2 -> 3 -> 3.5 -> 4 on a CPU with tiny local models (tests/tiny_models.py).

The pipeline runs once per module, in-process through each script's ``main(argv)``; the tests then
check its outputs against independent computations: the data directory steps 5-8 read, rewards
against a direct forward of the reward model, embeddings against an unbatched forward at the last
token for left- and right-padding tokenizers, step 3.5's sorting and idempotence, and the one-line
exit-2 errors of bad inputs.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never wait on the network

REPO = Path(__file__).resolve().parents[1]
for folder in (REPO, REPO / "tests"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import torch  # noqa: E402
from tiny_models import build_tiny_setup  # noqa: E402
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

import step1_sft  # noqa: E402
import step2_gen_sample  # noqa: E402
import step3_reward_annotation  # noqa: E402
import step4_gen_embeddings  # noqa: E402
from cli import InputError, run_cli  # noqa: E402
from llm_models import GenerationRun  # noqa: E402
from rm_data import load_embedding_set  # noqa: E402

STEP35 = REPO / "step3.5_processing_data.py"
N_TRAIN_PROMPTS, N_TRAIN_SAMPLES = 8, 4
N_TEST_PROMPTS, N_TEST_SAMPLES = 6, 5
MAX_LEN = 12


def step35_main(argv):
    """step3.5 cannot be imported by name; load its namespace and call main."""
    return runpy.run_path(str(STEP35))["main"](argv)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a busy CI box OpenMP spinning costs 10x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_setup(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="module")
def pipeline(tiny, tmp_path_factory):
    """Run steps 1-4 once; return the flags shared by steps 2-4 and the folders written."""
    root = tmp_path_factory.mktemp("gpu_pipeline")
    out, data = root / "out", root / "data"
    gen = ["--model_name", str(tiny["policy-lm"]), "--dataset", "tiny-helpful", "--eval_dataset", "tiny-helpful",
           "--max_len", str(MAX_LEN), "--output_dir", str(out)]
    rm = ["--reward_model", str(tiny["golden-rm"])]
    step1_sft.main(["--model_name", str(tiny["policy-lm"]), "--dataset", "tiny-helpful",
                    "--train_file", str(tiny["train_prompts"]), "--max_steps", "2", "--output_dir", str(out)])
    step2_gen_sample.main(gen + ["--adapter_name", "sft", "--data_class", "train", "--n_samples",
                                 str(N_TRAIN_SAMPLES), "--split", "all", "--backend", "transformers",
                                 "--prompts_file", str(tiny["train_prompts"]),
                                 "--max_prompts", str(N_TRAIN_PROMPTS)])
    step2_gen_sample.main(gen + ["--adapter_name", "sft", "--data_class", "test", "--n_samples",
                                 str(N_TEST_SAMPLES), "--split", "all", "--backend", "transformers",
                                 "--prompts_file", str(tiny["test_prompts"])])
    for data_class in ("train", "test"):
        step3_reward_annotation.main(gen + rm + ["--data_class", data_class, "--split", "all"])
    step35_main(gen + rm)
    step4_gen_embeddings.main(gen + rm + ["--embed_model_name", str(tiny["embed-left"]), "--data_dir", str(data)])
    run = GenerationRun(out, str(tiny["policy-lm"]), "sft", "tiny-helpful", "tiny-helpful", MAX_LEN, 1.0)
    return {"gen": gen, "rm": rm, "run": run, "out": out, "data": data, "rm_path": tiny["golden-rm"]}


def read_lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def independent_text(query, response):
    """The scored text, recomputed here from the rule (cut at the first "\\n\\nHuman", strip)."""
    cut = response.split("\n\nHuman")[0].strip()
    return f"{query} {cut}" if cut else query


def test_pipeline_writes_a_sorted_data_directory(pipeline):
    train = load_embedding_set(pipeline["data"], "train")
    test = load_embedding_set(pipeline["data"], "test")
    assert (train.n_prompts, train.n_splits, train.dim) == (N_TRAIN_PROMPTS, N_TRAIN_SAMPLES, 32)
    assert (test.n_prompts, test.n_splits, test.dim) == (N_TEST_PROMPTS, N_TEST_SAMPLES, 32)
    for eset in (train, test):
        assert np.all(np.diff(eset.rewards, axis=1) >= 0), "splits must ascend in golden reward"
        assert eset.embeddings[0].dtype == np.float32
    # rewards in the data directory are step 3's, per prompt, as a sorted multiset
    run, rm = pipeline["run"], str(pipeline["rm_path"])
    scored = [r for k in range(5) for r in read_lines(run.scored_path("train", k, rm))]
    assert np.array_equal(train.rewards, np.sort([r["rewards"] for r in scored], axis=1))
    # the adapter step 2 used is the one step 1 wrote
    record = read_lines(run.samples_path("train", 0))[0]
    assert Path(record["settings"]["adapter_path"], "adapter_config.json").is_file()
    assert [f"response_{i}" in record for i in range(N_TRAIN_SAMPLES)] == [True] * N_TRAIN_SAMPLES
    summary = json.loads(run.summary_path("test", 0).read_text())
    assert summary["n_skipped_over_length"] == 0 and summary["n_samples"] == N_TEST_SAMPLES


def test_step2_rerun_overwrites_with_identical_samples(pipeline, tiny):
    path = pipeline["run"].samples_path("test", 4)
    before = path.read_bytes()
    step2_gen_sample.main(pipeline["gen"] + ["--adapter_name", "sft", "--data_class", "test", "--n_samples",
                                             str(N_TEST_SAMPLES), "--split", "4", "--backend", "transformers",
                                             "--prompts_file", str(tiny["test_prompts"])])
    assert path.read_bytes() == before  # same seed, same output; replaced, never appended


def test_step2_counts_over_length_prompts(pipeline, tiny, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny["policy-lm"])
    lengths = [len(tokenizer(r["prompt"]).input_ids) for r in read_lines(tiny["test_prompts"])]
    limit = sorted(lengths)[len(lengths) // 2]
    assert 0 < sum(n > limit for n in lengths) < len(lengths)
    out = tmp_path / "out"
    gen = ["--model_name", str(tiny["policy-lm"]), "--adapter_name", "none", "--dataset", "tiny-helpful",
           "--eval_dataset", "tiny-helpful", "--max_len", "4", "--output_dir", str(out)]
    step2_gen_sample.main(gen + ["--n_samples", "2", "--split", "all", "--n_parts", "1",
                                 "--max_prompt_len", str(limit), "--prompts_file", str(tiny["test_prompts"])])
    run = GenerationRun(out, str(tiny["policy-lm"]), "none", "tiny-helpful", "tiny-helpful", 4, 1.0)
    summary = json.loads(run.summary_path("train", 0).read_text())
    assert summary["n_skipped_over_length"] == sum(n > limit for n in lengths)
    assert summary["skipped_ids"] == [i for i, n in enumerate(lengths) if n > limit]
    assert summary["n_generated"] == sum(n <= limit for n in lengths) == len(read_lines(run.samples_path("train", 0)))


def test_step3_scores_every_response_for_n_over_10(pipeline, tiny, tmp_path):
    """Twelve responses, some running into a new human turn: every one scored on its cut text."""
    run = GenerationRun(tmp_path / "out", "policy", "none", "tiny-helpful", "tiny-helpful", 128, 1.0)
    queries = [r["prompt"] for r in read_lines(tiny["test_prompts"])][:2]
    records = []
    for p, query in enumerate(queries):
        responses = {f"response_{i}": (" Sure" + " step" * (i + p) + ("\n\nHuman: and then?" if i % 3 == 0 else "")
                                       + ("\n\nAssistant: more" if i % 5 == 0 else ""))
                     for i in range(12)}
        records.append({"query": query, "id": p, **responses, "settings": {}})
    run.folder.mkdir(parents=True)
    run.samples_path("train", 0).write_text("".join(json.dumps(r) + "\n" for r in records))
    argv = ["--model_name", "policy", "--adapter_name", "none", "--dataset", "tiny-helpful", "--eval_dataset",
            "tiny-helpful", "--output_dir", str(tmp_path / "out"), "--reward_model", str(tiny["golden-rm"]),
            "--n_samples", "12", "--batch_size", "5"]
    step3_reward_annotation.main(argv)
    scored = read_lines(run.scored_path("train", 0, str(tiny["golden-rm"])))

    model = AutoModelForSequenceClassification.from_pretrained(tiny["golden-rm"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny["golden-rm"])
    for record, result in zip(records, scored):
        assert len(result["rewards"]) == 12
        with torch.no_grad():
            direct = [model(**tokenizer(independent_text(record["query"], record[f"response_{i}"]),
                                        return_tensors="pt")).logits[0, 0].item() for i in range(12)]
        np.testing.assert_allclose(result["rewards"], direct, rtol=1e-4, atol=1e-4)
        assert len(set(np.round(direct, 4))) == 12  # distinct texts, so a rescored first ten would show
        assert all("\n\nHuman" not in r for r in result["responses"])


@pytest.mark.parametrize("embed_model", ["embed-left", "embed-right-padeos"])
def test_step4_embeds_the_last_real_token(pipeline, tiny, tmp_path, embed_model):
    data = tmp_path / "data"
    step4_gen_embeddings.main(pipeline["gen"] + pipeline["rm"] + [
        "--embed_model_name", str(tiny[embed_model]), "--data_dir", str(data), "--train_test", "train",
        "--batch_size", "8"])
    eset = load_embedding_set(data, "train")
    tokenizer = AutoTokenizer.from_pretrained(tiny[embed_model])
    assert tokenizer.padding_side == ("left" if embed_model == "embed-left" else "right")
    model = AutoModelForCausalLM.from_pretrained(tiny[embed_model]).eval()
    ranked = read_lines(pipeline["run"].ranked_path("train", str(pipeline["rm_path"])))
    lengths = set()
    for p, record in enumerate(ranked):
        for k, response in enumerate(record["responses_sorted"]):
            text = f"{record['query']} {response}" if response else record["query"]
            ids = tokenizer(text, return_tensors="pt")
            lengths.add(ids.input_ids.shape[1])
            with torch.no_grad():
                expected = model(**ids, output_hidden_states=True).hidden_states[-1][0, -1].numpy()
            np.testing.assert_allclose(eset.embeddings[k][p], expected, rtol=1e-4, atol=1e-4)
    assert len(lengths) > 1, "texts of one length would not exercise padding"
    np.testing.assert_array_equal(eset.rewards, [r["rewards_sorted"] for r in ranked])


def test_step35_sorts_and_a_rerun_is_byte_identical(pipeline):
    run, rm = pipeline["run"], str(pipeline["rm_path"])
    paths = [run.ranked_path(c, rm) for c in ("train", "test")]
    before = [p.read_bytes() for p in paths]
    step35_main(pipeline["gen"] + pipeline["rm"])
    assert [p.read_bytes() for p in paths] == before
    scored = [r for k in range(5) for r in read_lines(run.scored_path("train", k, rm))]
    ranked = read_lines(paths[0])
    assert len(ranked) == len(scored) == N_TRAIN_PROMPTS
    for source, result in zip(scored, ranked):
        assert result["rewards_sorted"] == sorted(source["rewards"])
        assert [source["responses"][i] for i in result["original_index"]] == result["responses_sorted"]


def exit_2_message(main, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli(main, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_bad_inputs_exit_2_with_one_line(pipeline, tiny, tmp_path, capsys):
    missing_model = tmp_path / "no_such_model"
    err = exit_2_message(step3_reward_annotation.main, pipeline["gen"] + ["--reward_model", str(missing_model),
                                                                         "--split", "all"], capsys)
    assert str(missing_model) in err
    err = exit_2_message(step1_sft.main, ["--model_name", str(tiny["policy-lm"]), "--train_file",
                                          str(tmp_path / "missing.jsonl"), "--output_dir", str(tmp_path)], capsys)
    assert "missing.jsonl" in err
    err = exit_2_message(step2_gen_sample.main, pipeline["gen"] + ["--adapter_name", str(tmp_path),
                                                                   "--prompts_file", str(tiny["test_prompts"])],
                         capsys)
    assert "no LoRA adapter" in err
    err = exit_2_message(step4_gen_embeddings.main, pipeline["gen"] + pipeline["rm"] + [
        "--output_dir", str(tmp_path / "empty"), "--embed_model_name", str(tiny["embed-left"]),
        "--data_dir", str(tmp_path / "data")], capsys)
    assert "train_ranked_" in err and not (tmp_path / "data").exists()
    # step 3.5 as a real command: its file name has a dot, so it only ever runs this way
    result = subprocess.run([sys.executable, str(STEP35), "--output_dir", str(tmp_path / "empty"),
                             "--reward_model", "rayharmless"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


def test_step1_reads_gpt4_demonstrations_and_hh_dialogues(tmp_path, monkeypatch):
    import csv

    from llm_models import split_hh_dialogue

    (tmp_path / "data").mkdir()
    with open(tmp_path / "data" / "synthetic_hhrlhf_harmless_expert_gpt4.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["query", "response"])
        writer.writeheader()
        writer.writerow({"query": "Answer as a careful assistant.\n\nHuman: Hi?\n\nAssistant: Hello.\n\n"
                                  "Human: Can you help?\n\nAssistant:", "response": "Of course.\n"})
    monkeypatch.setattr(step1_sft, "REPO_ROOT", tmp_path)
    pairs = step1_sft.load_sft_pairs(step1_sft.parse_args(["--dataset", "hh-rlhf-harmless-gpt4"]))
    assert pairs == [{"prompt": "\n\nHuman: Hi?\n\nAssistant: Hello.\n\nHuman: Can you help?\n\nAssistant:",
                      "completion": " Of course."}]
    with pytest.raises(InputError, match="synthetic_hhrlhf_helpful_expert_gpt4.csv"):
        step1_sft.load_sft_pairs(step1_sft.parse_args(["--dataset", "hh-rlhf-helpful-gpt4"]))
    dialogue = "\n\nHuman: A?\n\nAssistant: B.\n\nHuman: C?\n\nAssistant: D, then\n\nAssistant: E."
    assert split_hh_dialogue(dialogue) == (dialogue[:-3], " E.")
