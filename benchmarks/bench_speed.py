"""Speed of the CPU pipeline against baselines and the machine's floor, measured in the same run.

    python3 benchmarks/bench_speed.py                   # all rows (~10 minutes on 2 cores)
    python3 benchmarks/bench_speed.py --only runs       # rows 3, 4, 6: whole runs against their floor
    python3 benchmarks/bench_speed.py --quick           # smaller sizes, for a smoke test
    python3 benchmarks/bench_speed.py --only runs --step6_scale 0.1   # adds row 5

Rows (each a ratio against a baseline timed in this process, so shared-machine noise cancels):
1. ORM training: responses/s of ``networks.train_orms`` (gather per batch, forward, backward, Adam,
   per-epoch validation) against a bare PyTorch train step of the same MLP shape and batch size
   on a pre-built batch tensor; plus achieved GFLOP/s against a bare matmul of the same size.
   Also ensemble training with members stacked into batched matmuls, against sequential members.
2. Evaluation: responses/s of ``EmbeddingSet.score`` with the stacked ensemble scorer (memory-mapped
   reads in chunks, all members) against a bare per-member forward pass on an in-memory tensor;
   and the share of step 6's time spent computing metrics.
3. ``FORCE=1 bash run_all.sh`` on the default demo (data present; the score cache removed before
   each run, or steps 6-8 would take the scores of the identical checkpoints FORCE=1 retrains from
   it), the best of ``--repeats`` runs, against its floor: 4 step processes x (start Python, import
   torch, exit; measured here) + the FLOPs the run must do (:func:`pipeline_flops`, counted from its
   manifests) at the bare GEMM rate measured here (run_all.sh runs steps 6 and 7 side by side, so a
   run could beat this sum of starts). Targets: <= 1.25x the floor and <= 10 s.
4. The original authors' "real embeddings" configuration on synthetic data of the same shape (5000 prompts x 10
   responses x 2048, N_SAMPLE=1000, ENSEMBLE_NUMBER=3), conversion included (each repeat converts
   afresh), against the same floor plus the converter's (start Python + a bare copy of its
   inputs). Target <= 25 s.
5. Optional (``--step6_scale``): step 6 on the published test-set shape (500 responses per prompt),
   a fraction of its prompts, against one process start + its scoring FLOPs at the GEMM rate, and
   its evaluation throughput against a bare forward of the 10 members.
6. ``python3 stepN_*.py --help`` for steps 5-8. Target <= 0.3 s.
7. Threads on a shared machine (``--only threads``): the default demo (as row 3) at ``THREADS`` = all
   CPUs and at ``THREADS=1``, alone and beside a fixed burner (one process spinning on one core),
   runs interleaved; each setting's best of ``--repeats`` against ``THREADS`` = all CPUs alone.
8. Denormals (``--only denormals``): step 5 of the default demo at learning rates 1e-3 and 1e-4,
   with float32 denormals flushed to zero (as the step runs) against the same step without it.
9. Side by side with the original authors' implementation (``--only reference --reference_dir
   DIR``, DIR a checkout of holarissun/RewardModelingBeyondBradleyTerry; its steps import lightgbm,
   datasets and transformers: ``pip install -r requirements-bench.txt``): their steps 5 and 6 and
   our run_all.sh (conversion and steps 5-6, then 5-8) on one synthetic repository (5000 prompts x
   10 x 2048, 20 test prompts x 500; N_SAMPLE 1000, 10 members, their 30 epochs and learning rate
   1e-3), runs interleaved, wall and CPU time and peak memory of each, with the FLOPs each does.
10. LightGBM members against MLP members (``--only lgbm``): steps 5-8 run one by one with
   ``--rm_objective clf`` and 10 members, ``--rm_model lgbm`` against ``mlp`` (runs interleaved), on the
   default demo (3000 prompts x 10 x 2048, N_SAMPLE 100) and at the published shape (10,000 prompts x
   10 x 2048, N_SAMPLE 7500 with the default evaluation pool of 2500, one pair per prompt): wall and
   CPU time and peak memory of each step, and the ratios (``--member_shapes`` picks the shapes,
   ``--members`` the ensemble size). Targets: a LightGBM member no slower than an MLP member; every
   step under 2 GB peak.

Every run row also prints the CPU time (user + sys) of its processes, which a shared machine
disturbs less than the wall time. The lead's command (rows 3-6, ~15 minutes on 2 idle cores):

    python3 benchmarks/bench_speed.py --only runs --step6_scale 0.1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_full_scale import command  # noqa: E402

import artifacts  # noqa: E402
import networks  # noqa: E402
import objectives  # noqa: E402
import rm_data  # noqa: E402
import run_folder  # noqa: E402
import step6_eval_rms  # noqa: E402


def report(name: str, value: str, note: str = "") -> None:
    print(f"{name:<48} {value:>14}  {note}", flush=True)


def best_time(fn, repeats: int) -> float:
    """Minimum wall time of ``repeats`` calls (after one warm-up), the least noisy estimate."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


