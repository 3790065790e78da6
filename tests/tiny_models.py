"""Tiny local models and prompt files for testing the GPU steps (1-4) on a CPU, without downloads.

``build_tiny_setup(folder)`` writes, in a few seconds:
- ``tokenizer/``: a byte-level BPE tokenizer trained with the ``tokenizers`` library on hh-rlhf-style
  text, wrapped as ``PreTrainedTokenizerFast`` (plain, no chat template; pad/eos/bos/unk tokens);
- ``policy-lm/``: a 2-layer Llama causal LM (hidden size 32) with that tokenizer;
- ``golden-rm/``: a 2-layer Llama sequence-classification reward model (num_labels=1, pad id set);
- ``sentiment-rm/``: the same with two labels (NEGATIVE, POSITIVE), a classifier that needs
  ``--reward_label``;
- ``embed-left/`` and ``embed-right-padeos/``: the policy LM's weights with a left-padding tokenizer,
  and with a right-padding tokenizer that has no pad token (the loader falls back to eos, as for
  Llama-3), for the last-real-token embedding tests;
- ``code-model/``: a model folder that asks for its own Python code (``auto_map`` in its config and
  tokenizer config, an unknown ``model_type``); importing that code writes ``RAN_CODE`` beside it,
  so a test can prove no loader ran it (:data:`CODE_MARKER`);
- ``train_prompts.jsonl`` (prompt + completion columns, usable by step 1 and step 2) and
  ``test_prompts.jsonl`` (prompt column), hh-rlhf formatted, disjoint.

Run as a script to build the setup into a folder for a tiny end-to-end run of ``run_all.sh``:
``python tests/tiny_models.py /tmp/tiny_gpu_setup [HIDDEN_SIZE]`` (prints the paths as shell variables).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
# What the code-model folder's code writes beside itself if anything ever imports it.
CODE_MARKER = "RAN_CODE"
# Role markers a test's chat template can use (plain text never contains them).
ROLE_TOKENS = ["<|user|>", "<|assistant|>", "<|end|>"]
TOPICS = [
    "bake bread",
    "fix a bike",
    "learn chess",
    "plant tomatoes",
    "write a poem",
    "save money",
    "train a puppy",
    "paint a wall",
    "cook rice",
    "sleep better",
    "run a marathon",
    "tie a knot",
    "brew coffee",
    "clean a carpet",
    "start a garden",
    "study for exams",
    "read faster",
    "swim faster",
    "sing in tune",
    "change a tire",
    "make friends",
    "draw a cat",
    "fold a shirt",
    "stay calm",
    "pack a suitcase",
    "call a plumber",
    "bake cookies",
    "fly a kite",
    "build a shelf",
    "grow basil",
    "learn guitar",
    "stop snoring",
    "light a fire",
    "knit a hat",
    "bathe a cat",
    "sharpen a knife",
    "boil an egg",
    "name a boat",
    "wash a car",
    "skip a stone",
]
ANSWERS = [
    "Sure, start slowly and practice every day.",
    "You could ask a friend who knows how.",
    "I am not sure, but there are good guides online.",
    "First gather the tools you need.",
    "That is a great question. Take it one step at a time.",
]


def hh_prompt(topic: str) -> str:
    return f"\n\nHuman: How do I {topic}?\n\nAssistant:"


def _corpus() -> list[str]:
    lines = []
    for topic in TOPICS:
        for answer in ANSWERS:
            lines.append(f"{hh_prompt(topic)} {answer}\n\nHuman: Thanks!\n\nAssistant: You are welcome.")
    return lines


def build_tokenizer(padding_side: str = "right", with_pad: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (round-trips any text) trained on hh-rlhf-style lines."""
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[*SPECIAL_TOKENS.values(), *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    specials = dict(SPECIAL_TOKENS)
    if not with_pad:
        specials.pop("pad_token")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        padding_side=padding_side,
        model_max_length=512,
        additional_special_tokens=ROLE_TOKENS,
        **specials,
    )


def _llama_config(tokenizer: PreTrainedTokenizerFast, hidden_size: int = 32, **extra) -> LlamaConfig:
    pad_id = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS["pad_token"])
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_id,
        tie_word_embeddings=False,
        **extra,
    )


