"""run_all.sh's variable table: which environment variable sets which flag of which step.

Data only, importing nothing of the project, so that cli.py (which names the variables in errors
under run_all.sh) and settings.py (which builds the steps' arguments from them) both read it. A
setting's default, type, choices and help stay in the step's own parser.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Command:
    """One command run_all.sh runs: its script, the flags its variables set, and the flags that are
    the command's shape rather than settings (which data class, which parts)."""

    name: str  # the bash array that receives its arguments: NAME_ARGS
    script: str
    flags: Mapping[str, str]  # flag -> variable
    fixed: tuple[str, ...] = ()
    stage: str = "cpu"  # gpu (steps 1-4), convert, demo, cpu (steps 5-8)
    paths: Mapping[str, str] = field(default_factory=dict)  # folder flag -> variable: always passed


OUT = {"--output_dir": "OUTPUT_DIR"}
OUT_DATA = {"--output_dir": "OUTPUT_DIR", "--data_dir": "DATA_DIR"}
_GENERATION = {
    "--model_name": "MODEL_NAME",
    "--dataset": "DATASET",
    "--eval_dataset": "EVAL_DATASET",
    "--max_len": "GEN_MAX_LEN",
}
_GOLDEN_RM = {"--reward_model": "GOLDEN_RM", "--rm_input_format": "RM_INPUT_FORMAT"}
_SHARDS = {"--num_shards": "NUM_SHARDS"}
_STEP2 = {
    **_GENERATION,
    **_SHARDS,
    "--backend": "GEN_BACKEND",
    "--tensor_parallel_size": "TP_SIZE",
    "--seed": "SEED",
}

COMMANDS = (
    Command(
        "STEP1",
        "step1_sft.py",
        {
            "--model_name": "MODEL_NAME",
            "--dataset": "DATASET",
            "--max_steps": "SFT_MAX_STEPS",
            "--seed": "SEED",
            "--train_file": "SFT_TRAIN_FILE",
        },
        stage="gpu",
        paths=OUT,
    ),
    *(
        Command(
            f"STEP2_{data_class.upper()}",
            "step2_gen_sample.py",
            {
                **_STEP2,
                "--n_samples": f"N_{data_class.upper()}_SAMPLES",
                "--max_prompts": max_prompts,
                "--prompts_file": f"{data_class.upper()}_PROMPTS_FILE",
            },
            ("--adapter_name", "sft", "--data_class", data_class, "--shard_index", "all"),
            stage="gpu",
            paths=OUT,
        )
        for data_class, max_prompts in (("train", "GPU_MAX_PROMPTS"), ("test", "GPU_MAX_TEST_PROMPTS"))
    ),
    *(
        Command(
            f"STEP3_{data_class.upper()}",
            "step3_reward_annotation.py",
            {**_GENERATION, **_GOLDEN_RM, **_SHARDS},
            ("--adapter_name", "sft", "--data_class", data_class, "--shard_index", "all"),
            stage="gpu",
            paths=OUT,
        )
        for data_class in ("train", "test")
    ),
    Command(
        "STEP3_5",
        "step3.5_processing_data.py",
        {**_GENERATION, **_GOLDEN_RM},
        ("--adapter_name", "sft", "--data_class", "both"),
        stage="gpu",
        paths=OUT,
    ),
    Command(
        "STEP4",
        "step4_gen_embeddings.py",
        {**_GENERATION, **_GOLDEN_RM, "--embed_model_name": "EMBED_MODEL_NAME"},
        ("--adapter_name", "sft", "--train_test", "both"),
        stage="gpu",
        paths=OUT_DATA,
    ),
    Command(
        "CONVERT",
        "convert_embeddings.py",
        {
            "--embd_dir": "EMBD_REPO_DIR",
            "--task": "TASK",
            "--sft_obj": "SFT_OBJ",
            "--embed_model": "MODEL_NAME",
            "--gen_model": "REPO_GEN_MODEL",
            "--max_prompts": "MAX_PROMPTS",
        },
        stage="convert",
        paths={"--output_dir": "DATA_DIR"},
    ),
    Command(
        "DEMO",
        "generate_demo_data.py",
        {
            "--n_prompts": "DEMO_PROMPTS",
            "--n_splits": "DEMO_N_SPLITS",
            "--emb_dim": "DEMO_EMB_DIM",
            "--seed": "DEMO_SEED",
            "--n_test_prompts": "DEMO_TEST_PROMPTS",
            "--n_test_responses": "DEMO_TEST_RESPONSES",
        },
        stage="demo",
        paths={"--output_dir": "DATA_DIR"},
    ),
    Command(
        "STEP5",
        "step5_train_rms.py",
        {
            "--embed_model_name": "EMBED_MODEL_NAME",
            "--task": "TASK",
            "--sft_obj": "SFT_OBJ",
            "--gen_pref_model_name": "GEN_PREF_MODEL",
            "--rm_objective": "RM_OBJECTIVE",
            "--rm_model": "RM_MODEL",
            "--consider_first_n": "CONSIDER_FIRST_N",
            "--n_sample": "N_SAMPLE",
            "--eval_prompts": "EVAL_PROMPTS",
            "--split_seed": "SPLIT_SEED",
            "--n_pairs": "N_PAIRS",
            "--pair_mode": "PAIR_MODE",
            "--replacement": "REPLACEMENT",
            "--training_epochs": "TRAINING_EPOCHS",
            "--learning_rate": "LEARNING_RATE",
            "--seed": "SEED",
            "--annotation_quality": "ANNOTATION_QUALITY",
            "--ensemble_number": "ENSEMBLE_NUMBER",
            "--early_stopping": "EARLY_STOPPING",
            "--stop_metric": "STOP_METRIC",
            "--min_val_pairs": "MIN_VAL_PAIRS",
            "--min_epoch_steps": "MIN_EPOCH_STEPS",
            "--reward_scale": "REWARD_SCALE",
            "--weight_decay": "WEIGHT_DECAY",
            "--bagging": "BAGGING",
            "--standardize": "STANDARDIZE",
        },
        paths={"--data_dir": "DATA_DIR", "--output_dir": "OUTPUT_DIR"},
    ),
    Command(
        "STEP7",
        "step7_isotonic_distillation.py",
        {
            "--task": "TASK",
            "--rm_objective": "RM_OBJECTIVE",
            "--distill_epochs": "DISTILL_EPOCHS",
            "--student_learning_rate": "DISTILL_LEARNING_RATE",
            "--student_seed": "SEED",
        },
        paths=OUT_DATA,
    ),
    Command("STEP6", "step6_eval_rms.py", {"--eval_seed": "SEED"}, paths=OUT_DATA),
    Command("STEP8", "step8_validate_distillation.py", {"--eval_seed": "SEED"}, paths=OUT_DATA),
)

