"""The figures say what they show: no panel without data, no curve hidden under another, no titles
over each other. Each test draws a figure from small hand-made results and inspects it before saving."""

from __future__ import annotations

import pytest

import plots
from step8_validate_distillation import MONOTONE_NOTE


@pytest.fixture
def drawn(monkeypatch, tmp_path):
    """The figures drawn, kept open (plots.save_figure still writes them)."""
    figures = []

    def keep(fig, path):
        fig.savefig(path, format="png")
        figures.append(fig)

    monkeypatch.setattr(plots, "save_figure", keep)
    yield figures
    for fig in figures:
        plots._pyplot().close(fig)


def curve(mean, stderr=(0.1, 0.1)):
    return {"n": [2, 5], "mean": list(mean), "stderr": list(stderr), "quantile": [0.5, 0.6]}


def best_of_n_result():
    return {
        "curves": {
            "Teacher": curve([1.0, 2.0]),
            "Teacher+Isotonic": curve([1.0, 2.0]),
            "Student": curve([1.1, 2.1]),
            "Student+Isotonic": curve([1.1, 2.05]),  # the map tied the scores of one pick
            "oracle": curve([2.0, 3.0]),
            "random": curve([0.0, 0.0]),
        },
        "n_draws": 50,
    }


def test_coinciding_best_of_n_curves_are_one_line_and_the_figure_says_why(drawn, tmp_path):
    panels = {f"{name} (200 prompts, 2000 responses)": best_of_n_result() for name in ("held-out prompts", "test set")}
    plots.plot_best_of_n(panels, tmp_path / "bon.png", title="Teacher vs student", note=MONOTONE_NOTE)
    (fig,) = drawn
    axes = [ax for ax in fig.axes if ax.get_visible()]
    for ax in axes:
        assert ax.get_legend_handles_labels()[1] == [
            "Teacher = Teacher+Isotonic",
            "Student",
            "Student+Isotonic",
            "oracle",
            "random",
        ]
    assert MONOTONE_NOTE in [text.get_text() for text in fig.texts]
    renderer = fig.canvas.get_renderer()
    left, right = (ax.title.get_window_extent(renderer) for ax in axes)
    assert left.x1 < right.x0, "the panel titles overlap"
    assert fig._suptitle.get_window_extent(renderer).y0 > max(left.y1, right.y1)


def history(validation: bool):
    return [
        {
            "epoch": epoch,
            "train_loss": 1.0 / epoch,
            "val_loss": 1.2 / epoch if validation else None,
            "val_accuracy": 0.6 if validation else None,
        }
        for epoch in (1, 2, 3)
    ]


@pytest.mark.parametrize("validation", [True, False])
def test_training_curves_draw_no_empty_validation_panel(drawn, tmp_path, validation):
    curves = {f"member {i}": history(validation) for i in range(2)}
    plots.plot_training_curves(curves, tmp_path / "curves.png", title="ORM members", kept_epochs={"member 0": 2})
    (fig,) = drawn
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    if validation:
        assert titles == [
            "training loss (mean over mini-batches)",
            "validation loss (* kept epoch)",
            "validation pair accuracy",
        ]
    else:
        assert titles == ["training loss (mean over mini-batches)"]
        assert "no validation data" in fig._suptitle.get_text()
    for ax in fig.axes:
        assert ax.get_legend_handles_labels()[1] == ["member 0", "member 1"]
