"""Charts drawn with Pillow (no plotting dependency): anneal.py's reward-diversity trade-off, train.py's
training curves, and the demo experiment's figure. A chart is a set of series of points, each point
with optional 95% intervals on either axis, drawn as dots, joined by lines where the series asks."""

import math
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


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
    joined: bool = False  # a line through the points in order (a curve), else dots alone
    labelled: bool = True  # write each point's label beside it


def _ticks(values: list[float], count: int = 6) -> list[float]:
    """Round tick values (1, 2, 2.5 or 5 times a power of ten apart) from at or below the lowest value to at or
    above the highest; the axis spans them."""
    low, high = min(values), max(values)
    if high == low:
        low, high = low - (abs(low) * 0.1 or 1.0), high + (abs(high) * 0.1 or 1.0)
    raw = (high - low) / count  # at most count + 1 ticks
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw * (1 - 1e-9))
    first, last = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
    return [round(i * step, 12) for i in range(first, last + 1)]  # 0.3, not 0.30000000000000004


def _finite(point: Point) -> bool:
    return math.isfinite(point.x) and math.isfinite(point.y)


def chart(series: list[Series], x_label: str, y_label: str, title: str = "", size: tuple[int, int] = (720, 520),
          legend: bool = True) -> Image.Image:
    """One chart; points that are not finite (a metric not logged at a step) are left out."""
    width, height = size
    left, right, top, bottom = 80, 40, 46 if title else 30, 56
    font = ImageFont.load_default(size=13)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    points = [p for s in series for p in s.points if _finite(p)]
    if not points:
        draw.text((width / 2, height / 2), f"{title or y_label}: nothing logged", fill="black", font=font, anchor="mm")
        return image
    x_ticks = _ticks([v for p in points for v in (p.x, *(p.x_interval or ()))])
    y_ticks = _ticks([v for p in points for v in (p.y, *(p.y_interval or ()))])
    (x_low, x_high), (y_low, y_high) = (x_ticks[0], x_ticks[-1]), (y_ticks[0], y_ticks[-1])

    def to_x(v: float) -> float:
        return left + (v - x_low) / (x_high - x_low) * (width - left - right)

    def to_y(v: float) -> float:
        return height - bottom - (v - y_low) / (y_high - y_low) * (height - top - bottom)

    draw.line([(left, top), (left, height - bottom), (width - right, height - bottom)], fill="black", width=1)
    for x_value in x_ticks:
        draw.line([(to_x(x_value), height - bottom), (to_x(x_value), height - bottom + 4)], fill="black")
        draw.text((to_x(x_value), height - bottom + 7), f"{x_value:.4g}", fill="black", font=font, anchor="mt")
    for y_value in y_ticks:
        draw.line([(left - 4, to_y(y_value)), (left, to_y(y_value))], fill="black")
        draw.text((left - 7, to_y(y_value)), f"{y_value:.4g}", fill="black", font=font, anchor="rm")
    draw.text(((left + width - right) / 2, height - 6), x_label, fill="black", font=font, anchor="mb")
    draw.text((left, top - 8), y_label, fill="black", font=font, anchor="lb")
    if title:
        draw.text((width / 2, 6), title, fill="black", font=ImageFont.load_default(size=15), anchor="mt")
    for index, one in enumerate(series):
        colour = COLOURS[index % len(COLOURS)]
        shown = [p for p in one.points if _finite(p)]
        if one.joined and len(shown) > 1:
            draw.line([(to_x(p.x), to_y(p.y)) for p in shown], fill=colour, width=2)
        for p in shown:
            x, y = to_x(p.x), to_y(p.y)
            if p.x_interval:
                draw.line([(to_x(p.x_interval[0]), y), (to_x(p.x_interval[1]), y)], fill=colour, width=1)
            if p.y_interval:
                draw.line([(x, to_y(p.y_interval[0])), (x, to_y(p.y_interval[1]))], fill=colour, width=1)
            radius = 2 if one.joined and len(shown) > 30 else 4
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
            if one.labelled and p.label:
                draw.text((x + 6, y - 6), p.label, fill=colour, font=font, anchor="lb")
    if legend and any(s.name for s in series):
        y = top + 4
        for index, one in enumerate(series):
            if one.name:
                colour = COLOURS[index % len(COLOURS)]
                draw.rectangle([width - right - 150, y + 3, width - right - 140, y + 13], fill=colour)
                draw.text((width - right - 134, y), one.name, fill="black", font=font)
                y += 18
    return image


def side_by_side(charts: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Charts of one size in a grid, `columns` wide (default: all in one row)."""
    columns = columns or len(charts)
    rows = math.ceil(len(charts) / columns)
    width, height = charts[0].size
    sheet = Image.new("RGB", (width * columns, height * rows), "white")
    for index, one in enumerate(charts):
        sheet.paste(one, ((index % columns) * width, (index // columns) * height))
    return sheet
