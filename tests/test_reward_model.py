"""The trained reward model in use (reward_model.py, score_responses.py, the TRL adapter).

Two finished runs are built once per module: a tiny demo ``run_all.sh`` run (D=32, synthetic
embeddings), and a run on step 4's embeddings of real texts made with the tiny local models
(tests/tiny_models.py: a hand-written step 3.5 file -> step 4 -> steps 5 and 7). The tests check the
module's scores against step 8's own predictions and against step 4's embeddings, exactly; the
CLI's best-of-N against a brute-force argmax; a TRL reward call; and one-line exit-2 errors.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local

REPO = Path(__file__).resolve().parents[1]
for folder in (REPO, REPO / "tests"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import torch  # noqa: E402
from conftest import SMALL_RUN_ALL, run_failing  # noqa: E402
from tiny_models import ANSWERS, TOPICS, hh_prompt  # noqa: E402

import score_responses  # noqa: E402
import step4_gen_embeddings  # noqa: E402
import step5_train_rms  # noqa: E402
import step7_isotonic_distillation as step7  # noqa: E402
import step8_validate_distillation as step8  # noqa: E402
from calibration import load_isotonic_map  # noqa: E402
from cli import InputError  # noqa: E402
from llm_models import GenerationRun  # noqa: E402
from metrics import calibration_errors  # noqa: E402
from networks import StackedEnsemble, load_checkpoint  # noqa: E402
from reward_model import RewardModel, hh_rlhf_prompt  # noqa: E402
from reward_variants import REWARD_VARIANTS, VARIANT_TITLES  # noqa: E402
from rm_data import load_embedding_set  # noqa: E402
from run_folder import (  # noqa: E402
    ENSEMBLE_SCORES,
    SCORE_CACHE_DIR,
    STUDENT_MAP_FILE,
    TEACHER_MAP_FILE,
    LazyEnsemble,
    checkpoint_paths,
    load_manifest,
    load_partition,
    student_checkpoint_name,
)

N_PROMPTS, N_RESPONSES = 30, 4
GEN = [
    "--model_name",
    "policy",
    "--adapter_name",
    "none",
    "--dataset",
    "tiny-helpful",
    "--eval_dataset",
    "tiny-helpful",
    "--reward_model",
    "golden",
]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """OUTPUT_DIR and DATA_DIR of a tiny demo run of run_all.sh (steps 5-8)."""
    root = tmp_path_factory.mktemp("demo_run")
    env = {
        **os.environ,
        "DATA_DIR": str(root / "data"),
        "OUTPUT_DIR": str(root / "out"),
        "PYTHON": sys.executable,
        **SMALL_RUN_ALL,
    }
    proc = subprocess.run(["bash", str(REPO / "run_all.sh")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root / "out", root / "data"


def ranked_records(seed: int = 0) -> list[dict]:
    """A step 3.5 file's records: hh-rlhf prompts, responses of different lengths, ascending rewards."""
    rng = np.random.default_rng(seed)
    records = []
    for p, topic in enumerate(TOPICS[:N_PROMPTS]):
        responses = [" ".join([ANSWERS[(p + k) % len(ANSWERS)]] * (1 + (p + k) % 3)) for k in range(N_RESPONSES)]
        records.append(
            {
                "query": hh_prompt(topic),
                "responses_sorted": responses,
                "rewards_sorted": np.sort(rng.normal(size=N_RESPONSES)).tolist(),
            }
        )
    return records


@pytest.fixture(scope="module")
def text_run(tiny, tmp_path_factory):
    """Step 4 embeds a ranked file with the tiny left-padding model; steps 5 and 7 train on it."""
    root = tmp_path_factory.mktemp("text_run")
    out, data = root / "out", root / "data"
    run = GenerationRun(out, "policy", "none", "tiny-helpful", "tiny-helpful", 128, 1.0)
    run.folder.mkdir(parents=True)
    records = ranked_records()
    run.ranked_path("train", "golden").write_text("".join(json.dumps(r) + "\n" for r in records))
    step4_gen_embeddings.main(
        GEN
        + [
            "--output_dir",
            str(out),
            "--embed_model_name",
            str(tiny["embed-left"]),
            "--data_dir",
            str(data),
            "--train_test",
            "train",
        ]
    )
    step5_train_rms.main(
        [
            "--data_dir",
            str(data),
            "--output_dir",
            str(out),
            "--n_sample",
            "5",
            "--ensemble_number",
            "2",
            "--training_epochs",
            "2",
            "--batch_size",
            "16",
            "--seed",
            "3",
        ]
    )
    step7.main(["--output_dir", str(out), "--distill_epochs", "2", "--batch_size", "16"])
    prompts = [r["query"] for r in records for _ in r["responses_sorted"]]
    responses = [response for r in records for response in r["responses_sorted"]]
    return {"out": out, "data": data, "prompts": prompts, "responses": responses}


