"""Step 1 (GPU): supervised fine-tuning of the policy model with LoRA, loss on the completion only.

    python3 step1_sft.py --model_name gemma2b --dataset hh-rlhf-helpful-gpt4

Data (``load_sft_pairs``): the GPT-4 demonstrations for ``hh-rlhf-{task}-gpt4`` (README, "Steps 1-4
(GPU)"), the chosen dialogues of Anthropic/hh-rlhf ``{task}-base`` for ``hh-rlhf-{task}``, or any
``--train_file``. The LoRA adapter (``LORA_SETTINGS``) is trained by trl's SFTTrainer with
``completion_only_loss``, in bf16 where the GPU supports it. Writes the adapter to
``llm_models.sft_adapter_dir``, where step 2 looks for ``--adapter_name sft``; the swap into place
is atomic, so a failed run leaves the previous adapter intact. Trainer checkpoints and logs go to
the sibling folder ``..._trainer``.

One process is the default. Under ``torchrun --nproc_per_node N`` (or ``accelerate launch``) the
same command trains data-parallel (DDP: NCCL on GPUs, one per process; gloo on CPUs), each process on
1/N of every batch-step's examples, so the effective batch is N x ``--batch_size`` x
``--gradient_accumulation_steps``; process 0 alone writes the adapter (docs/gpu_steps.md).
"""

from __future__ import annotations

import interrupts  # noqa: F401  (first: signals are handled from here on, before the heavy imports)

# isort: split
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch

from artifacts import ensure_writable_dir, write_json
from cli import ArgumentParser, InputError, finite_float, positive_int, random_seed, run_cli, setup_logging
from llm_models import (
    ASSISTANT_TURN,
    REPO_ROOT,
    dtype_name,
    gpt4_demo_prompt,
    load_causal_lm,
    load_hh_rlhf,
    load_tokenizer,
    pick_device,
    pick_dtype,
    read_table,
    resolve_model,
    sft_adapter_dir,
    split_hh_dialogue,
    task_of,
)

log = logging.getLogger("step1_sft")

LORA_SETTINGS = {"r": 32, "lora_alpha": 32, "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM"}


def build_parser() -> ArgumentParser:
    """The flags: each setting's one home (run_all.sh's variables set them: settings.py)."""
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model_name", default="gemma2b", help="base model: gemma2b, gemma7b, llama38b, a local folder or a hub id"
    )
    parser.add_argument(
        "--dataset",
        default="hh-rlhf-helpful-gpt4",
        help="hh-rlhf-{helpful,harmless}-gpt4 (GPT-4 demonstrations) or hh-rlhf-{helpful,harmless}; "
        "with --train_file only a name for the adapter",
    )
    parser.add_argument(
        "--train_file",
        help="local .jsonl/.csv with prompt and completion columns (replaces the data set)",
    )
    parser.add_argument("--learning_rate", type=finite_float, default=5e-5, help="AdamW learning rate")
    parser.add_argument("--epochs", type=positive_int, default=2, help="training epochs")
    parser.add_argument("--max_steps", type=int, default=-1, help="stop after this many steps (-1: all epochs)")
    parser.add_argument("--batch_size", type=positive_int, default=4, help="per-device batch size")
    parser.add_argument(
        "--gradient_accumulation_steps", type=positive_int, default=1, help="batches accumulated per optimizer step"
    )
    parser.add_argument(
        "--max_length",
        type=positive_int,
        default=512,
        help="tokens per training sequence (longer ones are cut at the end)",
    )
    parser.add_argument("--save_steps", type=positive_int, default=5000, help="trainer checkpoint interval")
    parser.add_argument("--seed", type=random_seed, default=6, help="seed of the trainer (data order, LoRA init)")
    parser.add_argument("--output_dir", default="distill_out", help="work folder of steps 1-3.5")
    return parser


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if args.max_steps == 0 or args.max_steps < -1:
        raise InputError(f"--max_steps must be a positive integer or -1, got {args.max_steps}")
    return args


