"""Step 2 (GPU): sample n responses per prompt from the (LoRA-fine-tuned) policy model.

    python3 step2_gen_sample.py --model_name gemma2b --adapter_name sft --dataset hh-rlhf-helpful-gpt4 \\
        --eval_dataset hh-rlhf-helpful --data_class train --n_samples 10 --max_len 128 --split 0

Prompts: the hh-rlhf ``{task}-base`` split ``--data_class`` (prompt = text up to and including the
last "\\n\\nAssistant:" of the chosen dialogue), or ``--prompts_file`` (.jsonl/.csv, column prompt).
``--max_prompts`` keeps the first M prompts (tiny runs); the rest is cut into ``--num_shards``
contiguous shards (alias ``--n_parts``) and ``--shard_index`` (alias ``--split``) picks one (or ``all``);
in a SLURM job array the array task picks it. Each shard writes its own part files, atomically, so a
killed shard is redone by running it again and reruns never append. The backends (vllm, transformers),
the per-prompt seeds ``llm_models.prompt_seed(--seed, i)``, shards and the summary file:
docs/gpu_steps.md; the file flow: ``llm_models``.
"""

from __future__ import annotations

import interrupts  # noqa: F401  (first: signals are handled from here on, before the heavy imports)

# isort: split
import json
import logging
import time
from pathlib import Path

import torch

from artifacts import ensure_writable_dir, file_sha256, json_sha256, remove_leftover_temps, write_json
from cli import (
    ArgumentParser,
    InputError,
    add_dtype_arg,
    positive_float,
    positive_int,
    random_seed,
    run_cli,
    setup_logging,
)
from llm_models import (
    GenerationRun,
    add_generation_args,
    add_shard_args,
    cut_response,
    dtype_name,
    load_causal_lm,
    load_config,
    load_hh_rlhf,
    load_tokenizer,
    part_bounds,
    pick_device,
    pick_dtype,
    prompt_seed,
    read_table,
    resolve_model,
    resolve_shard,
    sft_adapter_dir,
    split_hh_dialogue,
    task_of,
    write_jsonl,
)
from progress import progress

log = logging.getLogger("step2_gen_sample")

TOP_P = 0.95
# vllm accepts these LoRA ranks only; the engine is sized for the smallest one >= the adapter's.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def build_parser() -> ArgumentParser:
    """The flags: each setting's one home (run_all.sh's variables set them: settings.py)."""
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_generation_args(parser)
    parser.add_argument(
        "--data_class",
        choices=("train", "test"),
        default="train",
        help="which prompts: train (ORM data) or test (best-of-N evaluation)",
    )
    parser.add_argument(
        "--n_samples",
        type=positive_int,
        default=None,
        help="responses per prompt (default: the paper's, 10 per training prompt and 500 per test prompt)",
    )
    add_shard_args(parser, index_default=0, count_default=5, all_ok=True)
    parser.add_argument("--prompts_file", help="local .jsonl/.csv with a prompt column, instead of hh-rlhf")
    parser.add_argument(
        "--max_prompts",
        type=positive_int,
        help="use only the first M prompts of the set (before it is cut into shards)",
    )
    parser.add_argument(
        "--max_prompt_len", type=positive_int, default=450, help="skip (and count) prompts longer than this many tokens"
    )
    parser.add_argument(
        "--backend",
        choices=("auto", "vllm", "transformers"),
        default="auto",
        help="vllm if installed and a GPU is present (auto), or the transformers generate loop",
    )
    parser.add_argument(
        "--batch_size", type=positive_int, default=64, help="transformers backend: sequences per generate call"
    )
    parser.add_argument(
        "--gpu_memory_utilization",
        type=positive_float,
        default=0.7,
        help="vllm backend: fraction of GPU memory for the engine",
    )
    parser.add_argument(
        "--tensor_parallel_size",
        type=positive_int,
        default=1,
        help="vllm backend: GPUs one model is split over (must divide its attention heads)",
    )
    parser.add_argument(
        "--max_model_len",
        type=positive_int,
        help="vllm backend: tokens per sequence the engine reserves KV cache for "
        "(default: --max_prompt_len + --max_len)",
    )
    add_dtype_arg(parser)
    parser.add_argument(
        "--seed", type=random_seed, default=6, help="run seed; prompt i is sampled with a seed derived from (seed, i)"
    )
    return parser


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if args.n_samples is None:
        args.n_samples = 10 if args.data_class == "train" else 500
    if args.gpu_memory_utilization > 1:
        raise InputError(f"--gpu_memory_utilization must be in (0, 1], got {args.gpu_memory_utilization}")
    if args.max_model_len is None:
        args.max_model_len = args.max_prompt_len + args.max_len
    elif args.max_model_len < args.max_prompt_len + args.max_len:
        raise InputError(
            f"--max_model_len {args.max_model_len} is less than --max_prompt_len + --max_len "
            f"({args.max_prompt_len + args.max_len})"
        )
    resolve_shard(args)
    return args


