"""Write a synthetic embedding repository (the input of convert_embeddings.py), up to full size.

Defaults are one published setup at full size: train 40000 prompts x 10 responses x 2048 and test
2000 x 500 x 2048, float32 (11.5 GB), in the original authors' kn layout ((K, N, D) embeddings, (K, N)
rewards) or with --layout nk the infrastructure's ((N, K, D), (N, K, 1)), under the names that
convert_embeddings.py looks for with the same --task/--sft_obj/--embed_model/--gen_model.

Generative model (fixed random functions drawn from --seed):
    u_p ~ N(0, I_L), e_pk ~ N(0, I_L)              prompt latent, response latent
    x_pk = [u_p, e_pk] A / sqrt(2L) + 0.1 xi        embedding (D,), A (2L, D) ~ N(0, 1), xi ~ N(0, I_D)
    learnable reward: r_pk = 3 tanh(x_pk W) . a / sqrt(H) + --reward_noise * eps
                      (W (D, H) ~ N(0, 1/D), a ~ N(0, I_H): a random one-hidden-layer network of the
                      stored embedding, so steps 5-8 have something to learn)
    random reward:    r_pk ~ N(0, 1), independent of the embedding
Responses are stored unsorted, as a repository would hold them; the converter sorts them.

Memory stays near one block of prompts (~64 MiB of embeddings): each block is drawn from its own
seeded generator and written with seek+write into files created by np.lib.format.open_memmap, so
the output does not depend on memory or block layout beyond the settings. Files appear atomically;
``synthetic_repo.json`` records the settings, and a rerun with the same settings does nothing.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from artifacts import atomic_path, ensure_writable_dir, read_json, write_json, write_npy
from cli import (
    ArgumentParser,
    non_negative_float,
    non_negative_int,
    positive_int,
    random_seed,
    run_cli,
    setup_logging,
)
from convert_embeddings import LAYOUTS, repo_file_names
from progress import progress
from rm_data import TASKS

CONFIG_FILE = "synthetic_repo.json"
BLOCK_BYTES = 64 << 20
LATENT_DIM, HIDDEN = 16, 32


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True, help="folder to write the repository files into")
    parser.add_argument("--layout", choices=LAYOUTS, default="kn", help="kn: (K, N, D); nk: (N, K, D)")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="embedding dtype")
    parser.add_argument("--n_prompts", type=positive_int, default=40000, help="training prompts N")
    parser.add_argument("--n_responses", type=positive_int, default=10, help="responses per training prompt K")
    parser.add_argument("--n_test_prompts", type=non_negative_int, default=2000, help="test prompts (0: no test files)")
    parser.add_argument("--n_test_responses", type=positive_int, default=500, help="responses per test prompt")
    parser.add_argument("--emb_dim", type=positive_int, default=2048, help="embedding size D")
    parser.add_argument(
        "--reward",
        choices=("learnable", "random"),
        default="learnable",
        help="learnable: a fixed random network of the embedding; random: i.i.d. N(0, 1)",
    )
    parser.add_argument(
        "--reward_noise", type=non_negative_float, default=0.0, help="std of noise added to a learnable reward"
    )
    parser.add_argument("--seed", type=random_seed, default=0, help="random seed")
    parser.add_argument("--task", choices=TASKS, default="helpful", help="task in the file names")
    parser.add_argument("--sft_obj", choices=("gpt4", "none"), default="gpt4", help="SFT objective in the names")
    parser.add_argument("--embed_model", default="gemma2b", help="embedding model in the file names")
    parser.add_argument("--gen_model", default="gemma7b", help="generator model in the file names")
    return parser.parse_args(argv)


class SyntheticWorld:
    """The fixed embedding map and reward network of one seed."""

    def __init__(self, seed: int, emb_dim: int):
        rng = np.random.default_rng([seed, 0])
        self.mixing = (rng.standard_normal((2 * LATENT_DIM, emb_dim)) / np.sqrt(2 * LATENT_DIM)).astype(np.float32)
        self.hidden_weights = (rng.standard_normal((emb_dim, HIDDEN)) / np.sqrt(emb_dim)).astype(np.float32)
        self.output_weights = rng.standard_normal(HIDDEN).astype(np.float32) / np.sqrt(HIDDEN)

    def draw_block(
        self,
        rng: np.random.Generator,
        n_prompts: int,
        n_responses: int,
        dtype: np.dtype,
        reward: str,
        reward_noise: float,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings (P, K, D) in ``dtype`` and rewards (P, K) float32 of one block of prompts."""
        prompt_latent = rng.standard_normal((n_prompts, 1, LATENT_DIM), dtype=np.float32)
        response_latent = rng.standard_normal((n_prompts, n_responses, LATENT_DIM), dtype=np.float32)
        latent = np.concatenate([np.broadcast_to(prompt_latent, response_latent.shape), response_latent], axis=2)
        embeddings = latent @ self.mixing
        embeddings += 0.1 * rng.standard_normal(embeddings.shape, dtype=np.float32)
        embeddings = embeddings.astype(dtype, copy=False)
        if reward == "random":
            return embeddings, rng.standard_normal((n_prompts, n_responses), dtype=np.float32)
        # The reward sees exactly the stored values (float16 rounding included).
        hidden = np.tanh(embeddings.astype(np.float32) @ self.hidden_weights)
        rewards = 3.0 * hidden @ self.output_weights
        if reward_noise:
            rewards += reward_noise * rng.standard_normal(rewards.shape, dtype=np.float32)
        return embeddings, rewards