def prompt_major_rows(data, prompt_ids: np.ndarray) -> np.ndarray:
    """Embeddings of every response of ``prompt_ids``, row p * K + k = response k of prompt p."""
    return np.stack([data.read_rows(k, prompt_ids) for k in range(data.n_splits)], axis=1).reshape(-1, data.dim)


# --------------------------------------------------------------------------------------------
# Consistency with step 8 and step 4
# --------------------------------------------------------------------------------------------
def test_scores_equal_step8_predictions_on_held_out_prompts(demo_run):
    out, data_dir = demo_run
    data = load_embedding_set(data_dir)
    held_out = load_partition(out, data)["held_out"]
    manifest = load_manifest(out)
    assert manifest["data"]["embedding"]["model"] is None  # demo data: synthetic vectors, no model
    teacher_paths = checkpoint_paths(out, manifest)
    student_path = out / student_checkpoint_name("helpful", "bt")
    teacher = LazyEnsemble(teacher_paths, data.dim)
    teacher_scores = step8.cached_scores(
        {"held_out": (data, held_out)}, teacher, out / SCORE_CACHE_DIR, ENSEMBLE_SCORES
    )
    student = StackedEnsemble([load_checkpoint(student_path, data.dim)])  # not step 7's cached scores
    expected = step8.variants_from_scores(
        teacher_scores["held_out"],
        data.score(held_out, student)[0].astype(np.float64),
        load_isotonic_map(out / TEACHER_MAP_FILE),
        load_isotonic_map(out / STUDENT_MAP_FILE),
    )
    reward_model = RewardModel.load(out)
    rows = prompt_major_rows(data, held_out)
    scores = reward_model.score_variants(rows)
    shape = (len(held_out), data.n_splits)
    for variant in REWARD_VARIANTS:
        np.testing.assert_array_equal(scores[variant].reshape(shape), expected[VARIANT_TITLES[variant]])
        np.testing.assert_array_equal(reward_model.score_embeddings(rows, variant), scores[variant])
    # ... and step 8's saved calibration errors are those of these scores
    saved = json.loads((out / "validation_results.json").read_text())["held_out"]["variants"]
    gold = data.rewards[held_out]
    for variant in ("teacher_iso", "student_iso"):
        errors = calibration_errors(scores[variant].reshape(shape), gold)
        assert errors["mse"] == saved[VARIANT_TITLES[variant]]["calibration"]["mse"]
    # float16 rows are read as steps 5-8 read them: cast to float32
    half = rows.astype(np.float16)
    np.testing.assert_array_equal(
        reward_model.score_embeddings(half), reward_model.score_embeddings(half.astype(np.float32))
    )