def load_prompts(args) -> list[tuple[int, str]]:
    """(id, prompt) of the whole prompt set; id is the row in the source."""
    if args.prompts_file is not None:
        rows = read_table(args.prompts_file, ("prompt",), "--prompts_file")
        prompts = [(i, row["prompt"]) for i, row in enumerate(rows)]
    else:
        task = task_of(args.eval_dataset)
        if task is None or not args.eval_dataset.startswith("hh-rlhf"):
            raise InputError(
                f"--eval_dataset {args.eval_dataset}: expected hh-rlhf-helpful or "
                "hh-rlhf-harmless, or pass --prompts_file"
            )
        prompts = []
        for i, dialogue in enumerate(load_hh_rlhf(task, args.data_class, "--prompts_file")):
            try:
                prompts.append((i, split_hh_dialogue(dialogue)[0]))
            except ValueError:
                log.warning("hh-rlhf %s row %d has no assistant turn; skipped", args.data_class, i)
    return prompts[: args.max_prompts] if args.max_prompts else prompts


def resolve_adapter(args) -> Path | None:
    """None for the base model, else a folder holding a peft adapter_config.json."""
    if args.adapter_name == "none":
        return None
    if args.adapter_name == "sft":
        path = sft_adapter_dir(args.output_dir, args.model_name, args.dataset)
        hint = " (run step1_sft.py with the same --model_name/--dataset/--output_dir, or --adapter_name none)"
    else:
        path, hint = Path(args.adapter_name).expanduser(), ""
    if not (path / "adapter_config.json").is_file():
        raise InputError(f"--adapter_name {args.adapter_name}: no LoRA adapter at {path}{hint}")
    return path


def adapter_fingerprint(adapter: Path | None) -> str | None:
    """sha256 of the adapter's config and weights, so shards sampled from different step-1 runs are
    told apart; None for the base model."""
    if adapter is None:
        return None
    files = sorted(p for p in adapter.glob("adapter_*") if p.is_file())
    return json_sha256([[p.name, file_sha256(p)] for p in files])


def vllm_imports() -> bool:
    try:
        import vllm  # noqa: F401 - optional dependency, probed only
    except ImportError:
        return False
    return True


def check_vllm_settings(args) -> None:
    """What the vllm backend needs, checked before any work: vllm, a GPU, a tensor-parallel size
    that the visible GPUs and the model's attention heads allow."""
    if not vllm_imports():
        raise InputError("--backend vllm: vllm is not installed (pip install vllm, or use --backend transformers)")
    if not torch.cuda.is_available():
        raise InputError("--backend vllm needs a CUDA GPU (use --backend transformers)")
    if args.tensor_parallel_size > torch.cuda.device_count():
        raise InputError(
            f"--tensor_parallel_size {args.tensor_parallel_size}: only {torch.cuda.device_count()} GPU(s) visible"
        )
    heads = load_config(args.model_name, "--model_name").get_text_config().num_attention_heads
    if heads % args.tensor_parallel_size:
        raise InputError(
            f"--tensor_parallel_size {args.tensor_parallel_size} does not divide the "
            f"{heads} attention heads of {args.model_name}"
        )


