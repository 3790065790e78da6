"""Step 5: train an ensemble of ordinal reward models (BT or classification) on simulated preferences.

Story: parse flags; open the data directory; draw the prompt partition from ``--split_seed`` (only
``orm_train`` prompts are read here); build preference pairs (cross-prompt by default, the paper's "XPrompt");
label them with a simulated annotator p(first wins) = sigmoid(annotation_quality * (r1 - r2) / s);
train ``--ensemble_number`` members that differ by seed (MLPs, or with ``--rm_model lgbm`` LightGBM
models, ``members.py``); write their files, ``prompt_split.json`` and ``orm_manifest.json`` (config, data
fingerprint, member files with their kind and sha256, pair statistics), which later steps and run_all.sh
read instead of rebuilding file names.
"""

from __future__ import annotations

import interrupts  # noqa: F401  (first: signals are handled from here on, before the heavy imports)

# isort: split
import argparse
import logging
import time
from pathlib import Path

import numpy as np

from artifacts import ensure_writable_dir, file_sha256, write_json
from cli import (
    ArgumentParser,
    InputError,
    finite_float,
    fraction,
    from_flags,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    random_seed,
    run_cli,
    setup_logging,
    zero_one,
)
from members import LGBM_SUFFIX, RM_MODELS, LgbmConfig, save_booster, train_lgbm_members
from objectives import EARLY_STOPPING, OBJECTIVES
from progress import progress
from random_streams import int_seed, seed_sequence
from rm_data import (
    DEFAULT_SPLIT_SEED,
    TASKS,
    default_eval_prompts,
    embedding_record,
    fingerprint,
    load_embedding_set,
    make_partition,
)
from run_folder import MANIFEST_FILE, PARTITION_FILE

log = logging.getLogger("step5")
PAIR_MODES = ("xprompt", "same")
RAISE_CANDIDATES = "raise --consider_first_n (CONSIDER_FIRST_N) or use --replacement replacement_true (REPLACEMENT=1)"


# The flags added after runs had been made, each with the value that reproduces those runs' training
# (summarize_runs.py fills it in where a manifest lacks the flag, to compare old and new runs).
VALUES_BEFORE_FLAGS = {
    "early_stopping": "member",
    "stop_metric": "loss",
    "min_val_pairs": 0,
    "weight_decay": 0.0,
    "bagging": 0,
    "standardize": 0,
    "min_epoch_steps": 1,
    "rm_model": "mlp",
}


def replacement_arg(text: str) -> str:
    """argparse type of --replacement: the reference implementation's names, or 1 / 0 (REPLACEMENT)."""
    value = {"1": "replacement_true", "0": "replacement_false"}.get(text, text)
    if value not in ("replacement_true", "replacement_false"):
        raise argparse.ArgumentTypeError(f"expected 1, 0, replacement_true or replacement_false, got {text!r}")
    return value


