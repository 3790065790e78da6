"""What the GPU steps 1-4 share: model names and loading, hh-rlhf text handling, the file flow.

File flow. Steps 1-3.5 work inside ``--output_dir`` (default ``distill_out``); step 4 writes the
data directory that steps 5-8 read (README, "Data format")::

  step1_sft.py                {output_dir}/ckpts_SFT/SFT_{model}_{dataset}/  LoRA adapter, sft_run.json
  step2_gen_sample.py         {gen_dir}/{data_class}_part{k}.jsonl        query, id, response_0.., settings
                              {gen_dir}/{data_class}_part{k}.summary.json counts, skipped long prompts
  step3_reward_annotation.py  {gen_dir}/{data_class}_part{k}.scored_{rm}.jsonl  cut responses, rewards
  step3.5_processing_data.py  {gen_dir}/{data_class}_ranked_{rm}.jsonl    per prompt, sorted ascending
  step4_gen_embeddings.py     {data_dir}/EMBD-TRAIN-split_{k}.npy + rewards_split_{k}.json
                              (test: EMBD-TEST-split_{k}.npy + rewards_test_split_{k}.json)

``gen_dir`` = ``{output_dir}/generations/{model}_{adapter}_{dataset}_{eval_dataset}_len{max_len}_temp{T}``;
steps 2-4 take the same generation flags (``add_generation_args``) so they all find it. ``data_class``
is ``train`` (10 responses per prompt in the paper) or ``test`` (500, for best-of-N curves); ``k`` is
one of ``--num_shards`` (5) contiguous shards of the prompt set, so shards can run on separate GPUs
(docs/gpu_steps.md, "Shards on a cluster"); step 3.5 merges them, and step 4's shards
(``{gen_dir}/{data_class}_embd_{model}.shard{i}of{n}.npy`` + ``.json``) are merged by its ``--merge``.

Text conventions: step 3 (``--rm_input_format raw``, the default) scores and step 4 embeds the same
string, ``scored_text(query, cut_response(response))``; ``rm_texts`` gives the reward model the
chat-template form instead; ``embed_texts`` is step 4's embedding procedure as a function.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from artifacts import atomic_path, read_text
from cli import DTYPE_NAMES, InputError, non_negative_float, non_negative_int, positive_int
from random_streams import int_seed, seed_sequence
from rm_data import TASKS

log = logging.getLogger(__name__)

MODEL_IDS = {
    "gemma2b": "google/gemma-2b",
    "gemma7b": "google/gemma-7b",
    "llama38b": "meta-llama/Meta-Llama-3-8B",
    "rmmistral7b": "weqweasdas/RM-Mistral-7B",
    "rayharmless": "Ray2333/gpt2-large-harmless-reward_model",
}
HH_RLHF_HUB_ID = "Anthropic/hh-rlhf"
HUMAN_TURN = "\n\nHuman"
ASSISTANT_TURN = "\n\nAssistant:"
REPO_ROOT = Path(__file__).resolve().parent
# A single-file llama.cpp checkpoint: transformers reads its config, tokenizer and (dequantized to
# the compute dtype) weights with ``from_pretrained(folder, gguf_file=name)``; needs the ``gguf`` package.
GGUF_SUFFIX = ".gguf"
POOLINGS = ("last", "mean")


# --------------------------------------------------------------------------------------------
# Names: models, datasets, tasks
# --------------------------------------------------------------------------------------------
def resolve_model(name: str, flag: str) -> str:
    """A short name, an existing local folder, a local ``.gguf`` file or a hub id ``owner/name`` -> what
    ``from_pretrained`` takes (for a ``.gguf`` file, its path: see :func:`gguf_source`).

    Checked without importing transformers: a folder must hold ``config.json``; a name that can only
    be a path (it starts with ``.``, ``/`` or ``~``, has more than one ``/``, or its first part is a
    local folder) and does not exist is a missing folder, never a hub id; with ``HF_HUB_OFFLINE=1`` a
    hub id must be in the local cache.
    """
    if name in MODEL_IDS:
        name = MODEL_IDS[name]
    path = Path(name).expanduser()
    if path.suffix == GGUF_SUFFIX:
        if not path.is_file():
            raise InputError(f"{flag} {name}: no such .gguf file ({path.resolve()})")
        return str(path)
    if path.exists():
        if not path.is_dir():
            raise InputError(f"{flag} {name}: expected a model folder or a .gguf file, found another file")
        if not (path / "config.json").is_file():
            raise InputError(f"{flag} {name}: folder {path.resolve()} holds no config.json (not a model folder)")
        return str(path)
    first_part = Path(name.split("/")[0]).expanduser()
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or first_part.is_dir():
        raise InputError(f"{flag} {name}: no such model folder ({path.resolve()})")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)  # a bare name (no owner) passes it
        hub_id = name.count("/") == 1
    except HFValidationError:
        hub_id = False
    if not hub_id:
        raise InputError(
            f"{flag} {name}: no such model folder, and not a short name ({', '.join(MODEL_IDS)}) or hub id owner/name"
        )
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise InputError(
                f"{flag} {name}: no local folder {path.resolve()}, and the hub id is not in the "
                "local cache (HF_HUB_OFFLINE=1)"
            )
    return name


def model_tag(name: str) -> str:
    """A file-name-safe tag for a model given by short name, folder or hub id."""
    if name in MODEL_IDS:
        return name
    tail = Path(name.rstrip("/")).name or "model"
    return re.sub(r"[^\w.-]+", "-", tail)


def task_of(*dataset_names: str | None) -> str | None:
    """'helpful' or 'harmless' from the first dataset name that mentions one (hh-rlhf-helpful-gpt4)."""
    for name in dataset_names:
        for task in TASKS:
            if name and task in name:
                return task
    return None


def default_golden_rm(dataset: str, eval_dataset: str | None) -> str:
    """The paper's golden reward model for the task named by ``--eval_dataset`` or ``--dataset``."""
    task = task_of(eval_dataset, dataset)
    if task is None:
        raise InputError(
            f"--reward_model is required: neither --eval_dataset {eval_dataset!r} nor "
            f"--dataset {dataset!r} names a task ({', '.join(TASKS)})"
        )
    return TASKS[task].golden_rm