def test_a_checkpoint_with_nan_weights_is_refused_naming_the_file(demo_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(demo_run[0], out)
    student = out / student_checkpoint_name("helpful", "bt")
    state = torch.load(student, weights_only=True)
    state["fc1.bias"][0] = float("nan")
    torch.save(state, student)
    with pytest.raises(InputError) as err:
        RewardModel.load(out, variants=["student"])
    assert str(err.value) == f"{student}: non-finite weights (NaN or inf) in fc1.bias; the checkpoint is damaged"


def test_non_finite_cached_scores_are_rescored_never_evaluated(demo_run, tmp_path):
    """A score-cache file holding NaN is a miss: step 8 scores the set afresh, so its results are the
    run's own (a NaN can only come from a damaged cache; the checkpoints are checked when loaded)."""
    out = tmp_path / "out"
    shutil.copytree(demo_run[0], out)
    for path in (out / SCORE_CACHE_DIR).glob("*.npy"):
        scores = np.load(path)
        scores[..., 0] = np.nan
        np.save(path, scores)
    step8.main(["--output_dir", str(out)])
    fresh, saved = (json.loads((run / "validation_results.json").read_text()) for run in (out, demo_run[0]))
    assert {key: fresh[key] for key in ("held_out", "test")} == {key: saved[key] for key in ("held_out", "test")}
    for path in (out / SCORE_CACHE_DIR).glob("*.npy"):
        assert np.isfinite(np.load(path)).all()


def test_manifest_records_step4_embedding_model(text_run, tiny):
    embedding = load_manifest(text_run["out"])["data"]["embedding"]
    assert embedding["model"] == str(tiny["embed-left"]) and embedding["max_length"] == 1024
    assert embedding["source"] == str(text_run["data"] / "embedding_info_train.json")


def test_text_scores_equal_scores_of_step4_embeddings(text_run, tiny):
    data = load_embedding_set(text_run["data"])
    step4_rows = prompt_major_rows(data, np.arange(data.n_prompts))
    prompts, responses = text_run["prompts"], text_run["responses"]
    reward_model = RewardModel.load(text_run["out"])
    reward_model.load_embedder(device="cpu")  # the manifest's model, step 4's batch size
    # Step 4 batches each prompt's responses among themselves (so that its shards merge bit for bit);
    # the reward model batches the texts it is given by length: the same vectors to float rounding
    # (a batch's padding width changes the kernels' summation order, never the token read), and
    # scoring text is exactly scoring its embedding.
    embedded = reward_model.embed_texts(prompts, responses)
    np.testing.assert_allclose(embedded, step4_rows, rtol=1e-4, atol=1e-5)
    for variant in REWARD_VARIANTS:
        np.testing.assert_array_equal(
            reward_model.score_texts(prompts, responses, variant), reward_model.score_embeddings(embedded, variant)
        )
    # Responses are cut at a new human turn, as step 3 cuts them before step 4 embeds them.
    uncut = [f"  {response}\n\nHuman: and then?\n\nAssistant: more" for response in responses]
    np.testing.assert_array_equal(reward_model.score_texts(prompts, uncut), reward_model.score_embeddings(embedded))
    # A right-padding tokenizer without a pad token (same weights) and other batches: equal to float
    # rounding (padding changes the kernels' summation order, never the token read).
    right = RewardModel.load(text_run["out"])
    right.load_embedder(str(tiny["embed-right-padeos"]), "cpu", batch_size=7)
    np.testing.assert_allclose(right.embed_texts(prompts, responses), step4_rows, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        right.score_texts(prompts, responses), reward_model.score_embeddings(step4_rows), rtol=1e-4, atol=1e-5
    )


# --------------------------------------------------------------------------------------------
# The CLI
# --------------------------------------------------------------------------------------------
def write_requests(path: Path, text_run) -> list[tuple[str, str]]:
    """Prompts with lists of responses (duplicates included) and single-response lines that repeat a
    prompt; returns the (prompt, response) pairs in file order."""
    prompts = sorted(set(text_run["prompts"]))[:6]
    lines, pairs = [], []
    for i, prompt in enumerate(prompts):
        responses = [ANSWERS[(i + j) % len(ANSWERS)] + " Also" * j for j in range(5)] + [ANSWERS[i % len(ANSWERS)]]
        lines.append({"prompt": prompt, "responses": responses, "id": f"list-{i}"})
        pairs += [(prompt, r) for r in responses]
    for i, prompt in enumerate(prompts[:3]):
        lines.append({"prompt": prompt, "response": f"Ask someone about it, number {i}.", "id": f"single-{i}"})
        pairs.append((prompt, lines[-1]["response"]))
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return pairs


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_best_of_n_is_the_first_argmax_per_prompt(text_run, tmp_path, capsys):
    requests = tmp_path / "requests.jsonl"
    pairs = write_requests(requests, text_run)
    argv = ["--output_dir", str(text_run["out"]), "--input", str(requests), "--device", "cpu", "--variant", "teacher"]
    score_responses.main(argv + ["--output", str(tmp_path / "all.jsonl")])
    score_responses.main(argv + ["--output", str(tmp_path / "best.jsonl"), "--best_of_n"])
    scored = read_jsonl(tmp_path / "all.jsonl")
    rewards = [r for line in scored for r in (line["rewards"] if "rewards" in line else [line["reward"]])]
    assert len(rewards) == len(pairs) and scored[0]["id"] == "list-0" and "reward" in scored[-1]
    # the rewards are the module's for these texts
    reward_model = RewardModel.load(text_run["out"], ["teacher"])
    reward_model.load_embedder(device="cpu")
    np.testing.assert_array_equal(rewards, reward_model.score_texts(*zip(*pairs), "teacher"))
    # brute force: for each prompt, the first response with the maximal reward
    best = read_jsonl(tmp_path / "best.jsonl")
    prompts = list(dict.fromkeys(prompt for prompt, _ in pairs))
    assert [line["prompt"] for line in best] == prompts
    for line, prompt in zip(best, prompts):
        mine = [(reward, response) for (p, response), reward in zip(pairs, rewards) if p == prompt]
        top = max(reward for reward, _ in mine)
        first = next(i for i, (reward, _) in enumerate(mine) if reward == top)
        assert (line["best_index"], line["response"], line["reward"], line["n_candidates"]) == (
            first,
            mine[first][1],
            top,
            len(mine),
        )


def test_cli_writes_nothing_but_errors_to_a_log_file(text_run, tmp_path):
    """stderr that is not a terminal gets no progress bar and no transformers load report (README,
    "Pipeline"); the one-line summary goes to stdout."""
    requests = tmp_path / "requests.jsonl"
    write_requests(requests, text_run)
    with requests.open("a") as handle:  # far beyond any max_length: cut, with a warning on stdout only
        handle.write(json.dumps({"prompt": hh_prompt("bake bread"), "response": "Use yeast. " * 50_000}) + "\n")
    argv = ["--output_dir", str(text_run["out"]), "--input", str(requests), "--output", str(tmp_path / "out.jsonl")]
    proc = subprocess.run(
        [sys.executable, str(REPO / "score_responses.py"), *argv, "--device", "cpu"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr == ""
    assert proc.stdout.splitlines()[-1].startswith("score_responses: 40 responses of 6 prompts scored")


def test_a_long_text_is_cut_before_it_is_tokenised(tiny):
    """A 1 MB response is cut to a few thousand characters before tokenising; its first max_length
    tokens, and the warning that it was cut, are those of the whole text."""
    from llm_models import load_tokenizer, tokenize_texts

    tokenizer = load_tokenizer(str(tiny["embed-left"]), "--embedding_model")
    seen = []

    def spy(texts, **kwargs):
        seen.extend(map(len, texts))
        return tokenizer(texts, **kwargs)

    spy.get_vocab = tokenizer.get_vocab
    texts = [hh_prompt("bake bread") + " " + "Mix flour, water and yeast. " * 40_000, "short"]
    ids, truncated = tokenize_texts(spy, texts, max_length=64)
    whole = tokenizer(texts)["input_ids"]
    assert ids == [whole[0][:64], whole[1]] and truncated.tolist() == [True, False]
    longest_token = max(map(len, tokenizer.get_vocab()))
    assert seen == [2 * 65 * longest_token, 5] and seen[0] < len(texts[0]) / 100


def test_best_of_n_breaks_ties_by_first_response():
    requests = [
        (1, {"prompt": "a", "responses": ["x", "y", "z"]}, ["x", "y", "z"]),
        (2, {"prompt": "b", "response": "u", "id": 7}, ["u"]),
        (3, {"prompt": "a", "response": "w", "id": 9}, ["w"]),
    ]
    best = score_responses.best_per_prompt(requests, np.array([0.5, 2.0, 2.0, -1.0, 2.0]))
    assert best == [
        {"prompt": "a", "response": "y", "reward": 2.0, "best_index": 1, "n_candidates": 4},
        {"id": 7, "prompt": "b", "response": "u", "reward": -1.0, "best_index": 0, "n_candidates": 1},
    ]


def test_cli_on_demo_run_needs_an_embedding_model_of_size_d(demo_run, tiny, tmp_path, capsys):
    out, _ = demo_run
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"prompt": hh_prompt("bake bread"), "responses": ["Use yeast.", "No."]}) + "\n")
    argv = ["--output_dir", str(out), "--input", str(requests), "--output", str(tmp_path / "o.jsonl")]
    err = run_failing(score_responses.main, argv, capsys)
    assert err == (
        f"error: {out / 'orm_manifest.json'}: the ensemble was trained on demo data (synthetic "
        "vectors), with no embedding model; pass --embedding_model to score texts"
    )
    # the demo's D=32 is the tiny model's hidden size, so it can stand in (the rewards mean nothing)
    [line] = score_responses.main(argv + ["--embedding_model", str(tiny["embed-left"]), "--device", "cpu"])
    assert len(line["rewards"]) == 2 and all(np.isfinite(line["rewards"]))