def build_parser() -> ArgumentParser:
    """The flags: each setting's one home (run_all.sh's variables set them: settings.py)."""
    parser = ArgumentParser(description="Train an ORM ensemble on simulated pairwise preferences.")
    parser.add_argument("--embed_model_name", default="gemma2b", help="embedding model (recorded in the manifest)")
    parser.add_argument(
        "--task",
        default="helpful",
        choices=sorted(TASKS),
        help="hh-rlhf task: helpful or harmless (sets the annotator scale s)",
    )
    parser.add_argument("--sft_obj", default="gpt4", help="SFT objective of the generator (recorded)")
    parser.add_argument("--gen_pref_model_name", default="gemma7b", help="generation model (recorded)")
    parser.add_argument("--data_dir", default="data", help="folder with EMBD-TRAIN-split_k.npy/rewards_split_k.json")
    parser.add_argument("--output_dir", default="distill_out", help="where checkpoints and JSON go")
    parser.add_argument(
        "--rm_objective",
        default="bt",
        choices=OBJECTIVES,
        help="; ".join(f"{name}: {objective.help}" for name, objective in OBJECTIVES.items()),
    )
    parser.add_argument(
        "--rm_model",
        default=RM_MODELS[0],
        choices=RM_MODELS,
        help="mlp: the D->1024->512->1 MLP; lgbm: LightGBM gradient-boosted trees per member, a binary "
        "classifier (clf) or on the pairwise BT loss (bt), set by step 5's --lgbm_* flags (docs/method.md); "
        "the MLP's optimiser flags and --standardize do not apply to trees",
    )
    parser.add_argument(
        "--consider_first_n",
        type=int,
        default=2,
        help="candidate responses per prompt: n>0 random n splits, -1 splits {0,K-1} "
        "(most diverse), -2 the two middle splits (least diverse)",
    )
    parser.add_argument("--n_sample", type=positive_int, default=100, help="prompts used for ORM training pairs")
    parser.add_argument(
        "--eval_prompts",
        type=positive_int,
        help="size of the evaluation pool (calibration/student_train/held_out 60/20/20); "
        "default a quarter of the prompts, at least min(1000, half of them)",
    )
    parser.add_argument(
        "--split_seed",
        type=random_seed,
        default=DEFAULT_SPLIT_SEED,
        help="seed of the prompt partition (--seed draws pairs, labels and members)",
    )
    parser.add_argument("--n_pairs", type=positive_int, default=1, help="pairs per training prompt")
    parser.add_argument(
        "--pair_mode",
        default="xprompt",
        choices=PAIR_MODES,
        help="xprompt: a response of prompt i vs one of another prompt j != i; same: two responses of one prompt",
    )
    parser.add_argument(
        "--replacement",
        type=replacement_arg,
        default="replacement_false",
        choices=["replacement_true", "replacement_false"],
        help="may a prompt's n_pairs pairs reuse one of its responses (xprompt) or one pair (same); "
        "1 and 0 stand for replacement_true and replacement_false",
    )
    parser.add_argument(
        "--annotation_quality",
        type=finite_float,
        default=10.0,
        help="annotator sharpness beta; < 0 gives noise-free labels",
    )
    parser.add_argument(
        "--reward_scale",
        type=positive_float,
        help="s in sigmoid(beta (r1 - r2) / s); default 6 for helpful, 1 for harmless",
    )
    parser.add_argument("--ensemble_number", type=positive_int, default=10, help="members, differing by seed")
    parser.add_argument(
        "--training_epochs",
        type=positive_int,
        default=30,
        help="maximum epochs per member (early stopping usually ends sooner)",
    )
    parser.add_argument(
        "--learning_rate",
        type=positive_float,
        default=1e-4,
        help="the ORMs' Adam learning rate (docs/studies/defaults.md)",
    )
    parser.add_argument("--batch_size", type=positive_int, default=256, help="pairs (bt) or responses (clf) per step")
    parser.add_argument(
        "--val_fraction", type=fraction, default=0.1, help="share of pairs held out (whole pairs) for early stopping"
    )
    parser.add_argument("--patience", type=positive_int, default=3, help="early-stopping patience in epochs")
    # A group of flags is a table in docs/method.md, under the group's title (settings.py writes it).
    options = parser.add_argument_group("Early stopping and ensemble options")
    options.add_argument(
        "--early_stopping",
        default=EARLY_STOPPING[0],
        choices=EARLY_STOPPING,
        help="member: each member stops on its own validation slice; pooled: the members' "
        "slices are disjoint and one stopping epoch is chosen from their pooled "
        "validation loss; none: every pair trains, --training_epochs epochs",
    )
    options.add_argument(
        "--stop_metric",
        default="loss",
        choices=("loss", "accuracy"),
        help="early stopping on the validation loss, or on the validation pairwise accuracy (ties: lower loss)",
    )
    options.add_argument(
        "--min_val_pairs",
        type=non_negative_int,
        default=20,
        help="below this many validation pairs behind the stopping decision, train "
        "--training_epochs epochs on every pair instead (early stopping none); 0: always stop early",
    )
    options.add_argument(
        "--weight_decay", type=non_negative_float, default=0.0, help="decoupled (AdamW) weight decay; 0: plain Adam"
    )
    options.add_argument(
        "--bagging",
        type=zero_one,
        default=0,
        help="1: each member trains on a bootstrap resample of the pairs and validates on its out-of-bag pairs",
    )
    options.add_argument(
        "--standardize",
        type=zero_one,
        default=1,
        help="1: standardise inputs with the training responses' mean and std, folded into the checkpoint's "
        "first layer, so that training does not depend on the embedding's scale (docs/studies/defaults.md); "
        "0: raw inputs (MLP members only: tree splits do not depend on a dimension's scale)",
    )
    options.add_argument(
        "--min_epoch_steps",
        type=positive_int,
        default=1,
        help="optimizer steps an epoch takes at least: fewer mini-batches than this repeat their (reshuffled) "
        "pass, so --training_epochs and --patience are budgets in steps at small N_SAMPLE too",
    )
    add_lgbm_flags(parser)
    parser.add_argument(
        "--seed",
        type=random_seed,
        default=6,
        help="seeds pairs, labels and members' initialisations (and, by default, steps 6-8's draws); "
        "not the prompt partition (--split_seed)",
    )
    return parser


