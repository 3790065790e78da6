"""The trained reward model in use: load a finished OUTPUT_DIR, score embeddings or (prompt, response) texts.

    from reward_model import RewardModel

    rm = RewardModel.load("distill_out")            # every variant; student_iso is the default one
    rm.score_embeddings(embeddings)                 # (N, D) -> (N,) rewards on the golden scale
    rm.score_texts(["\\n\\nHuman: How do I bake bread?\\n\\nAssistant:"], ["Mix flour, water and yeast."])
    reward_fn = rm.trl_reward_function()            # trl.GRPOTrainer(..., reward_funcs=reward_fn)

The variants, safe loading, how texts are embedded (``llm_models.embed_texts``, step 4's procedure)
and by which model: README, "Using the trained reward model". The reward heads run on the CPU in
float32 with the same stacked-ensemble code as steps 6-8, so scores of the same embeddings equal
step 8's (bit for bit when rows are scored in the same batches: a matrix product's last bit depends
on its batch).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from calibration import check_map_provenance, load_isotonic_map
from cli import InputError
from llm_models import (
    ASSISTANT_TURN,
    HUMAN_TURN,
    cut_response,
    dtype_name,
    embed_texts,
    load_config,
    load_embedding_model,
    load_tokenizer,
    pick_device,
    pick_dtype,
    scored_text,
)
from members import load_members
from reward_variants import DEFAULT_REWARD_VARIANT, REWARD_VARIANTS
from rm_data import DEFAULT_CHUNK_ROWS, embedding_record
from run_folder import (
    MANIFEST_FILE,
    STUDENT_MAP_FILE,
    TEACHER_MAP_FILE,
    checkpoint_paths,
    load_manifest,
    member_hashes,
    student_checkpoint_name,
)

log = logging.getLogger("reward_model")

DEFAULT_MAX_LENGTH = 1024  # step 4's --max_length default, for manifests that do not record it
TEXTS_PER_ROUND = 4096  # texts embedded, then scored, at a time: memory stays at ~TEXTS_PER_ROUND x D floats


class RewardModel:
    """The reward variants of one finished OUTPUT_DIR (:meth:`load`), scoring embeddings or texts.

    dim: D, the embedding size the checkpoints take
    variants: the variants loaded
    embedding: the manifest's record of the embedding model ({"source", "model", "max_length", "pooling"})
    """

    def __init__(self, output_dir: Path, dim: int, variants: Sequence[str], scorers: dict, maps: dict, embedding: dict):
        self.output_dir, self.dim, self.variants = output_dir, dim, tuple(variants)
        self._scorers, self._maps, self.embedding = scorers, maps, embedding
        self._embedder = None

    @classmethod
    def load(cls, output_dir: str | os.PathLike, variants: Sequence[str] = REWARD_VARIANTS) -> RewardModel:
        """Load what ``variants`` need from ``output_dir`` (the teacher members, the student, their maps).

        Every problem (missing or foreign artifact, a map fitted on other checkpoints) is an
        :class:`cli.InputError` naming the file.
        """
        output_dir = Path(output_dir)
        unknown = [v for v in variants if v not in REWARD_VARIANTS]
        if unknown or not variants:
            raise InputError(f"unknown reward variant(s) {unknown}; choose from {', '.join(REWARD_VARIANTS)}")
        if not output_dir.is_dir():
            raise InputError(f"output directory {output_dir} does not exist (run run_all.sh or steps 5-7 first)")
        manifest = load_manifest(output_dir)
        task, objective = manifest["config"]["task"], manifest["config"]["rm_objective"]  # checked by load_manifest
        try:
            dim = manifest["data"]["dim"]
        except KeyError:
            raise InputError(
                f"{output_dir / MANIFEST_FILE}: expected data.dim, config.task and "
                "config.rm_objective (rerun step5_train_rms.py)"
            ) from None
        checkpoints = {
            "teacher": checkpoint_paths(output_dir, manifest),
            "student": [output_dir / student_checkpoint_name(task, objective)],
        }
        map_files = {"teacher": TEACHER_MAP_FILE, "student": STUDENT_MAP_FILE}
        scorers, maps = {}, {}
        for model in ("teacher", "student"):
            if model in variants or f"{model}_iso" in variants:
                scorers[model] = load_members(checkpoints[model], dim, member_hashes(output_dir, manifest))
            if f"{model}_iso" in variants:
                map_path = output_dir / map_files[model]
                maps[model] = load_isotonic_map(map_path, f"{model} isotonic map (run step7_isotonic_distillation.py)")
                check_map_provenance(maps[model], map_path, model, checkpoints[model])
        embedding = manifest["data"].get("embedding")
        if not isinstance(embedding, dict):  # a manifest written before step 5 recorded it (data_dir is checked)
            embedding = embedding_record(manifest["data"]["data_dir"], manifest["config"].get("embed_model_name"))
        return cls(output_dir, dim, variants, scorers, maps, embedding)

    # ----------------------------------------------------------------------------------------
    # Embeddings -> rewards
    # ----------------------------------------------------------------------------------------
    def score_embeddings(self, embeddings: np.ndarray, variant: str = DEFAULT_REWARD_VARIANT) -> np.ndarray:
        """Rewards (N,) float64 of ``embeddings`` (N, D) float32 or float16."""
        return self.score_variants(embeddings, [variant])[variant]

    def score_variants(self, embeddings: np.ndarray, variants: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Rewards (N,) float64 of ``embeddings`` (N, D) for each of ``variants`` (default: all loaded).

        As in steps 6-8: rows are cast to float32 and scored ``DEFAULT_CHUNK_ROWS`` at a time; the
        teacher is the float32 mean over members, then float64 through its map.
        """
        variants = self.variants if variants is None else tuple(variants)
        missing = [v for v in variants if v not in self.variants]
        if missing:
            raise InputError(
                f"variant(s) {missing} not loaded (RewardModel.load(..., variants=...) "
                f"loaded {', '.join(self.variants)})"
            )
        rows = np.asarray(embeddings)
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise InputError(f"embeddings of shape {rows.shape}: expected (N, {self.dim})")
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if not np.isfinite(rows).all():
            raise InputError(f"embeddings: non-finite value in row {int(np.flatnonzero(~np.isfinite(rows).all(1))[0])}")
        raw = {}
        for model in {variant.removesuffix("_iso") for variant in variants}:
            chunks = range(0, len(rows), DEFAULT_CHUNK_ROWS)  # member scores (M, B) -> float32 mean (B,)
            means = [self._scorers[model](rows[s : s + DEFAULT_CHUNK_ROWS]).mean(axis=0) for s in chunks]
            raw[model] = np.concatenate([np.empty(0, np.float32), *means]).astype(np.float64)
        return {v: self._maps[v[:-4]].predict(raw[v[:-4]]) if v.endswith("_iso") else raw[v] for v in variants}

    # ----------------------------------------------------------------------------------------
    # Texts -> embeddings -> rewards
    # ----------------------------------------------------------------------------------------
    def load_embedder(
        self,
        embedding_model: str | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 16,
        max_length: int | None = None,
        dtype: str = "auto",
    ) -> None:
        """Load the embedding model (default: the manifest's) on ``device`` (default: a GPU if present).

        Its hidden size must equal D. ``dtype``: compute dtype, 'auto' being step 4's rule
        (``llm_models.pick_dtype``). ``max_length``: tokens per text (default: step 4's recorded one).
        """
        manifest_path = self.output_dir / MANIFEST_FILE
        name = embedding_model or self.embedding.get("model")
        if name is None:
            raise InputError(
                f"{manifest_path}: the ensemble was trained on {self.embedding.get('source')}, with "
                "no embedding model; pass --embedding_model to score texts"
            )
        flag = "--embedding_model" if embedding_model else f"{manifest_path}: embedding model"
        hidden_size = load_config(name, flag).get_text_config().hidden_size  # config.json only, no weights
        if hidden_size != self.dim:
            raise InputError(
                f"{flag} {name}: hidden size {hidden_size} differs from the reward model's input "
                f"size D={self.dim} ({manifest_path})"
            )
        device = pick_device() if device is None else torch.device(device)
        tokenizer = load_tokenizer(name, flag)
        model = load_embedding_model(name, flag, device, pick_dtype(device, requested=dtype))
        max_length = max_length or self.embedding.get("max_length") or DEFAULT_MAX_LENGTH
        pooling = self.embedding.get("pooling", "last")  # manifests written before --pooling existed: last
        self._embedder = (name, tokenizer, model, batch_size, max_length, pooling)
        log.info(
            "embedding texts with %s on %s in %s (max %d tokens, padding side %s)",
            name,
            device,
            dtype_name(model.dtype),
            max_length,
            tokenizer.padding_side,
        )

    def embed_texts(self, prompts: Sequence[str], responses: Sequence[str], progress: bool = True) -> np.ndarray:
        """Step 4's embeddings (N, D) float32 of the (prompt, response) pairs."""
        if len(prompts) != len(responses):
            raise InputError(f"{len(prompts)} prompts but {len(responses)} responses")
        if self._embedder is None:
            self.load_embedder()
        _, tokenizer, model, batch_size, max_length, pooling = self._embedder
        texts = [scored_text(prompt, cut_response(response)) for prompt, response in zip(prompts, responses)]
        return embed_texts(model, tokenizer, texts, batch_size, max_length, progress, pooling)

    def score_texts(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        variant: str = DEFAULT_REWARD_VARIANT,
        progress: bool = True,
    ) -> np.ndarray:
        """Rewards (N,) float64 of (prompt, response) texts, ``TEXTS_PER_ROUND`` texts at a time."""
        if len(prompts) != len(responses):
            raise InputError(f"{len(prompts)} prompts but {len(responses)} responses")
        rewards = np.empty(len(prompts), dtype=np.float64)
        for start in range(0, len(prompts), TEXTS_PER_ROUND):
            stop = start + TEXTS_PER_ROUND
            embeddings = self.embed_texts(prompts[start:stop], responses[start:stop], progress)
            rewards[start:stop] = self.score_embeddings(embeddings, variant)
        return rewards

    def trl_reward_function(self, variant: str = DEFAULT_REWARD_VARIANT) -> TRLRewardFunction:
        """A reward function for TRL's ``GRPOTrainer``/``RLOOTrainer`` (``reward_funcs=``)."""
        return TRLRewardFunction(self, variant)