# --------------------------------------------------------------------------------------------
# hh-rlhf text
# --------------------------------------------------------------------------------------------
def split_hh_dialogue(text: str) -> tuple[str, str]:
    """hh-rlhf text -> (prompt up to and including the last "\\n\\nAssistant:", completion = the rest)."""
    cut = text.rfind(ASSISTANT_TURN)
    if cut == -1:
        raise ValueError(f"no {ASSISTANT_TURN!r} in dialogue: {text[:80]!r}")
    cut += len(ASSISTANT_TURN)
    return text[:cut], text[cut:]


def cut_response(response: str) -> str:
    """The generated response up to its first "\\n\\nHuman" (where the model starts a new turn), stripped."""
    cut = response.find(HUMAN_TURN)
    return (response if cut == -1 else response[:cut]).strip()


def scored_text(query: str, cut: str) -> str:
    """The exact string step 3 scores and step 4 embeds: the hh-rlhf form "...Assistant: response"."""
    return f"{query} {cut}" if cut else query


_TURN = re.compile(r"(?:\A|\n\n)(Human|Assistant):")


def dialogue_messages(query: str, response: str) -> list[dict[str, str]]:
    """An hh-rlhf prompt and a cut response -> alternating chat messages for a chat template.

    "\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:" with response "d" becomes
    user a, assistant b, user c, assistant d (contents stripped). Text before the first turn marker
    is kept as the start of the first user message; consecutive turns of one role are joined by a
    blank line, since most templates require strict alternation. A prompt without markers is one
    user message.
    """
    pieces = _TURN.split(query)
    messages: list[dict[str, str]] = []

    def add(role: str, content: str) -> None:
        content = content.strip()
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] = "\n\n".join(c for c in (messages[-1]["content"], content) if c)
        else:
            messages.append({"role": role, "content": content})

    if pieces[0].strip() or len(pieces) == 1:
        add("user", pieces[0])
    for marker, content in zip(pieces[1::2], pieces[2::2]):
        add("user" if marker == "Human" else "assistant", content)
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()  # the prompt's trailing "Assistant:" opens the turn the response fills
    add("assistant", response)
    return messages


def rm_texts(tokenizer, queries: Sequence[str], responses: Sequence[str], rm_input_format: str) -> list[str]:
    """The strings the golden reward model scores, one per (query, cut response).

    ``raw``: ``scored_text(query, response)``, the hh-rlhf form (tokenized with the tokenizer's
    special tokens). ``chat_template``: ``dialogue_messages`` rendered by the RM tokenizer's chat
    template (which holds its own special tokens; tokenize with ``add_special_tokens=False``).
    """
    if rm_input_format == "raw":
        return [scored_text(q, r) for q, r in zip(queries, responses)]
    if rm_input_format != "chat_template":
        raise ValueError(f"unknown rm_input_format {rm_input_format!r}")
    return [tokenizer.apply_chat_template(dialogue_messages(q, r), tokenize=False) for q, r in zip(queries, responses)]