def load_sft_pairs(args) -> list[dict]:
    """Prompt/completion pairs for the run, from --train_file, the GPT-4 CSV or hh-rlhf."""
    if args.train_file is not None:
        rows = read_table(args.train_file, ("prompt", "completion"), "--train_file")
        return [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]
    task = task_of(args.dataset)
    if task is None or not args.dataset.startswith("hh-rlhf-"):
        raise InputError(
            f"--dataset {args.dataset}: expected hh-rlhf-{{helpful,harmless}}[-gpt4], or pass --train_file"
        )
    if args.dataset.endswith("-gpt4"):
        csv_path = REPO_ROOT / "data" / f"synthetic_hhrlhf_{task}_expert_gpt4.csv"
        if not csv_path.is_file():
            raise InputError(
                f"--dataset {args.dataset}: GPT-4 demonstration file {csv_path} not found (it is not "
                'distributed with this code: see README "Steps 1-4 (GPU)"; or pass --train_file, '
                f"or --dataset hh-rlhf-{task})"
            )
        rows = read_table(csv_path, ("query", "response"), "--dataset")
        # hh-rlhf completions start with a space after "Assistant:"; the CSV responses do not.
        return [{"prompt": gpt4_demo_prompt(r["query"]), "completion": " " + r["response"].strip()} for r in rows]
    # a handful of hh-rlhf rows have no assistant turn
    split = (split_hh_dialogue(d) for d in load_hh_rlhf(task, "train", "--train_file") if ASSISTANT_TURN in d)
    return [{"prompt": prompt, "completion": completion} for prompt, completion in split]


def sft_trainer(args, pairs: list[dict], trainer_dir: Path, device: torch.device, dtype: torch.dtype):
    """trl's SFTTrainer for the LoRA adapter (``LORA_SETTINGS``) on ``pairs``, loss on the completion
    only, checkpoints and logs in ``trainer_dir``. Imports trl, peft and datasets (slow) only here."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    tokenizer = load_tokenizer(args.model_name, "--model_name", padding_side="right")
    model = load_causal_lm(args.model_name, "--model_name", device, dtype)
    config = SFTConfig(
        output_dir=str(trainer_dir),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_length=args.max_length,
        completion_only_loss=True,
        bf16=dtype == torch.bfloat16,
        gradient_checkpointing=device.type == "cuda",
        save_strategy="steps",
        save_steps=args.save_steps,
        logging_steps=10,
        seed=args.seed,
        data_seed=args.seed,
        report_to="none",
        use_cpu=device.type == "cpu",  # so that torchrun on CPUs trains data-parallel (gloo), not N copies
    )
    torch.manual_seed(args.seed)  # SFTTrainer initialises the LoRA weights before it seeds anything itself
    return SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(pairs),
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA_SETTINGS),
    )


def sft_run_record(args, n_pairs: int, result, world_size: int, dtype: torch.dtype, seconds: float) -> dict:
    """``sft_run.json``, saved with the adapter: the flags (but the work folder and checkpoint interval)
    and what the training did."""
    return {
        **{flag: value for flag, value in vars(args).items() if flag not in ("output_dir", "save_steps")},
        "model_path": resolve_model(args.model_name, "--model_name"),
        "n_pairs": n_pairs,
        "global_steps": int(result.global_step),
        "world_size": world_size,  # processes that trained data-parallel (torchrun)
        "train_loss": float(result.training_loss),
        "dtype": dtype_name(dtype),
        "lora": LORA_SETTINGS,
        "train_seconds": round(seconds, 2),
    }


def write_adapter(trainer, adapter_dir: Path, record: dict) -> None:
    """Save the trained adapter and ``record`` (``sft_run.json``) into a folder beside ``adapter_dir``,
    then swap it into place: a run that fails on the way leaves the previous adapter intact."""
    adapter_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=adapter_dir.parent, prefix=f".{adapter_dir.name}."))
    staging.chmod(0o755)  # mkdtemp creates it private; the adapter is a normal shared artifact
    try:
        trainer.save_model(str(staging))
        write_json(staging / "sft_run.json", record)
        old = adapter_dir.with_name(f".{adapter_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if adapter_dir.exists():
            adapter_dir.rename(old)
        staging.rename(adapter_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv=None):
    args = parse_args(argv)
    setup_logging()

    # ---- inputs, checked before any work (and before the slow trl/peft imports) -------------
    resolve_model(args.model_name, "--model_name")
    pairs = load_sft_pairs(args)
    output_dir = ensure_writable_dir(args.output_dir)
    adapter_dir = sft_adapter_dir(output_dir, args.model_name, args.dataset)
    device = pick_device()
    dtype = pick_dtype(device, training=True)
    log.info("%d prompt/completion pairs; device %s, dtype %s", len(pairs), device, dtype)

    # ---- model, trainer and training --------------------------------------------------------
    trainer = sft_trainer(args, pairs, adapter_dir.with_name(adapter_dir.name + "_trainer"), device, dtype)
    started = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - started

    # ---- write (process 0 of a torchrun) ----------------------------------------------------
    if not trainer.is_world_process_zero():
        return
    record = sft_run_record(args, len(pairs), result, trainer.args.world_size, dtype, seconds)
    write_adapter(trainer, adapter_dir, record)
    print(
        f"step1: LoRA adapter -> {adapter_dir} ({result.global_step} steps, "
        f"loss {result.training_loss:.4f}, {seconds:.1f} s)"
    )


if __name__ == "__main__":
    run_cli(main)
