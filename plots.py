"""Charts, drawn by matplotlib on its Agg canvas (no display, no pyplot state): anneal.py's reward-diversity
trade-off, train.py's training curves and the demo experiment's figure. What is ours is which series a
chart holds and how they are shown: a series is points, each with optional 95% intervals on either axis,
drawn as markers, joined by a line, or as a faint raw curve under its exponential moving average."""

import math
from dataclasses import dataclass, field

from adjustText import adjust_text
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

import utils

# matplotlib's own tab10 cycle in 8-bit RGB, so that a test can find a series' colour in the PNG
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
DPI = 100  # a panel of (W, H) pixels is a figure of W / DPI x H / DPI inches


@dataclass
class Point:
    x: float
    y: float
    label: str = ""
    x_interval: tuple[float, float] | None = None
    y_interval: tuple[float, float] | None = None


@dataclass
class Series:
    name: str
    points: list[Point] = field(default_factory=list)
    joined: bool = False  # a line through the points in order (a curve), else markers alone
    labelled: bool = True  # write each point's label beside it
    smoothing: float | None = None  # a faint raw curve under its exponential moving average of this weight


@dataclass
class Panel:
    series: list[Series]
    x_label: str
    y_label: str
    title: str = ""
    legend: bool = True


def smoothing_weight(count: int, span: int = 10) -> float:
    """An average over about a tenth of the run (at least 1 point): visible trend, steps still resolved."""
    return 1 - 1 / max(1, count // span)


def moving_average(values: list[float], weight: float) -> list[float]:
    """Exponential moving average, debiased as TensorBoard's and wandb's smoothing (the first values are
    not pulled towards 0)."""
    average, out = 0.0, []
    for n, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** n))
    return out


def _finite(point: Point) -> bool:
    return math.isfinite(point.x) and math.isfinite(point.y)


def _draw_series(ax, series: Series, colour) -> list:
    """The series on `ax`; returns its label texts, which adjust_text moves apart."""
    shown = [p for p in series.points if _finite(p)]
    xs, ys = [p.x for p in shown], [p.y for p in shown]
    if series.smoothing is not None and len(shown) > 1:
        ax.plot(xs, ys, color=colour, alpha=0.25, linewidth=1, label=f"{series.name or 'raw'} (raw)")
        ax.plot(xs, moving_average(ys, series.smoothing), color=colour, linewidth=2,
                label=f"exponential moving average, weight {series.smoothing:.2f}")
        return []
    marker_size = 3 if series.joined and len(shown) > 30 else 6
    ax.plot(xs, ys, color=colour, marker="o", markersize=marker_size, linestyle="-" if series.joined else "none",
            linewidth=1.5, label=series.name or None)
    for p in shown:
        if p.x_interval or p.y_interval:
            x_error = [[p.x - p.x_interval[0]], [p.x_interval[1] - p.x]] if p.x_interval else None
            y_error = [[p.y - p.y_interval[0]], [p.y_interval[1] - p.y]] if p.y_interval else None
            ax.errorbar([p.x], [p.y], xerr=x_error, yerr=y_error, color=colour, linewidth=0.8, alpha=0.5,
                        fmt="none")
    # above every line, on a light ground, so that no curve or interval crosses a label's letters
    return [ax.text(p.x, p.y, p.label, color=colour, fontsize=9, zorder=5,
                    bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=0.5))
            for p in shown if series.labelled and p.label]


def _draw_panel(ax, panel: Panel) -> list:
    """The panel on `ax`; returns its point labels, to be moved apart once the layout is final."""
    ax.set_xlabel(panel.x_label)
    ax.set_ylabel(panel.y_label)
    if panel.title:
        ax.set_title(panel.title, fontsize=11)
    if not any(_finite(p) for s in panel.series for p in s.points):
        ax.text(0.5, 0.5, "nothing logged", transform=ax.transAxes, ha="center", va="center")
        return []
    texts = []
    for index, series in enumerate(panel.series):
        texts += _draw_series(ax, series, [c / 255 for c in COLOURS[index % len(COLOURS)]])
    ax.grid(alpha=0.3)
    if panel.legend and ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=8)
    return texts


def _separate_labels(ax, panel: Panel, texts: list) -> None:
    """Labels moved off each other, off the points and off the legend (adjustText), joined to their points."""
    points = [p for s in panel.series for p in s.points if _finite(p)]
    legend = [ax.get_legend()] if ax.get_legend() else []
    adjust_text(texts, x=[p.x for p in points], y=[p.y for p in points], objects=legend or None, ax=ax,
                expand=(1.2, 1.4), arrowprops=dict(arrowstyle="-", color="grey", linewidth=0.5))


def figure(panels: list[Panel], columns: int | None = None, panel_size: tuple[int, int] = (720, 520)) -> Figure:
    """Panels in a grid `columns` wide (default: one row), each `panel_size` pixels."""
    columns = columns or len(panels)
    rows = math.ceil(len(panels) / columns)
    width, height = panel_size
    fig = Figure(figsize=(width * columns / DPI, height * rows / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, columns, index + 1) for index in range(rows * columns)]
    labels = [_draw_panel(ax, panel) for ax, panel in zip(axes, panels)]
    for ax in axes[len(panels):]:  # an empty cell of the grid stays blank
        ax.set_axis_off()
    fig.canvas.draw()  # the layout, final before labels are placed in display space
    fig.set_layout_engine("none")  # and kept so: saving must not move the axes under the placed labels
    for ax, panel, texts in zip(axes, panels, labels):
        if texts:
            _separate_labels(ax, panel, texts)
    fig.canvas.draw()
    return fig


def save_png(fig: Figure, path: str) -> None:
    """An RGB PNG (a chart has no use for matplotlib's alpha channel) at exactly the figure's pixel size,
    written in place atomically."""
    fig.canvas.draw()
    image = Image.frombuffer("RGBA", fig.canvas.get_width_height(), fig.canvas.buffer_rgba()).convert("RGB")
    utils.write_atomic_file(path, lambda tmp: image.save(tmp, format="PNG"))