def gpt4_demo_prompt(query: str) -> str:
    """Prompt of a GPT-4 demonstration row: the dialogue from its first "Human:" on (the original CSV's
    queries open with an instruction preamble, which the original code dropped as ``query[85:]``), ending
    with "\\n\\nAssistant:"."""
    start = query.find("Human:")
    dialogue = query if start == -1 else "\n\n" + query[start:]
    dialogue = dialogue.rstrip()
    if dialogue.endswith("Assistant:"):
        dialogue = dialogue[: -len("Assistant:")].rstrip()
    return dialogue + ASSISTANT_TURN


def load_hh_rlhf(task: str, split: str, flag: str) -> list[str]:
    """The "chosen" dialogues of Anthropic/hh-rlhf ``{task}-base``, split 'train' or 'test'."""
    import datasets  # heavy import, only where the hub data set is used

    try:
        rows = datasets.load_dataset(HH_RLHF_HUB_ID, data_dir=f"{task}-base", split=split)
    except (OSError, ValueError, ConnectionError, datasets.exceptions.DatasetsError) as err:
        first_line = (str(err).strip() or type(err).__name__).splitlines()[0]
        raise InputError(
            f"cannot load {HH_RLHF_HUB_ID} {task}-base/{split} ({first_line}); pass {flag} with a local file instead"
        ) from None
    return list(rows["chosen"])


# --------------------------------------------------------------------------------------------
# Local files
# --------------------------------------------------------------------------------------------
def read_table(path: str | Path, columns: Sequence[str], flag: str) -> list[dict]:
    """Rows of a local ``.jsonl`` (one object per line) or ``.csv`` file, checked for ``columns``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{flag} {path}: file not found")
    try:
        if path.suffix == ".csv":
            with open(path, newline="") as handle:
                rows = list(csv.DictReader(handle))
        elif path.suffix in (".jsonl", ".json"):
            rows = read_jsonl(path, flag)
        else:
            raise InputError(f"{flag} {path}: expected a .jsonl or .csv file")
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"{flag} {path}: cannot read ({err})") from None
    if not rows:
        raise InputError(f"{flag} {path}: no rows")
    for i, row in enumerate(rows):
        missing = [c for c in columns if not isinstance(row.get(c), str)]
        if missing:
            raise InputError(
                f"{flag} {path} row {i + 1}: missing text column(s) {', '.join(missing)} "
                f"(expected columns {', '.join(columns)})"
            )
    return rows


def numbered_jsonl(path: str | Path, flag: str = "") -> list[tuple[int, dict]]:
    """(line number, JSON object) of each non-blank line; a bad line is an error naming the file and
    line, an unreadable file one naming ``flag`` (the option that gave it, if any) and the file."""
    path = Path(path)
    lines = read_text(path, f"{flag} {path}".lstrip()).splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            raise InputError(f"{path} line {number}: not valid JSON ({getattr(err, 'msg', err)})") from None
        if not isinstance(record, dict):
            raise InputError(f"{path} line {number}: expected a JSON object")
        records.append((number, record))
    return records


def read_jsonl(path: str | Path, flag: str = "") -> list[dict]:
    """The JSON objects of :func:`numbered_jsonl`, without their line numbers."""
    return [record for _, record in numbered_jsonl(path, flag)]


def write_jsonl(path: str | Path, records: Sequence[dict]) -> None:
    """One JSON object per line, written atomically (a rerun replaces the file, never appends)."""
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in records))


# --------------------------------------------------------------------------------------------
# Where each step reads and writes
# --------------------------------------------------------------------------------------------
def sft_adapter_dir(output_dir: str | Path, model_name: str, dataset: str) -> Path:
    """Where step 1 saves the LoRA adapter and step 2 (``--adapter_name sft``) finds it."""
    return Path(output_dir) / "ckpts_SFT" / f"SFT_{model_tag(model_name)}_{dataset}"


def add_generation_args(parser, model_aliases: Sequence[str] = ()) -> None:
    """The flags that name one generation run; steps 2, 3, 3.5 and 4 take them with the same defaults."""
    parser.add_argument(
        "--model_name",
        *model_aliases,
        default="gemma2b",
        help="policy model that generated the responses: short name "
        f"({', '.join(list(MODEL_IDS)[:3])}), local folder or hub id",
    )
    parser.add_argument(
        "--adapter_name",
        default="sft",
        help="'sft' = step 1's adapter for --model_name/--dataset, 'none' = base model, or a LoRA adapter folder",
    )
    parser.add_argument(
        "--dataset",
        default="hh-rlhf-helpful-gpt4",
        help="SFT data set name (names step 1's adapter; its task picks the golden RM)",
    )
    parser.add_argument(
        "--eval_dataset",
        default="hh-rlhf-helpful",
        help="prompt source: hh-rlhf-helpful or hh-rlhf-harmless (any label when step 2 reads --prompts_file)",
    )
    parser.add_argument("--max_len", type=positive_int, default=128, help="max new tokens per response")
    parser.add_argument("--temperature", type=non_negative_float, default=1.0, help="sampling temperature (0: greedy)")
    parser.add_argument("--output_dir", default="distill_out", help="work folder of steps 1-3.5")


def add_reward_model_args(parser) -> None:
    """``--reward_model`` and ``--rm_input_format``, taken alike by steps 3, 3.5 and 4."""
    parser.add_argument(
        "--reward_model",
        help="golden RM: rmmistral7b, rayharmless, a local folder or hub id "
        "(default: the paper's RM for the task of --eval_dataset/--dataset)",
    )
    parser.add_argument(
        "--rm_input_format",
        choices=("raw", "chat_template"),
        default="raw",  # what the authors' step 3 scored (README, "Steps 1-4 (GPU)")
        help='how the golden RM sees a response: raw hh-rlhf text "...Assistant: response" '
        "(the authors' choice) or the RM tokenizer's chat template over user/assistant "
        "turns; recorded by step 3 and checked by steps 3.5 and 4",
    )


def check_rm_input_format(record: dict, path: str | Path, line: int, requested: str) -> None:
    """A scored or ranked record's ``rm_input_format`` (files without one were scored raw) must be
    the one this run asks for."""
    found = record.get("rm_input_format", "raw")
    if found != requested:
        raise InputError(
            f"{path} line {line}: scored with --rm_input_format {found}, this run asks for "
            f"{requested} (rerun step3_reward_annotation.py --rm_input_format {requested})"
        )


def prompt_seed(seed: int, prompt_id: int) -> int:
    """The sampling seed of one prompt, from the run seed and the prompt's id in its source, so a
    prompt's samples do not depend on which other prompts share its part, batch or run."""
    return int_seed(seed_sequence(seed, "sampling", prompt_id))