def build_code_model(folder: str | Path, hidden_size: int = 32) -> Path:
    """A model folder whose config and tokenizer config name classes in its own ``custom_code.py``
    (``auto_map``), which no library class can stand in for; importing it writes ``CODE_MARKER`` into
    ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save_pretrained(folder)
    auto_map = {
        auto: f"custom_code.{auto.removeprefix('Auto')}"
        for auto in ("AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification")
    }
    config = {"model_type": "tiny-custom-code", "hidden_size": hidden_size, "num_labels": 1, "auto_map": auto_map}
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config.update(tokenizer_class="CustomTokenizer", auto_map={"AutoTokenizer": [None, "custom_code.Tok"]})
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (folder / "custom_code.py").write_text(
        # an absolute path: transformers imports a copy of the file from its modules cache
        f"from pathlib import Path\n\nPath({str(folder.resolve() / CODE_MARKER)!r}).write_text('ran')\n"
    )
    return folder


def build_tiny_setup(
    folder: str | Path, seed: int = 0, n_train_prompts: int = 30, n_test_prompts: int = 6, hidden_size: int = 32
) -> dict[str, Path]:
    """Write the tiny tokenizer, models and prompt files into ``folder``; return their paths.

    ``hidden_size`` (4 attention heads) sets the models' width: 256 gives a head size of 64, which
    GPU attention kernels (vllm's among them) support; the tests keep 32 for speed.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    paths = {
        name: folder / name
        for name in ("tokenizer", "policy-lm", "golden-rm", "sentiment-rm", "embed-left", "embed-right-padeos")
    }
    tokenizer.save_pretrained(paths["tokenizer"])

    policy = LlamaForCausalLM(_llama_config(tokenizer, hidden_size))
    policy.generation_config.pad_token_id = policy.config.pad_token_id
    policy.save_pretrained(paths["policy-lm"])
    tokenizer.save_pretrained(paths["policy-lm"])

    policy.save_pretrained(paths["embed-left"])
    build_tokenizer(padding_side="left").save_pretrained(paths["embed-left"])
    policy.save_pretrained(paths["embed-right-padeos"])
    build_tokenizer(padding_side="right", with_pad=False).save_pretrained(paths["embed-right-padeos"])

    reward_model = LlamaForSequenceClassification(_llama_config(tokenizer, hidden_size, num_labels=1))
    with torch.no_grad():  # a visible reward spread, so ranks are not decided by rounding noise
        reward_model.score.weight.mul_(50.0)
    reward_model.save_pretrained(paths["golden-rm"])
    tokenizer.save_pretrained(paths["golden-rm"])

    sentiment = LlamaForSequenceClassification(
        _llama_config(
            tokenizer,
            hidden_size,
            num_labels=2,
            id2label={0: "NEGATIVE", 1: "POSITIVE"},
            label2id={"NEGATIVE": 0, "POSITIVE": 1},
        )
    )
    with torch.no_grad():
        sentiment.score.weight.mul_(50.0)
    sentiment.save_pretrained(paths["sentiment-rm"])
    tokenizer.save_pretrained(paths["sentiment-rm"])

    paths["code-model"] = build_code_model(folder / "code-model", hidden_size)

    rng = random.Random(seed)
    topics = list(TOPICS)
    rng.shuffle(topics)
    if n_train_prompts + n_test_prompts > len(topics):
        variants = [f"{t} {suffix}" for suffix in ("today", "at home", "quickly") for t in TOPICS]
        topics = (topics + variants)[: n_train_prompts + n_test_prompts]
    train = [{"prompt": hh_prompt(t), "completion": " " + rng.choice(ANSWERS)} for t in topics[:n_train_prompts]]
    test = [{"prompt": hh_prompt(t)} for t in topics[n_train_prompts : n_train_prompts + n_test_prompts]]
    paths["train_prompts"] = folder / "train_prompts.jsonl"
    paths["test_prompts"] = folder / "test_prompts.jsonl"
    paths["train_prompts"].write_text("".join(json.dumps(r) + "\n" for r in train))
    paths["test_prompts"].write_text("".join(json.dumps(r) + "\n" for r in test))
    return paths


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python tests/tiny_models.py OUTPUT_FOLDER [HIDDEN_SIZE]")
    width = int(sys.argv[2]) if len(sys.argv) == 3 else 32
    for key, path in build_tiny_setup(sys.argv[1], hidden_size=width).items():
        print(f"{key.upper().replace('-', '_')}={path}")
