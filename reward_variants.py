"""The four reward variants of a finished run (docs/method.md, "Step 8: four-variant validation"): the
teacher ensemble and the distilled student, each raw and through its isotonic map.

Names only, without torch, so that score_responses.py and step 8 answer ``--help`` and flag errors
before reward_model.py (which scores with them) imports torch.
"""

from __future__ import annotations

REWARD_VARIANTS = ("teacher", "teacher_iso", "student", "student_iso")
DEFAULT_REWARD_VARIANT = "student_iso"
# The variants as step 8 names them (validation_results.json's keys, its table's rows), and those meant
# to be on the golden reward scale (their MSE is meaningful; raw teacher scores are not).
VARIANT_TITLES = dict(zip(REWARD_VARIANTS, ("Teacher", "Teacher+Isotonic", "Student", "Student+Isotonic")))
GOLDEN_SCALE_VARIANTS = ("teacher_iso", "student", "student_iso")