def add_lgbm_flags(parser: ArgumentParser) -> None:
    """The LightGBM members' flags (``--rm_model lgbm``; docs/method.md, "LightGBM members")."""
    group = parser.add_argument_group("LightGBM members (--rm_model lgbm)")
    group.add_argument("--lgbm_num_leaves", type=positive_int, default=15, help="leaves per tree at most")
    group.add_argument("--lgbm_learning_rate", type=positive_float, default=0.1, help="shrinkage of each tree")
    group.add_argument(
        "--lgbm_n_estimators",
        type=positive_int,
        default=300,
        help="boosting rounds at most (early stopping usually ends sooner; without it, every round runs)",
    )
    group.add_argument(
        "--lgbm_min_child_samples", type=positive_int, default=10, help="training responses per leaf at least"
    )
    group.add_argument(
        "--lgbm_feature_fraction",
        type=fraction,
        default=0.1,
        help="share of embedding dimensions each tree sees (a round's cost grows with it)",
    )
    group.add_argument(
        "--lgbm_bagging_fraction",
        type=fraction,
        default=0.8,
        help="share of training responses each round samples (1: all); with --lgbm_feature_fraction, what makes "
        "members differ by seed",
    )
    group.add_argument(
        "--lgbm_patience", type=positive_int, default=50, help="early-stopping patience in boosting rounds"
    )


# Runs from before the LightGBM members were trained with their flags' defaults: none (compared as those).
VALUES_BEFORE_FLAGS.update(
    {action.dest: action.default for action in build_parser()._actions if action.dest.startswith("lgbm_")}
)


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if args.consider_first_n == 0 or args.consider_first_n < -2:
        raise InputError(f"--consider_first_n must be > 0, -1 or -2, got {args.consider_first_n}")
    if args.reward_scale is None:
        args.reward_scale = TASKS[args.task].reward_scale
    return args


def checkpoint_name(args, member: int) -> str:
    """The original authors' checkpoint naming, one file per ensemble member; a LightGBM member's
    names its rounds and learning rate and ends in ``.txt`` (``members.member_kind``)."""
    prefix = "XPrompt" if args.pair_mode == "xprompt" else "SamePrompt"
    replacement = args.replacement == "replacement_true"
    if args.rm_model == "lgbm":
        training = f"_trees{args.lgbm_n_estimators}_lr{args.lgbm_learning_rate}{LGBM_SUFFIX}"
    else:
        training = f"_epoch{args.training_epochs}_lr{args.learning_rate}.ckpt"
    return (
        f"{prefix}_{args.rm_model}_{args.rm_objective}_{member}_seed{args.seed}_firstn_{args.consider_first_n}"
        f"_n_{args.n_sample}_pair_{args.n_pairs}_replacement_{replacement}{training}"
    )


