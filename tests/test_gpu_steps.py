"""GPU steps 1 -> 2 -> 3 -> 3.5 -> 4 on a CPU with tiny local models (tests/tiny_models.py).

The pipeline runs once per module, in-process through each script's ``main(argv)``; the tests then
check its outputs against independent computations: the data directory steps 5-8 read, rewards
against a direct forward of the reward model, embeddings against an unbatched forward at the last
token for left- and right-padding tokenizers, step 3.5's sorting and idempotence, and the one-line
exit-2 errors of bad inputs.
"""

from __future__ import annotations

import io
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
from tiny_models import CODE_MARKER  # noqa: E402
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

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def step35_main(argv):
    """step3.5 cannot be imported by name; load its namespace and call main."""
    return runpy.run_path(str(STEP35))["main"](argv)


@pytest.fixture(scope="module")
def pipeline(tiny, tmp_path_factory):
    """Run steps 1-4 once; return the flags shared by steps 2-4 and the folders written."""
    root = tmp_path_factory.mktemp("gpu_pipeline")
    out, data = root / "out", root / "data"
    gen = [
        "--model_name",
        str(tiny["policy-lm"]),
        "--dataset",
        "tiny-helpful",
        "--eval_dataset",
        "tiny-helpful",
        "--max_len",
        str(MAX_LEN),
        "--output_dir",
        str(out),
    ]
    rm = ["--reward_model", str(tiny["golden-rm"])]
    step1_sft.main(
        [
            "--model_name",
            str(tiny["policy-lm"]),
            "--dataset",
            "tiny-helpful",
            "--train_file",
            str(tiny["train_prompts"]),
            "--max_steps",
            "2",
            "--output_dir",
            str(out),
        ]
    )
    step2_gen_sample.main(
        gen
        + [
            "--adapter_name",
            "sft",
            "--data_class",
            "train",
            "--n_samples",
            str(N_TRAIN_SAMPLES),
            "--split",
            "all",
            "--backend",
            "transformers",
            "--prompts_file",
            str(tiny["train_prompts"]),
            "--max_prompts",
            str(N_TRAIN_PROMPTS),
        ]
    )
    step2_gen_sample.main(
        gen
        + [
            "--adapter_name",
            "sft",
            "--data_class",
            "test",
            "--n_samples",
            str(N_TEST_SAMPLES),
            "--split",
            "all",
            "--backend",
            "transformers",
            "--prompts_file",
            str(tiny["test_prompts"]),
        ]
    )
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
    step2_gen_sample.main(
        pipeline["gen"]
        + [
            "--adapter_name",
            "sft",
            "--data_class",
            "test",
            "--n_samples",
            str(N_TEST_SAMPLES),
            "--split",
            "4",
            "--backend",
            "transformers",
            "--prompts_file",
            str(tiny["test_prompts"]),
        ]
    )
    assert path.read_bytes() == before  # same seed, same output; replaced, never appended


