"""run_all.sh's settings: the steps' command lines built from the environment, and checked.

A setting's default, type, choices and help live in one place, the argparse parser of the step that
takes it (``python stepN_....py --help``). Which run_all.sh variable sets which flag is
run_variables.py's table; run_all.sh passes a flag only when its variable is set (and not empty), so an unset
variable means the step's own default. Besides, run_all.sh has a few switches of its own that no
step takes (:func:`driver_parser`).

``python settings.py preflight CALLER_DIR`` is run_all.sh's first Python process: it reads the
environment, builds every step's argument list, parses each with that step's own parser before any
work starts (a bad value is one line and exit status 2), and prints bash assignments that
run_all.sh evaluates (the argument lists, the resolved folders, the interpreter's path, and the
resolved settings to show once). ``python settings.py variables`` lists the variables (run_sweep.sh
reads them), and ``python settings.py table`` writes the README's configuration table from the
parsers' help (``--group TITLE``: docs/method.md's table of an argument group of steps 5-8).
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import os
import re
import shlex
import sys
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cli import ArgumentParser, InputError, positive_int, zero_one
from run_variables import COMMANDS, FALLBACKS, Command, flag_variables

REPO = Path(__file__).resolve().parent


# Variables naming files and folders: relative to the caller's directory, then made canonical
# (os.path.realpath), so data/, ./data/ and the absolute path are one folder for the steps' command
# lines, which key their up-to-date records (run_state.py).
PATH_VARIABLES = (
    "OUTPUT_DIR",
    "DATA_DIR",
    "EMBD_REPO_DIR",
    "SFT_TRAIN_FILE",
    "TRAIN_PROMPTS_FILE",
    "TEST_PROMPTS_FILE",
)
# Model variables: short names, hub ids or local folders; a relative value naming a folder of the
# caller's directory is that folder (as from_pretrained would find it from there).
MODEL_VARIABLES = ("MODEL_NAME", "EMBED_MODEL_NAME", "GOLDEN_RM")
STEP_NAMES = {"STEP3_5": "step 3.5", "CONVERT": "conversion", "DEMO": "demo data"}


def driver_parser() -> ArgumentParser:
    """run_all.sh's own switches: what it runs, where it writes, whether it redoes work."""
    parser = ArgumentParser(prog="run_all.sh", add_help=False)

    def switch(name: str, help: str) -> None:
        parser.add_argument(f"--{name}", dest=name, type=zero_one, default=0, help=help)

    switch("RUN_GPU_STEPS", "`1`: run steps 1-4 (LoRA SFT, sampling, golden rewards, embeddings) first")
    switch("USE_REPO_EMBD", "`1`: convert the published embeddings in `EMBD_REPO_DIR` first")
    switch("DATA_ONLY", "`1`: prepare `DATA_DIR` (steps 1-4, conversion or demo data), then stop")
    parser.add_argument(
        "--PRINT_JOBS", dest="PRINT_JOBS", choices=("0", "slurm", "lines"), default="0",
        help="with `RUN_GPU_STEPS=1`: print the run as jobs instead of running it, each GPU step an array of "
        "`NUM_SHARDS` jobs: `slurm`, a bash script of `sbatch --array` commands chained by "
        "`--dependency=afterok`; `lines`, one command per line, stage after stage, for GNU parallel "
        "(docs/gpu_steps.md, \"Shards on a cluster\")",
    )  # fmt: skip
    switch("FORCE", "`1`: rerun steps 5-8 even where they are up to date")
    parser.add_argument(
        "--LAST_STEP", dest="LAST_STEP", type=int, choices=(5, 6, 7, 8), default=8,
        help="stop after this step (e.g. `6` for ranking studies, which need no calibration)",
    )  # fmt: skip
    parser.add_argument("--OUTPUT_DIR", dest="OUTPUT_DIR", default="distill_out", help="steps 5-8's outputs")
    parser.add_argument(
        "--DATA_DIR", dest="DATA_DIR", default=None,
        help="embedding data (default: `data` for the demo, a folder named after the setup for converted or "
        "generated data, so setups never overwrite each other)",
    )  # fmt: skip
    parser.add_argument(
        "--THREADS", dest="THREADS", type=positive_int, default=None,
        help="torch and BLAS threads of each step (exported as `OMP_NUM_THREADS`, `MKL_NUM_THREADS`, "
        "`OPENBLAS_NUM_THREADS`); steps 6 and 7, which run side by side, get half each. Default: "
        "`OMP_NUM_THREADS` when set, else the CPUs this process may run on (its affinity mask, which a "
        "scheduler sets). A matrix product's last bits depend on its threads, so results are "
        "bit-identical only at the same THREADS (docs/performance.md). More than the CPUs is allowed with one "
        "warning line",
    )  # fmt: skip
    return parser