# --------------------------------------------------------------------------------------------
# LightGBM members
# --------------------------------------------------------------------------------------------
def test_lgbm_members_score_texts_through_every_interface(text_run, tmp_path, capsys):
    """A run whose teacher is LightGBM classifiers: RewardModel, score_responses.py and the TRL reward
    function score texts with it; the teacher is the mean of the boosters' raw scores; a damaged member
    file is one line naming it."""
    import lightgbm as lgb

    out = tmp_path / "lgbm"
    step5_train_rms.main(
        ["--data_dir", str(text_run["data"]), "--output_dir", str(out), "--rm_model", "lgbm", "--rm_objective", "clf",
         "--n_sample", "5", "--ensemble_number", "2", "--lgbm_min_child_samples", "2", "--lgbm_n_estimators", "20",
         "--min_val_pairs", "0", "--seed", "3"]
    )  # fmt: skip
    step7.main(["--output_dir", str(out), "--distill_epochs", "2", "--batch_size", "16"])
    reward_model = RewardModel.load(out)
    reward_model.load_embedder(device="cpu")
    prompts, responses = text_run["prompts"][:8], text_run["responses"][:8]
    rows = reward_model.embed_texts(prompts, responses, progress=False)
    members = [lgb.Booster(model_file=str(path)) for path in checkpoint_paths(out, load_manifest(out))]
    expected = np.mean([booster.predict(rows, raw_score=True).astype(np.float32) for booster in members], axis=0)
    np.testing.assert_array_equal(reward_model.score_embeddings(rows, "teacher"), expected.astype(np.float64))
    rewards = reward_model.score_texts(prompts, responses)
    assert np.isfinite(rewards).all()
    reward_fn = reward_model.trl_reward_function()
    assert reward_fn(prompts=prompts, completions=responses) == rewards.tolist()
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in zip(prompts, responses)))
    lines = score_responses.main(
        ["--output_dir", str(out), "--input", str(requests), "--output", str(tmp_path / "o.jsonl"), "--device", "cpu"]
    )
    np.testing.assert_allclose([line["reward"] for line in lines], rewards, rtol=1e-6)  # batched as texts
    member = checkpoint_paths(out, load_manifest(out))[1]
    member.write_text(member.read_text().replace("leaf_value=", "leaf_value=1", 1))
    argv = ["--output_dir", str(out), "--input", str(requests), "--output", str(tmp_path / "p.jsonl")]
    argv += ["--variant", "teacher_iso"]  # the members are loaded only for the teacher's variants
    err = run_failing(score_responses.main, argv, capsys)
    assert err == f"error: {member}: sha256 differs from the one step 5 recorded in the manifest (damaged or replaced)"
    assert not (tmp_path / "p.jsonl").exists()


