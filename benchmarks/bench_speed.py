"""Speed of the CPU pipeline against baselines measured in the same run.

    python3 benchmarks/bench_speed.py            # all rows (about 5 minutes on 2 cores)
    python3 benchmarks/bench_speed.py --quick    # smaller sizes, for a smoke test

Rows (each a ratio against a baseline timed in this process, so shared-machine noise cancels):
1. ORM training: responses/s of ``networks.train_orm`` (gather per batch, forward, backward, Adam,
   per-epoch validation) against a bare PyTorch train step of the same MLP shape and batch size
   on a pre-built batch tensor; plus achieved GFLOP/s against a bare matmul of the same size.
   Also ensemble training with members stacked into batched matmuls, against sequential members.
2. Evaluation: responses/s of ``EmbeddingSet.score`` with the stacked ensemble scorer (memory-mapped
   reads in chunks, all members) against a bare per-member forward pass on an in-memory tensor;
   and the share of step 6's time spent computing metrics.
3. ``bash run_all.sh`` on the default demo: wall time per step and in total (target <= 10 s), and
   the share spent starting Python and importing libraries.
4. The seed's "real embeddings" configuration on synthetic data of the same shape (5000 prompts x 10
   responses x 2048, N_SAMPLE=1000, ENSEMBLE_NUMBER=3, conversion included): wall time (<= 45 s).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import networks  # noqa: E402
import rm_data  # noqa: E402
import step6_eval_rms  # noqa: E402

ROWS: list[tuple[str, str, str]] = []


def report(name: str, value: str, note: str = "") -> None:
    ROWS.append((name, value, note))
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
    config = networks.TrainConfig(epochs=epochs, batch_size=batch, patience=epochs)
    steps = -(-(n_pairs - val) // batch) * epochs

    def project():
        networks.train_orm(features, winners[val:], losers[val:], winners[:val], losers[:val], "bt",
                           config, torch.Generator().manual_seed(1))

    bare_model = torch.nn.Sequential(torch.nn.Linear(dim, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 512),
                                     torch.nn.ReLU(), torch.nn.Linear(512, 1))
    bare_opt = torch.optim.Adam(bare_model.parameters(), lr=1e-3)
    bare_x = torch.randn(2 * batch, dim, generator=gen)

    def bare():
        for _ in range(steps):
            scores = bare_model(bare_x).squeeze(-1)
            loss = torch.nn.functional.softplus(scores[batch:] - scores[:batch]).mean()
            bare_opt.zero_grad()
            loss.backward()
            bare_opt.step()

    t_project, t_bare = best_time(project, 2), best_time(bare, 2)
    responses = 2 * (n_pairs - val) * epochs
    flops = 3 * networks.mlp_flops_per_sample(dim) * responses
    a, b = torch.randn(2 * batch, dim), torch.randn(dim, 1024)
    t_matmul = best_time(lambda: [a @ b for _ in range(20)], 3) / 20
    matmul_gflops = 2 * 2 * batch * dim * 1024 / t_matmul / 1e9
    report("1. ORM training vs bare train step", f"{t_bare / t_project:.2f}x",
           f"target >= 0.8; {responses / t_project:,.0f} vs {responses / t_bare:,.0f} responses/s "
           f"(batch {batch} pairs, D={dim}, includes per-epoch validation)")
    report("   achieved GFLOP/s (train) vs bare matmul", f"{flops / t_project / 1e9:.1f}",
           f"bare ({2 * batch}x{dim})@({dim}x1024) matmul: {matmul_gflops:.1f} GFLOP/s")
    bench_stacked_training(features, winners, losers, dim, batch, members=4)


def bench_stacked_training(features, winners, losers, dim: int, batch: int, members: int) -> None:
    """Members trained together (torch.func.stack_module_state + vmap) vs one after another."""
    from torch.func import functional_call, stack_module_state

    models = [networks.MLP(dim, generator=torch.Generator().manual_seed(i)) for i in range(members)]
    steps = 10
    batches = [torch.randint(len(winners), (batch,), generator=torch.Generator().manual_seed(i))
               for i in range(members)]

    def sequential():
        for model, idx in zip(models, batches):
            opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
            for _ in range(steps):
                scores = model(features[torch.cat([winners[idx], losers[idx]])])
                loss = networks.bt_loss(scores[:batch], scores[batch:])
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
            loss = networks.bt_loss(scores[:, :batch], scores[:, batch:]) * members
            opt.zero_grad()
            loss.backward()
            opt.step()

    t_seq, t_stack = best_time(sequential, 1), best_time(stacked, 1)
    report("   ensemble training: stacked vs sequential", f"{t_seq / t_stack:.2f}x",
           f"{members} members x {steps} steps; kept sequential unless clearly > 1")


# --------------------------------------------------------------------------------------------
# 2. Evaluation throughput
# --------------------------------------------------------------------------------------------
def bench_evaluation(dim: int, n_prompts: int, n_splits: int, members: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        for k in range(n_splits):
            rm_data.write_npy(Path(tmp) / f"EMBD-TRAIN-split_{k}.npy",
                              rng.standard_normal((n_prompts, dim), dtype=np.float32))
            rm_data.write_rewards_jsonl(Path(tmp) / f"rewards_split_{k}.json", rng.standard_normal(n_prompts))
        data = rm_data.load_embedding_set(tmp)
        models = [networks.MLP(dim, generator=torch.Generator().manual_seed(i)).eval() for i in range(members)]
        prompts = np.arange(n_prompts)
        scorer = networks.ensemble_scorer(models)
        t_project = best_time(lambda: data.score(prompts, scorer), 2)
        in_memory = torch.from_numpy(np.concatenate([np.asarray(e) for e in data.embeddings]))

        def bare():
            with torch.inference_mode():
                for start in range(0, len(in_memory), rm_data.DEFAULT_CHUNK_ROWS):
                    x = in_memory[start:start + rm_data.DEFAULT_CHUNK_ROWS]
                    [model(x) for model in models]

        t_bare = best_time(bare, 2)
        responses = n_prompts * n_splits
        report("2. evaluation scoring vs bare forward", f"{t_bare / t_project:.2f}x",
               f"target >= 0.8; {responses * members / t_project:,.0f} vs {responses * members / t_bare:,.0f} "
               f"member-responses/s ({members} members, memory-mapped reads included)")
        scores = data.score(prompts, scorer)
        args = argparse.Namespace(n_cross_pairs=100_000, bon_draws=50)
        t_metrics = best_time(lambda: step6_eval_rms.evaluate(scores, data.rewards, args, seed=0), 1)
        report("   step 6 metrics share of evaluation", f"{t_metrics / (t_metrics + t_project):.0%}",
               f"metrics {t_metrics:.2f}s for {members + 4} variants vs scoring {t_project:.2f}s")


# --------------------------------------------------------------------------------------------
# 3-4. Whole runs
# --------------------------------------------------------------------------------------------
def run(cmd: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"benchmark command failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start, proc.stdout


def bench_run_all() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        env = {"DATA_DIR": f"{tmp}/data", "OUTPUT_DIR": f"{tmp}/out"}
        run(["bash", "run_all.sh"], env)  # generates the demo once (not part of the timed run)
        total, stdout = run(["bash", "run_all.sh"], {**env, "FORCE": "1"})  # FORCE: no resumed steps
    steps = re.findall(r"\[(.+?) took ([\d.]+) s\]", stdout)
    modules = ["step5_train_rms", "step6_eval_rms", "step7_isotonic_distillation", "step8_validate_distillation"]
    startup = sum(run([sys.executable, "-c", f"import {module}"], {})[0] for module in modules)
    report("3. run_all.sh default demo, total", f"{total:.1f} s",
           "target <= 10 s; seed claims ~2 min; " + ", ".join(f"{n} {t} s" for n, t in steps))
    report("   share spent starting Python + imports", f"{startup / total:.0%}",
           f"{startup:.1f} s: python -c 'import stepN' for steps 5-8, each its own process")


def bench_real_shape(quick: bool) -> None:
    converter = ROOT / "convert_embeddings.py"
    maker = ROOT / "benchmarks" / "make_synthetic_repo.py"
    if not converter.exists() or not maker.exists():
        report("4. seed 'real embeddings' config", "skipped", "convert_embeddings.py not present")
        return
    n_prompts = 1200 if quick else 5000
    with tempfile.TemporaryDirectory() as tmp:
        run([sys.executable, str(maker), "--output_dir", f"{tmp}/repo", "--n_prompts", str(n_prompts),
             "--n_test_prompts", "0", "--task", "harmless", "--gen_model", "gemma2b"], {})
        env = {"USE_REPO_EMBD": "1", "TASK": "harmless", "N_SAMPLE": "1000" if not quick else "300",
               "ENSEMBLE_NUMBER": "3", "GEN_PREF_MODEL": "gemma2b", "MAX_PROMPTS": str(n_prompts),
               "EMBD_REPO_DIR": f"{tmp}/repo", "DATA_DIR": f"{tmp}/data", "OUTPUT_DIR": f"{tmp}/out"}
        total, stdout = run(["bash", "run_all.sh"], env)
    steps = re.findall(r"\[(.+?) took ([\d.]+) s\]", stdout)
    report("4. seed 'real embeddings' config, total", f"{total:.1f} s",
           f"target <= 45 s; seed claims ~5 min; {n_prompts}x10x2048; " + ", ".join(f"{n} {t} s" for n, t in steps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    dim = 2048
    bench_training(dim, batch=256, n_pairs=2000 if args.quick else 8000, epochs=2)
    bench_evaluation(dim, n_prompts=200 if args.quick else 1000, n_splits=10, members=10)
    bench_run_all()
    bench_real_shape(args.quick)


if __name__ == "__main__":
    main()