@dataclass(frozen=True)
class GenerationRun:
    """The files of one generation run (see the module docstring for the flow)."""

    output_dir: str | Path
    model_name: str
    adapter_name: str
    dataset: str
    eval_dataset: str
    max_len: int
    temperature: float

    @classmethod
    def from_args(cls, args) -> GenerationRun:
        return cls(**{field.name: getattr(args, field.name) for field in fields(cls)})

    @property
    def folder(self) -> Path:
        name = (
            f"{model_tag(self.model_name)}_{model_tag(self.adapter_name)}_{self.dataset}_"
            f"{self.eval_dataset}_len{self.max_len}_temp{self.temperature:g}"
        )
        return Path(self.output_dir) / "generations" / re.sub(r"[^\w.-]+", "-", name)

    def samples_path(self, data_class: str, part: int) -> Path:
        return self.folder / f"{data_class}_part{part}.jsonl"

    def summary_path(self, data_class: str, part: int) -> Path:
        return self.folder / f"{data_class}_part{part}.summary.json"

    def scored_path(self, data_class: str, part: int, reward_model: str) -> Path:
        return self.folder / f"{data_class}_part{part}.scored_{model_tag(reward_model)}.jsonl"

    def ranked_path(self, data_class: str, reward_model: str) -> Path:
        return self.folder / f"{data_class}_ranked_{model_tag(reward_model)}.jsonl"

    def parts_present(self, data_class: str, reward_model: str | None = None) -> list[int]:
        """Part indices with a samples file (or, given ``reward_model``, a scored file), ascending."""
        scored = "" if reward_model is None else rf"\.scored_{re.escape(model_tag(reward_model))}"
        pattern = re.compile(rf"{data_class}_part(\d+){scored}\.jsonl\Z")
        if not self.folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.folder.iterdir() if (m := pattern.match(p.name)))


def part_bounds(n_items: int, n_parts: int, part: int) -> tuple[int, int]:
    """[start, stop) of contiguous part ``part`` of ``n_parts``; the parts cover all items (no remainder
    is dropped, unlike the original code's ``int(total / 5)`` slices)."""
    return n_items * part // n_parts, n_items * (part + 1) // n_parts


