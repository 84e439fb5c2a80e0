"""The gate report's pictures show what the numbers say: checked on matplotlib's own figure
objects (the data each line holds, the axes' limits, the colour scale, the legend), not pixels.

The numbers are small on purpose: gates near 0.5 that move by 2% and an α of 10 that moves by
2%, the case where a cut axis made a tiny change look steep."""
from pathlib import Path

import pytest

import report

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

HEADS = {"q": [[0.50, 0.51, 0.49], [0.52, 0.50, 0.51]],  # (layers, heads): within 2% of 0.5
         "v": [[0.90, 0.10, 0.60], [0.40, 0.70, 0.20]]}  # a wider range than q's
ALPHAS = [10.0, 10.2]
ZERO_FRACTIONS = [0.49, 0.50]
RUN = [(Path("out/run"), [{"step": 1, "loss": 2.0, "lr": 3e-4}])]  # a log without gates


def statistics(alpha=True):
    heads = {role: [{"layer": i, "mean": means, "std": [0.0] * len(means)}
                    for i, means in enumerate(rows)] for role, rows in HEADS.items()}
    ffn = [{"layer": i, "zero_fraction": z, "mean_magnitude": 0.1} | ({"alpha": a} if alpha else {})
           for i, (z, a) in enumerate(zip(ZERO_FRACTIONS, ALPHAS))]
    return {"all": {"heads": heads, "ffn": {"down": ffn}}}


def log(steps):
    """A training log of `steps` logged steps, the gates moving by 2% over them."""
    return [{"step": 10 * (n + 1), "loss": 2.0 - 0.1 * n, "lr": 3e-4 * (n + 1) / steps,
             "gates": {"q_gate": 0.50 + 0.01 * n, "v_gate": 0.51, "down_zero_fraction": 0.49,
                       "down_alpha": 10.0 + 0.2 * n}} for n in range(steps)]


@pytest.fixture
def drawn():
    made = []

    def draw(*args):
        figures = report.figures(*args)
        made.extend(figures.values())
        return figures
    yield draw
    for figure in made:
        plt.close(figure)


def legend_labels(figure):
    """The labels of the figure's one legend (below the plot, for both y axes' lines)."""
    assert len(figure.legends) == 1 and all(a.get_legend() is None for a in figure.axes)
    return [text.get_text() for text in figure.legends[0].get_texts()]


def curves(figure):
    """{label: (x, y)} of every line on every axes of the figure, twins included."""
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
            for axes in figure.axes for line in axes.get_lines()}


def test_both_head_maps_share_one_0_to_1_colour_scale(drawn):
    figures = drawn(statistics(), [], RUN)
    for role, rows in HEADS.items():
        image = figures[f"heads-{role}"].axes[0].get_images()[0]
        assert (image.norm.vmin, image.norm.vmax) == (0, 1), role  # not each map's own range
        assert image.get_array().tolist() == rows  # (layers, heads), as gates.json has them
    # the same gate value is the same colour on both maps
    q, v = (figures[f"heads-{role}"].axes[0].get_images()[0] for role in ("q", "v"))
    assert q.to_rgba(0.5) == v.to_rgba(0.5) and q.to_rgba(0.3) == v.to_rgba(0.3)


def test_the_ffn_picture_has_its_alpha_in_the_legend_on_an_axis_from_0(drawn):
    figure = drawn(statistics(), [], RUN)["ffn-down"]
    axes, twin = figure.axes
    assert axes.get_ylim() == (0, 1)
    assert twin.get_ylim()[0] == 0 and twin.get_ylim()[1] >= max(ALPHAS)
    assert legend_labels(figure) == ["fraction of gates exactly 0", "α"]
    assert curves(figure) == {"fraction of gates exactly 0": ([0, 1], ZERO_FRACTIONS),
                              "α": ([0, 1], ALPHAS)}
    # a 2% change in α spans at most 3% of its axis, not all of it
    low, high = twin.get_ylim()
    assert (ALPHAS[1] - ALPHAS[0]) / (high - low) < 0.03
    # a variant without α (InterLoRA*) has the zero fraction alone
    figure = drawn(statistics(alpha=False), [], RUN)["ffn-down"]
    assert len(figure.axes) == 1 and legend_labels(figure) == ["fraction of gates exactly 0"]


@pytest.mark.parametrize("steps", [1, 3])
def test_gates_over_steps_shows_every_logged_step_alpha_included(drawn, steps):
    records = log(steps)
    figures = drawn(statistics(), records, [(Path("out/tiny-math-interlora"), records)])
    figure = figures["gates-over-steps"]
    axes, twin = figure.axes
    assert axes.get_ylim() == (0, 1) and twin.get_ylim()[0] == 0
    assert legend_labels(figure) == ["q_gate", "v_gate", "down_zero_fraction", "down_alpha"]
    step_numbers = [r["step"] for r in records]
    assert curves(figure) == {key: (step_numbers, [r["gates"][key] for r in records])
                              for key in records[0]["gates"]}
    for line in [*axes.get_lines(), *twin.get_lines()]:
        assert line.get_marker() not in (None, "None", "", " ")  # one step is a dot, not blank
    assert [line.get_label() for line in twin.get_lines()] == ["down_alpha"]  # α on its own axis
    loss = figures["loss"]
    loss_axes, lr_axes = loss.axes
    assert curves(loss) == {"tiny-math-interlora": (step_numbers, [r["lr"] for r in records])}
    assert [line.get_ydata().tolist() for line in loss_axes.get_lines()] == [
        [r["loss"] for r in records]]
    assert all(line.get_marker() == "o" for axes in loss.axes for line in axes.get_lines())
    assert lr_axes.get_ylim()[0] == 0


def test_the_pictures_are_written_as_png_and_svg(tmp_path):
    records = log(1)
    written = report.draw(tmp_path, statistics(), records, [(tmp_path, records)])
    names = ["heads-q", "heads-v", "ffn-down", "gates-over-steps", "loss"]
    assert written == [f"{name}.{suffix}" for name in names for suffix in ("png", "svg")]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(written)  # no temp files left
    assert not plt.get_fignums()  # every figure closed