def test_step2_counts_over_length_prompts(pipeline, tiny, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny["policy-lm"])
    lengths = [len(tokenizer(r["prompt"]).input_ids) for r in read_lines(tiny["test_prompts"])]
    limit = sorted(lengths)[len(lengths) // 2]
    assert 0 < sum(n > limit for n in lengths) < len(lengths)
    out = tmp_path / "out"
    gen = [
        "--model_name",
        str(tiny["policy-lm"]),
        "--adapter_name",
        "none",
        "--dataset",
        "tiny-helpful",
        "--eval_dataset",
        "tiny-helpful",
        "--max_len",
        "4",
        "--output_dir",
        str(out),
    ]
    step2_gen_sample.main(
        gen
        + [
            "--n_samples",
            "2",
            "--split",
            "all",
            "--n_parts",
            "1",
            "--max_prompt_len",
            str(limit),
            "--prompts_file",
            str(tiny["test_prompts"]),
        ]
    )
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
        responses = {
            f"response_{i}": (
                " Sure"
                + " step" * (i + p)
                + ("\n\nHuman: and then?" if i % 3 == 0 else "")
                + ("\n\nAssistant: more" if i % 5 == 0 else "")
            )
            for i in range(12)
        }
        records.append({"query": query, "id": p, **responses, "settings": {}})
    run.folder.mkdir(parents=True)
    run.samples_path("train", 0).write_text("".join(json.dumps(r) + "\n" for r in records))
    argv = [
        "--model_name",
        "policy",
        "--adapter_name",
        "none",
        "--dataset",
        "tiny-helpful",
        "--eval_dataset",
        "tiny-helpful",
        "--output_dir",
        str(tmp_path / "out"),
        "--reward_model",
        str(tiny["golden-rm"]),
        "--n_samples",
        "12",
        "--batch_size",
        "5",
    ]
    step3_reward_annotation.main(argv)
    scored = read_lines(run.scored_path("train", 0, str(tiny["golden-rm"])))

    model = AutoModelForSequenceClassification.from_pretrained(tiny["golden-rm"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny["golden-rm"])
    for record, result in zip(records, scored):
        assert len(result["rewards"]) == 12
        with torch.no_grad():
            direct = [
                model(**tokenizer(independent_text(record["query"], record[f"response_{i}"]), return_tensors="pt"))
                .logits[0, 0]
                .item()
                for i in range(12)
            ]
        np.testing.assert_allclose(result["rewards"], direct, rtol=1e-4, atol=1e-4)
        assert len(set(np.round(direct, 4))) == 12  # distinct texts, so a rescored first ten would show
        assert all("\n\nHuman" not in r for r in result["responses"])


@pytest.mark.parametrize("embed_model", ["embed-left", "embed-right-padeos"])
def test_step4_embeds_the_last_real_token(pipeline, tiny, tmp_path, embed_model):
    data = tmp_path / "data"
    step4_gen_embeddings.main(
        pipeline["gen"]
        + pipeline["rm"]
        + [
            "--embed_model_name",
            str(tiny[embed_model]),
            "--data_dir",
            str(data),
            "--train_test",
            "train",
            "--batch_size",
            "8",
        ]
    )
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
    # the reusable function gives step 4's vectors for (prompt, response) texts
    from llm_models import embed_texts, load_embedding_model, load_tokenizer, scored_text

    texts = [scored_text(r["query"], r["responses_sorted"][1]) for r in ranked]
    vectors = embed_texts(
        load_embedding_model(str(tiny[embed_model]), "model", torch.device("cpu"), torch.float32),
        load_tokenizer(str(tiny[embed_model]), "model"),
        texts,
        batch_size=3,
    )
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, eset.embeddings[1], rtol=1e-5, atol=1e-5)


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
    capsys.readouterr()  # drop the output of earlier calls (progress bars)
    with pytest.raises(SystemExit) as exc:
        run_cli(main, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_bad_inputs_exit_2_with_one_line(pipeline, tiny, tmp_path, capsys):
    missing_model = tmp_path / "no_such_model"
    err = exit_2_message(
        step3_reward_annotation.main, pipeline["gen"] + ["--reward_model", str(missing_model), "--split", "all"], capsys
    )
    assert str(missing_model) in err
    err = exit_2_message(
        step1_sft.main,
        [
            "--model_name",
            str(tiny["policy-lm"]),
            "--train_file",
            str(tmp_path / "missing.jsonl"),
            "--output_dir",
            str(tmp_path),
        ],
        capsys,
    )
    assert "missing.jsonl" in err
    err = exit_2_message(
        step2_gen_sample.main,
        pipeline["gen"] + ["--adapter_name", str(tmp_path), "--prompts_file", str(tiny["test_prompts"])],
        capsys,
    )
    assert "no LoRA adapter" in err
    err = exit_2_message(
        step4_gen_embeddings.main,
        pipeline["gen"]
        + pipeline["rm"]
        + [
            "--output_dir",
            str(tmp_path / "empty"),
            "--embed_model_name",
            str(tiny["embed-left"]),
            "--data_dir",
            str(tmp_path / "data"),
        ],
        capsys,
    )
    assert "train_ranked_" in err and not (tmp_path / "data").exists()
    # step 3.5 as a real command: its file name has a dot, so it only ever runs this way
    result = subprocess.run(
        [sys.executable, str(STEP35), "--output_dir", str(tmp_path / "empty"), "--reward_model", "rayharmless"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


def test_step1_reads_gpt4_demonstrations_and_hh_dialogues(tmp_path, monkeypatch):
    import csv

    from llm_models import split_hh_dialogue

    (tmp_path / "data").mkdir()
    with open(tmp_path / "data" / "synthetic_hhrlhf_harmless_expert_gpt4.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["query", "response"])
        writer.writeheader()
        writer.writerow(
            {
                "query": "Answer as a careful assistant.\n\nHuman: Hi?\n\nAssistant: Hello.\n\n"
                "Human: Can you help?\n\nAssistant:",
                "response": "Of course.\n",
            }
        )
    monkeypatch.setattr(step1_sft, "REPO_ROOT", tmp_path)
    pairs = step1_sft.load_sft_pairs(step1_sft.parse_args(["--dataset", "hh-rlhf-harmless-gpt4"]))
    assert pairs == [
        {
            "prompt": "\n\nHuman: Hi?\n\nAssistant: Hello.\n\nHuman: Can you help?\n\nAssistant:",
            "completion": " Of course.",
        }
    ]
    with pytest.raises(InputError, match="synthetic_hhrlhf_helpful_expert_gpt4.csv"):
        step1_sft.load_sft_pairs(step1_sft.parse_args(["--dataset", "hh-rlhf-helpful-gpt4"]))
    dialogue = "\n\nHuman: A?\n\nAssistant: B.\n\nHuman: C?\n\nAssistant: D, then\n\nAssistant: E."
    assert split_hh_dialogue(dialogue) == (dialogue[:-3], " E.")


# --------------------------------------------------------------------------------------------
# Golden-RM input format
# --------------------------------------------------------------------------------------------
CHAT_TEMPLATE = "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"


def with_chat_template(source: Path, target: Path) -> Path:
    """A copy of a model folder whose tokenizer has ``CHAT_TEMPLATE``."""
    import shutil

    shutil.copytree(source, target)
    tokenizer = AutoTokenizer.from_pretrained(target)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(target)
    return target


def test_chat_template_tokens_of_a_two_turn_dialogue(tiny, tmp_path):
    from llm_models import rm_texts, tokenize_texts

    tokenizer = AutoTokenizer.from_pretrained(with_chat_template(tiny["golden-rm"], tmp_path / "rm"))
    query = "\n\nHuman: How do I bake bread?\n\nAssistant: Gather the tools.\n\nHuman: Then?\n\nAssistant:"
    texts = rm_texts(tokenizer, [query], ["Knead the dough."], "chat_template")
    (ids,), _ = tokenize_texts(tokenizer, texts, 512, add_special_tokens=False)

    def piece(text):
        return tokenizer(text, add_special_tokens=False).input_ids

    user, assistant, end = tokenizer.convert_tokens_to_ids(["<|user|>", "<|assistant|>", "<|end|>"])
    expected = (
        [tokenizer.bos_token_id, user]
        + piece("How do I bake bread?")
        + [end, assistant]
        + piece("Gather the tools.")
        + [end, user]
        + piece("Then?")
        + [end, assistant]
        + piece("Knead the dough.")
        + [end]
    )
    assert ids == expected
    assert ids.count(tokenizer.bos_token_id) == 1  # the template's bos, not a second one from the tokenizer
    (raw_ids,), _ = tokenize_texts(tokenizer, rm_texts(tokenizer, [query], ["Knead the dough."], "raw"), 512)
    assert raw_ids == piece(query + " Knead the dough.")


def test_step3_chat_template_scores_are_recorded_and_checked(pipeline, tiny, tmp_path, capsys):
    """Score with the chat template: rewards equal a direct forward of the rendered dialogue; steps 3.5
    and 4 refuse the scores when asked for the raw format, and accept them with chat_template."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(pipeline["out"], out)
    rm = with_chat_template(tiny["golden-rm"], tmp_path / "chat-rm")
    gen = [*pipeline["gen"][:-1], str(out)]
    argv = gen + ["--reward_model", str(rm), "--rm_input_format", "chat_template"]
    step3_reward_annotation.main(argv + ["--data_class", "train", "--split", "all"])
    run = GenerationRun(out, str(tiny["policy-lm"]), "sft", "tiny-helpful", "tiny-helpful", MAX_LEN, 1.0)
    scored = read_lines(run.scored_path("train", 0, str(rm)))
    assert all(r["rm_input_format"] == "chat_template" for r in scored)

    model = AutoModelForSequenceClassification.from_pretrained(rm).eval()
    tokenizer = AutoTokenizer.from_pretrained(rm)
    record = scored[0]
    turns = [{"role": "user", "content": record["query"].split("Human:")[1].split("\n\nAssistant:")[0].strip()}]
    for response, reward in zip(record["responses"], record["rewards"]):
        text = tokenizer.apply_chat_template(turns + [{"role": "assistant", "content": response}], tokenize=False)
        with torch.no_grad():
            direct = model(**tokenizer(text, add_special_tokens=False, return_tensors="pt")).logits[0, 0].item()
        assert reward == pytest.approx(direct, abs=1e-4)

    before = sorted(p.name for p in run.folder.iterdir())
    err = exit_2_message(step35_main, gen + ["--reward_model", str(rm), "--data_class", "train"], capsys)
    assert "scored with --rm_input_format chat_template" in err and "asks for raw" in err
    assert sorted(p.name for p in run.folder.iterdir()) == before
    step35_main(argv + ["--data_class", "train"])
    ranked = read_lines(run.ranked_path("train", str(rm)))
    assert {r["rm_input_format"] for r in ranked} == {"chat_template"}
    data = tmp_path / "data"
    err = exit_2_message(
        step4_gen_embeddings.main,
        gen
        + [
            "--reward_model",
            str(rm),
            "--train_test",
            "train",
            "--embed_model_name",
            str(tiny["embed-left"]),
            "--data_dir",
            str(data),
        ],
        capsys,
    )
    assert "asks for raw" in err and not data.exists()


# --------------------------------------------------------------------------------------------
# Sampling seeds: a prompt's samples do not depend on the other prompts
# --------------------------------------------------------------------------------------------
def sample_run(tiny, out, *extra):
    """Step 2 on the base policy over the test prompts; returns {prompt id: responses}."""
    argv = [
        "--model_name",
        str(tiny["policy-lm"]),
        "--adapter_name",
        "none",
        "--dataset",
        "tiny-helpful",
        "--eval_dataset",
        "tiny-helpful",
        "--max_len",
        "6",
        "--output_dir",
        str(out),
        "--n_samples",
        "3",
        "--batch_size",
        "2",
        "--backend",
        "transformers",
        "--prompts_file",
        str(tiny["test_prompts"]),
        "--seed",
        "5",
        *extra,
    ]
    step2_gen_sample.main(argv)
    run = GenerationRun(out, str(tiny["policy-lm"]), "none", "tiny-helpful", "tiny-helpful", 6, 1.0)
    records = [r for k in run.parts_present("train") for r in read_lines(run.samples_path("train", k))]
    return {r["id"]: [r[f"response_{i}"] for i in range(3)] for r in records}


def test_transformers_samples_of_a_prompt_do_not_depend_on_batching(tiny, tmp_path):
    together = sample_run(tiny, tmp_path / "all", "--split", "all", "--n_parts", "1")
    assert len(together) == 6
    alone_first = sample_run(tiny, tmp_path / "first", "--split", "all", "--n_parts", "1", "--max_prompts", "1")
    alone_fourth = sample_run(tiny, tmp_path / "fourth", "--split", "3", "--n_parts", "6")
    assert alone_first == {0: together[0]} and alone_fourth == {3: together[3]}
    assert len({text for texts in together.values() for text in texts}) > 6, "samples should differ"
    other_seed = sample_run(
        tiny, tmp_path / "seed6", "--split", "all", "--n_parts", "1", "--max_prompts", "1", "--seed", "6"
    )
    assert other_seed[0] != together[0]


class FakeVLLM:
    """Stands in for the vllm package (not installable without CUDA) and records what step 2 asks."""

    def __init__(self):
        self.engine_kwargs, self.generate_calls = None, []
        fake = self

        class LLM:
            def __init__(self, **kwargs):
                fake.engine_kwargs = kwargs

            def generate(self, prompts, sampling, lora_request=None):
                fake.generate_calls.append((list(prompts), list(sampling), lora_request))
                return [
                    type(
                        "Out",
                        (),
                        {"outputs": [type("C", (), {"text": f" r{params.seed}-{j}"})() for j in range(params.n)]},
                    )()
                    for params in sampling
                ]

        class SamplingParams:
            def __init__(self, **kwargs):
                self.__dict__.update(kwargs)

        class LoRARequest:
            def __init__(self, name, lora_id, path):
                self.name, self.lora_id, self.path = name, lora_id, path

        self.module = type(sys)("vllm")
        self.module.LLM, self.module.SamplingParams = LLM, SamplingParams
        self.lora_module = type(sys)("vllm.lora.request")
        self.lora_module.LoRARequest = LoRARequest


@pytest.fixture
def fake_vllm(monkeypatch):
    fake = FakeVLLM()
    monkeypatch.setitem(sys.modules, "vllm", fake.module)
    monkeypatch.setitem(sys.modules, "vllm.lora", type(sys)("vllm.lora"))
    monkeypatch.setitem(sys.modules, "vllm.lora.request", fake.lora_module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    return fake


def test_vllm_settings_per_prompt_seeds_tp_and_max_model_len(pipeline, tiny, tmp_path, fake_vllm, capsys):
    from llm_models import prompt_seed

    out = tmp_path / "out"
    argv = [
        "--model_name",
        str(tiny["policy-lm"]),
        "--adapter_name",
        "none",
        "--dataset",
        "tiny-helpful",
        "--eval_dataset",
        "tiny-helpful",
        "--max_len",
        "7",
        "--output_dir",
        str(out),
        "--n_samples",
        "2",
        "--backend",
        "vllm",
        "--prompts_file",
        str(tiny["test_prompts"]),
        "--split",
        "1",
        "--n_parts",
        "3",
        "--seed",
        "9",
        "--max_prompt_len",
        "40",
    ]
    step2_gen_sample.main(argv + ["--tensor_parallel_size", "2"])
    kwargs = fake_vllm.engine_kwargs
    assert kwargs["tensor_parallel_size"] == 2 and kwargs["max_model_len"] == 40 + 7
    assert kwargs["dtype"] == "bfloat16" and "enable_lora" not in kwargs
    prompts, sampling, lora = fake_vllm.generate_calls[0]
    assert len(prompts) == 2 and lora is None  # part 1 of 3 of six prompts: ids 2 and 3
    assert [p.seed for p in sampling] == [prompt_seed(9, 2), prompt_seed(9, 3)]
    assert {(p.n, p.max_tokens, p.top_p, p.temperature) for p in sampling} == {(2, 7, 0.95, 1.0)}
    run = GenerationRun(out, str(tiny["policy-lm"]), "none", "tiny-helpful", "tiny-helpful", 7, 1.0)
    record = read_lines(run.samples_path("train", 1))[1]
    assert record["id"] == 3 and record["response_1"] == f" r{prompt_seed(9, 3)}-1"
    summary = json.loads(run.summary_path("train", 1).read_text())
    assert summary["tensor_parallel_size"] == 2 and summary["dtype"] == "bfloat16"
    # the tiny model has 4 attention heads: 3 GPUs cannot split it, 8 are not visible
    bad = tmp_path / "bad"
    err = exit_2_message(
        step2_gen_sample.main, [*argv[:11], str(bad), *argv[12:], "--tensor_parallel_size", "3"], capsys
    )
    assert "--tensor_parallel_size 3 does not divide the 4 attention heads" in err and not bad.exists()
    err = exit_2_message(
        step2_gen_sample.main, [*argv[:11], str(bad), *argv[12:], "--tensor_parallel_size", "8"], capsys
    )
    assert "only 4 GPU(s) visible" in err and not bad.exists()


# --------------------------------------------------------------------------------------------
# float32 outputs whatever the compute dtype
# --------------------------------------------------------------------------------------------
def test_bf16_models_give_float32_rewards_and_embeddings(pipeline, tiny, tmp_path, capsys):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(pipeline["out"], out)
    gen = [*pipeline["gen"][:-1], str(out)]
    run = GenerationRun(out, str(tiny["policy-lm"]), "sft", "tiny-helpful", "tiny-helpful", MAX_LEN, 1.0)
    rm = str(pipeline["rm_path"])
    fp32 = np.array([r["rewards"] for k in range(5) for r in read_lines(run.scored_path("train", k, rm))])
    step3_reward_annotation.main(
        gen + pipeline["rm"] + ["--data_class", "train", "--split", "all", "--dtype", "bfloat16"]
    )
    scored = [r for k in range(5) for r in read_lines(run.scored_path("train", k, rm))]
    bf16 = np.array([r["rewards"] for r in scored])
    assert {r["rm_dtype"] for r in scored} == {"bfloat16"}
    assert np.array_equal(bf16.astype(np.float32), bf16)  # stored values are float32 numbers
    np.testing.assert_allclose(bf16, fp32, atol=0.05 * fp32.std())
    # the score head runs in float32: rewards are not rounded to bf16's ~3 significant digits
    as_bf16 = torch.tensor(bf16.ravel(), dtype=torch.float32).bfloat16().float().numpy()
    assert np.mean(as_bf16 != bf16.ravel()) > 0.9
    assert len(np.unique(bf16)) == len(np.unique(fp32)) == fp32.size

    capsys.readouterr()
    step35_main(gen + pipeline["rm"])
    assert (
        "train: 8 prompts x 4 responses from shards 0,1,2,3,4 (0 empty after the cut, 0 prompts with tied rewards)"
        in capsys.readouterr().out
    )
    data = tmp_path / "data"
    step4_gen_embeddings.main(
        gen
        + pipeline["rm"]
        + [
            "--embed_model_name",
            str(tiny["embed-left"]),
            "--data_dir",
            str(data),
            "--train_test",
            "train",
            "--dtype",
            "bfloat16",
        ]
    )
    info = json.loads((data / "embedding_info_train.json").read_text())
    assert info["compute_dtype"] == "bfloat16" and info["embedding_dtype"] == "float32"
    embedded = load_embedding_set(data, "train")
    assert embedded.embeddings[0].dtype == np.float32
    reference = load_embedding_set(pipeline["data"], "train")  # the fp32 model's embeddings of the same texts
    ranked = read_lines(run.ranked_path("train", rm))
    reference_ranked = read_lines(pipeline["run"].ranked_path("train", rm))
    for p, (record, reference_record) in enumerate(zip(ranked, reference_ranked)):
        for k, response in enumerate(record["responses_sorted"]):
            j = reference_record["responses_sorted"].index(response)  # bf16 rewards may order ties differently
            np.testing.assert_allclose(embedded.embeddings[k][p], reference.embeddings[j][p], rtol=0.05, atol=0.05)


# --------------------------------------------------------------------------------------------
# Bad inputs to the GPU steps: exit 2, one stderr line, no traceback, no partial artifact
# --------------------------------------------------------------------------------------------
def folder_state(folder: Path) -> dict:
    return (
        {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}
        if folder.exists()
        else {}
    )


def gen_flags(tiny, out, adapter="sft"):
    return [
        "--model_name",
        str(tiny["policy-lm"]),
        "--adapter_name",
        adapter,
        "--dataset",
        "tiny-helpful",
        "--eval_dataset",
        "tiny-helpful",
        "--max_len",
        str(MAX_LEN),
        "--output_dir",
        str(out),
    ]


def step2_flags(tiny, out):
    return gen_flags(tiny, out, "none") + ["--prompts_file", str(tiny["test_prompts"]), "--backend", "transformers"]


def no_config_folder(tmp_path):
    (tmp_path / "half_downloaded").mkdir()
    (tmp_path / "half_downloaded" / "tokenizer.json").write_text("{}")
    return str(tmp_path / "half_downloaded")


# (id, main, argv builder (tiny, out, tmp_path), fragments of the error line)
GPU_BAD_INPUTS = [
    (
        "relative-model-folder-missing",
        step2_gen_sample.main,
        lambda tiny, out, tmp: [*step2_flags(tiny, out)[:1], "models/policy", *step2_flags(tiny, out)[2:]],
        ["--model_name models/policy", "no such model folder"],
    ),
    (
        "dot-model-folder-missing",
        step2_gen_sample.main,
        lambda tiny, out, tmp: [*step2_flags(tiny, out)[:1], "./policy", *step2_flags(tiny, out)[2:]],
        ["--model_name ./policy", "no such model folder"],
    ),
    (
        "hub-id-not-cached-offline",
        step3_reward_annotation.main,
        lambda tiny, out, tmp: gen_flags(tiny, out) + ["--reward_model", "nobody-here/tiny-rm"],
        ["--reward_model nobody-here/tiny-rm", "not in the local cache (HF_HUB_OFFLINE=1)"],
    ),
    (
        "model-folder-without-config",
        step3_reward_annotation.main,
        lambda tiny, out, tmp: gen_flags(tiny, out) + ["--reward_model", no_config_folder(tmp)],
        ["half_downloaded", "holds no config.json"],
    ),
    (
        "causal-lm-as-reward-model",
        step3_reward_annotation.main,
        lambda tiny, out, tmp: gen_flags(tiny, out) + ["--reward_model", str(tiny["policy-lm"])],
        ["--reward_model", "causal language model (LlamaForCausalLM)", "not a sequence-classification"],
    ),
    (
        "several-labels-without-reward-label",
        step3_reward_annotation.main,
        lambda tiny, out, tmp: gen_flags(tiny, out) + ["--reward_model", str(tiny["sentiment-rm"])],
        ["sentiment-rm", "2 labels (0=NEGATIVE, 1=POSITIVE)", "--reward_label"],
    ),
    (
        "unknown-reward-label",
        step3_reward_annotation.main,
        lambda tiny, out, tmp: (
            gen_flags(tiny, out) + ["--reward_model", str(tiny["sentiment-rm"]), "--reward_label", "HAPPY"]
        ),
        ["--reward_label HAPPY", "0=NEGATIVE, 1=POSITIVE"],
    ),
    (
        "chat-template-missing",
        step3_reward_annotation.main,
        lambda tiny, out, tmp: (
            gen_flags(tiny, out) + ["--reward_model", str(tiny["golden-rm"]), "--rm_input_format", "chat_template"]
        ),
        ["--rm_input_format chat_template", "has no chat template"],
    ),
    (
        "bad-rm-input-format",
        step3_reward_annotation.main,
        lambda tiny, out, tmp: gen_flags(tiny, out) + ["--rm_input_format", "jinja"],
        ["--rm_input_format", "invalid choice: 'jinja'"],
    ),
    (
        "negative-seed",
        step2_gen_sample.main,
        lambda tiny, out, tmp: step2_flags(tiny, out) + ["--seed", "-1"],
        ["--seed", "expected a non-negative integer seed, got '-1'"],
    ),
    (
        "max-model-len-too-small",
        step2_gen_sample.main,
        lambda tiny, out, tmp: step2_flags(tiny, out) + ["--max_model_len", "100"],
        ["--max_model_len 100", "--max_prompt_len + --max_len (462)"],
    ),
    (
        "zero-tensor-parallel-size",
        step2_gen_sample.main,
        lambda tiny, out, tmp: step2_flags(tiny, out) + ["--tensor_parallel_size", "0"],
        ["--tensor_parallel_size", "expected a positive integer"],
    ),
    # a model folder that asks for its own code is refused by every loader, whatever stdin answers
    (
        "custom-code-policy-step1",
        step1_sft.main,
        lambda tiny, out, tmp: [
            "--model_name",
            str(tiny["code-model"]),
            "--train_file",
            str(tiny["train_prompts"]),
            "--output_dir",
            str(out),
        ],
        ["--model_name", "code-model: the tokenizer needs Python code from its own folder (auto_map); refused"],
    ),
    (
        "custom-code-policy-step2",
        step2_gen_sample.main,
        lambda tiny, out, tmp: [*step2_flags(tiny, out)[:1], str(tiny["code-model"]), *step2_flags(tiny, out)[2:]],
        ["--model_name", "code-model", "needs Python code from its own folder (auto_map); refused"],
    ),
    (
        "custom-code-reward-model-step3",
        step3_reward_annotation.main,
        lambda tiny, out, tmp: gen_flags(tiny, out) + ["--reward_model", str(tiny["code-model"])],
        ["--reward_model", "code-model: the model config needs Python code from its own folder"],
    ),
    (
        "custom-code-embedding-model-step4",
        step4_gen_embeddings.main,
        lambda tiny, out, tmp: (
            gen_flags(tiny, out)
            + ["--reward_model", str(tiny["golden-rm"]), "--embed_model_name", str(tiny["code-model"])]
            + ["--data_dir", str(tmp / "data")]
        ),
        ["--embed_model_name", "code-model", "needs Python code from its own folder (auto_map); refused"],
    ),
    (
        "bad-dtype",
        step4_gen_embeddings.main,
        lambda tiny, out, tmp: gen_flags(tiny, out) + ["--dtype", "float8"],
        ["--dtype", "invalid choice: 'float8'"],
    ),
]


@pytest.mark.parametrize(
    "main, make_argv, expected", [case[1:] for case in GPU_BAD_INPUTS], ids=[case[0] for case in GPU_BAD_INPUTS]
)
def test_gpu_bad_input(pipeline, tiny, tmp_path, monkeypatch, capsys, main, make_argv, expected):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(pipeline["out"], out)
    (tmp_path / "models").mkdir()  # "models/policy" names a folder under an existing local folder
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n" * 5))  # a yes to any question a loader might ask
    argv = make_argv(tiny, out, tmp_path)
    before = folder_state(tmp_path)
    err = exit_2_message(main, argv, capsys)
    for fragment in expected:
        assert fragment in err, err
    assert "Traceback" not in err
    assert folder_state(tmp_path) == before
    assert not (tiny["code-model"] / CODE_MARKER).exists()
    assert sys.stdin.read() == "y\n" * 5  # nothing asked


def test_step1_reports_a_missing_file_before_loading_trl(tiny, tmp_path):
    """One line and exit 2 without importing trl/peft (the slow part of step 1's start)."""
    probe = (
        "import sys, step1_sft\nfrom cli import run_cli\ntry:\n    run_cli(step1_sft.main, sys.argv[1:])\n"
        "except SystemExit as exit:\n    print(exit.code, 'trl' in sys.modules, 'peft' in sys.modules)\n"
    )
    for extra in (["--train_file", str(tmp_path / "missing.jsonl")], ["--dataset", "hh-rlhf-helpful-gpt4"]):
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                probe,
                "--model_name",
                str(tiny["policy-lm"]),
                "--output_dir",
                str(tmp_path / "out"),
                *extra,
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        assert result.stdout.split() == ["2", "False", "False"], result.stdout + result.stderr
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
        assert ("missing.jsonl" in result.stderr) or ("README" in result.stderr)
        assert not (tmp_path / "out").exists()


def test_reward_label_scores_the_log_odds_of_that_label(pipeline, tiny, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(pipeline["out"], out)
    rm = tiny["sentiment-rm"]
    step3_reward_annotation.main(
        gen_flags(tiny, out) + ["--reward_model", str(rm), "--reward_label", "POSITIVE", "--split", "0"]
    )
    run = GenerationRun(out, str(tiny["policy-lm"]), "sft", "tiny-helpful", "tiny-helpful", MAX_LEN, 1.0)
    record = read_lines(run.scored_path("train", 0, str(rm)))[0]
    assert record["reward_label"] == 1
    model = AutoModelForSequenceClassification.from_pretrained(rm).eval()
    tokenizer = AutoTokenizer.from_pretrained(rm)
    with torch.no_grad():
        for response, reward in zip(record["responses"], record["rewards"]):
            logits = model(**tokenizer(independent_text(record["query"], response), return_tensors="pt")).logits[0]
            assert reward == pytest.approx((logits[1] - logits[0]).item(), abs=1e-4)


def test_empty_responses_are_counted_by_every_step(tiny, tmp_path, capsys):
    """Responses that start a new human turn at once are empty after the cut: each step counts them."""
    out, data = tmp_path / "out", tmp_path / "data"
    run = GenerationRun(out, "policy", "none", "tiny-helpful", "tiny-helpful", 128, 1.0)
    queries = [r["prompt"] for r in read_lines(tiny["test_prompts"])][:3]
    records = [
        {
            "query": q,
            "id": p,
            "response_0": " Sure, one step.",
            "response_1": "\n\nHuman: hello?",
            "response_2": " " if p == 0 else " Ask a friend.",
            "settings": {"num_shards": 1, "shard_index": 0},
        }
        for p, q in enumerate(queries)
    ]
    run.folder.mkdir(parents=True)
    run.samples_path("train", 0).write_text("".join(json.dumps(r) + "\n" for r in records))
    run.summary_path("train", 0).write_text(json.dumps({"num_shards": 1, "shard_index": 0, "n_generated": 3}))
    flags = [
        "--model_name",
        "policy",
        "--adapter_name",
        "none",
        "--dataset",
        "tiny-helpful",
        "--eval_dataset",
        "tiny-helpful",
        "--output_dir",
        str(out),
        "--reward_model",
        str(tiny["golden-rm"]),
    ]
    step3_reward_annotation.main(flags)
    assert "; 4 empty after the cut;" in capsys.readouterr().out
    scored = read_lines(run.scored_path("train", 0, str(tiny["golden-rm"])))
    assert [r["n_empty_after_cut"] for r in scored] == [2, 1, 1]
    step35_main(flags)
    assert "(4 empty after the cut, 1 prompts with tied rewards)" in capsys.readouterr().out  # prompt 0's two
    step4_gen_embeddings.main(flags + ["--embed_model_name", str(tiny["embed-left"]), "--data_dir", str(data)])
    assert "4 responses empty after the cut" in capsys.readouterr().out
    assert json.loads((data / "embedding_info_train.json").read_text())["n_empty_after_cut"] == 4


def test_dialogue_messages_alternate_roles():
    from llm_models import dialogue_messages

    prompt = "Be kind.\n\nHuman: A?\n\nHuman: B?\n\nAssistant: C.\n\nHuman: D?\n\nAssistant:"
    assert dialogue_messages(prompt, " E ") == [
        {"role": "user", "content": "Be kind.\n\nA?\n\nB?"},
        {"role": "assistant", "content": "C."},
        {"role": "user", "content": "D?"},
        {"role": "assistant", "content": "E"},
    ]
    assert dialogue_messages("Human: Hi?\n\nAssistant:", "") == [
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": ""},
    ]
    assert dialogue_messages("Plain question?", "Answer.") == [
        {"role": "user", "content": "Plain question?"},
        {"role": "assistant", "content": "Answer."},
    ]


def test_a_hub_failure_names_the_missing_local_folder(tmp_path, monkeypatch):
    """An owner/name that is neither a local folder nor reachable on the hub: the error says both."""
    import transformers

    from llm_models import load_tokenizer

    def unreachable(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files\nmore detail")

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", unreachable)
    with pytest.raises(InputError) as err:
        load_tokenizer("tiny/policy-lm", "--model_name")
    message = str(err.value)
    assert message.startswith(
        "--model_name tiny/policy-lm: cannot load tokenizer (no local folder "
        f"{tmp_path / 'tiny' / 'policy-lm'}; tried it as a hub id): We couldn't connect"
    )
    assert "\n" not in message
