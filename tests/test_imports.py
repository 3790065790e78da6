"""Steps 5-8 import only what their path uses (docs/performance.md): start-up is most of a demo step;
and the project's modules import each other without a cycle.

Each step check runs in a fresh interpreter, since this test process has imported everything already.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("step5_train_rms", "step6_eval_rms", "step7_isotonic_distillation", "step8_validate_distillation")
HEAVY = ("torch", "torch._dynamo", "sklearn", "scipy", "matplotlib", "matplotlib.pyplot", "pandas")

# Runs the given steps' main() one after another in this interpreter and prints, as JSON, the exit
# status of each and the heavy modules loaded after it.
RUNNER = """
import json, sys
sys.path.insert(0, {root!r})
from cli import run_cli
report = []
for module, argv in {calls!r}:
    try:
        run_cli(__import__(module).main, argv)
        status = 0
    except SystemExit as exit:
        status = exit.code
    report.append([status, [name for name in {heavy!r} if name in sys.modules]])
print(json.dumps(report))
"""


def run_steps(calls: list[tuple[str, list[str]]]) -> list[tuple[int, set[str]]]:
    code = RUNNER.format(root=str(ROOT), calls=calls, heavy=HEAVY)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [(status, set(loaded)) for status, loaded in json.loads(proc.stdout.strip().splitlines()[-1])]


@pytest.mark.parametrize(
    "step,bad_flag",
    zip(STEPS, (["--n_sample", "-3"], ["--bon_draws", "0"], ["--cv_folds", "1"], ["--calibration_bins", "x"])),
)
def test_help_and_flag_errors_return_before_torch_is_imported(step, bad_flag):
    (help_status, help_loaded), (error_status, error_loaded) = run_steps([(step, ["--help"]), (step, bad_flag)])
    assert help_status == 0 and error_status == 2
    assert help_loaded == error_loaded == set()


def test_each_step_imports_only_what_its_path_uses(demo_dir, tmp_path):
    out = str(tmp_path / "out")
    steps_5_to_7 = run_steps(
        [
            (
                "step5_train_rms",
                [
                    "--data_dir",
                    str(demo_dir),
                    "--output_dir",
                    out,
                    "--n_sample",
                    "120",
                    "--ensemble_number",
                    "2",
                    "--training_epochs",
                    "2",
                    "--batch_size",
                    "32",
                ],
            ),
            ("step6_eval_rms", ["--output_dir", out, "--bon_draws", "5", "--n_cross_pairs", "1000"]),
            ("step7_isotonic_distillation", ["--output_dir", out, "--distill_epochs", "2", "--n_cross_pairs", "1000"]),
        ]
    )
    ((step8_status, step8_loaded),) = run_steps([("step8_validate_distillation", ["--output_dir", out])])
    assert [status for status, _ in steps_5_to_7] == [0, 0, 0] and step8_status == 0
    after5, after6, after7 = (loaded for _, loaded in steps_5_to_7)
    assert after5 == {"torch"}  # no torch.optim optimizer (constructing one imports torch._dynamo), no scipy
    # pyplot: step 6 draws a plot; its ridge baseline needs numpy only (baselines.ridge_loo)
    assert {"torch", "matplotlib", "matplotlib.pyplot"} <= after6 and not {"sklearn", "scipy", "torch._dynamo"} & after6
    assert {"sklearn", "scipy"} <= after7 and "torch._dynamo" not in after7  # step 7 fits and saves maps
    # Maps from JSON (no sklearn), both models' scores from the cache that steps 6 and 7 filled (no torch)
    assert step8_loaded == {"matplotlib", "matplotlib.pyplot"}


def test_score_responses_answers_help_and_flag_errors_without_torch():
    (help_status, help_loaded), (error_status, error_loaded) = run_steps(
        [("score_responses", ["--help"]), ("score_responses", ["--input", "x", "--output", "y", "--batch_size", "0"])]
    )
    assert help_status == 0 and error_status == 2
    assert help_loaded == error_loaded == set()


def project_imports() -> dict[str, set[str]]:
    """{module: the project's top-level modules it imports}, from every import statement of the
    repository's top-level files, those inside functions included (a lazy import is still an arrow)."""
    files = {path.stem: path for path in ROOT.glob("*.py")}
    graph = {}
    for module, path in files.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
        graph[module] = (imported & files.keys()) - {module}
    return graph


def test_the_import_graph_has_no_cycle():
    graph = project_imports()
    assert {"cli", "settings", "run_variables"} <= graph.keys() and "cli" in graph["settings"]
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(module) :], module]))
        if module in done:
            return
        for imported in sorted(graph[module]):
            visit(imported, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_no_arrow_points_up():
    """Scripts (the steps and the tools that run them) import library modules; no library module
    imports a script, and no step imports another step (what two steps share lives below them)."""
    graph = project_imports()
    scripts = {m for m in graph if m.startswith("step")} | {
        "convert_embeddings",
        "generate_demo_data",
        "score_responses",
        "summarize_runs",
        "run_state",
        "settings",
    }
    steps = {m for m in graph if m.startswith("step")}
    upward = sorted(f"{m} -> {s}" for m in graph for s in graph[m] & scripts if m not in scripts)
    assert not upward, f"library modules importing scripts: {upward}"
    between_steps = sorted(f"{m} -> {s}" for m in steps for s in graph[m] & steps)
    assert not between_steps, f"steps importing steps: {between_steps}"
    # the foundations import nothing of the project's but each other
    for module in ("interrupts", "run_variables", "random_streams", "objectives", "progress", "plots"):
        assert graph[module] == set(), f"{module} imports {sorted(graph[module])}"
    assert graph["cli"] <= {"interrupts", "run_variables"}
