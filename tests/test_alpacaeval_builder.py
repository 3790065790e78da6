"""benchmarks/make_alpacaeval_data.py on a stand-in alpaca_eval tree, and step 4's pooling options.

The tree has the real files' layout and record format (numeric-string preferences, exact 1 and 2,
ties) with four usable models and six kinds of unusable ones; the embedding model is the tiny causal
LM of tests/tiny_models.py. Values are checked against hand computations: the reward transform,
the sort, the sidecars' row order, the disjoint prompt sets, the recorded skips, step 4's embeddings,
and a masked mean over real tokens for ``--pooling mean`` (a tiny causal LM and a tiny BERT).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
for folder in (REPO, REPO / "tests", REPO / "benchmarks"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import make_alpacaeval_data as builder  # noqa: E402
import torch  # noqa: E402
from conftest import run_failing  # noqa: E402

from cli import InputError  # noqa: E402
from llm_models import (  # noqa: E402
    embed_texts,
    gguf_source,
    load_embedding_model,
    load_tokenizer,
    resolve_model,
    scored_text,
)
from rm_data import discover_splits, load_embedding_set  # noqa: E402

SCRIPT = REPO / "benchmarks" / "make_alpacaeval_data.py"
ANNOTATOR = "weighted_alpaca_eval_gpt4_turbo"
INSTRUCTIONS = [f"How do I {topic}?" for topic in ("bake bread", "fix a bike", "learn chess", "cook rice", "knit")]
INSTRUCTIONS.append("Name a boat.")
# preference per (model, instruction); strings as some of the real files store them; exact 1 and 2
# (certain verdicts, clipped by eps) and a tie between "alpha" and "delta" on instruction 0.
PREFERENCES = {
    "alpha": [1.5, "1.0", 1.25, 1.9, 1.1, 1.3],
    "bravo": [1.2, 1.7, "2.0", 1.05, 1.6, 1.45],
    "charlie": [1.9, 1.3, 1.4, 1.0, 1.35, 1.8],
    "delta": [1.5, 1.55, 1.05, 1.65, 1.2, "1.999"],
}
EPS = 0.01
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def answer(model: str, i: int) -> str:
    return f"{model} says: " + "step " * (i + len(model)) + "done."  # lengths differ by model and prompt


def records(model: str, prefs, instructions=INSTRUCTIONS, generator_1="reference_model") -> list[dict]:
    return [
        {
            "instruction": text,
            "output_1": "the reference answer",
            "generator_1": generator_1,
            "dataset": "helpful_base",
            "output_2": answer(model, i),
            "generator_2": model,
            "annotator": ANNOTATOR,
            "preference": pref,
            "price_per_example": "0.01",
        }
        for i, (text, pref) in enumerate(zip(instructions, prefs))
    ]


def write_model(root: Path, model: str, content) -> None:
    path = root / "results" / model / ANNOTATOR / "annotations.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())


def make_tree(root: Path) -> Path:
    for model, prefs in PREFERENCES.items():
        write_model(root, model, records(model, prefs))
    write_model(root, "incomplete", records("incomplete", [1.5] * 5, INSTRUCTIONS[:5]))
    write_model(root, "nulls", records("nulls", [1.5, None, 1.2, 1.3, 1.4, 1.5]))
    write_model(root, "lfs", b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 3\n")
    write_model(root, "reference_model", records("reference_model", [1.5] * 6))
    write_model(root, "NullModel", records("NullModel", [2.0] * 6))
    (root / "results" / "absent" / ANNOTATOR).mkdir(parents=True)
    return root


def logit_clip(pref) -> float:
    p = min(max(float(pref) - 1.0, EPS), 1.0 - EPS)
    return math.log(p / (1.0 - p))


def read_values(path: Path, key: str) -> list:
    return [json.loads(line)[key] for line in path.read_text().splitlines()]


def build_argv(tiny, tmp: Path, data: Path, *extra: str) -> list[str]:
    return [
        "--alpaca_eval_dir",
        str(tmp / "alpaca_eval"),
        "--embed_model_name",
        str(tiny["embed-left"]),
        "--cache_dir",
        str(tmp / "cache"),
        "--data_dir",
        str(data),
        "--n_train_models",
        "3",
        "--n_test_prompts",
        "2",
        "--max_length",
        "12",
        "--batch_size",
        "4",
        "--threads",
        "1",
        "--eps",
        str(EPS),
        *extra,
    ]


@pytest.fixture(scope="module")
def built(tiny, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("alpacaeval")
    make_tree(tmp / "alpaca_eval")
    data = tmp / "data"
    builder.main(build_argv(tiny, tmp, data))
    return {"tmp": tmp, "data": data, "info": json.loads((data / "benchmark_info.json").read_text())}


def test_skipped_models_are_reported_with_their_reasons(built):
    models = built["info"]["models"]
    assert models["usable"] == sorted(PREFERENCES)
    skipped = models["skipped"]
    assert set(skipped) == {"absent", "incomplete", "nulls", "lfs", "reference_model", "NullModel"}
    assert skipped["incomplete"] == "answers 5 of 6 instructions"
    assert skipped["nulls"].startswith("1 of 6 preferences null")
    assert "LFS" in skipped["lfs"] and "itself" in skipped["reference_model"]
    assert skipped["NullModel"] == "excluded by --exclude_models" and skipped["absent"] == "no annotations.json"


def test_one_odd_model_is_skipped_not_all(tmp_path):
    """The instruction set is the one most models share: a model whose instruction text differs by a
    trailing space is skipped with that reason, and the others stay usable."""
    root = make_tree(tmp_path / "alpaca_eval")
    odd = [*INSTRUCTIONS[:2], INSTRUCTIONS[2] + " ", *INSTRUCTIONS[3:]]
    write_model(root, "odd", records("odd", [1.5] * 6, odd))
    models, instructions, skipped = builder.load_models(root, ANNOTATOR, {"NullModel"})
    assert [model.name for model in models] == sorted(PREFERENCES) and instructions == INSTRUCTIONS
    assert skipped["odd"] == (
        "1 of its instructions are not in the set that 4 models share (first: 'How do I learn chess? '; "
        "it misses 1 of theirs)"
    )
    assert skipped["incomplete"] == "answers 5 of 6 instructions"


def test_train_models_spread_over_the_win_rate_range(built):
    models = built["info"]["models"]
    win = {m: np.mean([float(p) - 1 for p in prefs]) for m, prefs in PREFERENCES.items()}
    assert models["win_rate"] == pytest.approx(win)
    ranked = sorted(win, key=win.get)
    assert models["train"] == [ranked[0], ranked[2], ranked[3]]  # ranks round(linspace(0, 3, 3))
    assert models["test"] == sorted(PREFERENCES)


def test_prompts_are_disjoint_and_cover_the_instructions(built):
    prompts = built["info"]["prompts"]
    assert len(prompts["test"]) == 2 and len(prompts["train"]) == 4
    assert not set(prompts["train"]) & set(prompts["test"])
    assert sorted(prompts["train"] + prompts["test"]) == sorted(INSTRUCTIONS)
    assert [INSTRUCTIONS[i] for i in prompts["train_index"]] == prompts["train"]


@pytest.mark.parametrize("kind", ["train", "test"])
def test_rewards_sorted_with_matching_models_and_lengths(built, kind):
    data, info = built["data"], built["info"]
    suffix = "" if kind == "train" else "test_"
    n_splits = 3 if kind == "train" else 4
    assert discover_splits(data, kind) == list(range(n_splits))
    eset = load_embedding_set(data, kind)
    models = np.array([read_values(data / f"models_{suffix}split_{k}.json", "model") for k in range(n_splits)]).T
    lengths = np.array([read_values(data / f"lengths_{suffix}split_{k}.json", "length") for k in range(n_splits)]).T
    for p, prompt in enumerate(info["prompts"][kind]):
        i = INSTRUCTIONS.index(prompt)
        expected = [logit_clip(PREFERENCES[m][i]) for m in models[p]]
        np.testing.assert_allclose(eset.rewards[p], expected, rtol=0, atol=1e-12)  # the transform, by hand
        assert list(eset.rewards[p]) == sorted(eset.rewards[p])  # split 0 lowest
        assert list(lengths[p]) == [len(answer(m, i)) for m in models[p]]
        pool = info["models"]["train" if kind == "train" else "test"]
        assert sorted(models[p]) == sorted(pool)
    assert np.abs(eset.rewards).max() <= math.log(99) + 1e-12  # eps bounds the odds at 99:1


def test_ties_keep_alphabetical_model_order():
    models = [builder.ModelAnswers(m, {"q": "a"}, {"q": 1.5}, ["q"]) for m in ("alpha", "bravo", "charlie")]
    models[1].preferences["q"] = 1.2
    result = builder.response_set(models, ["q"], EPS)
    assert result.models.tolist() == [["bravo", "alpha", "charlie"]]
    assert result.rewards[0].tolist() == [logit_clip(1.2), 0.0, 0.0]


def test_embeddings_are_step4_last_token_vectors_of_the_texts(built, tiny):
    data, info = built["data"], built["info"]
    eset = load_embedding_set(data, "train")
    models = np.array([read_values(data / f"models_split_{k}.json", "model") for k in range(3)]).T
    texts, rows = [], []
    for p, prompt in enumerate(info["prompts"]["train"]):
        i = INSTRUCTIONS.index(prompt)
        for k, model in enumerate(models[p]):
            texts.append(scored_text(f"\n\nHuman: {prompt}\n\nAssistant:", answer(model, i).strip()))
            rows.append((k, p))
    model = load_embedding_model(str(tiny["embed-left"]), "m", torch.device("cpu"), torch.float32)
    vectors = embed_texts(model, load_tokenizer(str(tiny["embed-left"]), "m"), texts, max_length=12, progress=False)
    for vector, (k, p) in zip(vectors, rows):
        np.testing.assert_allclose(eset.embeddings[k][p], vector, rtol=1e-5, atol=1e-5)
    record = json.loads((data / "embedding_info_train.json").read_text())
    assert record["pooling"] == "last" and record["max_length"] == 12 and record["n_cut_at_max_length"] > 0
    assert info["counts"]["train"]["texts_cut_at_max_length"] == record["n_cut_at_max_length"]


def test_rerun_uses_the_cache_and_is_byte_identical(built, tiny, monkeypatch):
    data, tmp = built["data"], built["tmp"]
    before = {p.name: p.read_bytes() for p in sorted(data.iterdir())}

    def no_embedding(argv):
        raise AssertionError("step 4 ran although its embeddings are cached")

    import step4_gen_embeddings

    monkeypatch.setattr(step4_gen_embeddings, "main", no_embedding)
    builder.main(build_argv(tiny, tmp, data))
    assert {p.name: p.read_bytes() for p in sorted(data.iterdir())} == before


def test_bad_inputs_exit_2_and_write_nothing(built, tiny, tmp_path, capsys):
    tmp = built["tmp"]
    out = tmp_path / "never"
    argv = build_argv(tiny, tmp, out)
    missing = [*argv[:1], str(tmp_path / "nowhere"), *argv[2:]]
    assert "--alpaca_eval_dir" in run_failing(builder.main, missing, capsys)
    err = run_failing(builder.main, [*argv, "--n_train_models", "5"], capsys)
    assert "--n_train_models 5: only 4 usable models" in err
    err = run_failing(builder.main, [*argv, "--n_test_prompts", "6"], capsys)
    assert "--n_test_prompts 6" in err
    assert not out.exists()
    # the script itself, as a user runs it
    result = subprocess.run([sys.executable, str(SCRIPT), *missing], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--alpaca_eval_dir" in result.stderr
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# step 4's --pooling and model names
# --------------------------------------------------------------------------------------------
def masked_means(model, tokenizer, texts):
    """Each text alone (no padding): the mean of its final hidden states over its tokens."""
    out = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            out.append(model(**ids).last_hidden_state[0].mean(dim=0).numpy())
    return np.array(out)


TEXTS = [
    "\n\nHuman: How do I bake bread?\n\nAssistant: Sure.",
    "Hi",
    "\n\nHuman: Thanks!\n\nAssistant: You are welcome.",
]


@pytest.mark.parametrize("name", ["embed-left", "embed-right-padeos"])
def test_mean_pooling_of_a_causal_lm_is_the_masked_mean(tiny, name):
    tokenizer = load_tokenizer(str(tiny[name]), "m")
    model = load_embedding_model(str(tiny[name]), "m", torch.device("cpu"), torch.float32)
    vectors = embed_texts(model, tokenizer, TEXTS, batch_size=3, pooling="mean", progress=False)
    np.testing.assert_allclose(vectors, masked_means(model, tokenizer, TEXTS), rtol=1e-5, atol=1e-5)
    last = embed_texts(model, tokenizer, TEXTS, batch_size=3, progress=False)
    assert not np.allclose(vectors, last)


def test_mean_pooling_of_a_bert_encoder(tiny, tmp_path):
    from tiny_models import build_tokenizer
    from transformers import BertConfig, BertModel

    tokenizer = build_tokenizer(padding_side="right")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    BertModel(config).save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    model = load_embedding_model(str(tmp_path / "bert"), "m", torch.device("cpu"), torch.float32)
    assert type(model).__name__ == "BertModel"
    tokenizer = load_tokenizer(str(tmp_path / "bert"), "m")
    vectors = embed_texts(model, tokenizer, TEXTS, batch_size=3, pooling="mean", progress=False)
    np.testing.assert_allclose(vectors, masked_means(model, tokenizer, TEXTS), rtol=1e-5, atol=1e-5)


def test_a_gguf_file_is_a_model_name(tmp_path):
    path = tmp_path / "model.Q4_1.gguf"
    with pytest.raises(InputError, match="no such .gguf file"):
        resolve_model(str(path), "--embed_model_name")
    path.write_bytes(b"GGUF")
    assert resolve_model(str(path), "--embed_model_name") == str(path)
    assert gguf_source(str(path)) == (str(tmp_path), {"gguf_file": "model.Q4_1.gguf"})
    assert gguf_source(str(tmp_path)) == (str(tmp_path), {})


def test_an_interrupted_build_resumes_from_its_finished_parts(built, tiny, tmp_path, monkeypatch, capsys):
    """Killed after its first part, a rerun embeds only the parts left: the same bytes as one run."""
    import step4_gen_embeddings

    make_tree(tmp_path / "alpaca_eval")
    data, real_main, calls = tmp_path / "data", step4_gen_embeddings.main, []

    def killed_after_one_part(argv):
        calls.append(argv)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_main(argv)

    monkeypatch.setattr(step4_gen_embeddings, "main", killed_after_one_part)
    with pytest.raises(KeyboardInterrupt):
        builder.main(build_argv(tiny, tmp_path, data, "--parts", "3"))
    assert not any(data.iterdir())  # checked writable at the start, written only at the end
    monkeypatch.setattr(step4_gen_embeddings, "main", real_main)
    capsys.readouterr()
    builder.main(build_argv(tiny, tmp_path, data, "--parts", "3"))
    assert capsys.readouterr().out.count("was embedded with these settings (kept)") == 2  # part 0: train, test
    arrays = sorted(p.name for p in data.glob("EMBD-*.npy"))
    assert arrays and all((data / n).read_bytes() == (built["data"] / n).read_bytes() for n in arrays)