# --------------------------------------------------------------------------------------------
# 1. Training throughput
# --------------------------------------------------------------------------------------------
def bench_training(dim: int, batch: int, n_pairs: int, epochs: int) -> None:
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(2 * n_pairs, dim, generator=gen)
    perm = torch.randperm(2 * n_pairs, generator=gen)
    winners, losers = perm[:n_pairs], perm[n_pairs:]
    val = n_pairs // 10
    config = networks.TrainConfig(
        epochs=epochs,
        learning_rate=1e-3,
        batch_size=batch,
        patience=epochs,
        weight_decay=0.0,
        stop_metric="loss",
        min_epoch_steps=1,
    )
    steps = -(-(n_pairs - val) // batch) * epochs

    def project():
        generator = torch.Generator().manual_seed(1)
        member = networks.OrmMember(features, winners[val:], losers[val:], winners[:val], losers[:val], "bt", generator)
        networks.train_orms([member], config)

    bare_model = networks.MLP(dim)
    bare_opt = torch.optim.Adam(bare_model.parameters(), lr=1e-3)
    bare_x = torch.randn(2 * batch, dim, generator=gen)

    def bare():
        for _ in range(steps):
            scores = bare_model(bare_x)
            loss = torch.nn.functional.softplus(scores[batch:] - scores[:batch]).mean()
            bare_opt.zero_grad()
            loss.backward()
            bare_opt.step()

    t_project, t_bare = best_time(project, 2), best_time(bare, 2)
    responses = 2 * (n_pairs - val) * epochs
    flops = networks.mlp_train_flops_per_sample(dim) * responses
    a, b = torch.randn(2 * batch, dim), torch.randn(dim, 1024)
    t_matmul = best_time(lambda: [a @ b for _ in range(20)], 3) / 20
    matmul_gflops = 2 * 2 * batch * dim * 1024 / t_matmul / 1e9
    report(
        "1. ORM training vs bare train step",
        f"{t_bare / t_project:.2f}x",
        f"target >= 0.8; {responses / t_project:,.0f} vs {responses / t_bare:,.0f} responses/s "
        f"(batch {batch} pairs, D={dim}, includes per-epoch validation)",
    )
    report(
        "   achieved GFLOP/s (train) vs bare matmul",
        f"{flops / t_project / 1e9:.1f}",
        f"bare ({2 * batch}x{dim})@({dim}x1024) matmul: {matmul_gflops:.1f} GFLOP/s",
    )
    bench_stacked_training(features, winners, losers, dim, batch=200, members=10)


def bench_stacked_training(features, winners, losers, dim: int, batch: int, members: int) -> None:
    """Members trained together (torch.func.stack_module_state + vmap) vs one after another."""
    from torch.func import functional_call, stack_module_state

    models = [networks.MLP(dim, generator=torch.Generator().manual_seed(i)) for i in range(members)]
    steps = 10
    batches = [
        torch.randint(len(winners), (batch,), generator=torch.Generator().manual_seed(i)) for i in range(members)
    ]

    def sequential():
        for model, idx in zip(models, batches):
            opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
            for _ in range(steps):
                scores = model(features[torch.cat([winners[idx], losers[idx]])])
                loss = objectives.bt_loss(scores[:batch], scores[batch:])
                opt.zero_grad()
                loss.backward()
                opt.step()

    params, buffers = stack_module_state(models)
    params = {k: v.detach().requires_grad_() for k, v in params.items()}
    base = networks.MLP(dim).to("meta")
    opt = torch.optim.Adam(list(params.values()), lr=1e-3, fused=True)
    member_rows = torch.stack([torch.cat([winners[idx], losers[idx]]) for idx in batches])  # (M, 2B)

    def forward(p, b, x):
        return functional_call(base, (p, b), (x,))

    def stacked():
        for _ in range(steps):
            scores = torch.vmap(forward)(params, buffers, features[member_rows])  # (M, 2B)
            loss = objectives.bt_loss(scores[:, :batch], scores[:, batch:]) * members
            opt.zero_grad()
            loss.backward()
            opt.step()

    # A plain batched formulation: stacked weights, three baddbmm products, one fused Adam step.
    with torch.no_grad():
        weights = [
            torch.stack([m.fc1.weight.T for m in models]),  # (M, D, H1)
            torch.stack([m.fc1.bias for m in models])[:, None, :],
            torch.stack([m.fc2.weight.T for m in models]),  # (M, H1, H2)
            torch.stack([m.fc2.bias for m in models])[:, None, :],
            torch.stack([m.fc3.weight.T for m in models]),  # (M, H2, 1)
            torch.stack([m.fc3.bias for m in models])[:, None, :],
        ]
    weights = [w.contiguous().requires_grad_() for w in weights]
    bmm_opt = torch.optim.Adam(weights, lr=1e-3, fused=True)

    def batched():
        w1, b1, w2, b2, w3, b3 = weights
        for _ in range(steps):
            x = features[member_rows]  # (M, 2B, D)
            h = torch.baddbmm(b2, torch.baddbmm(b1, x, w1).relu(), w2).relu()
            scores = torch.baddbmm(b3, h, w3).squeeze(-1)  # (M, 2B)
            loss = objectives.bt_loss(scores[:, :batch], scores[:, batch:]) * members
            bmm_opt.zero_grad()
            loss.backward()
            bmm_opt.step()

    times = {"sequential": [], "vmap": [], "bmm": []}
    for _ in range(3):  # interleaved: a shared machine's load changes between them
        for name, fn in (("sequential", sequential), ("vmap", stacked), ("bmm", batched)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    t_seq = min(times["sequential"])
    for name in ("vmap", "bmm"):
        report(
            f"   ensemble training: {name} vs sequential",
            f"{t_seq / min(times[name]):.2f}x",
            f"{members} members x {steps} steps of {batch} pairs, best of 3 interleaved",
        )


# --------------------------------------------------------------------------------------------
# 2. Evaluation throughput
# --------------------------------------------------------------------------------------------
def bench_evaluation(dim: int, n_prompts: int, n_splits: int, members: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        for k in range(n_splits):
            artifacts.write_npy(
                Path(tmp) / f"EMBD-TRAIN-split_{k}.npy", rng.standard_normal((n_prompts, dim), dtype=np.float32)
            )
            rm_data.write_rewards_jsonl(Path(tmp) / f"rewards_split_{k}.json", k + rng.random(n_prompts))  # sorted
        data = rm_data.load_embedding_set(tmp)
        models = [networks.MLP(dim, generator=torch.Generator().manual_seed(i)).eval() for i in range(members)]
        prompts = np.arange(n_prompts)
        scorer = networks.StackedEnsemble(models)
        t_project = best_time(lambda: data.score(prompts, scorer), 2)
        in_memory = torch.from_numpy(np.concatenate([np.asarray(e) for e in data.embeddings]))

        def bare():
            with torch.inference_mode():
                for start in range(0, len(in_memory), rm_data.DEFAULT_CHUNK_ROWS):
                    x = in_memory[start : start + rm_data.DEFAULT_CHUNK_ROWS]
                    [model(x) for model in models]

        t_bare = best_time(bare, 2)
        responses = n_prompts * n_splits
        report(
            "2. evaluation scoring vs bare forward",
            f"{t_bare / t_project:.2f}x",
            f"target >= 0.8; {responses * members / t_project:,.0f} vs {responses * members / t_bare:,.0f} "
            f"member-responses/s ({members} members, memory-mapped reads included)",
        )
        scores = data.score(prompts, scorer)
        stand_in = {"ridge": scores[0]}  # a baseline's scores: the metrics' cost, not the ridge fit's
        t_metrics = best_time(lambda: step6_eval_rms.evaluate(scores, data.rewards, stand_in, 0, 100_000, 50), 1)
        report(
            "   step 6 metrics share of evaluation",
            f"{t_metrics / (t_metrics + t_project):.0%}",
            f"metrics {t_metrics:.2f}s for {members + 5} variants vs scoring {t_project:.2f}s",
        )


# --------------------------------------------------------------------------------------------
# 3-5. Whole runs against the machine's floor
# --------------------------------------------------------------------------------------------
@dataclass(order=True)
class Timing:
    """Wall seconds of one command (runs compare by it), the CPU seconds (user + sys) of its processes and
    the largest peak resident memory among them (MiB)."""

    wall: float
    cpu: float
    stdout: str
    peak_mib: float = 0.0


def run(cmd: list[str], env: dict, cwd: Path = ROOT) -> Timing:
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=out, stderr=err, text=True, cwd=cwd)
        # wait4's usage covers the command and every descendant it waited for (ru_maxrss: the largest).
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"benchmark command failed: {' '.join(map(str, cmd))}\n{stderr[-3000:]}")
    return Timing(wall, usage.ru_utime + usage.ru_stime, stdout, usage.ru_maxrss / 1024)


@dataclass
class Machine:
    """The floor's ingredients, measured in this run (best of ``repeats``)."""

    torch_start: float  # seconds of a fresh process that imports torch and exits as the steps do
    numpy_start: float  # the same with numpy only (the converter's process)
    gemm_flops: float  # FLOP/s of a bare float32 matmul, the best of the shapes the steps multiply


def measure_machine(repeats: int) -> Machine:
    def start_time(module: str, freeze: str = "import atexit, gc; atexit.register(gc.freeze); ") -> float:
        # Exit as cli.run_cli makes the steps exit, without the last garbage collection (~0.35 s
        # with torch): a floor with it would count a cost the steps no longer pay.
        return min(run([sys.executable, "-c", f"{freeze}import {module}"], {}).wall for _ in range(repeats))

    rates = []
    for rows, inner, outer in ((4096, 2048, 10240), (4096, 2048, 1024), (256, 2048, 1024)):
        a, b = torch.randn(rows, inner), torch.randn(inner, outer)
        n = max(1, int(2e10 // (2 * rows * inner * outer)))  # ~20 GFLOP per timing
        seconds = best_time(lambda a=a, b=b, n=n: [torch.mm(a, b) for _ in range(n)], repeats)
        rates.append(2 * rows * inner * outer * n / seconds)
    machine = Machine(start_time("torch"), start_time("numpy"), max(rates))
    report(
        "   floor: Python + import torch + exit (one process)",
        f"{machine.torch_start:.2f} s",
        f"exiting as the steps do; with Python's usual exit {start_time('torch', freeze=''):.2f} s; "
        f"the same with numpy: {machine.numpy_start:.2f} s",
    )
    report(
        "   floor: bare GEMM rate",
        f"{machine.gemm_flops / 1e9:.0f} GFLOP/s",
        "best of (4096x2048)@(2048x{10240,1024}), (256x2048)@(2048x1024): "
        + ", ".join(f"{r / 1e9:.0f}" for r in rates),
    )
    return machine


def pipeline_flops(out_dir: Path) -> dict[str, float]:
    """FLOPs steps 5-8 must do for the run in ``out_dir``, from its manifests (2 per multiply-add).

    Counted: ORM training (forward and backward of every training response in every epoch run) and
    its validation each epoch; step 6 scoring held-out and test responses with every member; step 7
    scoring calibration and student_train responses with the teacher, the student's training and
    early-stopping passes, its final training-set error, and the student scoring the calibration,
    held-out and test responses (step 8 takes the held-out and test scores of both models from the
    score cache). Not counted: element-wise work, metrics, isotonic fits, reading files.
    """
    manifest = json.loads((out_dir / run_folder.MANIFEST_FILE).read_text())
    distill = json.loads((out_dir / run_folder.DISTILLATION_CONFIG_FILE).read_text())
    evaluation = json.loads((out_dir / run_folder.eval_results_file(manifest["config"]["rm_objective"])).read_text())
    dim = manifest["data"]["dim"]
    forward, train = networks.mlp_flops_per_sample(dim), networks.mlp_train_flops_per_sample(dim)
    step5 = sum(
        m["epochs_run"] * 2 * (m["train_pairs"] * train + m["val_pairs"] * forward) for m in manifest["members"]
    )
    members = len(manifest["members"])
    scored = [evaluation[name]["n_responses"] for name in ("held_out", "test") if name in evaluation]
    step6 = sum(scored) * members * forward
    fits, student = distill["fits"], distill["student"]
    calibration, fit_rows = fits["teacher_isotonic"]["n_responses"], fits["student_training"]["n_responses"]
    stop_rows = fits["student_early_stopping"]["n_responses"]
    step7 = (
        (calibration + fit_rows + stop_rows) * distill["teacher"]["n_members"] * forward
        + student["epochs_run"] * (fit_rows * train + stop_rows * forward)
        + (fit_rows + calibration + sum(scored)) * forward
    )
    return {"step 5": step5, "step 6": step6, "step 7": step7}


def report_against_floor(name: str, timing: Timing, floor: float, target: str, note: str) -> None:
    report(
        name,
        f"{timing.wall:.1f} s",
        f"floor {floor:.1f} s, ratio {timing.wall / floor:.2f}; {target}; CPU (user+sys) {timing.cpu:.1f} s; {note}",
    )


def report_pipeline(
    name: str, runs: list[Timing], machine: Machine, flops: dict[str, float], target: str, copy: float | None = None
) -> None:
    """A whole-run row: the best of ``runs`` against its floor, 4 step starts + ``flops`` at the GEMM rate
    (+ the converter's start and ``copy``, a bare copy of its inputs, when the run converts), and the floor's parts."""
    best, total = min(runs), sum(flops.values())
    floor = 4 * machine.torch_start + total / machine.gemm_flops
    parts = f"4 x {machine.torch_start:.2f} s + {total / machine.gemm_flops:.1f} s"
    if copy is not None:
        floor = floor + machine.numpy_start + copy
        parts += f" + conversion {machine.numpy_start:.2f} + {copy:.1f} s (bare copy of the sources)"
    # Step 8 imports no torch when the cache holds both models' scores: with its process counted as a
    # numpy one, the floor is lower by the difference.
    strict = floor - machine.torch_start + machine.numpy_start
    report_against_floor(
        name,
        best,
        floor,
        target,
        f"with step 8 counted as a numpy process: floor {strict:.1f} s, ratio {best.wall / strict:.2f}; "
        f"least CPU of the runs {min(t.cpu for t in runs):.1f} s; " + step_times(best.stdout),
    )
    report(
        "   floor = 4 x start + FLOPs / GEMM rate" + ("" if copy is None else " + copy"),
        f"{total / 1e12:.2f} TFLOP",
        f"{parts}; " + ", ".join(f"{n} {f / 1e9:.0f} GFLOP" for n, f in flops.items()),
    )


def step_times(stdout: str) -> str:
    return ", ".join(f"{name} {seconds} s" for name, seconds in re.findall(r"\[(.+?) took ([\d.]+) s\]", stdout))


def bench_help(repeats: int) -> None:
    """``stepN --help`` for steps 5-8: the best of ``repeats`` wall times each."""
    scripts = sorted(path.name for path in ROOT.glob("step[5-8]_*.py"))
    best = [min(run([sys.executable, script, "--help"], {}) for _ in range(repeats)) for script in scripts]
    bare = min(run([sys.executable, "-c", "pass"], {}) for _ in range(repeats))
    report(
        "6. stepN --help, steps 5-8",
        f"{max(t.wall for t in best):.2f} s",
        "target <= 0.3 s; wall "
        + ", ".join(f"{t.wall:.2f}" for t in best)
        + " s, CPU "
        + ", ".join(f"{t.cpu:.2f}" for t in best)
        + f" s; python -c pass: {bare.wall:.2f} s wall, {bare.cpu:.2f} s CPU",
    )


def bench_run_all(machine: Machine, repeats: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        env = {"DATA_DIR": f"{tmp}/data", "OUTPUT_DIR": f"{tmp}/out"}
        run(["bash", "run_all.sh"], env)  # generates the demo once (not part of the timed runs)
        runs = []
        for _ in range(repeats):  # FORCE: no resuming; no score cache: every FLOP counted is done
            shutil.rmtree(Path(tmp) / "out" / run_folder.SCORE_CACHE_DIR)
            runs.append(run(["bash", "run_all.sh"], {**env, "FORCE": "1"}))
        flops = pipeline_flops(Path(tmp) / "out")
    report_pipeline("3. run_all.sh default demo (FORCE=1)", runs, machine, flops, "target <= 10 s and <= 1.25x floor")


def bench_denormals(repeats: int) -> None:
    # As a script (run_cli, argv None) step 5 flushes denormals; main called in-process leaves them.
    code = "import sys, step5_train_rms as s5; from cli import run_cli; {}"
    ways = {"flushed": "run_cli(s5.main)", "plain": "s5.main(sys.argv[1:])"}
    with tempfile.TemporaryDirectory() as tmp:
        run([sys.executable, "generate_demo_data.py", "--output_dir", f"{tmp}/data"], {})
        for learning_rate in ("1e-3", "1e-4"):
            best: dict[str, Timing] = {}
            for _ in range(repeats):  # interleaved
                for name, call in ways.items():
                    argv = [
                        "--data_dir",
                        f"{tmp}/data",
                        "--output_dir",
                        f"{tmp}/{name}",
                        "--learning_rate",
                        learning_rate,
                    ]
                    timing = run([sys.executable, "-c", code.format(call), *argv], {})
                    best[name] = min(best.get(name, timing), timing)
            report(
                f"8. step 5, demo, lr {learning_rate}: flushed vs plain",
                f"{best['plain'].wall / best['flushed'].wall:.2f}x",
                f"{best['flushed'].wall:.1f} s against {best['plain'].wall:.1f} s; "
                f"CPU {best['flushed'].cpu:.1f} against {best['plain'].cpu:.1f} s",
            )


def bench_threads(repeats: int) -> None:
    cpus = len(os.sched_getaffinity(0))
    settings = sorted({cpus, 1}, reverse=True)
    with tempfile.TemporaryDirectory() as tmp:
        env = {"DATA_DIR": f"{tmp}/data", "OUTPUT_DIR": f"{tmp}/out"}
        run(["bash", "run_all.sh"], env)  # the demo data, once
        best: dict[tuple[bool, int], Timing] = {}
        for burner in (False, True):
            spin = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if burner else None
            try:
                for _ in range(repeats):
                    for threads in settings:
                        shutil.rmtree(Path(tmp) / "out" / run_folder.SCORE_CACHE_DIR, ignore_errors=True)
                        timing = run(["bash", "run_all.sh"], {**env, "FORCE": "1", "THREADS": str(threads)})
                        key = (burner, threads)
                        best[key] = min(best.get(key, timing), timing)
            finally:
                if spin is not None:
                    spin.kill()
                    spin.wait()
    base = best[(False, cpus)].wall
    for (burner, threads), timing in best.items():
        report(
            f"7. demo, THREADS={threads}" + (", beside a 1-core burner" if burner else ", alone"),
            f"{timing.wall:.1f} s",
            f"{timing.wall / base:.2f}x THREADS={cpus} alone; CPU {timing.cpu:.1f} s; {step_times(timing.stdout)}",
        )


def bench_real_shape(machine: Machine, repeats: int, quick: bool) -> None:
    """The original authors' "real embeddings" run (conversion included): each repeat converts and trains afresh."""
    n_prompts = 1200 if quick else 5000
    with tempfile.TemporaryDirectory() as tmp:
        synthetic_repo = command(
            "benchmarks/make_synthetic_repo.py",
            output_dir=f"{tmp}/repo",
            n_prompts=n_prompts,
            n_test_prompts=0,
            task="harmless",
            gen_model="gemma2b",
        )
        run(synthetic_repo, {})
        env = {
            "USE_REPO_EMBD": "1",
            "TASK": "harmless",
            "N_SAMPLE": "300" if quick else "1000",
            "ENSEMBLE_NUMBER": "3",
            "GEN_PREF_MODEL": "gemma2b",
            "MAX_PROMPTS": str(n_prompts),
            "EMBD_REPO_DIR": f"{tmp}/repo",
            "DATA_DIR": f"{tmp}/data",
            "OUTPUT_DIR": f"{tmp}/out",
        }
        runs = []
        for _ in range(repeats):
            shutil.rmtree(f"{tmp}/data", ignore_errors=True)
            shutil.rmtree(f"{tmp}/out", ignore_errors=True)
            runs.append(run(["bash", "run_all.sh"], env))
        flops = pipeline_flops(Path(tmp) / "out")
        # The converter reads and writes every byte once: its floor is a bare copy of its inputs.
        sources = sorted(Path(f"{tmp}/repo").glob("*.npy"))
        copy_seconds = best_time(lambda: [shutil.copyfile(src, Path(tmp) / "copy.npy") for src in sources], repeats)
    name = f"4. seed real config {n_prompts}x10x2048, conversion"
    report_pipeline(name, runs, machine, flops, "target <= 25 s", copy=copy_seconds)


def bench_step6_published(machine: Machine, scale: float, repeats: int) -> None:
    """Step 6 on the published test-set shape (500 responses per prompt), scaled in prompts: its wall
    time against one process start + its scoring FLOPs at the GEMM rate, and its evaluation
    throughput (scoring and metrics, from its log) against a bare forward of the 10 members."""
    n_test = max(2, int(2000 * scale))
    n_train = max(60, int(40000 * scale))
    with tempfile.TemporaryDirectory() as tmp:
        run(
            command(
                "benchmarks/make_synthetic_repo.py", output_dir=f"{tmp}/repo", n_prompts=n_train, n_test_prompts=n_test
            ),
            {},
        )
        run(command("convert_embeddings.py", embd_dir=f"{tmp}/repo", output_dir=f"{tmp}/data"), {})
        shutil.rmtree(f"{tmp}/repo")
        out = Path(tmp) / "out"
        step5 = command(
            "step5_train_rms.py",
            data_dir=f"{tmp}/data",
            output_dir=out,
            n_sample=max(10, n_train // 4),
            ensemble_number=10,
            training_epochs=1,
        )
        run(step5, {})
        runs = []
        for _ in range(repeats):
            shutil.rmtree(out / run_folder.SCORE_CACHE_DIR, ignore_errors=True)  # score afresh each time
            runs.append(run(command("step6_eval_rms.py", output_dir=out), {}))
        evaluation = json.loads((out / run_folder.eval_results_file("bt")).read_text())
    best = min(runs)
    responses = sum(evaluation[name]["n_responses"] for name in ("held_out", "test"))
    flops = responses * 10 * networks.mlp_flops_per_sample(2048)
    floor = machine.torch_start + flops / machine.gemm_flops
    evaluated = min(float(re.search(r"evaluated \d+ members in ([\d.]+)s", t.stdout).group(1)) for t in runs)
    models = [networks.MLP(2048, generator=torch.Generator().manual_seed(i)).eval() for i in range(10)]
    batch = torch.randn(rm_data.DEFAULT_CHUNK_ROWS, 2048)

    def bare():
        with torch.inference_mode():
            [model(batch) for model in models]

    bare_rate = rm_data.DEFAULT_CHUNK_ROWS / best_time(bare, repeats)
    report_against_floor(
        f"5. step 6, published shape x{scale:g} (test {n_test}x500)",
        best,
        floor,
        "10 members",
        f"{responses:,} responses, {flops / 1e12:.2f} TFLOP",
    )
    report(
        "   evaluation throughput vs bare forward",
        f"{responses / evaluated / bare_rate:.2f}x",
        f"{responses / evaluated:,.0f} responses/s scored and evaluated (10 members, memory-mapped reads, "
        f"metrics) vs {bare_rate:,.0f} responses/s bare forward on an in-memory {rm_data.DEFAULT_CHUNK_ROWS}-row "
        f"chunk; evaluation {evaluated:.1f} s of the step's {best.wall:.1f} s",
    )


# --------------------------------------------------------------------------------------------
# 9. Side by side with the original authors' implementation
# --------------------------------------------------------------------------------------------
# Their steps 5 and 6 read fixed paths under /mnt/bn and ./data_10split; the benchmark runs copies of
# those two scripts (and their networks.py) with "/mnt/bn/" pointed into its temporary folder, and
# writes their inputs there from the same synthetic repository our converter reads. Their training
# loop's verbose default is turned on, so its log shows the epochs each member ran (their FLOPs).
REFERENCE_SCRIPTS = ("step5_train_rms.py", "step6_eval_rms.py", "networks.py")
REFERENCE_SPLITS = 5  # their step 6 evaluates five test splits of 500 responses per prompt
REFERENCE_TASK, REFERENCE_MODEL = "harmless", "gemma2b"


def reference_paths(root: Path, members: int) -> dict[str, object]:
    """Where the reference's steps 5 and 6 look for their inputs (--task harmless --sft_obj gpt4,
    gemma2b embeddings and generations, server alias lq, annotation quality 10), under ``root``."""
    task, model, rm = REFERENCE_TASK, REFERENCE_MODEL, "rayharmless"
    dataset = f"hh-rlhf-{task}-gpt4"
    mnt = root / "mnt/bn/hsunvolume-lq"
    setup = f"embed_model_name_{model}_dataset_orig_{dataset}_gen_pref_model_name_{model}"
    return {
        "train_embeddings": lambda i: (
            mnt
            / "Step4_2_reorg_tensors_all"
            / f"{setup}_golden_rm_name_{rm}_train_test_train_server_alias_lq_embedding_only_rank_{i}.pt"
        ),
        "train_rewards": lambda i: root / f"data_10split/{rm}_{model}_train_{dataset}_database_split{i}.json",
        "test_embeddings": lambda s: (
            mnt
            / f"Step4_2_testall/EXP{setup}_n_samples_500_max_len_128_split_{s}_server_alias_lq"
            / f"{model}_{model}_{dataset}_{s}_testembedding_total_128.pt"
        ),
        "test_rewards": lambda s: (
            mnt / f"Step3_Annotate_Test_RPT/EXPmodel_name_{model}_dataset_{dataset}_n_samples_500_split_{s}"
            f"_data_class_test_server_alias_yg_rm{rm}_{s}_maxlen128.json"
        ),
        "checkpoints": mnt
        / f"Step5_CNT_ML_ALLCASE_ET3_beta/EXPembed_model_name_{model}_task_{task}_sft_obj_gpt4_rm_objective_bt"
        f"_annotation_quality_10_0_replacement_replacement_false_gen_pref_model_name_{model}"
        f"_ensemble_number_{members}_server_alias_lq",
    }


def new_file(path: Path) -> Path:
    """``path``, its folder created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_reference_inputs(repo: Path, root: Path, members: int) -> None:
    """The synthetic repository's train and test sets as the reference's step 5 and 6 read them:
    per-rank (N, D) tensors with each prompt's responses sorted by reward (its ``scores_sorted``),
    and the test set cut into five splits of (500, N / 5, D) with one JSON line of rewards per prompt."""
    from convert_embeddings import repo_file_names

    paths = reference_paths(root, members)
    names = {
        split: repo_file_names("kn", split, REFERENCE_TASK, "gpt4", REFERENCE_MODEL, REFERENCE_MODEL)
        for split in ("train", "test")
    }
    embeddings, rewards = (np.load(repo / name, mmap_mode="r") for name in names["train"])
    order = np.argsort(rewards, axis=0, kind="stable")  # (K, N): rank -> response, per prompt
    for rank in range(order.shape[0]):
        picked = order[rank], np.arange(order.shape[1])
        torch.save(
            torch.from_numpy(np.ascontiguousarray(embeddings[picked])), new_file(paths["train_embeddings"](rank))
        )
        lines = (json.dumps({"query": f"prompt {n}", "scores_sorted": float(r)}) for n, r in enumerate(rewards[picked]))
        new_file(paths["train_rewards"](rank)).write_text("\n".join(lines) + "\n")
    embeddings, rewards = (np.load(repo / name, mmap_mode="r") for name in names["test"])
    for split, prompts in enumerate(np.array_split(np.arange(rewards.shape[1]), REFERENCE_SPLITS)):
        torch.save(
            torch.from_numpy(np.ascontiguousarray(embeddings[:, prompts])), new_file(paths["test_embeddings"](split))
        )
        lines = (
            json.dumps({"id": int(n), **{f"rm_rayharmless_{k}": float(r) for k, r in enumerate(rewards[:, n])}})
            for n in prompts
        )
        new_file(paths["test_rewards"](split)).write_text("\n".join(lines) + "\n")


def bench_reference(reference_dir: Path, repeats: int, quick: bool) -> None:
    """The same workload through the original authors' steps 5-6 and through ours (steps 5-6, and 5-8)."""
    missing = [name for name in REFERENCE_SCRIPTS if not (reference_dir / name).is_file()]
    if missing:
        sys.exit(
            f"--reference_dir {reference_dir}: no {', '.join(missing)} (a checkout of "
            "holarissun/RewardModelingBeyondBradleyTerry)"
        )
    n_prompts, n_test, n_sample, members = (1200, 10, 300, 10) if quick else (5000, 20, 1000, 10)
    epochs, learning_rate = 30, "0.001"  # the reference's defaults
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run(
            command(
                "benchmarks/make_synthetic_repo.py",
                output_dir=tmp / "repo",
                n_prompts=n_prompts,
                n_test_prompts=n_test,
                task=REFERENCE_TASK,
                gen_model=REFERENCE_MODEL,
            ),
            {},
        )
        ref = tmp / "reference"
        ref.mkdir()
        for name in REFERENCE_SCRIPTS:
            text = (reference_dir / name).read_text()
            text = text.replace("/mnt/bn/", f"{ref}/mnt/bn/")
            (ref / name).write_text(text.replace("verbose=False", "verbose=True"))
        write_reference_inputs(tmp / "repo", ref, members)
        shared = ["--embed_model_name", REFERENCE_MODEL, "--task", REFERENCE_TASK, "--sft_obj", "gpt4"]
        shared += ["--gen_pref_model_name", REFERENCE_MODEL, "--rm_objective", "bt", "--consider_first_n", "2"]
        shared += ["--n_sample", str(n_sample), "--ensemble_number", str(members), "--seed", "6"]
        shared += ["--training_epochs", str(epochs), "--learning_rate", learning_rate]
        checkpoints = reference_paths(ref, members)["checkpoints"]
        ours_env = {
            "USE_REPO_EMBD": "1",
            "EMBD_REPO_DIR": str(tmp / "repo"),
            "TASK": REFERENCE_TASK,
            "GEN_PREF_MODEL": REFERENCE_MODEL,
            "MAX_PROMPTS": str(n_prompts),
            "N_SAMPLE": str(n_sample),
            "ENSEMBLE_NUMBER": str(members),
            "TRAINING_EPOCHS": str(epochs),
            "LEARNING_RATE": learning_rate,
            "DATA_DIR": str(tmp / "data"),
            "OUTPUT_DIR": str(tmp / "out"),
        }
        best: dict[str, Timing] = {}
        for _ in range(repeats):  # interleaved; each repeat starts from the repository files
            for folder in (checkpoints, ref / "out", tmp / "hf_cache", tmp / "data", tmp / "out"):
                shutil.rmtree(folder, ignore_errors=True)
            checkpoints.mkdir(parents=True)
            (ref / "out").mkdir()
            # Their steps load the JSON files with datasets, which caches them: a fresh cache each repeat.
            env = {"HF_DATASETS_CACHE": str(tmp / "hf_cache"), "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
            five = run([sys.executable, "step5_train_rms.py", *shared, "--output_dir", str(checkpoints)], env, ref)
            six = run([sys.executable, "step6_eval_rms.py", *shared, "--output_dir", str(ref / "out")], env, ref)
            timings = {
                "reference step 5": five,
                "reference step 6": six,
                "reference steps 5-6": Timing(
                    five.wall + six.wall, five.cpu + six.cpu, "", max(five.peak_mib, six.peak_mib)
                ),
                "ours: conversion, steps 5-6": run(["bash", "run_all.sh"], {**ours_env, "LAST_STEP": "6"}),
            }
            shutil.rmtree(tmp / "data")
            shutil.rmtree(tmp / "out")
            timings["ours: conversion, steps 5-8"] = run(["bash", "run_all.sh"], ours_env)
            for name, timing in timings.items():
                best[name] = min(best.get(name, timing), timing)
        flops = pipeline_flops(tmp / "out")  # the last repeat's run (every repeat does the same work)
    base = best["reference steps 5-6"]
    setup = (
        f"train {n_prompts} x 10 x 2048, test {n_test} x 500, N_SAMPLE {n_sample}, {members} members, "
        f"{epochs} epochs, lr {learning_rate}"
    )
    print(f"9. side by side with the original authors' steps 5-6 ({setup}; best of {repeats} interleaved)")
    forward, train = networks.mlp_flops_per_sample(2048), networks.mlp_train_flops_per_sample(2048)
    # Their step 5 trains each member on 80 % of 2 N_SAMPLE pairs (each pair in both orders), one
    # mini-batch of them per epoch, and validates on the rest, until 3 rising validation losses or
    # `epochs`; their step 6 scores the test set with one member (the last), where ours uses all.
    reference_epochs = len(re.findall(r"^(Epoch \d|Early stopping)", best["reference step 5"].stdout, re.M))
    reference_flops = {
        "step 5": reference_epochs * 2 * (1.6 * n_sample * train + 0.4 * n_sample * forward),
        "step 6": n_test * 500 * forward,
    }
    notes = {
        "reference step 5": f"{reference_epochs} epochs in all, {reference_flops['step 5'] / 1e12:.2f} TFLOP; "
        f"ours: step 5 {flops['step 5'] / 1e12:.2f} TFLOP",
        "reference step 6": f"{reference_flops['step 6'] / 1e12:.2f} TFLOP (one member scores the test set); ours: "
        f"step 6 {flops['step 6'] / 1e12:.2f} TFLOP ({members} members score the held-out and test sets, and the "
        "ridge baseline)",
    }
    for name, timing in best.items():
        report(
            f"   {name}",
            f"{timing.wall:.1f} s",
            f"CPU {timing.cpu:.1f} s, peak memory {timing.peak_mib:.0f} MiB"
            + (  # a single step of theirs has its work beside it; the wholes have their ratio
                f"; {notes[name]}"
                if name in notes
                else f"; {base.wall / timing.wall:.2f}x the reference's steps 5-6 (CPU {base.cpu / timing.cpu:.2f}x)"
            )
            + (f"; {step_times(timing.stdout)}" if timing.stdout else ""),
        )


# --------------------------------------------------------------------------------------------
# 10. LightGBM members against MLP members
# --------------------------------------------------------------------------------------------
MEMBER_SHAPES = {  # name -> (prompts, test prompts, N_SAMPLE); 10 responses x 2048 each
    "demo": (3000, 20, 100),
    "published": (10000, 0, 7500),
}


def bench_members(repeats: int, quick: bool, shapes: list[str], members: int = 10) -> None:
    """Steps 5-8 with LightGBM members against the same steps with MLP members, step by step, each step's
    row printed once both kinds have run it (runs interleaved: a load change hits both)."""
    chosen = {"quick": (1200, 0, 900)} if quick else {name: MEMBER_SHAPES[name] for name in shapes}
    for shape, (n_prompts, n_test, n_sample) in chosen.items():
        with tempfile.TemporaryDirectory() as tmp:
            data = f"{tmp}/data"
            demo = ["generate_demo_data.py", "--output_dir", data, "--n_prompts", str(n_prompts)]
            run([sys.executable, *demo, "--n_test_prompts", str(n_test)], {})
            steps = {
                "step 5": ["step5_train_rms.py", "--data_dir", data, "--rm_objective", "clf", "--n_sample",
                           str(n_sample), "--ensemble_number", str(members), "--rm_model"],
                "step 6": ["step6_eval_rms.py"],
                "step 7": ["step7_isotonic_distillation.py"],
                "step 8": ["step8_validate_distillation.py"],
            }  # fmt: skip
            best = {}
            for step, argv in steps.items():
                timings: dict[str, list[Timing]] = {"mlp": [], "lgbm": []}
                for _ in range(repeats):
                    for model in timings:
                        out = Path(tmp) / model
                        if step in ("step 6", "step 7"):  # each repeat scores afresh (step 8 reads the cache)
                            shutil.rmtree(out / run_folder.SCORE_CACHE_DIR, ignore_errors=True)
                        model_flag = [model] if step == "step 5" else []
                        command = [sys.executable, *argv, *model_flag, "--output_dir", str(out)]
                        timings[model].append(run(command, {}))
                mlp, lgbm = best[step] = min(timings["mlp"]), min(timings["lgbm"])
                report(
                    f"10. {shape} {n_prompts}x10x2048 N_SAMPLE {n_sample}: {step}",
                    f"{lgbm.wall / mlp.wall:.2f}x wall",
                    f"lgbm {lgbm.wall:.1f} s / {lgbm.cpu:.1f} s CPU / {lgbm.peak_mib:.0f} MiB; "
                    f"mlp {mlp.wall:.1f} s / {mlp.cpu:.1f} s CPU / {mlp.peak_mib:.0f} MiB; "
                    f"CPU {lgbm.cpu / mlp.cpu:.2f}x, peak {lgbm.peak_mib / mlp.peak_mib:.2f}x; "
                    f"load average {os.getloadavg()[0]:.1f}",
                )
            rounds = [
                m["epochs_run"] for m in json.loads((Path(tmp) / "lgbm" / "orm_manifest.json").read_text())["members"]
            ]
            epochs = [
                m["epochs_run"] for m in json.loads((Path(tmp) / "mlp" / "orm_manifest.json").read_text())["members"]
            ]
            mlp5, lgbm5 = best["step 5"]
            report(
                f"10. {shape}: step 5 per member ({members} members)",
                f"{lgbm5.wall / members:.2f} s",
                f"mlp {mlp5.wall / members:.2f} s per member (process start and data included); CPU per member "
                f"lgbm {lgbm5.cpu / members:.2f} s, mlp {mlp5.cpu / members:.2f} s; "
                f"LightGBM rounds {min(rounds)}-{max(rounds)}, "
                f"MLP epochs {min(epochs)}-{max(epochs)}",
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--repeats", type=int, default=3, help="timings are the best of this many runs")
    parser.add_argument(
        "--only",
        choices=["throughput", "runs", "threads", "denormals", "reference", "lgbm"],
        default=None,
        help="throughput: rows 1-2 only; runs: rows 3, 4 and 6 (and 5 with --step6_scale); threads: row 7; "
        "denormals: row 8; reference: row 9 (needs --reference_dir); lgbm: row 10",
    )
    parser.add_argument(
        "--reference_dir",
        type=Path,
        help="a checkout of the original authors' repository (holarissun/RewardModelingBeyondBradleyTerry) for "
        "row 9; their steps import datasets, transformers and lightgbm (pip install -r requirements-bench.txt)",
    )
    parser.add_argument(
        "--member_shapes",
        nargs="+",
        choices=list(MEMBER_SHAPES),
        default=list(MEMBER_SHAPES),
        help="row 10's data shapes",
    )
    parser.add_argument("--members", type=int, default=10, help="row 10's ensemble members")
    parser.add_argument(
        "--step6_scale",
        type=float,
        default=0.0,
        help="also run row 5: step 6 on the published test shape at this fraction of its "
        "prompts (0.1: 200 x 500 test responses, ~2 GB of temporary files)",
    )
    args = parser.parse_args()
    load = os.getloadavg()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    dim = 2048
    if args.only == "threads":
        bench_threads(args.repeats)
    if args.only == "denormals":
        bench_denormals(args.repeats)
    if args.only == "reference" or (args.only is None and args.reference_dir):
        if args.reference_dir is None:
            parser.error("--only reference needs --reference_dir")
        bench_reference(args.reference_dir, args.repeats, args.quick)
    if args.only == "lgbm":
        bench_members(args.repeats, args.quick, args.member_shapes, args.members)
    if args.only not in ("runs", "threads", "denormals", "reference", "lgbm"):
        bench_training(dim, batch=256, n_pairs=2000 if args.quick else 8000, epochs=2)
        bench_evaluation(dim, n_prompts=200 if args.quick else 1000, n_splits=10, members=10)
    if args.only not in ("throughput", "threads", "denormals", "reference", "lgbm"):
        machine = measure_machine(args.repeats)
        bench_run_all(machine, args.repeats)
        bench_real_shape(machine, args.repeats, args.quick)
        if args.step6_scale > 0:
            bench_step6_published(machine, args.step6_scale, args.repeats)
        bench_help(args.repeats)
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