# --------------------------------------------------------------------------------------------
# Shards: one slice of the prompts per worker (docs/gpu_steps.md, "Shards on a cluster")
# --------------------------------------------------------------------------------------------
def add_shard_args(parser, index_default: int | str | None, count_default: int | None, all_ok: bool) -> None:
    """``--shard_index`` (alias ``--split``, the original code's name) and ``--num_shards`` (alias
    ``--n_parts``). Left out, they come from a SLURM job array (:func:`resolve_shard`), else the defaults."""
    parser.add_argument(
        "--shard_index",
        "--split",
        dest="shard_index",
        type=split_arg if all_ok else non_negative_int,
        default=None,
        help="shard (contiguous slice of the prompts) this run handles, 0..num_shards-1"
        + (", or 'all'" if all_ok else "")
        + f" (default: SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN in a job array, else {index_default})",
    )
    parser.add_argument(
        "--num_shards",
        "--n_parts",
        dest="num_shards",
        type=positive_int,
        default=None,
        help="shards the prompts are cut into (default: SLURM_ARRAY_TASK_COUNT in a job array, else "
        f"{count_default if count_default is not None else 'as written by the previous step'})",
    )
    parser.set_defaults(shard_defaults=(index_default, count_default))


def resolve_shard(args, environ: dict | None = None) -> None:
    """Fill ``args.shard_index`` / ``args.num_shards`` left unset from a SLURM job array
    (``--array=0-{n-1}``: index = SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN, count =
    SLURM_ARRAY_TASK_COUNT, so ``--array=1-4`` works too), else the step's defaults; check the index."""
    environ = os.environ if environ is None else environ
    index_default, count_default = args.shard_defaults
    task_id = environ.get("SLURM_ARRAY_TASK_ID", "")
    if args.shard_index is None and task_id:
        try:
            low = int(environ.get("SLURM_ARRAY_TASK_MIN", "0") or 0)
            index = int(task_id) - low
            count = int(environ.get("SLURM_ARRAY_TASK_COUNT", "0") or 0)
            high = int(environ.get("SLURM_ARRAY_TASK_MAX") or low + count - 1)
        except ValueError:
            raise InputError(f"SLURM_ARRAY_TASK_ID {task_id!r}: expected integers in SLURM's array variables") from None
        if high - low + 1 != count or environ.get("SLURM_ARRAY_TASK_STEP", "1") not in ("", "1"):
            raise InputError(
                f"SLURM_ARRAY_TASK_ID {task_id}: the job array is not one range of consecutive ids "
                f"({low}..{high}, {count} tasks), so its ids do not number the shards "
                "(submit with --array=0-{num_shards-1}, or pass --shard_index)"
            )
        if args.num_shards is None and count:
            args.num_shards = count
        if not 0 <= index < (args.num_shards or count or index + 1):
            raise InputError(
                f"SLURM_ARRAY_TASK_ID {task_id}: shard {index} is outside 0..{(args.num_shards or count) - 1} "
                "(submit with --array=0-{num_shards-1}, without steps, or pass --shard_index)"
            )
        args.shard_index = index
    if args.shard_index is None:
        args.shard_index = index_default
    if args.num_shards is None:
        args.num_shards = count_default
    if isinstance(args.shard_index, int) and args.num_shards is not None and args.shard_index >= args.num_shards:
        raise InputError(
            f"--shard_index {args.shard_index}: expected 0..{args.num_shards - 1} (--num_shards {args.num_shards})"
        )


# --------------------------------------------------------------------------------------------
# Devices, dtypes, models
# --------------------------------------------------------------------------------------------
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def pick_device() -> torch.device:
    """The GPU if there is one (under torchrun, this process's: ``LOCAL_RANK``), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def pick_dtype(device: torch.device, training: bool = False, requested: str = "auto") -> torch.dtype:
    """``requested`` (a ``DTYPES`` name) or, for ``auto``: bf16 on GPUs that support it; fp16 on
    older GPUs for inference only (fp16 training diverges too easily without care, so training
    falls back to fp32 there); fp32 on CPU."""
    if requested != "auto":
        return DTYPES[requested]
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32 if training else torch.float16
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Where stderr is not a terminal (a log file), transformers' progress bars and its notices (the
    load report: a backbone loaded without its LM head, as embedding models are) are left out while
    the block runs, so the log holds only errors and warnings (README, "Pipeline")."""
    from transformers.utils import logging as hf_logging

    if sys.stderr.isatty():
        yield
        return
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def gguf_source(path: str) -> tuple[str, dict]:
    """What ``from_pretrained`` takes for a resolved model: ``(folder, {"gguf_file": file name})`` for
    a ``.gguf`` file, else ``(path, {})``."""
    if Path(path).suffix != GGUF_SUFFIX:
        return path, {}
    return str(Path(path).parent), {"gguf_file": Path(path).name}


