"""Synthetic embedding data with real prompt structure, for running steps 5-8 on a CPU.

Generative model (all draws from one seeded generator):
    u_p  ~ N(0, I_L)                      latent of prompt p, shared by its responses
    e_pk ~ N(0, I_L)                      latent of response k of prompt p
    h_pk = [u_p, e_pk]                    (2L,)
    x_pk = A h_pk / sqrt(2L) + sigma xi   embedding, A (D, 2L) ~ N(0, 1), xi ~ N(0, I_D)
    r_pk = c_prompt * tanh(u_p . w)                          prompt-level part
         + c_resp * tanh(h_pk B) . a / sqrt(H)               response-level part (a random
                                                             one-hidden-layer network of the
                                                             prompt and response latents)
         + c_noise * eps,  eps ~ N(0, 1)                     annotation-free golden noise
The golden reward is thus a nonlinear function of a dense low-dimensional subspace of the
embedding (every coordinate carries signal), with prompt- and response-level parts. Responses are
written sorted ascending by golden reward within each prompt (split 0 lowest, README "Data format").
An optional test set draws fresh prompts with ``--n_test_responses`` responses each.

The folder also gets ``demo_config.json``; rerunning with the same settings is a no-op, and other
settings regenerate the demo, saying which settings changed (a folder with non-demo data is never
overwritten; with ``--in_use``, which run_all.sh passes while other runs read the folder, nothing
is). Runs on one folder take turns, and a new demo is built beside the folder and swapped in whole
(``data_folder``): parallel sweep cells never race to write it, and a step reading the folder sees
the old demo or the new one, never a mix.
"""

from __future__ import annotations

import interrupts  # noqa: F401  (first: signals are handled from here on, before the heavy imports)

# isort: split
import logging
from pathlib import Path

import numpy as np

from artifacts import ensure_writable_dir, read_json, write_json, write_npy
from cli import (
    ArgumentParser,
    InputError,
    for_user,
    non_negative_int,
    positive_int,
    random_seed,
    run_cli,
    setup_logging,
)
from data_folder import data_dir_claim, rewritten_data_dir, split_files
from progress import progress
from rm_data import DEMO_CONFIG_FILE, FILE_PATTERNS, write_rewards_jsonl

log = logging.getLogger("generate_demo_data")
DEMO_VERSION = 1


def build_parser() -> ArgumentParser:
    """The flags: each setting's one home (run_all.sh's variables set them: settings.py)."""
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="data", help="data directory to write (DATA_DIR)")
    parser.add_argument(
        "--n_prompts",
        type=positive_int,
        default=3000,
        help="training prompts (3000 fit N_SAMPLE up to 2000 beside step 5's evaluation pool)",
    )
    parser.add_argument("--n_splits", type=positive_int, default=10, help="responses per training prompt (K)")
    parser.add_argument("--emb_dim", type=positive_int, default=2048, help="embedding size D")
    parser.add_argument("--latent_dim", type=positive_int, default=16, help="latent size L per part")
    parser.add_argument("--n_test_prompts", type=non_negative_int, default=20, help="test prompts (0: no test set)")
    parser.add_argument("--n_test_responses", type=positive_int, default=100, help="responses per test prompt")
    parser.add_argument("--seed", type=random_seed, default=0, help="seed of the demo data")
    parser.add_argument(
        "--in_use",
        action="store_true",
        help="other runs read --output_dir: refuse to write it unless it is up to date (run_all.sh sets this)",
    )
    return parser


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if args.n_splits < 2:
        raise InputError("--n_splits must be at least 2 (responses to compare per prompt)")
    return args