def candidate_splits(n_prompts: int, n_splits: int, consider_first_n: int, rng: np.random.Generator) -> np.ndarray:
    """(n_prompts, C) split indices each prompt may contribute (splits are sorted by reward)."""
    if consider_first_n == -1:
        return np.tile([0, n_splits - 1], (n_prompts, 1))
    if consider_first_n == -2:
        return np.tile([n_splits // 2 - 1, n_splits // 2], (n_prompts, 1))
    if consider_first_n > n_splits:
        raise InputError(f"--consider_first_n {consider_first_n} exceeds the {n_splits} responses per prompt")
    return np.argsort(rng.random((n_prompts, n_splits)), axis=1)[:, :consider_first_n]


def _distinct_draws(
    rng: np.random.Generator, n_rows: int, n_options: int, n_draws: int, replace: bool, what: str, remedy: str
) -> np.ndarray:
    """(n_rows, n_draws) draws from range(n_options) per row, distinct within a row unless replace."""
    if replace:
        return rng.integers(n_options, size=(n_rows, n_draws))
    if n_draws > n_options:
        raise InputError(
            f"--n_pairs (N_PAIRS) {n_draws} exceeds the {n_options} {what} available without replacement; {remedy}"
        )
    if n_options <= 64:
        return np.argsort(rng.random((n_rows, n_options)), axis=1)[:, :n_draws]
    draws = rng.integers(n_options, size=(n_rows, n_draws))
    while True:  # redraw rows holding a repeat; rare when n_draws << n_options
        ordered = np.sort(draws, axis=1)
        repeated = (ordered[:, 1:] == ordered[:, :-1]).any(axis=1)
        if not repeated.any():
            return draws
        draws[repeated] = rng.integers(n_options, size=(int(repeated.sum()), n_draws))


def build_pairs(
    orm_prompts: np.ndarray,
    candidates: np.ndarray,
    n_pairs: int,
    pair_mode: str,
    replacement: bool,
    rng: np.random.Generator,
) -> tuple[np.ndarray, ...]:
    """Pairs as four (P * n_pairs,) arrays: first prompt, first split, second prompt, second split.

    xprompt: for each training prompt i, n_pairs of its candidates against candidates of n_pairs
    distinct other training prompts (never i itself). same: n_pairs pairs of two distinct
    candidates of prompt i.
    """
    n_prompts, n_cand = candidates.shape
    rows = np.repeat(np.arange(n_prompts), n_pairs)
    if pair_mode == "xprompt":
        if n_prompts < 2:
            raise InputError("--pair_mode xprompt needs --n_sample >= 2")
        own = _distinct_draws(
            rng, n_prompts, n_cand, n_pairs, replacement, "candidate responses per prompt", RAISE_CANDIDATES
        )
        offsets = 1 + _distinct_draws(
            rng, n_prompts, n_prompts - 1, n_pairs, False, "other prompts", "raise --n_sample (N_SAMPLE)"
        )
        partner_rows = (rows + offsets.ravel()) % n_prompts  # offset in 1..P-1: never the same prompt
        partner_cand = rng.integers(n_cand, size=len(rows))
        return (
            orm_prompts[rows],
            candidates[rows, own.ravel()],
            orm_prompts[partner_rows],
            candidates[partner_rows, partner_cand],
        )
    first_c, second_c = np.triu_indices(n_cand, k=1)
    if len(first_c) == 0:
        raise InputError("--pair_mode same needs --consider_first_n >= 2 candidate responses per prompt")
    combo = _distinct_draws(
        rng, n_prompts, len(first_c), n_pairs, replacement, "same-prompt pairs per prompt", RAISE_CANDIDATES
    ).ravel()
    return (orm_prompts[rows], candidates[rows, first_c[combo]], orm_prompts[rows], candidates[rows, second_c[combo]])


def simulate_annotator(
    first_rewards: np.ndarray,
    second_rewards: np.ndarray,
    annotation_quality: float,
    reward_scale: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """(first_wins bool, p(first wins)) with p = sigmoid(quality * (r1 - r2) / s); quality < 0: noise-free."""
    delta = (first_rewards - second_rewards) / reward_scale
    if annotation_quality < 0:
        prob = np.where(delta > 0, 1.0, np.where(delta < 0, 0.0, 0.5))
    else:
        with np.errstate(over="ignore"):  # exp overflow -> inf -> probability 0, as intended
            prob = 1.0 / (1.0 + np.exp(-annotation_quality * delta))
    return rng.random(len(delta)) < prob, prob


def pair_statistics(first_rewards, second_rewards, first_wins, prob, reward_scale) -> dict:
    """Realised label-flip rate (winner has the lower golden reward) against sigmoid theory.

    A pair whose golden rewards tie has no true order to flip: the rates are over the other pairs,
    and ``n_pairs_with_golden_tie`` says how many were left out. When every pair ties the rates are
    None, with ``label_flip_rate_reason`` (step 5 then refuses to train)."""
    delta = first_rewards - second_rewards
    decided = delta != 0
    flipped = np.where(first_wins, delta < 0, delta > 0)[decided]
    expected = np.where(delta > 0, 1 - prob, prob)[decided]
    stats = {
        "n_pairs": int(len(delta)),
        "n_pairs_with_golden_tie": int((~decided).sum()),
        "label_flip_rate": float(flipped.mean()) if decided.any() else None,
        "expected_flip_rate": float(expected.mean()) if decided.any() else None,
        "mean_abs_delta": float(np.abs(delta).mean()),
        "mean_abs_scaled_delta": float(np.abs(delta / reward_scale).mean()),
    }
    if not decided.any():
        stats["label_flip_rate_reason"] = "every pair ties in golden reward: no pair has a true order to flip"
    return stats


def member_splits(n_pairs: int, generators: list, args, pair_rng: np.random.Generator) -> tuple[list, str, int]:
    """Each member's (training, validation) pair indices, the early-stopping scheme used and the
    number of validation pairs its stopping decisions rest on.

    member: a random slice of --val_fraction of the pairs per member (the member's own generator);
    pooled: the slices are consecutive blocks of one permutation (``pair_rng``), disjoint while
    members x slice <= pairs; bagging: a bootstrap resample per member, its out-of-bag pairs the
    validation. Fewer than --min_val_pairs validation pairs behind the stopping decision (a member's
    own for member, all members' for pooled), or --early_stopping none: no validation, every pair
    (or the bootstrap resample) trains for --training_epochs epochs.
    """
    import torch

    def others(pairs: torch.Tensor) -> torch.Tensor:  # the pair indices not in ``pairs``, ascending
        return torch.from_numpy(np.setdiff1d(np.arange(n_pairs), pairs.numpy()))

    n_val = min(max(1, int(round(args.val_fraction * n_pairs))), n_pairs - 1)
    splits = []
    if args.bagging:
        for generator in generators:
            drawn = torch.randint(n_pairs, (n_pairs,), generator=generator)
            splits.append((drawn, others(drawn)))  # out-of-bag pairs validate
    elif args.early_stopping == "pooled":
        order = torch.from_numpy(pair_rng.permutation(n_pairs))
        for member in range(len(generators)):
            positions = (member * n_val + torch.arange(n_val)) % n_pairs
            splits.append((order[others(positions)], order[positions]))
    elif args.early_stopping == "member":
        for generator in generators:
            order = torch.randperm(n_pairs, generator=generator)
            splits.append((order[n_val:], order[:n_val]))
    if args.early_stopping == "member" and splits:
        decision_pairs = min(len(val) for _, val in splits)
    elif args.early_stopping == "pooled" and splits:
        decision_pairs = len(torch.unique(torch.cat([val for _, val in splits])))
    else:
        decision_pairs = 0
    if args.early_stopping != "none" and decision_pairs >= max(args.min_val_pairs, 1):
        return splits, args.early_stopping, decision_pairs
    if args.early_stopping != "none":
        log.info(
            "%d validation pairs < --min_val_pairs %d: no early stopping, %s on every pair",
            decision_pairs,
            args.min_val_pairs,
            f"{args.lgbm_n_estimators} boosting rounds"
            if getattr(args, "rm_model", "mlp") == "lgbm"
            else f"{args.training_epochs} epochs",
        )
    no_val = torch.zeros(0, dtype=torch.int64)
    if args.bagging:
        return [(train, no_val) for train, _ in splits], "none", 0
    return [(torch.arange(n_pairs), no_val) for _ in generators], "none", 0


def label_pairs(
    rewards: np.ndarray, pairs: tuple[np.ndarray, ...], annotation_quality: float, reward_scale: float, rng
) -> tuple[np.ndarray, dict]:
    """The simulated annotator's labels of the pairs (first_wins) and their :func:`pair_statistics`;
    ``rewards`` is (prompts, splits) golden rewards."""
    first_r, second_r = rewards[pairs[0], pairs[1]], rewards[pairs[2], pairs[3]]
    first_wins, prob = simulate_annotator(first_r, second_r, annotation_quality, reward_scale, rng)
    stats = pair_statistics(first_r, second_r, first_wins, prob, reward_scale)
    ties = stats["n_pairs_with_golden_tie"]
    if ties == stats["n_pairs"]:
        raise InputError(
            f"all {ties} training pairs tie in golden reward, so no label carries a preference; "
            "nothing to train on (check the rewards files of --data_dir)"
        )
    log.info(
        "%d pairs, label flip rate %.3f (theory %.3f)%s",
        stats["n_pairs"],
        stats["label_flip_rate"],
        stats["expected_flip_rate"],
        f"; {ties} pairs tie in golden reward, left out of the rate" if ties else "",
    )
    return first_wins, stats


def pair_features(data, pairs: tuple[np.ndarray, ...], first_wins: np.ndarray):
    """Each response used in a pair read once: features (R, D) and the pairs' winners and losers as
    row indices into them (torch tensors)."""
    import torch

    first_p, first_k, second_p, second_k = pairs
    keys = np.concatenate([first_k * data.n_prompts + first_p, second_k * data.n_prompts + second_p])
    unique_keys, inverse = np.unique(keys, return_inverse=True)
    features = np.empty((len(unique_keys), data.dim), dtype=np.float32)
    for k in range(data.n_splits):
        in_split = unique_keys // data.n_prompts == k
        features[in_split] = data.read_rows(k, unique_keys[in_split] % data.n_prompts)
    first_rows, second_rows = np.split(inverse, 2)
    winners = torch.from_numpy(np.where(first_wins, first_rows, second_rows))
    losers = torch.from_numpy(np.where(first_wins, second_rows, first_rows))
    return torch.from_numpy(features), winners, losers


def member_pairs(winners, losers, splits: list) -> list[tuple]:
    """Each member's (winners, losers, val_winners, val_losers) from its :func:`member_splits` split."""
    return [(winners[train], losers[train], winners[val], losers[val]) for train, val in splits]


def train_config(args):
    """The ``networks.TrainConfig`` of the flags."""
    from networks import TrainConfig

    return from_flags(TrainConfig, args, epochs=args.training_epochs)


def lgbm_config(args):
    """The ``members.LgbmConfig`` of the flags; LightGBM's threads are torch's (THREADS)."""
    import torch

    return from_flags(LgbmConfig, args, "lgbm_", threads=torch.get_num_threads(), stop_metric=args.stop_metric)


def train_members(members: list, config, scheme: str) -> list:
    """Train the members (``networks.OrmMember``) by the early-stopping scheme: (model, FitResult) each.
    Divergence is an InputError naming the member and --learning_rate."""
    from networks import TrainingDiverged, diverged_advice, train_orms

    trained = []
    try:
        if scheme == "pooled":
            start = time.perf_counter()
            trained = train_orms(members, config)  # one stopping epoch for all
            log.info(
                "pooled early stopping: best epoch %d/%d for all %d members, %.2fs",
                trained[0][1].best_epoch,
                trained[0][1].epochs_run,
                len(trained),
                time.perf_counter() - start,
            )
        else:
            for member in progress(members, "ensemble members", unit="member"):
                trained += train_orms([member], config, early_stopping=scheme == "member")
    except TrainingDiverged as err:
        index = err.index if scheme == "pooled" else len(trained)
        who = "ORM members" if index < 0 else f"ORM member {index}"
        advice = diverged_advice(err, "--learning_rate (LEARNING_RATE in run_all.sh)", config.learning_rate)
        raise InputError(f"{who} diverged ({err}); {advice}") from None
    return trained


def member_record(member: int, checkpoint: str, kind: str, seed: int, result, train_pairs: int, val_pairs: int) -> dict:
    """A member's entry in the manifest; ``result`` is its ``networks.FitResult`` (a LightGBM member's
    epochs are boosting rounds). The file's sha256 is added once it is written."""
    return {
        "member": member,
        "checkpoint": checkpoint,
        "kind": kind,
        "seed": seed,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "val_loss": result.best_val_loss,
        "val_pair_accuracy": result.val_pair_accuracy,
        "train_pairs": train_pairs,
        "val_pairs": val_pairs,
        "history": result.history,
    }


def log_member(member: int, result, responses_per_sample: int, flops_per_response: int | None) -> None:
    """A member's line: its stopping epoch (boosting round), validation loss and accuracy, training speed
    (and for an MLP its GFLOP/s; ``flops_per_response`` None for a tree model)."""
    responses_per_second = result.samples_per_second * responses_per_sample
    log.info(
        "member %d: best %s %d/%d, val loss %s, val acc %s, %.0f responses/s%s",
        member,
        "round" if flops_per_response is None else "epoch",
        result.best_epoch,
        result.epochs_run,
        "n/a" if result.best_val_loss is None else f"{result.best_val_loss:.4f}",
        "n/a" if result.val_pair_accuracy is None else f"{result.val_pair_accuracy:.4f}",
        responses_per_second,
        "" if flops_per_response is None else f" ({responses_per_second * flops_per_response / 1e9:.1f} GFLOP/s)",
    )


def partition_record(
    partition: dict, split_seed: int, eval_prompts: int, n_sample: int, data, data_fingerprint
) -> dict:
    """``prompt_split.json``: the partition and what it was drawn from (steps 6-8 refuse it for other data)."""
    return {
        "split_seed": split_seed,
        "eval_prompts": eval_prompts,
        "n_prompts": data.n_prompts,
        "n_sample": n_sample,
        "data_fingerprint": data_fingerprint,
        **partition,
    }


def manifest_record(
    args,
    data,
    data_fingerprint,
    partition: dict,
    stats: dict,
    scheme: str,
    decision_pairs: int,
    records: list,
    threads: int,
) -> dict:
    """``orm_manifest.json``: the flags (``args``, but the output folder), the threads, the data, the
    pairs, the early-stopping scheme used and each member's record."""
    return {
        "config": {key: value for key, value in vars(args).items() if key != "output_dir"},
        "threads": threads,  # a matrix product's last bits depend on its threads (run_all.sh THREADS)
        "data": {
            "data_dir": str(Path(args.data_dir)),
            "fingerprint": data_fingerprint,
            "n_prompts": data.n_prompts,
            "n_splits": data.n_splits,
            "dim": data.dim,
            "dtype": str(data.dtype),
            "embedding": embedding_record(args.data_dir, args.embed_model_name),
        },
        "prompt_counts": {role: len(ids) for role, ids in partition.items()},
        "pair_statistics": stats,
        "checkpoints": [record["checkpoint"] for record in records],
        "early_stopping": {
            "scheme": scheme,
            "requested": args.early_stopping,
            "stop_metric": args.stop_metric,
            "decision_validation_pairs": decision_pairs,
            "bagging": bool(args.bagging),
        },
        "members": records,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    # torch is imported once the flags are valid: --help and flag errors return at once.
    import torch

    from networks import OrmMember, flush_denormals, mlp_train_flops_per_sample, save_checkpoint

    flush_denormals()
    setup_logging()
    output_dir = ensure_writable_dir(args.output_dir)
    data = load_embedding_set(args.data_dir, "train")

    # --- seeding: every random stream derives from --seed through its own SeedSequence ---
    streams = seed_sequence(args.seed, "orm_training").spawn(2 + args.ensemble_number)
    pair_rng = np.random.default_rng(streams[0])
    label_rng = np.random.default_rng(streams[1])
    member_seeds = [int_seed(s) for s in streams[2:]]

    if args.eval_prompts is None:  # record the size used, so the manifest says what was evaluated
        args.eval_prompts = default_eval_prompts(data.n_prompts)
    partition = make_partition(data.n_prompts, args.n_sample, args.split_seed, args.eval_prompts)
    orm_prompts = np.asarray(partition["orm_train"], dtype=np.int64)
    candidates = candidate_splits(len(orm_prompts), data.n_splits, args.consider_first_n, pair_rng)
    pairs = build_pairs(
        orm_prompts, candidates, args.n_pairs, args.pair_mode, args.replacement == "replacement_true", pair_rng
    )
    if len(pairs[0]) < 2:
        raise InputError(f"--n_sample {args.n_sample} x --n_pairs {args.n_pairs} gives fewer than 2 pairs")
    first_wins, stats = label_pairs(data.rewards, pairs, args.annotation_quality, args.reward_scale, label_rng)
    features, winners, losers = pair_features(data, pairs, first_wins)

    generators = [torch.Generator().manual_seed(member_seed) for member_seed in member_seeds]
    splits, scheme, decision_pairs = member_splits(len(winners), generators, args, pair_rng)
    own_pairs = member_pairs(winners, losers, splits)
    if args.rm_model == "lgbm":
        trained = train_lgbm_members(
            features.numpy(), own_pairs, args.rm_objective, member_seeds, scheme, lgbm_config(args)
        )
        flops, save = None, save_booster
    else:
        members = [
            OrmMember(features, *pairs, args.rm_objective, generator, bool(args.standardize))
            for pairs, generator in zip(own_pairs, generators)
        ]
        trained = train_members(members, train_config(args), scheme)
        flops, save = mlp_train_flops_per_sample(data.dim), save_checkpoint  # forward + backward per response
    records = []
    for member, ((_, result), (train, val), member_seed) in enumerate(zip(trained, splits, member_seeds)):
        log_member(member, result, OBJECTIVES[args.rm_objective].responses_per_sample, flops)
        name = checkpoint_name(args, member)
        records.append(member_record(member, name, args.rm_model, member_seed, result, len(train), len(val)))

    # Saved once every member has trained: a diverged one leaves no files.
    for record, (model, _) in zip(records, trained):
        save(model, output_dir / record["checkpoint"])
        record["sha256"] = file_sha256(output_dir / record["checkpoint"])  # steps 6-8 check a tree model's
    data_fingerprint = fingerprint(data)
    write_json(
        output_dir / PARTITION_FILE,
        partition_record(partition, args.split_seed, args.eval_prompts, args.n_sample, data, data_fingerprint),
    )
    manifest = manifest_record(
        args, data, data_fingerprint, partition, stats, scheme, decision_pairs, records, torch.get_num_threads()
    )
    write_json(output_dir / MANIFEST_FILE, manifest)  # written last: marks the run complete
    kind = " LightGBM" if args.rm_model == "lgbm" else ""
    print(
        f"step5: trained {len(records)} {args.rm_objective}{kind} members on {stats['n_pairs']} pairs "
        f"(flip rate {stats['label_flip_rate']:.3f}) -> {output_dir / MANIFEST_FILE}"
    )
    return manifest


if __name__ == "__main__":
    run_cli(main)