# A variable left unset takes this other variable's value when that one is set (else the step's
# default): the embedding model is the generation model unless named, the published files'
# generator is the preference data's, and the test prompts are capped like the training prompts.
FALLBACKS = {
    "EMBED_MODEL_NAME": "MODEL_NAME",
    "REPO_GEN_MODEL": "GEN_PREF_MODEL",
    "GPU_MAX_TEST_PROMPTS": "GPU_MAX_PROMPTS",
}


def flag_variables(script: str) -> dict[str, str]:
    """{flag: variable} for ``script`` under run_all.sh ("" where two variables set it, as
    step 2's --n_samples is set by N_TRAIN_SAMPLES for the training prompts and N_TEST_SAMPLES for
    the test prompts)."""
    found: dict[str, str] = {}
    for command in COMMANDS:
        if command.script != Path(script).name:
            continue
        for flag, variable in {**command.flags, **command.paths}.items():
            found[flag] = variable if found.get(flag, variable) == variable else ""
    return found


def name_variables(message: str, script: str) -> str:
    """``message`` with each ``--flag`` that a run_all.sh variable sets for ``script`` followed by
    ``(VARIABLE)``, unless it already names it: under run_all.sh users set variables, not flags.
    The map is :data:`COMMANDS`, the one run_all.sh's preflight builds the steps' arguments from."""
    flags = flag_variables(script)

    def name(match: re.Match) -> str:
        variable = flags.get(match.group(1))
        return f"{match.group(1)} ({variable})" if variable and variable != match.group(2) else match.group(0)

    return re.sub(r"(--[a-z][a-z0-9_]*)(?![a-z0-9_])(?: \(([A-Z][A-Z0-9_]*)(?: in run_all\.sh)?\))?", name, message)