def _from_pretrained(auto_class: str, name: str, flag: str, what: str, **kwargs):
    """``transformers.{auto_class}.from_pretrained`` of model ``name``; a failure is one InputError line."""
    import transformers

    path = resolve_model(name, flag)  # its own one-line error, not wrapped in the one below
    path, gguf_kwargs = gguf_source(path)
    if gguf_kwargs and importlib.util.find_spec("gguf") is None:
        raise InputError(
            f"{flag} {name}: reading a .gguf file needs the gguf package (pip install -r requirements-bench.txt)"
        )
    try:
        with quiet_transformers():
            # Never code from a model folder: a folder whose config.json or tokenizer_config.json asks
            # for its own classes (auto_map) loads with the library's class when there is one, else is
            # refused. Passed explicitly, so transformers never asks on stdin, where a "y" would run it.
            return getattr(transformers, auto_class).from_pretrained(
                path, **gguf_kwargs, **kwargs, trust_remote_code=False
            )
    except (OSError, ValueError) as err:
        if "trust_remote_code" in str(err):
            raise InputError(
                f"{flag} {name}: the {what} needs Python code from its own folder (auto_map); "
                "refused: this pipeline never runs code from a model folder"
            ) from None
        first_line = (str(err).strip() or type(err).__name__).splitlines()[0]
    if name in MODEL_IDS:
        where = f" (hub id {MODEL_IDS[name]})"
    elif Path(name).expanduser().exists():
        where = ""
    else:
        where = f" (no local folder {Path(name).resolve()}; tried it as a hub id)"
    raise InputError(f"{flag} {name}: cannot load {what}{where}: {first_line}")


def load_config(name: str, flag: str):
    """The model's ``AutoConfig`` (config.json only, no weights)."""
    return _from_pretrained("AutoConfig", name, flag, "model config")


def load_tokenizer(name: str, flag: str, padding_side: str | None = None):
    """The model's tokenizer, with a pad token (eos when it has none, as Llama-3 and Gemma-base need)."""
    tokenizer = _from_pretrained("AutoTokenizer", name, flag, "tokenizer")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise InputError(f"{flag} {name}: tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if padding_side is not None:
        tokenizer.padding_side = padding_side
    return tokenizer


def load_causal_lm(name: str, flag: str, device: torch.device, dtype: torch.dtype):
    return _from_pretrained("AutoModelForCausalLM", name, flag, "causal LM", dtype=dtype).to(device)


def load_embedding_model(name: str, flag: str, device: torch.device, dtype: torch.dtype):
    """The backbone alone (``AutoModel``, no LM head): its ``last_hidden_state`` is the final layer's
    hidden state after the final norm, i.e. ``hidden_states[-1]`` of the full model. Encoders (BERT)
    load the same way; their final hidden states are what ``--pooling mean`` averages."""
    return _from_pretrained("AutoModel", name, flag, "embedding model", dtype=dtype).to(device).eval()


def reward_label_index(config, name: str, flag: str, reward_label: str | None) -> int:
    """Which output of a sequence-classification model is the reward, checked on its config alone.

    A one-output model needs no ``--reward_label`` (or 0). A model with several labels (a sentiment
    classifier) needs ``--reward_label``, an index or a name from its ``id2label``. A causal LM
    (``*ForCausalLM`` / ``*LMHeadModel`` without a classification head) is refused: loading it as a
    classifier would score with an untrained random head.
    """
    architectures = list(getattr(config, "architectures", None) or [])
    if (
        architectures
        and not any("ForSequenceClassification" in a for a in architectures)
        and any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in architectures)
    ):
        raise InputError(
            f"{flag} {name}: this is a causal language model ({architectures[0]}), not a "
            "sequence-classification reward model; pass a reward model (e.g. rmmistral7b)"
        )
    n_labels = int(config.num_labels)
    labels = {int(i): str(label) for i, label in (getattr(config, "id2label", None) or {}).items()}
    listed = ", ".join(f"{i}={labels.get(i, i)}" for i in range(n_labels))
    if reward_label is None:
        if n_labels == 1:
            return 0
        raise InputError(
            f"{flag} {name}: the model has {n_labels} labels ({listed}); pick the reward with --reward_label"
        )
    if reward_label.isdigit() and int(reward_label) < n_labels:
        return int(reward_label)
    by_name = [i for i in range(n_labels) if labels.get(i) == reward_label]
    if by_name:
        return by_name[0]
    raise InputError(f"--reward_label {reward_label}: {name} has labels {listed}")


