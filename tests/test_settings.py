"""settings.py: run_all.sh's variables set the steps' own flags, and only when set."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT

import cli
import run_variables
import settings
import step5_train_rms
import summarize_runs


def test_every_variable_names_a_flag_of_its_steps_parser():
    for command in run_variables.COMMANDS:
        options = {o for a in settings.step_parser(command.script)._actions for o in a.option_strings}
        missing = (set(command.flags) | set(command.paths)) - options
        assert not missing, (command.script, missing)
        for flag in command.fixed[::2]:
            assert flag in options, (command.script, flag)


def test_the_readme_and_gpu_tables_are_written_from_the_parsers():
    for path, gpu in ((ROOT / "README.md", False), (ROOT / "docs" / "gpu_steps.md", True)):
        text = path.read_text()
        begin, end = text.index(settings.TABLE_BEGIN), text.index(settings.TABLE_END)
        assert text[begin + len(settings.TABLE_BEGIN) : end].strip() == settings.table(gpu), (
            f"{path.name}: run `python settings.py table{' --gpu' if gpu else ''}` and paste its output"
        )


def test_the_method_pages_flag_tables_are_written_from_the_parsers():
    """docs/method.md has one table per argument group of steps 5-8, each as the parser says."""
    begin = re.escape(settings.GROUP_TABLE_BEGIN).replace(re.escape("{}"), "(.+?)")
    text = (ROOT / "docs" / "method.md").read_text()
    tables = re.findall(f"{begin}\n(.*?)\n{re.escape(settings.GROUP_TABLE_END)}", text, re.S)
    assert sorted(title for title, _ in tables) == sorted(settings.flag_groups())
    for title, written in tables:
        assert written.strip() == settings.group_table(title), (
            f'docs/method.md: run `python settings.py table --group "{title}"` and paste its output'
        )


def test_unset_variables_pass_no_flag_and_set_ones_pass_theirs(tmp_path):
    bash, argvs, _ = settings.preflight({}, str(tmp_path))
    data, out = os.path.realpath(ROOT / "data"), os.path.realpath(ROOT / "distill_out")
    assert argvs["STEP5"] == ["--data_dir", data, "--output_dir", out]
    assert argvs["DEMO"] == ["--output_dir", data]
    assert bash["DATA_DIR"] == data and bash["LAST_STEP"] == "8" and "STEP1" not in argvs
    env = {"N_SAMPLE": "250", "ANNOTATION_QUALITY": "-1", "SEED": "3", "REPLACEMENT": "1", "EVAL_PROMPTS": ""}
    _, argvs, text = settings.preflight({**env, "OUTPUT_DIR": "o", "DATA_DIR": "d"}, str(tmp_path))
    assert argvs["STEP5"] == [
        "--data_dir", str(tmp_path / "d"), "--output_dir", str(tmp_path / "o"),
        "--n_sample=250", "--replacement=1", "--seed=3", "--annotation_quality=-1",
    ]  # fmt: skip
    assert argvs["STEP7"][-1] == "--student_seed=3" and argvs["STEP8"][-1] == "--eval_seed=3"
    parsed = step5_train_rms.parse_args(argvs["STEP5"])
    assert (parsed.n_sample, parsed.replacement, parsed.annotation_quality) == (250, "replacement_true", -1.0)
    shown = " ".join(text).split()  # the lines wrap where the settings' widths put them
    assert "N_SAMPLE=250*" in shown and "N_PAIRS=1" in shown and "RM_MODEL=mlp" in shown


def test_fallbacks_and_the_data_folder_named_after_the_setup(tmp_path):
    (tmp_path / "my_model").mkdir()
    env = {"USE_REPO_EMBD": "1", "MODEL_NAME": "my_model", "GEN_PREF_MODEL": "llama38b", "MAX_PROMPTS": "50"}
    bash, argvs, _ = settings.preflight(env, str(tmp_path))
    model = str(tmp_path / "my_model")
    assert f"--embed_model_name={model}" in argvs["STEP5"] and "--gen_model=llama38b" in argvs["CONVERT"]
    assert (
        bash["DATA_DIR"] == os.path.realpath(ROOT / "data_helpful_gpt4_my_model_llama38b_max50") == argvs["CONVERT"][1]
    )
    assert "DEMO" not in argvs
    bash, _, _ = settings.preflight({"USE_REPO_EMBD": "1"}, str(tmp_path))
    assert bash["DATA_DIR"].endswith("/data_helpful_gpt4_gemma2b_gemma7b")  # the parsers' defaults


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"N_SAMPLE": "-3"}, "N_SAMPLE: expected a positive integer, got '-3'"),
        ({"STANDARDIZE": "yes"}, "STANDARDIZE: expected 0 or 1, got 'yes'"),
        ({"CONSIDER_FIRST_N": "0"}, "--consider_first_n (CONSIDER_FIRST_N) must be > 0, -1 or -2, got 0"),
        ({"LAST_STEP": "9"}, "LAST_STEP: invalid choice: 9 (choose from 5, 6, 7, 8)"),
        ({"RUN_GPU_STEPS": "1", "USE_REPO_EMBD": "1"}, "set at most one of RUN_GPU_STEPS=1 and USE_REPO_EMBD=1"),
        ({"DATA_DIR": "a\nb"}, "DATA_DIR must not contain a newline"),
        ({"THREADS": "0"}, "THREADS: expected a positive integer, got '0'"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_variable(env, message, tmp_path):
    with pytest.raises(cli.InputError) as err:
        settings.preflight(env, str(tmp_path))
    assert str(err.value) == message


def test_threads_from_the_setting_then_openmp_then_the_affinity_mask(tmp_path):
    def threads(env):
        bash = settings.preflight(env, str(tmp_path))[0]
        return int(bash["THREADS"]), int(bash["SIDE_THREADS"])

    assert threads({"THREADS": "3", "OMP_NUM_THREADS": "8"}) == (3, 1)
    assert threads({"OMP_NUM_THREADS": "8"}) == (8, 4)
    cpus = len(os.sched_getaffinity(0))
    assert threads({"OMP_NUM_THREADS": "x"}) == threads({}) == (cpus, max(1, cpus // 2))


def test_the_gpu_steps_are_checked_only_when_they_run(tmp_path):
    settings.preflight({"TP_SIZE": "0"}, str(tmp_path))
    with pytest.raises(cli.InputError, match="^TP_SIZE: expected a positive integer"):
        settings.preflight({"TP_SIZE": "0", "RUN_GPU_STEPS": "1"}, str(tmp_path))


def test_the_preflight_prints_bash_that_sets_the_arrays(tmp_path):
    env = {**os.environ, "N_SAMPLE": "7", "OUTPUT_DIR": "it's out", "NSAMPLE": "3", "PATIENCE": "5"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "settings.py"), "preflight", str(tmp_path)],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert proc.stderr.splitlines() == [
        "run_all.sh: warning: NSAMPLE is not a run_all.sh setting and is ignored; did you mean N_SAMPLE?",
        "run_all.sh: warning: PATIENCE is not a run_all.sh setting and is ignored: no variable sets step 5's "
        "--patience or step 7's --patience (run that step by hand to change it)",
    ]
    script = proc.stdout + '\nprintf "%s\\n" "${STEP5_ARGS[@]}" "$PYTHON_EXECUTABLE" "$LAST_STEP"'
    shown = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.splitlines()
    assert shown[-5:] == ["--output_dir", str(tmp_path / "it's out"), "--n_sample=7", sys.executable, "8"]


def test_threads_beyond_the_cpus_are_one_warning_line(tmp_path):
    cpus = settings.available_cpus()
    for threads, expected in (
        (cpus, []),
        (
            cpus + 1,
            [
                f"run_all.sh: warning: THREADS={cpus + 1} is more than the {cpus} CPU(s) this process may run on: "
                "the steps' threads will contend for them (slower; results stay bit-identical at the same THREADS)"
            ],
        ),
    ):
        proc = subprocess.run(
            [sys.executable, str(ROOT / "settings.py"), "preflight", str(tmp_path)],
            env={**os.environ, "THREADS": str(threads)}, capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert proc.stderr.splitlines() == expected
        assert f"THREADS='{threads}'" in proc.stdout or f"THREADS={threads}" in proc.stdout


def test_summaries_and_sweeps_read_the_variables_from_here():
    assert summarize_runs.VARIABLES["n_sample"] == "N_SAMPLE"
    assert summarize_runs.VARIABLES["embed_model_name"] == "EMBED_MODEL_NAME"
    assert summarize_runs.VARIABLES["distill_epochs"] == "DISTILL_EPOCHS"
    assert set(step5_train_rms.VALUES_BEFORE_FLAGS) <= set(settings.step_defaults("step5_train_rms.py"))
    listed = subprocess.run(
        [sys.executable, str(ROOT / "settings.py"), "variables"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert listed == settings.variables() and {"N_SAMPLE", "PYTHON", "LAST_STEP", "DEMO_SEED"} <= set(listed)


def test_print_jobs_needs_the_gpu_steps(tmp_path):
    with pytest.raises(cli.InputError, match="PRINT_JOBS=slurm prints the GPU steps' jobs: set RUN_GPU_STEPS=1 too"):
        settings.preflight({"PRINT_JOBS": "slurm"}, str(tmp_path))
    bash, argvs, _ = settings.preflight({"RUN_GPU_STEPS": "1", "NUM_SHARDS": "2", "PRINT_JOBS": "lines"}, str(tmp_path))
    assert argvs["STEP2_TRAIN"][:6] == ["--adapter_name", "sft", "--data_class", "train", "--shard_index", "all"]
    assert "--num_shards=2" in argvs["STEP2_TRAIN"] and "--num_shards=2" in argvs["STEP3_TEST"]
    lines = bash["JOBS_TEXT"].splitlines()
    assert sum(line.endswith("--num_shards 2 --shard_index 1") for line in lines) == 2 + 2 + 1  # steps 2, 3, 4