def resolve_threads(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """THREADS, else a valid OMP_NUM_THREADS, else the CPUs of this process's affinity mask."""
    if args.THREADS:
        return args.THREADS
    omp = environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    return available_cpus()


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which a scheduler's allocation sets)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads_warning(threads: int) -> str | None:
    """A warning, not a refusal, when THREADS exceeds the CPUs: oversubscribing is slow but legal
    (a timing study may want it, and a container's CPU quota may differ from its affinity mask)."""
    cpus = available_cpus()
    if threads <= cpus:
        return None
    return (
        f"THREADS={threads} is more than the {cpus} CPU(s) this process may run on: the steps' threads "
        "will contend for them (slower; results stay bit-identical at the same THREADS)"
    )


def commands(stage: str | None = None) -> list[Command]:
    return [c for c in COMMANDS if stage is None or c.stage == stage]


def variables() -> list[str]:
    """Every run_all.sh setting, sorted: the driver's switches and the variables of the step flags."""
    names = {action.dest for action in driver_parser()._actions}
    names.update(variable for command in COMMANDS for variable in command.flags.values())
    return sorted(names | {"PYTHON"})


# Environment variables that are not run_all.sh settings but belong to the project or its tools.
OTHER_VARIABLES = {"LOG_LEVEL", "SWEEP", "GRID", "SEEDS", "NAME", "SWEEP_DIR", "JOBS", "THREADS", "PRINT"}


def setting_typos(environ: Mapping[str, str]) -> list[str]:
    """One warning per environment variable that looks like a misspelt run_all.sh setting: a
    lower-case spelling of one (``n_sample``) or a near miss (``NSAMPLE``, by difflib's ratio)."""
    known = set(variables())
    warnings = []
    for name in sorted(environ):
        if name in known or name in OTHER_VARIABLES or name.startswith("RUN_ALL_") or len(name) < 4:
            continue
        if name.upper() in known:
            guess = name.upper()
        else:
            close = difflib.get_close_matches(name.upper(), sorted(known), n=1, cutoff=0.85)
            if not close:
                continue
            guess = close[0]
        warnings.append(f"{name} is not a run_all.sh setting and is ignored; did you mean {guess}?")
    return warnings


def load_script(script: str):
    """A step script as a module (its file name may hold a dot: step3.5_processing_data.py)."""
    name = "_settings_" + Path(script).stem.replace(".", "_")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def step_parser(script: str) -> argparse.ArgumentParser:
    """The step's own parser (its ``build_parser``)."""
    return load_script(script).build_parser()


def step_defaults(script: str) -> dict[str, object]:
    """{dest: default} of a step's parser (summarize_runs.py compares runs by these)."""
    return {a.dest: a.default for a in step_parser(script)._actions if a.dest != "help"}


# --------------------------------------------------------------------------------------------
# the preflight
# --------------------------------------------------------------------------------------------
def resolve_environment(environ: Mapping[str, str], caller_dir: str) -> dict[str, str]:
    """The set (non-empty) variables, with fallbacks applied and paths made absolute."""
    values = {name: value for name, value in environ.items() if value != "" and name in set(variables())}
    for name, other in FALLBACKS.items():
        if name not in values and other in values:
            values[name] = values[other]
    for name in PATH_VARIABLES:
        if name in values:
            if "\n" in values[name]:
                raise InputError(f"{name} must not contain a newline")
            values[name] = os.path.realpath(os.path.join(caller_dir, values[name]))
    for name in MODEL_VARIABLES:
        if name in values and not os.path.isabs(values[name]) and os.path.isdir(os.path.join(caller_dir, values[name])):
            values[name] = os.path.join(caller_dir, values[name])
    return values


def parse_driver(values: Mapping[str, str]) -> argparse.Namespace:
    parser = driver_parser()
    argv = [f"--{action.dest}={values[action.dest]}" for action in parser._actions if action.dest in values]
    try:
        args = parser.parse_args(argv)
    except InputError as err:
        raise InputError(_variable_message(str(err), {f"--{a.dest}": a.dest for a in parser._actions})) from None
    if args.RUN_GPU_STEPS and args.USE_REPO_EMBD:
        raise InputError("set at most one of RUN_GPU_STEPS=1 and USE_REPO_EMBD=1")
    if args.PRINT_JOBS != "0" and not args.RUN_GPU_STEPS:
        raise InputError(f"PRINT_JOBS={args.PRINT_JOBS} prints the GPU steps' jobs: set RUN_GPU_STEPS=1 too")
    return args


def _variable_message(message: str, flags: Mapping[str, str]) -> str:
    """A parser's error with the variable named: ``N_SAMPLE: expected a positive integer, got '-3'``."""
    message = re.sub(r"^[\w.-]+: (error: )?", "", message)
    match = re.match(r"argument (--[A-Za-z0-9_]+)(?:/[^:]*)?: (.*)", message, re.S)
    if match and flags.get(match.group(1)):
        return f"{flags[match.group(1)]}: {match.group(2)}"
    for flag, variable in flags.items():  # a step's own check (parse_args after argparse)
        if variable:
            message = re.sub(rf"{re.escape(flag)}(?![a-z0-9_])(?! \()", f"{flag} ({variable})", message)
    return message


def flag_lookalikes(environ: Mapping[str, str], scripts: Sequence[str]) -> list[str]:
    """One warning per environment variable named like a flag of a step that no variable sets
    (``PATIENCE``, ``BATCH_SIZE``): run_all.sh would ignore it silently."""
    known = set(variables())
    found: dict[str, list[str]] = {}
    for script in dict.fromkeys(scripts):
        for action in step_parser(script)._actions:
            name = action.dest.upper()
            if name in environ and name not in known and len(name) >= 4 and action.option_strings:
                found.setdefault(name, []).append(f"{_step_label(script)}'s {action.option_strings[0]}")
    return [
        f"{name} is not a run_all.sh setting and is ignored: no variable sets {' or '.join(flags)} "
        "(run that step by hand to change it)"
        for name, flags in found.items()
    ]


def build_argv(command: Command, values: Mapping[str, str], folders: Mapping[str, str]) -> list[str]:
    argv = [*command.fixed]
    for flag, variable in command.paths.items():
        argv += [flag, folders[variable]]
    for flag, variable in command.flags.items():
        if variable in values:  # --flag=value: a value may start with "-" (ANNOTATION_QUALITY=-1e400)
            argv.append(f"{flag}={values[variable]}")
    return argv


def parse_command(command: Command, argv: list[str]) -> argparse.Namespace:
    module = load_script(command.script)
    try:
        return module.parse_args(argv)
    except InputError as err:
        raise InputError(_variable_message(str(err), flag_variables(command.script))) from None


def default_data_dir(args: argparse.Namespace, parsed: Mapping[str, argparse.Namespace]) -> str:
    """Converted or generated embeddings go to a folder named after the setup, so that setups never
    overwrite each other (nor the demo data in data/)."""
    if args.USE_REPO_EMBD:
        c = parsed["CONVERT"]
        return f"data_{c.task}_{c.sft_obj}_{os.path.basename(c.embed_model.rstrip('/'))}_{c.gen_model}" + (
            f"_max{c.max_prompts}" if c.max_prompts else ""
        )
    if args.RUN_GPU_STEPS:
        s = parsed["STEP4"]
        return f"data_gpu_{s.dataset}_{os.path.basename(s.embed_model_name.rstrip('/'))}"
    return "data"


def preflight(environ: Mapping[str, str], caller_dir: str) -> tuple[dict[str, str], dict[str, list[str]], list[str]]:
    """(bash variables, {command name: argv}, settings text) for run_all.sh; InputError on a bad value."""
    values = resolve_environment(environ, caller_dir)
    args = parse_driver(values)
    stages = ["cpu", "gpu" if args.RUN_GPU_STEPS else "convert" if args.USE_REPO_EMBD else "demo"]
    folders = {name: values.get(name, "") for name in ("OUTPUT_DIR", "DATA_DIR")}
    folders["OUTPUT_DIR"] = folders["OUTPUT_DIR"] or str(REPO / args.OUTPUT_DIR)
    placeholder = "DATA_DIR"  # the default data folder depends on the parsed settings
    parsed: dict[str, argparse.Namespace] = {}
    argvs: dict[str, list[str]] = {}
    for command in COMMANDS:
        if command.stage not in stages:
            continue
        argv = build_argv(command, values, {**folders, "DATA_DIR": folders["DATA_DIR"] or placeholder})
        parsed[command.name] = parse_command(command, argv)
        argvs[command.name] = argv
    if not folders["DATA_DIR"]:
        folders["DATA_DIR"] = os.path.realpath(REPO / default_data_dir(args, parsed))
        for argv in argvs.values():
            argv[:] = [folders["DATA_DIR"] if arg is placeholder else arg for arg in argv]
    shown = {"EMBD_REPO_DIR": parsed["CONVERT"].embd_dir} if "CONVERT" in parsed else {}
    threads = resolve_threads(args, environ)
    bash = {
        **{
            name: str(getattr(args, name))
            for name in ("RUN_GPU_STEPS", "USE_REPO_EMBD", "DATA_ONLY", "FORCE", "LAST_STEP", "PRINT_JOBS")
        },
        "THREADS": str(threads),
        "SIDE_THREADS": str(max(1, threads // 2)),
        **folders,
        **shown,
    }
    if "STEP4" in parsed:
        s2, s4 = parsed["STEP2_TRAIN"], parsed["STEP4"]
        bash.update(
            MODEL_NAME=s4.model_name, DATASET=s4.dataset, EMBED_MODEL_NAME=s4.embed_model_name,
            N_TRAIN_SAMPLES=str(s2.n_samples), N_TEST_SAMPLES=str(parsed["STEP2_TEST"].n_samples),
        )  # fmt: skip
    text = settings_text(values, parsed, stages)
    text.append(
        f"  threads: THREADS={threads}{'*' if 'THREADS' in values else ''} (steps 6 and 7: {bash['SIDE_THREADS']} each)"
    )
    if args.PRINT_JOBS != "0":
        stages = job_stages(argvs, values, folders, parsed["STEP2_TRAIN"].num_shards)
        bash["JOBS_TEXT"] = slurm_script(stages) if args.PRINT_JOBS == "slurm" else job_lines(stages)
    return bash, argvs, text


# --------------------------------------------------------------------------------------------
# the GPU steps as jobs (PRINT_JOBS): arrays of shards chained by their merges
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobStage:
    """One stage of the run: its jobs may run together, each after every job of the stage before."""

    title: str
    jobs: tuple[tuple[str, str], ...]  # (job name, command): one job, or one array (the shard from SLURM)
    shards: tuple[str, ...] = ()  # the arrays' tasks as plain command lines
    gpu: bool = True


def job_stages(
    argvs: Mapping[str, list[str]], values: Mapping[str, str], folders: Mapping[str, str], num_shards: int
) -> list[JobStage]:
    """The GPU path as stages: step 1, step 2's arrays, step 3's arrays, step 3.5 (the merge of steps
    2-3), step 4's array, step 4's merge into DATA_DIR, then run_all.sh for steps 5-8 on that data."""
    python = values.get("PYTHON") or sys.executable

    def command(script: str, argv: Sequence[str]) -> str:
        return f"cd {shlex.quote(str(REPO))} && {shlex.quote(python)} {script} {shlex.join(argv)}"

    def array(title: str, names: Sequence[str]) -> JobStage:
        cells, lines = [], []
        for command_name in names:
            script = next(c.script for c in COMMANDS if c.name == command_name)
            argv = list(argvs[command_name])
            if "--shard_index" in argv:  # the fixed "--shard_index all" of the one-machine run
                del argv[argv.index("--shard_index") : argv.index("--shard_index") + 2]
            argv = [arg for arg in argv if not arg.startswith("--num_shards")] + ["--num_shards", str(num_shards)]
            cells.append((command_name.lower(), command(script, argv)))
            lines += [command(script, [*argv, "--shard_index", str(i)]) for i in range(num_shards)]
        return JobStage(title, tuple(cells), tuple(lines))

    later = {name: value for name, value in values.items() if name not in ("RUN_GPU_STEPS", "PRINT_JOBS", "PYTHON")}
    later.update(folders, PYTHON=python)
    steps_5_8 = "cd {} && env {} bash run_all.sh".format(
        shlex.quote(str(REPO)), " ".join(f"{name}={shlex.quote(value)}" for name, value in sorted(later.items()))
    )
    return [
        JobStage("step 1: LoRA SFT", (("step1", command("step1_sft.py", argvs["STEP1"])),)),
        array("step 2: sampling, an array per data class", ("STEP2_TRAIN", "STEP2_TEST")),
        array("step 3: golden rewards, an array per data class", ("STEP3_TRAIN", "STEP3_TEST")),
        JobStage(
            "step 3.5: merge steps 2-3",
            (("step3_5", command("step3.5_processing_data.py", argvs["STEP3_5"])),),
            gpu=False,
        ),
        array("step 4: embeddings", ("STEP4",)),
        JobStage(
            "step 4 --merge: check the shards, write DATA_DIR",
            (
                (
                    "step4_merge",
                    command("step4_gen_embeddings.py", [*argvs["STEP4"], "--merge", "--num_shards", str(num_shards)]),
                ),
            ),
            gpu=False,
        ),
        JobStage("steps 5-8 on the CPU", (("steps5_8", steps_5_8),), gpu=False),
    ]


def job_lines(stages: Sequence[JobStage]) -> str:
    """Plain command lines: a comment line per stage, then its commands (any order, in parallel);
    a stage starts when the one before has finished."""
    out = []
    for stage in stages:
        cells = stage.shards or [cell for _, cell in stage.jobs]
        out += [f"# {stage.title}: {len(cells)} command(s), after the stage above", *cells]
    return "\n".join(out)


def slurm_script(stages: Sequence[JobStage]) -> str:
    """A bash script of sbatch commands, each stage's jobs after all of the previous stage's."""
    out = [
        "#!/usr/bin/env bash",
        '# The GPU steps as SLURM jobs (docs/gpu_steps.md, "Shards on a cluster"); edit the options, then run it.',
        "set -euo pipefail",
        'GPU_OPTS="${GPU_OPTS:---gres=gpu:1}"  # options of the GPU jobs (partition, time, memory, ...)',
        'CPU_OPTS="${CPU_OPTS:-}"             # options of the merges and of steps 5-8',
    ]
    previous = ""
    for stage in stages:
        options = "$GPU_OPTS" if stage.gpu else "$CPU_OPTS"
        after = f" --dependency=afterok:{previous}" if previous else ""
        ids = []
        for name, cell in stage.jobs:
            size = f" --array=0-{len(stage.shards) // len(stage.jobs) - 1}" if stage.shards else ""
            out.append(
                f"{name}=$(sbatch --parsable {options} --job-name={name}{size}{after} --wrap {shlex.quote(cell)})"
                f"  # {stage.title}"
            )
            ids.append(f"${name}")
        previous = ":".join(ids)
    out.append(f'echo "submitted; the last job is {previous}"')
    return "\n".join(out)


def settings_text(values: Mapping[str, str], parsed: Mapping[str, argparse.Namespace], stages: list[str]) -> list[str]:
    """The run's settings once, as ``VARIABLE=value`` per step (``*``: set in the environment)."""
    lines, seen = [], set()
    for command in COMMANDS:
        if command.name not in parsed or command.name in ("STEP2_TEST", "STEP3_TEST"):
            continue
        shown = []
        for flag, variable in command.flags.items():
            if variable in seen:  # an earlier step shows it (steps 6-8 take step 5's by default)
                continue
            seen.add(variable)
            value = getattr(parsed[command.name], flag[2:].replace("-", "_"))
            shown.append(f"{variable}={'' if value is None else value}{'*' if variable in values else ''}")
        if not shown:
            continue
        name = STEP_NAMES.get(command.name, re.sub(r"STEP(\d)(_TRAIN)?", r"step \1", command.name))
        lines += textwrap.wrap(" ".join(shown), 100, initial_indent=f"  {name}: ", subsequent_indent="    ")
    return ["Settings (* set here, the rest the steps' defaults):", *lines]


def bash_assignments(bash: Mapping[str, str], argvs: Mapping[str, list[str]], text: list[str]) -> str:
    out = [f"{name}={shlex.quote(value)}" for name, value in bash.items()]
    out += [f"{name}_ARGS=({' '.join(shlex.quote(arg) for arg in argv)})" for name, argv in argvs.items()]
    out.append(f"SETTINGS_TEXT={shlex.quote(chr(10).join(text))}")
    out.append(f"PYTHON_EXECUTABLE={shlex.quote(sys.executable)}")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# the README's configuration table, and docs/method.md's table of each argument group of steps 5-8
# --------------------------------------------------------------------------------------------
TABLE_BEGIN = "<!-- settings table: written by `python settings.py table`; tests/test_settings.py checks it -->"
TABLE_END = "<!-- end of settings table -->"
GROUP_TABLE_BEGIN = (
    '<!-- flag table: written by `python settings.py table --group "{}"`; tests/test_settings.py checks it -->'
)
GROUP_TABLE_END = "<!-- end of flag table -->"


def _help_text(action: argparse.Action) -> str:
    text = (action.help or "").replace("%(default)s", str(action.default)).replace("|", "\\|")
    return re.sub(r"\s+", " ", text).strip()


def _default_text(action: argparse.Action, variable: str) -> str:
    if variable in FALLBACKS:
        return f"`{FALLBACKS[variable]}`" + ("" if action.default is None else f", else `{action.default}`")
    return "(see meaning)" if action.default is None else f"`{action.default}`"


def _step_label(script: str) -> str:
    special = {"convert_embeddings.py": "conversion", "generate_demo_data.py": "demo data"}
    return special.get(script) or "step " + re.match(r"step([\d.]+)_", script).group(1)


def _flag_text(flag: str, steps: list[str]) -> str:
    numbers = sorted(step[5:] for step in steps if step.startswith("step "))
    named = [step for step in steps if not step.startswith("step ")]
    steps_text = [f"step{'s' if len(numbers) > 1 else ''} {', '.join(numbers)}"] if numbers else []
    return f"{', '.join(named + steps_text)} `{flag}`"


def table(gpu: bool = False) -> str:
    """Markdown: a row per variable, its flags and the parser's default and help: the variables of
    steps 1-4 (``gpu``), or the others with run_all.sh's own switches."""
    rows = ["| variable | flag | default | meaning |", "|---|---|---|---|"]
    if not gpu:
        for action in driver_parser()._actions:
            rows.append(f"| `{action.dest}` | | {_default_text(action, action.dest)} | {_help_text(action)} |")
        rows.append(
            "| `PYTHON` | | `python3` | interpreter of every step (an unset `PYTHON` is resolved once to the "
            "interpreter's own path, so that a launcher such as pyenv's shim does not start before each step) |"
        )
    uses: dict[str, dict[str, list[str]]] = {}  # variable -> flag -> steps
    actions: dict[str, argparse.Action] = {}
    # The help shown is that of steps 5-8 where they take the variable, else the data's, else steps 1-4's.
    for command in sorted(COMMANDS, key=lambda c: ("cpu", "demo", "convert", "gpu").index(c.stage)):
        parser_actions = (
            {o: a for a in step_parser(command.script)._actions for o in a.option_strings} if command.flags else {}
        )
        for flag, variable in command.flags.items():
            steps = uses.setdefault(variable, {}).setdefault(flag, [])
            if _step_label(command.script) not in steps:
                steps.append(_step_label(command.script))
            actions.setdefault(variable, parser_actions[flag])
    gpu_only = {v for v in uses if all(c.stage == "gpu" for c in COMMANDS if v in c.flags.values())}
    for variable in sorted(uses, key=lambda v: min(i for i, c in enumerate(COMMANDS) if v in c.flags.values())):
        if (variable in gpu_only) == gpu:
            where = "; ".join(_flag_text(flag, steps) for flag, steps in uses[variable].items())
            action = actions[variable]
            rows.append(f"| `{variable}` | {where} | {_default_text(action, variable)} | {_help_text(action)} |")
    return "\n".join(rows)


def flag_groups() -> dict[str, tuple[str, argparse._ArgumentGroup]]:
    """{title: (script, group)}: the argument groups of steps 5-8's parsers, beside argparse's own two."""
    return {
        group.title: (script, group)
        for script in dict.fromkeys(command.script for command in COMMANDS if command.stage == "cpu")
        for group in step_parser(script)._action_groups[2:]
    }


def group_table(title: str) -> str:
    """Markdown: a row per flag of the argument group ``title``, its run_all.sh variable where one
    sets it, and the parser's default and help."""
    script, group = flag_groups()[title]
    variables = flag_variables(script)
    header = (
        "flag (`run_all.sh` variable)"
        if any(variables.get(a.option_strings[0]) for a in group._group_actions)
        else "flag"
    )
    rows = [f"| {header} | default | what |", "|---|---|---|"]
    for action in group._group_actions:
        flag = action.option_strings[0]
        variable = variables.get(flag)
        name = f"`{flag}` (`{variable}`)" if variable else f"`{flag}`"
        rows.append(f"| {name} | {_default_text(action, variable)} | {_help_text(action)} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> None:
    parser = ArgumentParser(description="run_all.sh's settings (see the module docstring)")
    sub = parser.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("preflight", help="bash assignments for run_all.sh")
    pre.add_argument("caller_dir")
    sub.add_parser("variables", help="the variables, one per line")
    table_parser = sub.add_parser("table", help="the README's configuration table (docs/gpu_steps.md's with --gpu)")
    table_parser.add_argument("--gpu", action="store_true", help="the variables of steps 1-4")
    table_parser.add_argument("--group", help="docs/method.md's table of this argument group of steps 5-8")
    args = parser.parse_args(argv)
    if args.command == "variables":
        print("\n".join(variables()))
    elif args.command == "table" and args.group:
        groups = flag_groups()
        if args.group not in groups:
            print(
                f"settings.py: error: no argument group {args.group!r}; steps 5-8 have {sorted(groups)}",
                file=sys.stderr,
            )
            sys.exit(2)
        print(group_table(args.group))
    elif args.command == "table":
        print(table(args.gpu))
    else:
        for warning in setting_typos(os.environ):
            print(f"run_all.sh: warning: {warning}", file=sys.stderr)
        try:
            bash, argvs, text = preflight(os.environ, args.caller_dir)
            scripts = [c.script for c in COMMANDS if c.name in argvs]
            warnings = [*flag_lookalikes(os.environ, scripts), threads_warning(int(bash["THREADS"]))]
            for warning in filter(None, warnings):
                print(f"run_all.sh: warning: {warning}", file=sys.stderr)
            print(bash_assignments(bash, argvs, text))
        except InputError as err:
            print(f"run_all.sh: error: {err}", file=sys.stderr)
            sys.exit(2)


if __name__ == "__main__":
    main()