def load_reward_model(name: str, flag: str, device: torch.device, dtype: torch.dtype, tokenizer):
    """An ``AutoModelForSequenceClassification`` whose score head runs in float32.

    Its pad id is aligned with the tokenizer's, since the model pools the logit at the last token
    that is not the pad id. The head (``score`` or ``classifier``, a Linear layer) is kept in float32
    and fed the final hidden state upcast: in bf16 the rewards would keep ~3 significant digits and
    tie in step 3.5's sort. Check the config with ``reward_label_index`` first.
    """
    model = _from_pretrained(
        "AutoModelForSequenceClassification", name, flag, "sequence-classification reward model", dtype=dtype
    )
    if model.config.pad_token_id != tokenizer.pad_token_id:
        if model.config.pad_token_id is not None:
            log.warning(
                "%s: model pad_token_id %s differs from the tokenizer's %s; using the tokenizer's",
                name,
                model.config.pad_token_id,
                tokenizer.pad_token_id,
            )
        model.config.pad_token_id = tokenizer.pad_token_id
    model = model.to(device).eval()
    heads = [getattr(model, attr, None) for attr in ("score", "classifier")]
    head = next((layer for layer in heads if isinstance(layer, torch.nn.Linear)), None)
    if head is None:
        log.warning("%s: no Linear score head found; rewards keep the compute dtype's precision", name)
    elif dtype != torch.float32:
        head.float()
        head.register_forward_pre_hook(lambda module, args: (args[0].float(), *args[1:]))
    return model


def rewards_from_logits(logits: torch.Tensor, label: int) -> torch.Tensor:
    """(B, L) logits -> (B,) float32 rewards: the logit itself for a one-output model, else the
    log-odds of ``label``, log p(label) - log(1 - p(label)) (shift-invariant, as logits are)."""
    logits = logits.float()
    if logits.shape[1] == 1:
        return logits[:, 0]
    others = torch.cat([logits[:, :label], logits[:, label + 1 :]], dim=1)
    return logits[:, label] - torch.logsumexp(others, dim=1)


# --------------------------------------------------------------------------------------------
# Batched forward passes over texts (steps 3 and 4, and anyone embedding (prompt, response) texts)
# --------------------------------------------------------------------------------------------
def tokenize_texts(
    tokenizer,
    texts: Sequence[str],
    max_length: int,
    add_special_tokens: bool = True,
    flag: str = "",
    logger: logging.Logger = log,
) -> tuple[list[list[int]], np.ndarray]:
    """Token ids of each text (with the tokenizer's special tokens unless told otherwise), cut to
    ``max_length`` (set by option ``flag``, if any); ``logger`` warns how many texts were cut.

    Returns the id lists and a (len(texts),) bool array marking the texts that were cut.
    """
    # Texts far longer than max_length tokens are cut before tokenising (tokenising a 5 MB response
    # whole took 1.5 GB). No token spans more characters than the longest vocabulary entry, so the
    # kept characters hold over twice max_length tokens: the first max_length are the whole text's
    # (tokenisers merge locally, and the cut is max_length tokens away from them).
    limit = 2 * (max_length + 1)
    if any(len(text) > limit for text in texts):
        limit *= max(map(len, tokenizer.get_vocab()), default=1)
        texts = [text[:limit] for text in texts]
    # verbose=False: no "longer than the specified maximum" notice; the cut below is what counts
    ids = tokenizer(list(texts), add_special_tokens=add_special_tokens, verbose=False)["input_ids"]
    truncated = np.array([len(seq) > max_length for seq in ids], dtype=bool)
    if truncated.any():
        logger.warning(
            "%d of %d texts are longer than %s%d tokens and were cut at the end",
            truncated.sum(),
            len(texts),
            f"{flag} " if flag else "",
            max_length,
        )
    return [seq[:max_length] for seq in ids], truncated


