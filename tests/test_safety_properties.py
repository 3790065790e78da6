"""No code path unpickles or runs a model folder's code; metric and isotonic-map properties hold on random
inputs (hypothesis)."""

import ast
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.stats import spearmanr
from sklearn.isotonic import IsotonicRegression

import calibration
import metrics

UNSAFE = re.compile(
    r"pickle\.loads?\(|joblib\.load\(|torch\.load\((?![^)]*weights_only=True)|allow_pickle=True"
    r"|(?<![.\w])(?:eval|exec)\(|yaml\.(?:unsafe_)?load\(|marshal\.loads?\(|shelve\.open\(|dill\.|cloudpickle\."
)
SOURCES = [*ROOT.glob("*.py"), *ROOT.glob("benchmarks/*.py")]


def test_no_source_file_unpickles_or_evaluates():
    offenders = []
    for path in SOURCES:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if UNSAFE.search(line):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert not offenders, offenders


def test_every_model_load_passes_trust_remote_code_false():
    """Every ``from_pretrained`` and vllm ``LLM`` call says ``trust_remote_code=False``, so no model
    folder's code runs and transformers never asks on stdin. peft's ``PeftModel.from_pretrained``
    takes no such flag: it reads an adapter's JSON config and safetensors (or weights-only) tensors."""
    calls, offenders = 0, []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name not in ("from_pretrained", "LLM") or ast.unparse(func) == "PeftModel.from_pretrained":
                continue
            calls += 1
            flags = {k.arg: k.value for k in node.keywords}
            trust = flags.get("trust_remote_code")
            if not (isinstance(trust, ast.Constant) and trust.value is False):
                offenders.append(f"{path.name}:{node.lineno}: {ast.unparse(node)[:80]}")
    assert calls >= 2 and not offenders, offenders