def generate_vllm(
    model_path: str, adapter: Path | None, prompts: list[str], seeds: list[int], args, dtype: torch.dtype
) -> list[list[str]]:
    """n responses per prompt from one vllm ``generate`` call, prompt i sampled with ``seeds[i]``."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    engine_args = {}
    if adapter is not None:
        rank = json.loads((adapter / "adapter_config.json").read_text()).get("r", 32)
        engine_args = {"enable_lora": True, "max_lora_rank": next(r for r in VLLM_LORA_RANKS if r >= rank)}
    llm = LLM(
        model=model_path,
        dtype=dtype_name(dtype),
        seed=args.seed,
        tensor_parallel_size=args.tensor_parallel_size,
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        trust_remote_code=False,  # never code from a model folder (llm_models._from_pretrained)
        **engine_args,
    )
    top_p = TOP_P if args.temperature > 0 else 1.0
    sampling = [
        SamplingParams(n=args.n_samples, temperature=args.temperature, top_p=top_p, max_tokens=args.max_len, seed=seed)
        for seed in seeds
    ]
    lora = LoRARequest("sft", 1, str(adapter)) if adapter is not None else None
    outputs = llm.generate(prompts, sampling, lora_request=lora)
    return [[completion.text for completion in output.outputs] for output in outputs]


def generate_transformers(
    model, tokenizer, prompt_ids: list[list[int]], seeds: list[int], args, device: torch.device
) -> list[list[str]]:
    """n responses per prompt: one ``generate`` call per prompt (``--batch_size`` sequences at most),
    the RNG seeded with the prompt's seed first, so no prompt's samples depend on another's."""
    sampling = {"do_sample": True, "temperature": args.temperature, "top_p": TOP_P, "top_k": 0}
    decoding = sampling if args.temperature > 0 else {"do_sample": False}
    responses: list[list[str]] = []
    for ids, seed in progress(list(zip(prompt_ids, seeds)), "generating", unit="prompt"):
        torch.manual_seed(seed)  # generate draws from the global RNG (CPU and CUDA)
        input_ids = torch.as_tensor([ids], device=device)
        texts: list[str] = []
        for first in range(0, args.n_samples, args.batch_size):
            count = min(args.batch_size, args.n_samples - first)
            with torch.inference_mode():
                sequences = model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    num_return_sequences=count,
                    max_new_tokens=args.max_len,
                    pad_token_id=tokenizer.pad_token_id,
                    **decoding,
                )
            texts += tokenizer.batch_decode(sequences[:, len(ids) :], skip_special_tokens=True)
        responses.append(texts)
    return responses


def pick_backend(args) -> str:
    """``--backend``, with auto resolved (vllm if installed and a GPU is present, else transformers);
    what vllm needs is checked here, before any work."""
    backend = args.backend
    if backend == "auto":
        backend = "vllm" if torch.cuda.is_available() and vllm_imports() else "transformers"
    if backend == "vllm":
        check_vllm_settings(args)
    return backend


def part_prompts(
    all_prompts: list[tuple[int, str]], parts, tokenizer, num_shards: int, max_prompt_len: int
) -> tuple[dict[int, list[tuple[int, str, list[int]]]], dict[int, list[int]]]:
    """Each part's (id, prompt, token ids) to sample, and the ids of its prompts longer than
    ``max_prompt_len`` tokens (skipped, and counted in the part's summary)."""
    kept_by_part, skipped = {}, {}
    for part in parts:
        start, stop = part_bounds(len(all_prompts), num_shards, part)
        kept, too_long = [], []
        for prompt_id, prompt in all_prompts[start:stop]:
            ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            (kept if len(ids) <= max_prompt_len else too_long).append((prompt_id, prompt, ids))
        kept_by_part[part], skipped[part] = kept, [prompt_id for prompt_id, _, _ in too_long]
    return kept_by_part, skipped


def sample_responses(
    backend: str, model_path: str, adapter: Path | None, work: list, tokenizer, args, device, dtype
) -> list[list[str]]:
    """``--n_samples`` responses for each (id, prompt, token ids) of ``work``, prompt i sampled with
    the seed ``prompt_seed(--seed, id)``, by vllm or by the transformers model (adapter merged in)."""
    seeds = [prompt_seed(args.seed, prompt_id) for prompt_id, _, _ in work]
    if backend == "vllm":
        return generate_vllm(model_path, adapter, [prompt for _, prompt, _ in work], seeds, args, dtype)
    model = load_causal_lm(args.model_name, "--model_name", device, dtype)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.eval()
    return generate_transformers(model, tokenizer, [ids for _, _, ids in work], seeds, args, device)


def sample_settings(args, model_path: str, adapter: Path | None, backend: str, dtype, all_prompts: list) -> dict:
    """What every record and summary of the run holds: the settings that made the samples."""
    settings = {
        "model_name": args.model_name,
        "model_path": model_path,
        "adapter_name": args.adapter_name,
        "adapter_path": str(adapter) if adapter else None,
        "dataset": args.dataset,
        "eval_dataset": args.eval_dataset,
        "prompts_file": args.prompts_file,
        "data_class": args.data_class,
        "n_samples": args.n_samples,
        "max_len": args.max_len,
        "temperature": args.temperature,
        "top_p": TOP_P if args.temperature > 0 else 1.0,
        "seed": args.seed,
        "seed_rule": "prompt_seed(seed, id)",
        "backend": backend,
        "dtype": dtype_name(dtype),
        "num_shards": args.num_shards,
        "max_prompt_len": args.max_prompt_len,
        "max_prompts": args.max_prompts,
        # what step 3.5's merge compares between shards besides the flags: the whole prompt set
        # (every shard reads it all) and the adapter's files
        "n_prompts_in_set": len(all_prompts),
        "prompt_set_sha256": json_sha256(all_prompts),
        "adapter_sha256": adapter_fingerprint(adapter),
    }
    if backend == "vllm":
        settings.update(tensor_parallel_size=args.tensor_parallel_size, max_model_len=args.max_model_len)
    return settings