def iter_length_batches(
    token_ids: Sequence[Sequence[int]],
    pad_id: int,
    padding_side: str,
    batch_size: int,
    device: torch.device,
    desc: str,
    progress: bool = True,
    group_size: int | None = None,
) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
    """Yield (row indices, model inputs) over batches of similar length, longest first.

    Sorting by length keeps padding small (dynamic padding per batch) and surfaces out-of-memory on
    the first batch. With ``group_size`` g, rows g*j .. g*j+g-1 (one prompt's responses) are batched
    among themselves only, longest first: a row's batch, hence its floating-point result, is then the
    same whichever prompts share its shard or run. Inputs hold ``input_ids``, ``attention_mask`` and
    ``position_ids``, padded on the tokenizer's side. ``progress``: report progress as ``desc``
    (progress.py: a tqdm bar on a terminal, log lines in a log file).
    """
    from progress import progress as report_progress

    lengths = np.array([len(seq) for seq in token_ids])
    if group_size is None:
        order = np.argsort(-lengths, kind="stable")
        batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    else:
        batches = []
        for first in range(0, len(lengths), group_size):
            order = first + np.argsort(-lengths[first : first + group_size], kind="stable")
            batches += [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    for rows in report_progress(batches, desc, unit="batch", enabled=progress):
        width = int(lengths[rows].max())
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            seq = torch.as_tensor(token_ids[row], dtype=torch.long)
            span = slice(width - len(seq), width) if padding_side == "left" else slice(0, len(seq))
            input_ids[i, span] = seq
            attention_mask[i, span] = 1
        # Positions count real tokens only, so a left-padded row sees the positions it would see
        # unpadded (models otherwise number pads too).
        positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": positions}
        yield rows, {name: tensor.to(device) for name, tensor in batch.items()}


def pool_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, T, D) final hidden states -> (B, D) float32 embeddings.

    ``last``: the hidden state at the last real token of each row, for left or right padding alike
    (the paper's embedding of a causal LM). ``mean``: the attention-mask-weighted mean over the real
    tokens (special tokens included, as sentence-transformers pools), the embedding an encoder such as
    all-MiniLM-L6-v2 was trained to give; averaged in float32.
    """
    if pooling == "last":
        last = (torch.arange(hidden.shape[1], device=hidden.device) * attention_mask).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()
    if pooling == "mean":
        weights = attention_mask.to(torch.float32).unsqueeze(-1)
        return (hidden.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
    raise ValueError(f"unknown pooling {pooling!r} (expected one of {', '.join(POOLINGS)})")


def iter_embeddings(
    model,
    tokenizer,
    token_ids: Sequence[Sequence[int]],
    batch_size: int,
    device: torch.device,
    progress: bool = True,
    pooling: str = "last",
    group_size: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (row indices, (B, D) float32 embeddings) pooled from the final layer's hidden states
    (:func:`pool_hidden`; by default the last real token of each sequence), for ``model`` from
    ``load_embedding_model`` (step 4's procedure). ``progress``: report it (progress.py); ``group_size``:
    as :func:`iter_length_batches`. Raises RuntimeError on a non-finite hidden state."""
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r} (expected one of {', '.join(POOLINGS)})")
    for rows, batch in iter_length_batches(
        token_ids, tokenizer.pad_token_id, tokenizer.padding_side, batch_size, device, "embedding", progress, group_size
    ):
        with torch.inference_mode():
            hidden = model(**batch, use_cache=False).last_hidden_state
            vectors = pool_hidden(hidden, batch["attention_mask"], pooling).cpu().numpy()
        if not np.isfinite(vectors).all():
            raise RuntimeError("the embedding model returned non-finite hidden states")
        yield rows, vectors


def embed_texts(
    model,
    tokenizer,
    texts: Sequence[str],
    batch_size: int = 16,
    max_length: int = 1024,
    progress: bool = True,
    pooling: str = "last",
) -> np.ndarray:
    """(N, D) float32 embeddings of ``texts`` exactly as step 4 computes them (texts cut to
    ``max_length`` tokens, a warning says how many; ``pooling`` as step 4's ``--pooling``). For a
    (prompt, response) pair pass ``scored_text(prompt, cut_response(response))``. ``progress``:
    report it (progress.py)."""
    out = np.empty((len(texts), model.config.get_text_config().hidden_size), dtype=np.float32)
    if not len(texts):
        return out
    device = next(model.parameters()).device
    token_ids, _ = tokenize_texts(tokenizer, texts, max_length)
    for rows, vectors in iter_embeddings(model, tokenizer, token_ids, batch_size, device, progress, pooling):
        out[rows] = vectors
    return out


# --------------------------------------------------------------------------------------------
# argparse types local to the GPU steps
# --------------------------------------------------------------------------------------------
def split_arg(text: str) -> int | str:
    """argparse type for ``--split``: a part index (0, 1, ...) or 'all'."""
    if text == "all":
        return text
    try:
        return non_negative_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a part index >= 0 or 'all', got {text!r}") from None
