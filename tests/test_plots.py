"""The charts: curves.png, the demo experiment's figure and the smoothing they draw."""

import json
import math
import os

import pandas
import pytest
from PIL import Image

import does_it_work
import plots
import training
from conftest import ROOT

PANEL = (480, 320)  # a curves.png panel


def record(step: int, reward: float, kl: float | None = 0.01, **extra) -> dict:
    return {"step": step, "reward_mean": reward, "kl": kl, "grad_norm": 1.0, **extra}


def png(path) -> Image.Image:
    image = Image.open(path)
    assert image.format == "PNG"
    image.load()  # the whole file decodes, not just its header
    return image


def test_moving_average_is_pandas_debiased_ewm():
    values = [3.0, 5.0, 4.0, 8.0, 6.5, 7.0, 9.0]
    for weight in (0.0, 0.6, 0.9):
        expected = pandas.Series(values).ewm(alpha=1 - weight, adjust=True).mean().tolist()
        assert plots.moving_average(values, weight) == pytest.approx(expected, rel=1e-12)


def test_curves_draw_raw_reward_faint_under_its_stated_moving_average_and_val_metrics_as_markers(tmp_path):
    records = [record(step, 3 + step / 20 + (-1) ** step, val=None) for step in range(1, 101)]
    for r in records:
        del r["val"]
        if r["step"] % 25 == 0:
            r["val/gold_fidelity"] = 1 - r["step"] / 200
    fig = training.curves_figure(records)
    reward, kl, grad_norm, fidelity = fig.axes[:4]
    raw, smooth = reward.get_lines()
    assert raw.get_alpha() < 0.5 and smooth.get_alpha() in (None, 1.0)
    def largest_jump(values):  # past the first points, which the debiased average follows closely
        return max(abs(later - earlier) for earlier, later in zip(values[10:], values[11:]))

    assert largest_jump(raw.get_ydata()) > 1.5 and largest_jump(smooth.get_ydata()) < 0.5  # zigzag, trend
    legend = [t.get_text() for t in reward.get_legend().get_texts()]
    assert legend[1] == "exponential moving average, weight 0.90"  # the smoothing, said on the chart
    assert len(kl.get_lines()) == len(grad_norm.get_lines()) == 2  # KL and gradient norm alike
    (markers,) = fidelity.get_lines()
    assert markers.get_marker() == "o" and list(markers.get_xdata()) == [25, 50, 75, 100]
    path = tmp_path / "curves.png"
    training.write_curves(records, str(path))
    assert png(path).size == (3 * PANEL[0], 2 * PANEL[1])


def test_one_logged_step_and_nan_in_a_series_still_draw(tmp_path):
    one = tmp_path / "one.png"
    training.write_curves([record(1, 3.0, kl=None)], str(one))  # kl None: --kl-coeff 0 logs no KL
    assert png(one).size == (3 * PANEL[0], PANEL[1])
    records = [record(1, 3.0), record(2, math.nan, kl=math.inf), record(3, 3.5), record(4, 4.0)]
    fig = training.curves_figure(records)
    raw, smooth = fig.axes[0].get_lines()
    assert list(raw.get_xdata()) == [1, 3, 4] and all(math.isfinite(y) for y in smooth.get_ydata())
    path = tmp_path / "nan.png"
    training.write_curves(records, str(path))
    image = png(path)
    assert image.size == (3 * PANEL[0], PANEL[1]) and len(image.getcolors(1 << 16)) > 2


def test_does_it_work_figure_labels_every_point_without_overlaps(tmp_path):
    with open(os.path.join(ROOT, "docs", "does_it_work", "results.json")) as f:
        rows = json.load(f)["rows"]
    fig = does_it_work.figure(rows)
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        labels = [text for text in ax.texts if text.get_text()]
        assert len(labels) == 21  # 6 KL coefficients, 7 weighings of each of two checkpoints, the base
        boxes = [text.get_window_extent(renderer) for text in labels]
        overlapping = [(labels[i].get_text(), labels[j].get_text()) for i in range(len(boxes))
                       for j in range(i + 1, len(boxes)) if boxes[i].overlaps(boxes[j])]
        assert not overlapping
        assert all(ax.bbox.contains(box.x0, box.y0) and ax.bbox.contains(box.x1, box.y1) for box in boxes)
    path = tmp_path / "does_it_work.png"
    plots.save_png(fig, str(path))
    assert png(path).size == (2 * 760, 560)