class DemoWorld:
    """The fixed random functions (embedding map and golden reward) of one demo seed."""

    def __init__(self, rng: np.random.Generator, emb_dim: int, latent_dim: int, hidden: int = 32):
        self.latent_dim = latent_dim
        self.mixing = rng.standard_normal((2 * latent_dim, emb_dim)).astype(np.float32)
        self.mixing /= np.sqrt(2 * latent_dim)
        self.prompt_weights = rng.standard_normal(latent_dim) / np.sqrt(latent_dim)
        self.hidden_weights = rng.standard_normal((2 * latent_dim, hidden)) / np.sqrt(latent_dim)
        self.output_weights = rng.standard_normal(hidden)
        self.hidden = hidden
        self.emb_noise = 0.1

    def golden_reward(
        self, prompt_latent: np.ndarray, response_latent: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        """prompt_latent (P, L), response_latent (P, K, L) -> rewards (P, K)."""
        joint = np.concatenate(
            [np.broadcast_to(prompt_latent[:, None], response_latent.shape), response_latent], axis=-1
        )
        prompt_part = np.tanh(prompt_latent @ self.prompt_weights)[:, None]
        response_part = np.tanh(joint @ self.hidden_weights) @ self.output_weights / np.sqrt(self.hidden)
        noise = rng.standard_normal(response_part.shape)
        return 2.0 * prompt_part + 3.0 * response_part + 0.3 * noise

    def embed(self, prompt_latent: np.ndarray, response_latent: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(P, L), (P, L) -> (P, D) float32 embeddings of one response per prompt."""
        joint = np.concatenate([prompt_latent, response_latent], axis=1).astype(np.float32)
        noise = rng.standard_normal((len(joint), self.mixing.shape[1]), dtype=np.float32)
        return joint @ self.mixing + self.emb_noise * noise


def write_set(
    out_dir: Path, kind: str, world: DemoWorld, n_prompts: int, n_responses: int, rng: np.random.Generator
) -> None:
    """Draw one set of prompts and write its splits, sorted ascending by reward per prompt."""
    prompt_latent = rng.standard_normal((n_prompts, world.latent_dim))
    response_latent = rng.standard_normal((n_prompts, n_responses, world.latent_dim))
    rewards = world.golden_reward(prompt_latent, response_latent, rng)
    order = np.argsort(rewards, axis=1, kind="stable")
    rewards = np.take_along_axis(rewards, order, axis=1)
    response_latent = np.take_along_axis(response_latent, order[..., None], axis=1)
    emb_pattern, reward_pattern = FILE_PATTERNS[kind]
    for k in progress(range(n_responses), f"demo {kind} splits", unit="split"):
        write_npy(out_dir / emb_pattern.format(k=k), world.embed(prompt_latent, response_latent[:, k], rng))
        write_rewards_jsonl(out_dir / reward_pattern.format(k=k), rewards[:, k])


def main(argv=None) -> Path:
    args = parse_args(argv)
    setup_logging()
    out_dir = ensure_writable_dir(args.output_dir)
    with data_dir_claim(out_dir) as unused:  # no other process reads the folder meanwhile
        return write_demo(args, out_dir, in_use=args.in_use or not unused)


def write_demo(args, out_dir: Path, in_use: bool) -> Path:
    """Write the demo set into ``out_dir`` unless it already holds one with these settings; with
    ``in_use`` (other runs read it), refuse to change it."""
    config = {key: value for key, value in vars(args).items() if key not in ("output_dir", "in_use")}
    config |= {"version": DEMO_VERSION}
    config_path = out_dir / DEMO_CONFIG_FILE
    data_files = [*out_dir.glob("EMBD-*-split_*.npy"), *out_dir.glob("rewards*_split_*.json")]
    if config_path.exists():
        old = read_json(config_path, "demo config")
        if old == config:
            log.info("demo data in %s is up to date", out_dir)
            return out_dir
        changes = ", ".join(
            f"{'the demo version' if key == 'version' else '--' + key} "
            f"{old.get(key) if isinstance(old, dict) else None} -> {value}"
            for key, value in config.items()
            if not isinstance(old, dict) or old.get(key) != value
        )
        if in_use:
            raise InputError(
                f"--output_dir {out_dir} holds demo data made with other settings ({changes}) and another run "
                f"is reading it; wait for that run, or set another --output_dir for these settings"
            )
        print(for_user(f"regenerating the demo data in {out_dir}: its settings changed ({changes})"), flush=True)
    elif data_files:
        raise InputError(f"--output_dir {out_dir} holds embedding data that is not a demo; refusing to overwrite it")
    elif in_use:
        raise InputError(f"--output_dir {out_dir} holds no demo data yet and another run is reading it; wait for it")

    replaced = split_files("train", "test")  # an older demo's splits go, whatever their number
    with rewritten_data_dir(out_dir, lambda name: replaced(name) or name == DEMO_CONFIG_FILE) as staging:
        rng = np.random.default_rng(args.seed)
        world = DemoWorld(rng, args.emb_dim, args.latent_dim)
        write_set(staging, "train", world, args.n_prompts, args.n_splits, rng)
        if args.n_test_prompts:
            write_set(staging, "test", world, args.n_test_prompts, args.n_test_responses, rng)
        write_json(staging / DEMO_CONFIG_FILE, config)
    print(
        f"demo data: {args.n_prompts} prompts x {args.n_splits} responses x D={args.emb_dim}"
        f"{f', test {args.n_test_prompts} x {args.n_test_responses}' if args.n_test_prompts else ''}"
        f" -> {out_dir}"
    )
    return out_dir


if __name__ == "__main__":
    run_cli(main)