class Exploit:
    """Unpickling this opens (creates) ``marker``: proof that a loader ran pickled code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_an_object_array_npy_is_refused_and_never_unpickled(demo_copy, tmp_path):
    import convert_embeddings
    from cli import InputError
    from rm_data import load_embedding_set

    marker = tmp_path / "pwned"
    evil = demo_copy / "EMBD-TRAIN-split_3.npy"
    np.save(evil, np.array([[Exploit(marker)]], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match=rf"cannot read embeddings {re.escape(str(evil))} \(expected"):
        load_embedding_set(demo_copy)
    with pytest.raises(InputError, match=rf"cannot read embeddings {re.escape(str(evil))} \(expected"):
        convert_embeddings.open_npy(evil, "embeddings", "numbers", mmap=True)
    assert not marker.exists()


def test_an_object_array_in_the_score_cache_is_rescored_never_unpickled(demo_dir, tmp_path):
    from rm_data import load_embedding_set
    from run_folder import score_cached

    marker = tmp_path / "pwned"
    eset = load_embedding_set(demo_dir)
    prompt_ids = np.arange(3)
    model_file = tmp_path / "model.ckpt"  # the cache key stats it
    model_file.write_bytes(b"weights")

    def score(embeddings: np.ndarray) -> np.ndarray:
        return embeddings[:, :1].T.astype(np.float32)

    first = score_cached(eset, prompt_ids, score, tmp_path / "cache", [model_file], "probe")
    for cache_file in (tmp_path / "cache").iterdir():
        np.save(cache_file, np.array([Exploit(marker)], dtype=object), allow_pickle=True)
    again = score_cached(eset, prompt_ids, score, tmp_path / "cache", [model_file], "probe")
    assert np.array_equal(first, again)
    assert not marker.exists()


def test_malicious_checkpoint_is_refused_without_running_code(tmp_path):
    import pickle

    import networks
    from cli import InputError

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.ckpt"
    import torch

    torch.save({"fc1.weight": Exploit()}, path, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(InputError, match="not a readable weights-only PyTorch checkpoint"):
        networks.load_checkpoint(path)
    assert not marker.exists()


score_matrix = st.integers(2, 6).flatmap(
    lambda r: st.tuples(
        arrays(np.float64, (4, r), elements=st.integers(-3, 3).map(float)),
        arrays(np.float64, (4, r), elements=st.floats(-5, 5, allow_nan=False, width=32)),
    )
)


@settings(max_examples=60, deadline=None)
@given(score_matrix)
def test_spearman_matches_scipy_property(mats):
    pred, gold = mats
    expected = [spearmanr(p, g).statistic for p, g in zip(pred, gold) if np.ptp(p) > 0 and np.ptp(g) > 0]
    result = metrics.per_prompt_spearman(pred, gold)
    assert result["n_prompts_used"] == len(expected)
    if expected:
        assert result["mean"] == pytest.approx(np.mean(expected), abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(score_matrix)
def test_pairwise_accuracy_bounds_and_symmetry(mats):
    pred, gold = mats
    acc = metrics.same_prompt_pairwise_accuracy(pred, gold)
    flipped = metrics.same_prompt_pairwise_accuracy(-pred, gold)
    if acc["n_pairs"]:
        assert 0.0 <= acc["accuracy"] <= 1.0
        assert acc["accuracy"] + flipped["accuracy"] == pytest.approx(1.0)  # ties count 1/2 both ways
        assert metrics.same_prompt_pairwise_accuracy(gold, gold)["accuracy"] == 1.0


@settings(max_examples=25, deadline=None)
@given(arrays(np.float64, (5, 12), elements=st.floats(-5, 5, allow_nan=False, width=32)), st.integers(0, 100))
def test_oracle_best_of_n_is_monotone_and_dominates(gold, seed):
    curves = metrics.best_of_n(gold, {"model": gold[:, ::-1].copy()}, n_draws=8, seed=seed, ns=(2, 5, 10))["curves"]
    oracle = curves["oracle"]["mean"]
    assert all(b >= a - 1e-12 for a, b in zip(oracle, oracle[1:])) or np.ptp(gold) == 0
    for name in ("model", "random"):
        assert all(o >= m - 1e-12 for o, m in zip(oracle, curves[name]["mean"]))


# Scores on a coarse grid, so ties are frequent; golden rewards anywhere.
grid_scores = arrays(np.float64, st.integers(1, 40), elements=st.integers(-8, 8).map(lambda v: v / 4))


@settings(max_examples=80, deadline=None)
@given(st.data(), st.sampled_from(calibration.ISOTONIC_VARIANTS))
def test_isotonic_json_round_trip_predicts_like_sklearn(data, variant):
    scores = data.draw(grid_scores, label="scores")
    gold = data.draw(arrays(np.float64, scores.shape, elements=st.floats(-1e3, 1e3, allow_nan=False)), label="gold")
    queries = data.draw(
        arrays(np.float64, st.integers(0, 20), elements=st.integers(-12, 12).map(lambda v: v / 4)), label="queries"
    )
    imap, estimator = calibration.fit_isotonic(scores, gold, variant)
    with tempfile.TemporaryDirectory() as tmp:  # the files steps 7 and 8 write and read
        calibration.save_isotonic_map(imap, estimator, Path(tmp) / "map.joblib")
        loaded = calibration.load_isotonic_map(Path(tmp) / "map.joblib")
    assert loaded.variant == variant
    assert loaded.x_thresholds.tobytes() == imap.x_thresholds.tobytes()  # JSON floats round-trip exactly
    assert loaded.y_thresholds.tobytes() == imap.y_thresholds.tobytes()
    midpoints = (loaded.x_thresholds[1:] + loaded.x_thresholds[:-1]) / 2
    queries = np.concatenate([queries, scores, loaded.x_thresholds, midpoints, [-1e300, 1e300]])
    predicted = loaded.predict(queries)
    assert np.array_equal(predicted, estimator.predict(queries))
    if variant == "standard":  # the map is sklearn's own fit of the data
        reference = IsotonicRegression(out_of_bounds="clip").fit(scores, gold)
        assert np.array_equal(predicted, reference.predict(queries))
    ordered = loaded.predict(np.sort(queries))
    assert (np.diff(ordered) >= 0).all()
    assert ordered.min() >= gold.min() - 1e-9 * abs(gold.min()) and ordered.max() <= gold.max() + 1e-9 * abs(gold.max())


def test_an_output_path_is_replaced_only_when_it_is_a_file_or_absent(tmp_path, capsysbinary):
    """The one output rule of the atomic writers: ``-`` is standard output, a symlink is written
    through (the link stays), a directory, FIFO or device is refused in one line."""
    from artifacts import write_text
    from cli import InputError

    write_text(tmp_path / "new.txt", "a\n")  # absent: created
    write_text(tmp_path / "new.txt", "b\n")  # a regular file: replaced
    assert (tmp_path / "new.txt").read_text() == "b\n"

    capsysbinary.readouterr()
    write_text("-", "to stdout\n")
    assert capsysbinary.readouterr().out == b"to stdout\n"
    assert not Path("-").exists()

    real = tmp_path / "real" / "scores.jsonl"
    real.parent.mkdir()
    real.write_text("old\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(real)
    write_text(link, "new\n")
    assert link.is_symlink() and link.resolve() == real and real.read_text() == "new\n"
    assert not list(real.parent.glob(".*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    dangling = tmp_path / "dangling.jsonl"
    dangling.symlink_to(tmp_path / "real" / "later.jsonl")
    write_text(dangling, "x\n")
    assert dangling.is_symlink() and (tmp_path / "real" / "later.jsonl").read_text() == "x\n"

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match=rf"^cannot write {re.escape(str(fifo))}: it is a FIFO, not a file to replace"):
        write_text(fifo, "x\n")
    with pytest.raises(InputError, match=rf"^cannot write {re.escape(str(tmp_path / 'real'))}: it is a directory$"):
        write_text(tmp_path / "real", "x\n")
    with pytest.raises(InputError, match=r"^cannot write /dev/null: it is a device or socket, not a file"):
        write_text("/dev/null", "x\n")
    to_device = tmp_path / "stdout-link"
    to_device.symlink_to("/dev/null")
    with pytest.raises(InputError, match=r"\(a symlink to /dev/null\): it is a device or socket"):
        write_text(to_device, "x\n")
    assert fifo.exists() and to_device.is_symlink() and Path("/dev/null").is_char_device()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["new.txt", "real", "link.jsonl", "dangling.jsonl", "fifo", "stdout-link"]
    )