# --------------------------------------------------------------------------------------------
# TRL
# --------------------------------------------------------------------------------------------
def test_trl_reward_function(text_run, tiny, tmp_path):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    reward_model = RewardModel.load(text_run["out"])
    reward_model.load_embedder(device="cpu")
    reward_fn = reward_model.trl_reward_function()
    topics = ["bake bread", "fix a bike", "bake bread"]
    prompts = [hh_prompt(topic) for topic in topics]
    completions = [" Mix flour and water.", "Oil the chain.\n\nHuman: thanks", "Buy a loaf."]
    expected = reward_model.score_texts(prompts, completions).tolist()
    assert reward_fn(prompts=prompts, completions=completions, completion_ids=[[1]] * 3, trainer_state=None) == expected
    # conversational form: message lists, rendered as the hh-rlhf text above
    chat_prompts = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"How do I {t}?"}] for t in topics
    ]
    assert [hh_rlhf_prompt(p) for p in chat_prompts] == prompts
    chat_completions = [[{"role": "assistant", "content": c}] for c in completions]
    assert reward_fn(chat_prompts, chat_completions) == expected

    # The call TRL's GRPOTrainer makes (no training step).
    tokenizer = AutoTokenizer.from_pretrained(tiny["policy-lm"], padding_side="left")
    config = GRPOConfig(
        output_dir=str(tmp_path / "grpo"),
        per_device_train_batch_size=3,
        num_generations=3,
        max_completion_length=4,
        report_to=[],
        use_cpu=True,
    )
    trainer = GRPOTrainer(
        model=str(tiny["policy-lm"]),
        reward_funcs=reward_fn,
        args=config,
        train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
        processing_class=tokenizer,
    )
    assert trainer.reward_func_names == ["embedding_rm_student_iso"]
    for batch_prompts, batch_completions in ((prompts, completions), (chat_prompts, chat_completions)):
        rewards = trainer._calculate_rewards(
            [{"prompt": p} for p in batch_prompts], batch_prompts, batch_completions, [[1]] * 3
        )
        assert torch.equal(rewards[:, 0], torch.tensor(expected, dtype=torch.float32))


