"""Paper-ready figures shared by steps 6-8 (matplotlib, Agg backend; callers write them atomically).

matplotlib is imported when a figure is drawn, not with this module (~0.5-0.9 s of a step's start-up).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

REFERENCE_STYLE = {"oracle": dict(color="black", linestyle="--"), "random": dict(color="grey", linestyle=":")}
POINTS = dict(marker="o", markersize=3)  # every curve's points; error bars get caps


def _pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> None:
    """Write ``fig`` as PNG to ``path``: a temporary path of the caller's ``artifacts.atomic_paths``, which
    writes a step's plots and JSON results together, so that a failure leaves neither."""
    try:
        fig.savefig(path, format="png", dpi=150, bbox_inches="tight")
    finally:
        _pyplot().close(fig)


def coinciding_curves(curves: Mapping[str, dict]) -> dict[str, dict]:
    """Curves with equal values (N, mean and standard error) drawn once: label "A = B" -> curve."""
    merged: dict[tuple, list[str]] = {}
    for name, curve in curves.items():
        key = (tuple(curve["n"]), tuple(curve["mean"]), tuple(curve["stderr"]))
        merged.setdefault(key, []).append(name)
    return {" = ".join(names): curves[names[0]] for names in merged.values()}


def plot_best_of_n(panels: Mapping[str, dict], path: str | Path, title: str, note: str | None = None) -> None:
    """One panel per evaluation set: mean golden reward of the pick vs N, +-1 standard error.

    panels: panel title -> ``metrics.best_of_n`` result (its curves include oracle and random).
    Curves that coincide exactly are one line with one legend entry ("A = B"), so none is hidden
    under another; ``note`` (why curves coincide) is printed below the panels.
    """
    from matplotlib import ticker

    fig, axes = _pyplot().subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
    for ax, (panel_title, result) in zip(axes[0], panels.items()):
        for label, curve in coinciding_curves(result["curves"]).items():
            if not curve["n"]:
                continue
            style = REFERENCE_STYLE.get(label, {})
            stderr = [math.nan if value is None else value for value in curve["stderr"]]  # None: one prompt
            ax.errorbar(curve["n"], curve["mean"], yerr=stderr, label=label, capsize=2, **POINTS, **style)
        ax.set_xscale("log")
        ax.set_xticks(result["curves"]["oracle"]["n"])
        ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.set_xlabel("N (responses sampled per prompt)")
        ax.set_ylabel("golden reward of best-of-N pick")
        ax.set_title(f"{panel_title}\n{result['n_draws']} draws per N", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, y=1.04)  # above the two-line panel titles
    if note:
        fig.text(0.5, -0.02, note, ha="center", va="top", fontsize=8)
    save_figure(fig, path)


def plot_calibration(panels: Mapping[str, Mapping[str, dict]], path: str | Path, title: str) -> None:
    """Reliability diagram, one panel per evaluation set: mean golden reward vs mean prediction per bin.

    panels: panel title -> {variant name -> ``metrics.binned_calibration`` result}; the dashed
    diagonal is perfect calibration, error bars are +-1 standard error of the bin's golden mean.
    """
    fig, axes = _pyplot().subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
    for ax, (panel_title, curves) in zip(axes[0], panels.items()):
        values = [v for curve in curves.values() for v in (*curve["pred_mean"], *curve["gold_mean"])]
        low, high = min(values), max(values)
        ax.plot([low, high], [low, high], color="black", linestyle="--", linewidth=1, label="perfect calibration")
        for name, curve in curves.items():
            ax.errorbar(
                curve["pred_mean"], curve["gold_mean"], yerr=curve["gold_stderr"], label=name, capsize=2, **POINTS
            )
        n_bins = max(len(curve["count"]) for curve in curves.values())
        ax.set_xlabel("predicted reward (bin mean)")
        ax.set_ylabel("golden reward (bin mean)")
        ax.set_title(f"{panel_title}\n{n_bins} equal-count bins", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, y=1.04)  # above the two-line panel titles
    save_figure(fig, path)