def write_set(
    out_dir: Path, set_index: int, split: str, n_prompts: int, n_responses: int, args, world: SyntheticWorld
) -> None:
    dtype = np.dtype(args.dtype)
    embd_name, reward_name = repo_file_names(
        args.layout, split, args.task, args.sft_obj, args.embed_model, args.gen_model
    )
    shape = (n_responses, n_prompts, args.emb_dim) if args.layout == "kn" else (n_prompts, n_responses, args.emb_dim)
    row_bytes = args.emb_dim * dtype.itemsize
    block_prompts = max(1, BLOCK_BYTES // (n_responses * args.emb_dim * 4))
    rewards = np.empty((n_prompts, n_responses), dtype=np.float32)
    with atomic_path(out_dir / embd_name) as tmp:
        offset = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape).offset  # header and size only
        with open(tmp, "r+b") as handle:
            for block, start in enumerate(
                progress(range(0, n_prompts, block_prompts), f"synthetic {split}", unit="block")
            ):
                stop = min(start + block_prompts, n_prompts)
                rng = np.random.default_rng([args.seed, set_index, block])
                embeddings, rewards[start:stop] = world.draw_block(
                    rng, stop - start, n_responses, dtype, args.reward, args.reward_noise
                )
                if args.layout == "nk":
                    handle.seek(offset + start * n_responses * row_bytes)
                    handle.write(embeddings.data)
                else:
                    for k in range(n_responses):
                        handle.seek(offset + (k * n_prompts + start) * row_bytes)
                        handle.write(np.ascontiguousarray(embeddings[:, k]).data)
    write_npy(out_dir / reward_name, rewards.T.copy() if args.layout == "kn" else rewards[:, :, None])


def main(argv=None) -> Path:
    args = parse_args(argv)
    setup_logging()
    out_dir = ensure_writable_dir(args.output_dir)
    config = {key: value for key, value in vars(args).items() if key != "output_dir"}
    sets = [("train", args.n_prompts, args.n_responses)]
    if args.n_test_prompts:
        sets.append(("test", args.n_test_prompts, args.n_test_responses))
    names = [
        name
        for split, _, _ in sets
        for name in repo_file_names(args.layout, split, args.task, args.sft_obj, args.embed_model, args.gen_model)
    ]
    config_path = out_dir / CONFIG_FILE
    if (
        config_path.exists()
        and read_json(config_path, "synthetic repository settings") == config
        and all((out_dir / name).is_file() for name in names)
    ):
        print(f"synthetic repository in {out_dir} is up to date")
        return out_dir
    config_path.unlink(missing_ok=True)
    started = time.perf_counter()
    world = SyntheticWorld(args.seed, args.emb_dim)
    for set_index, (split, n_prompts, n_responses) in enumerate(sets):
        write_set(out_dir, set_index, split, n_prompts, n_responses, args, world)
    write_json(config_path, config)  # written last: marks the repository complete
    size = sum((out_dir / name).stat().st_size for name in names)
    print(
        f"synthetic {args.layout} repository: "
        + ", ".join(f"{split} {n} x {k}" for split, n, k in sets)
        + f" x D={args.emb_dim} {args.dtype}, {size / 1e9:.2f} GB in {time.perf_counter() - started:.1f} s"
        + f" -> {out_dir}"
    )
    return out_dir


if __name__ == "__main__":
    run_cli(main)