def write_parts(run: GenerationRun, args, parts, prompts: dict, skipped: dict, responses: list, settings: dict) -> None:
    """One samples file and one summary per part, each written atomically; ``responses`` are in the
    order of the parts' prompts."""
    responses_in_order = iter(responses)
    for part in parts:
        records = [
            {
                "query": prompt,
                "id": prompt_id,
                **{f"response_{i}": text for i, text in enumerate(next(responses_in_order))},
                "settings": {**settings, "shard_index": part},
            }
            for prompt_id, prompt, _ in prompts[part]
        ]
        cuts = [cut_response(r[f"response_{i}"]) for r in records for i in range(args.n_samples)]
        write_jsonl(run.samples_path(args.data_class, part), records)
        write_json(
            run.summary_path(args.data_class, part),
            {
                **settings,
                "shard_index": part,
                "n_prompts_in_part": len(records) + len(skipped[part]),
                "n_generated": len(records),
                "n_skipped_over_length": len(skipped[part]),
                "skipped_ids": skipped[part],
                "n_responses": len(cuts),
                "n_empty_after_cut": sum(not cut for cut in cuts),
            },
        )


def count_responses(responses: list[list[str]], tokenizer) -> tuple[int, int]:
    """The responses' tokens and how many are empty once cut (logged as a warning when any are)."""
    texts = [text for row in responses for text in row]
    n_tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    n_empty = sum(not cut_response(text) for text in texts)
    if n_empty:
        log.warning('%d of %d responses are empty once cut at the first "\\n\\nHuman"', n_empty, len(texts))
    return n_tokens, n_empty


def main(argv=None):
    args = parse_args(argv)
    setup_logging()
    run = GenerationRun.from_args(args)

    # ---- inputs, checked before any work ----------------------------------------------------
    model_path = resolve_model(args.model_name, "--model_name")
    adapter = resolve_adapter(args)
    all_prompts = load_prompts(args)
    parts = range(args.num_shards) if args.shard_index == "all" else [args.shard_index]
    backend = pick_backend(args)
    device = pick_device()
    dtype = pick_dtype(device, requested=args.dtype)
    tokenizer = load_tokenizer(args.model_name, "--model_name", padding_side="left")
    prompts, skipped = part_prompts(all_prompts, parts, tokenizer, args.num_shards, args.max_prompt_len)
    work = [item for part in parts for item in prompts[part]]
    n_skipped = sum(map(len, skipped.values()))
    log.info(
        "%s part(s) %s: %d prompts, %d skipped as longer than %d tokens; backend %s, device %s, %s",
        args.data_class,
        list(parts),
        len(work),
        n_skipped,
        args.max_prompt_len,
        backend,
        device,
        dtype,
    )
    if not work:
        raise InputError(
            f"no prompts to generate for --shard_index {args.shard_index} "
            f"({len(all_prompts)} prompts in all, --max_prompt_len {args.max_prompt_len})"
        )
    ensure_writable_dir(run.folder, "--output_dir")
    for part in parts:  # what a shard killed mid-write left behind
        remove_leftover_temps(
            run.folder, [run.samples_path(args.data_class, part).name, run.summary_path(args.data_class, part).name]
        )

    # ---- generate ---------------------------------------------------------------------------
    started = time.perf_counter()
    responses = sample_responses(backend, model_path, adapter, work, tokenizer, args, device, dtype)
    seconds = time.perf_counter() - started

    # ---- write one file per part ------------------------------------------------------------
    settings = sample_settings(args, model_path, adapter, backend, dtype, all_prompts)
    write_parts(run, args, parts, prompts, skipped, responses, settings)
    n_tokens, n_empty = count_responses(responses, tokenizer)
    print(
        f"step2: {len(work)} prompts x {args.n_samples} responses ({args.data_class}, part(s) "
        f"{','.join(map(str, parts))}) -> {run.folder}; {n_skipped} over-length "
        f"prompts skipped; {n_empty} responses empty after the cut; {n_tokens} tokens in {seconds:.1f} s = "
        f"{n_tokens / max(seconds, 1e-9):.1f} tokens/s with {backend} ({dtype_name(dtype)})"
    )


if __name__ == "__main__":
    run_cli(main)