# --------------------------------------------------------------------------------------------
# Bad inputs: one line, exit 2, no output file
# --------------------------------------------------------------------------------------------
def test_bad_inputs_exit_2_with_one_line(text_run, tmp_path, capsys):
    from transformers import LlamaConfig

    out = tmp_path / "run"
    shutil.copytree(text_run["out"], out, ignore=shutil.ignore_patterns("generations"))
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": hh_prompt("bake bread"), "response": "Use yeast."}) + "\n")
    output = tmp_path / "scored.jsonl"

    def fails(*extra, input_file=good, output_dir=out) -> str:
        argv = [
            "--output_dir",
            str(output_dir),
            "--input",
            str(input_file),
            "--output",
            str(output),
            "--device",
            "cpu",
            *extra,
        ]
        err = run_failing(score_responses.main, argv, capsys)
        assert not output.exists()
        return err

    def bad_input(text: str) -> str:
        path = tmp_path / "bad.jsonl"
        path.write_text(text)
        return fails(input_file=path)

    path = tmp_path / "bad.jsonl"
    ok = json.dumps({"prompt": "p", "response": "r"})
    assert (
        bad_input(ok + "\n{oops\n") == f"error: {path} line 2: not valid JSON (Expecting property name "
        "enclosed in double quotes)"
    )
    assert bad_input(ok + "\n\n[1, 2]\n") == f"error: {path} line 3: expected a JSON object"
    assert bad_input('{"response": "r"}\n') == f'error: {path} line 1: expected "prompt" as a string'
    assert (
        bad_input('{"prompt": "p", "response": "r", "responses": ["s"]}\n')
        == f'error: {path} line 1: expected exactly one of "response" (a string) and "responses" (a list of strings)'
    )
    assert (
        bad_input('{"prompt": "p", "responses": []}\n')
        == f'error: {path} line 1: "responses" must be a non-empty list of strings'
    )
    assert bad_input('{"prompt": "p", "response": 3}\n') == f'error: {path} line 1: "response" must be a string'
    assert bad_input("\n") == f"error: --input {path}: no records"
    assert (
        fails(input_file=tmp_path / "missing.jsonl") == f"error: --input {tmp_path / 'missing.jsonl'}: file not found"
    )

    # missing or foreign OUTPUT_DIR artifacts
    assert (
        fails(output_dir=tmp_path / "nowhere")
        == f"error: output directory {tmp_path / 'nowhere'} does not exist (run run_all.sh or steps 5-7 first)"
    )
    student = out / student_checkpoint_name("helpful", "bt")
    student.rename(tmp_path / "student.ckpt")
    assert fails() == f"error: checkpoint not found: {student}"
    (tmp_path / "student.ckpt").rename(student)
    (out / "isotonic_student_map.json").unlink()
    assert fails().startswith(
        f"error: student isotonic map (run step7_isotonic_distillation.py) (JSON sidecar) "
        f"not found: {out / 'isotonic_student_map.json'}"
    )
    shutil.copy(out / "isotonic_teacher_map.json", out / "isotonic_student_map.json")
    assert fails() == f"error: {out / 'isotonic_student_map.json'} maps teacher scores; expected a student map"
    shutil.copy(text_run["out"] / "isotonic_student_map.json", out / "isotonic_student_map.json")

    # an embedding model of another hidden size (checked from its config, before any weights load)
    wide = tmp_path / "wide-model"
    LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4).save_pretrained(wide)
    assert (
        fails("--embedding_model", str(wide))
        == f"error: --embedding_model {wide}: hidden size 48 differs from the reward model's input size D=32 "
        f"({out / 'orm_manifest.json'})"
    )
    assert fails("--embedding_model", str(tmp_path / "no-model")).startswith(
        f"error: --embedding_model {tmp_path / 'no-model'}: no such model folder"
    )
    if not torch.cuda.is_available():
        assert fails("--device", "cuda") == "error: --device cuda: no such CUDA device here"
    assert fails("--device", "tpu9") == "error: --device tpu9: not a device (auto, cpu, cuda, cuda:N)"

    # the real command: one stderr line, exit status 2
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "score_responses.py"),
            "--output_dir",
            str(out),
            "--input",
            str(good),
            "--output",
            str(output),
            "--variant",
            "best",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: score_responses.py: argument --variant: invalid choice: 'best'")
    assert not output.exists()


