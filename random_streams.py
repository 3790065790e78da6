"""The named random streams: every draw of steps 2 and 5-8 derives from a seed flag through one of them.

Each stream is its own ``SeedSequence([seed, *words])``, so how much one stream draws never shifts
another. The words are fixed: changing one changes that stream's results (README, "Reproducibility
and safety").
"""

from __future__ import annotations

import numpy as np

STREAMS = {
    "orm_training": (),  # step 5, --seed: spawned into pairs, labels and one stream per member
    "partition": (0x5A17,),  # step 5, --split_seed: the prompt permutation
    "cross_prompt_pairs": (0xC805,),  # metrics: the cross-prompt pairs drawn for pairwise accuracy
    "best_of_n": (0xB0F,),  # metrics: best-of-N orderings and tie-breaks
    "cv_folds": (0xCF01D,),  # calibration: the KFold random_state of the isotonic cross-validation
    "distillation": (0xD157,),  # step 7: spawned into the student's early-stopping split and its training
    "sampling": (),  # step 2: one stream per prompt id (its samples do not depend on its batch)
}


def seed_sequence(seed: int, name: str, *ids: int) -> np.random.SeedSequence:
    """Stream ``name`` of ``seed`` (``ids``: one sub-stream per id, e.g. a prompt's)."""
    return np.random.SeedSequence([seed, *STREAMS[name], *ids])


def int_seed(sequence: np.random.SeedSequence) -> int:
    """One 32-bit integer from ``sequence``, for seeds taken as integers (torch, scikit-learn, samplers)."""
    return int(sequence.generate_state(1)[0])