def plot_sweep(
    x_name: str, panels: Mapping[str, Mapping[str, dict]], path: str | Path, title: str, log_x: bool = False
) -> None:
    """Metrics against one swept setting, one panel per metric, one line per curve, +-1 SE bars.

    panels: metric label -> {curve label -> {"x": [...], "mean": [...], "se": [...]}} (None for a
    missing value; a point without a standard error gets no bar).
    """
    from matplotlib import ticker

    # Metrics no run has (steps a sweep left out with LAST_STEP) get no panel, unless none has any.
    panels = {
        metric: curves
        for metric, curves in panels.items()
        if any(m is not None for curve in curves.values() for m in curve["mean"])
    } or panels
    n_cols = min(4, len(panels))
    n_rows = -(-len(panels) // n_cols)
    fig, axes = _pyplot().subplots(n_rows, n_cols, figsize=(4.2 * n_cols, 3.4 * n_rows), squeeze=False)
    for ax, (metric, curves) in zip(axes.ravel(), panels.items()):
        for label, curve in curves.items():
            points = [(x, m, s) for x, m, s in zip(curve["x"], curve["mean"], curve["se"]) if m is not None]
            if not points:
                continue
            xs, means, ses = zip(*points)
            ax.errorbar(xs, means, yerr=[0.0 if s is None else s for s in ses], label=label, capsize=2, **POINTS)
        if log_x:
            ax.set_xscale("log")
            ax.set_xticks(sorted({x for curve in curves.values() for x in curve["x"]}))
            ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
            ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.set_xlabel(x_name)
        ax.set_title(metric, fontsize=9)
        ax.grid(alpha=0.3)
        if not ax.get_legend_handles_labels()[0]:
            ax.text(0.5, 0.5, "n/a", transform=ax.transAxes, ha="center", va="center")
    for ax in axes.ravel()[len(panels) :]:
        ax.set_visible(False)
    handles = {}  # label -> first handle: one legend for the figure, below the panels
    for ax in axes.ravel()[: len(panels)]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, min(0.3, 0.03 * len(handles) / n_rows), 1, 1))
    if handles:
        fig.legend(
            list(handles.values()),
            list(handles),
            loc="lower center",
            fontsize=8,
            ncol=min(2, len(handles)),
            frameon=False,
        )
    save_figure(fig, path)


def plot_training_curves(
    curves: Mapping[str, list[dict]], path: str | Path, title: str, kept_epochs: Mapping[str, int] | None = None
) -> None:
    """Training and validation loss (and ORMs' validation pair accuracy) per epoch, one line per model,
    the epoch whose weights were kept marked (``kept_epochs``; default: the lowest validation loss).

    curves: model name -> per-epoch records ``{"epoch", "train_loss", "val_loss"[, "val_accuracy"]}``
    (networks.FitResult); a ``val_loss`` of None (no validation data) is not drawn, and with no
    validation data at all the figure has no validation panels (its title says so).
    """
    records = [record for history in curves.values() for record in history]
    panels = ["training loss (mean over mini-batches)"]
    if any(record.get("val_loss") is not None for record in records):
        panels.append("validation loss (* kept epoch)")
    else:  # no validation slice (e.g. fewer validation pairs than --min_val_pairs): no empty panel
        title += "\nno validation data: no early stopping, every epoch trained"
    if any(record.get("val_accuracy") is not None for record in records):
        panels.append("validation pair accuracy")
    fig, axes = _pyplot().subplots(1, len(panels), figsize=(5.2 * len(panels), 4), squeeze=False)
    for name, history in curves.items():
        if not history:
            continue
        epochs = [record["epoch"] for record in history]
        (line,) = axes[0, 0].plot(epochs, [record["train_loss"] for record in history], label=name, **POINTS)
        points = [(record["epoch"], record["val_loss"]) for record in history if record.get("val_loss") is not None]
        if not points:
            continue
        axes[0, 1].plot(*zip(*points), color=line.get_color(), label=name, **POINTS)
        kept = (kept_epochs or {}).get(name)
        best = next((p for p in points if p[0] == kept), None) or min(points, key=lambda p: p[1])
        axes[0, 1].plot(*best, marker="*", markersize=10, color=line.get_color())
        accuracy = [(r["epoch"], r["val_accuracy"]) for r in history if r.get("val_accuracy") is not None]
        if accuracy:
            axes[0, 2].plot(*zip(*accuracy), color=line.get_color(), label=name, **POINTS)
    for ax, what in zip(axes[0], panels):
        ax.set_xlabel("epoch")
        ax.set_title(what)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center")
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