def test_a_run_folder_naming_a_custom_code_model_is_refused_without_a_prompt(text_run, tiny, tmp_path):
    """An untrusted run folder whose manifest names a model folder with its own code (auto_map): one
    line, exit 2, nothing asked on stdin, the folder's code never imported, however stdin answers."""
    from tiny_models import CODE_MARKER

    out = tmp_path / "run"
    shutil.copytree(text_run["out"], out, ignore=shutil.ignore_patterns("generations"))
    manifest = json.loads((out / "orm_manifest.json").read_text())
    manifest["data"]["embedding"]["model"] = str(tiny["code-model"])
    (out / "orm_manifest.json").write_text(json.dumps(manifest))
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": hh_prompt("bake bread"), "response": "Use yeast."}) + "\n")
    output = tmp_path / "scored.jsonl"
    result = subprocess.run(
        [sys.executable, str(REPO / "score_responses.py"), "--output_dir", str(out), "--input", str(good)]
        + ["--output", str(output), "--device", "cpu"],
        input="y\ny\n",
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"error: {out / 'orm_manifest.json'}: embedding model {tiny['code-model']}: the model config needs Python "
        "code from its own folder (auto_map); refused: this pipeline never runs code from a model folder\n"
    )
    assert result.stdout == ""
    assert not (tiny["code-model"] / CODE_MARKER).exists()
    assert not output.exists()


def output_argv(text_run, tmp_path) -> list[str]:
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": hh_prompt("bake bread"), "response": "Use yeast."}) + "\n")
    return ["--output_dir", str(text_run["out"]), "--input", str(good), "--device", "cpu", "--output"]


def test_cli_output_dash_is_stdout_and_a_symlink_is_written_through(text_run, tmp_path, capsysbinary):
    """--output follows the atomic writer's rule: - is standard output (the summary line goes to
    stderr), a symlink is written through (the link stays)."""
    argv = output_argv(text_run, tmp_path)
    real = tmp_path / "real.jsonl"
    score_responses.main([*argv, str(real)])
    expected = real.read_bytes()

    capsysbinary.readouterr()
    score_responses.main([*argv, "-"])
    captured = capsysbinary.readouterr()
    assert captured.out == expected and b"score_responses: 1 responses" in captured.err
    assert not Path("-").exists() and not (REPO / "-").exists()

    real.write_text("stale\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(real)
    score_responses.main([*argv, str(link)])
    assert link.is_symlink() and real.read_bytes() == expected


def test_cli_output_to_a_device_fifo_or_directory_is_refused(text_run, tmp_path, capsys):
    """One line and exit 2 before any model loads; the FIFO and the link stay as they were."""
    argv = output_argv(text_run, tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    to_null = tmp_path / "null-link"
    to_null.symlink_to("/dev/null")
    cases = {
        "/dev/null": "error: cannot write --output /dev/null: it is a device or socket, not a file to replace "
        "(use - for standard output)",
        str(to_null): f"error: cannot write --output {to_null} (a symlink to /dev/null): it is a device or socket",
        str(fifo): f"error: cannot write --output {fifo}: it is a FIFO, not a file to replace",
        str(tmp_path): f"error: cannot write --output {tmp_path}: it is a directory",
    }
    for output, message in cases.items():
        assert run_failing(score_responses.main, [*argv, output], capsys).startswith(message)
    assert fifo.exists() and to_null.is_symlink()