# --------------------------------------------------------------------------------------------
# TRL adapter
# --------------------------------------------------------------------------------------------
def _message_text(message: dict) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
        return "".join(
            part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"
        )
    raise ValueError(f"message content must be a string or a list of parts, got {type(content).__name__}")


def hh_rlhf_prompt(messages: Sequence[dict]) -> str:
    """Chat messages -> the hh-rlhf prompt the pipeline embeds: "\\n\\nHuman: ...\\n\\nAssistant: ...",
    ending with "\\n\\nAssistant:". System messages are left out (hh-rlhf dialogues have none)."""
    turns = []
    for message in messages:
        role = message.get("role")
        if role == "user":
            turns.append(f"{HUMAN_TURN}: {_message_text(message)}")
        elif role == "assistant":
            turns.append(f"{ASSISTANT_TURN} {_message_text(message)}")
        elif role != "system":
            raise ValueError(f"cannot render a {role!r} message as hh-rlhf text (user, assistant, system only)")
    return "".join(turns) + ASSISTANT_TURN


class TRLRewardFunction:
    """``reward_func(prompts, completions, **kwargs) -> list[float]`` for TRL's online trainers
    (docs/trl.md): strings, or conversational lists of ``{"role", "content"}`` messages (completions: assistant
    messages only) rendered as hh-rlhf text (:func:`hh_rlhf_prompt`); other keyword arguments are ignored.
    """

    def __init__(self, reward_model: RewardModel, variant: str = DEFAULT_REWARD_VARIANT):
        if variant not in reward_model.variants:
            raise InputError(f"variant {variant!r} not loaded; loaded: {', '.join(reward_model.variants)}")
        self.reward_model, self.variant = reward_model, variant
        self.__name__ = f"embedding_rm_{variant}"  # the name TRL logs this reward under

    def __call__(self, prompts: Sequence, completions: Sequence, **kwargs) -> list[float]:
        prompt_texts, response_texts = [], []
        for prompt, completion in zip(prompts, completions, strict=True):
            prompt_texts.append(prompt if isinstance(prompt, str) else hh_rlhf_prompt(prompt))
            if not isinstance(completion, str):
                roles = {message.get("role") for message in completion}
                if roles - {"assistant"}:
                    raise ValueError(f"completion messages must be assistant messages, got roles {sorted(roles)}")
                completion = "\n".join(_message_text(message) for message in completion)
            response_texts.append(completion)
        return self.reward_model.score_texts(prompt_texts, response_texts, self.variant, progress=False).tolist()
