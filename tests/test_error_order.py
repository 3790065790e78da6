"""Steps 6-8 check their inputs in a fixed order, so a user with several problems meets them one by one.

Each step's list names its inputs in the order the step checks them. Case ``i`` breaks inputs i..end
at once (later breaks first, so an earlier one wins where two touch the same file or flag) and the
step must report input i: every input is checked before each later one.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import run_failing

import step6_eval_rms
import step7_isotonic_distillation
import step8_validate_distillation


@dataclass
class Inputs:
    run: Path  # a private copy of a step-5 (or step-7) output folder
    data: Path  # a private copy of the demo data
    tmp: Path


# A break damages files of ``Inputs`` and returns (extra flags, a fragment of the expected error line).
Break = Callable[[Inputs], tuple[list[str], str]]


def edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))


def drop_last_line(path: Path) -> None:
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))


def member(inputs: Inputs, index: int) -> Path:
    return inputs.run / json.loads((inputs.run / "orm_manifest.json").read_text())["checkpoints"][index]


def flag(name: str, value: str, message: str) -> Break:
    return lambda inputs: ([f"--{name}", value], message)


def output_dir_under_a_file(inputs: Inputs):
    (inputs.tmp / "a_file").write_text("not a folder\n")
    return ["--output_dir", str(inputs.tmp / "a_file" / "out")], "cannot create directory (Not a directory)"


def manifest_seed_a_string(inputs: Inputs):
    edit_json(inputs.run / "orm_manifest.json", lambda record: record["config"].update(seed="6"))
    return [], "key 'config' -> 'seed' must be a non-negative integer seed"


def short_train_rewards(inputs: Inputs):
    drop_last_line(inputs.data / "rewards_split_1.json")
    return [], "rewards_split_1.json: 259 rewards, expected 260"


def short_test_rewards(inputs: Inputs):
    drop_last_line(inputs.data / "rewards_test_split_2.json")
    return [], "rewards_test_split_2.json: 5 rewards, expected 6"


def member_missing(inputs: Inputs):
    path = member(inputs, 1)
    path.unlink()
    return [], f"checkpoint not found: {path}"


def partition_role_a_string(inputs: Inputs):
    edit_json(inputs.run / "prompt_split.json", lambda record: record.update(held_out="all"))
    return [], "key 'held_out' must be a list of integer prompt ids"


def student_corrupt(inputs: Inputs):
    (inputs.run / "distilled_rm_helpful_bt.ckpt").write_bytes(b"PK\x03\x04 truncated zip")
    return [], "distilled_rm_helpful_bt.ckpt: not a readable weights-only PyTorch checkpoint"


def map_truncated(model: str) -> Break:
    def damage(inputs: Inputs):
        path = inputs.run / f"isotonic_{model}_map.json"
        path.write_text(path.read_text()[:30])
        return [], f"{model} isotonic map (run step7_isotonic_distillation.py) (JSON sidecar) {path} is not readable"

    return damage


def map_of_other_checkpoints(model: str) -> Break:
    def damage(inputs: Inputs):
        key, value = ("teacher_checkpoints", ["other.ckpt"]) if model == "teacher" else ("student_checkpoint", "x.ckpt")
        edit_json(inputs.run / f"isotonic_{model}_map.json", lambda record: record["settings"].update({key: value}))
        return [], f"isotonic_{model}_map.json was fitted on {model}"

    return damage


def opened_run(flag_error: Break, mismatched_flag: Break) -> list[Break]:
    """A step's own flag error, then what ``run_folder.open_run`` checks, in its order."""
    return [flag_error, output_dir_under_a_file, manifest_seed_a_string, mismatched_flag, short_train_rewards]


SEED_FLAG = flag("embed_model_name", "other", "--embed_model_name other does not match the ensemble in")
ORDER: dict[str, tuple[Callable, str, list[Break]]] = {
    "step6": (
        step6_eval_rms.main,
        "run",
        [
            *opened_run(
                flag("bon_draws", "0", "argument --bon_draws: expected a positive integer"),
                flag("rm_objective", "clf", "--rm_objective clf does not match the ensemble in"),
            ),
            member_missing,
            partition_role_a_string,
            short_test_rewards,
        ],
    ),
    "step7": (
        step7_isotonic_distillation.main,
        "run",
        [
            *opened_run(flag("cv_folds", "1", "--cv_folds must be at least 2, got 1"), SEED_FLAG),
            member_missing,
            partition_role_a_string,
            flag("cv_folds", "500", "--cv_folds 500 needs at least 500 calibration prompts, the partition has 78"),
        ],
    ),
    "step8": (
        step8_validate_distillation.main,
        "distilled",
        [
            *opened_run(
                flag("calibration_bins", "0", "argument --calibration_bins: expected a positive integer"), SEED_FLAG
            ),
            short_test_rewards,
            member_missing,
            map_truncated("teacher"),
            map_truncated("student"),
            map_of_other_checkpoints("teacher"),
            map_of_other_checkpoints("student"),
            partition_role_a_string,
            student_corrupt,  # read only for the scores the cache lacks
        ],
    ),
}
CASES = [(step, first) for step, (_, _, breaks) in ORDER.items() for first in range(len(breaks))]


@pytest.mark.parametrize(("step", "first"), CASES, ids=[f"{step}-{first}" for step, first in CASES])
def test_the_first_broken_input_in_check_order_is_reported(
    step, first, demo_dir, trained_run, distilled_run, tmp_path, capsys
):
    main, source, breaks = ORDER[step]
    inputs = Inputs(tmp_path / "run", tmp_path / "data", tmp_path)
    shutil.copytree(trained_run if source == "run" else distilled_run, inputs.run)
    shutil.copytree(demo_dir, inputs.data)
    argv = ["--output_dir", str(inputs.run), "--data_dir", str(inputs.data)]
    for damage in reversed(breaks[first:]):  # later breaks first: an earlier one overrides them
        flags, expected = damage(inputs)
        argv += flags
    err = run_failing(main, argv, capsys)
    assert expected in err, (expected, err)
