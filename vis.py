"""Pictures, drawn with PIL alone: what K-center sampling keeps (every frame of a clip, unchosen patches dimmed,
hybrid frames framed), a confusion matrix (a heat map of each class's predictions), and line plots (eval.py's
accuracy against cost of each token budget; bench/bench_budgets.py's curves of several models, with their spread)."""
from __future__ import annotations

import math
import os
import tempfile

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

HYBRID_COLOUR = (255, 140, 0)  # border of frames kept whole
PICK_COLOUR = (0, 200, 255)  # outline of k-center patches
HEAT_LOW, HEAT_HIGH = (255, 255, 255), (8, 48, 107)  # a cell holding none of its row, and all of it
EMPTY_ROW_COLOUR = (224, 224, 224)  # a class without videos in the split: no share to show


def draw_sampled_patches(clip: torch.Tensor, t_index: torch.Tensor, s_index: torch.Tensor, patch_size: int,
                         mean, std, hybrid_frames=(), per_row: int = 8, border: int = 2) -> np.ndarray:
    """One clip (C, T, H, W), normalised, and its K chosen patches -> an (rows*H', per_row*W', 3) uint8 grid.

    Chosen patches keep their pixels, the others are dimmed to a quarter; k-center patches get a thin outline
    and hybrid frames (kept whole) a thick border.
    """
    C, T, H, W = clip.shape
    pixels = clip.detach().float().cpu() * torch.tensor(std).view(C, 1, 1, 1) + torch.tensor(mean).view(C, 1, 1, 1)
    frames = (pixels.clamp(0, 1) * 255).permute(1, 2, 3, 0).numpy().astype(np.float32)  # (T, H, W, C)
    grid_w = W // patch_size
    chosen = np.zeros((T, H // patch_size, grid_w), bool)
    chosen[t_index.cpu().numpy(), s_index.cpu().numpy() // grid_w, s_index.cpu().numpy() % grid_w] = True
    mask = chosen.repeat(patch_size, 1).repeat(patch_size, 2)[..., None]
    frames = np.where(mask, frames, frames * 0.25).astype(np.uint8)
    hybrid = set(int(t) for t in hybrid_frames)
    for t, r, c in zip(*np.nonzero(chosen)):
        if t not in hybrid:
            y, x = r * patch_size, c * patch_size
            frames[t, y, x:x + patch_size] = frames[t, y + patch_size - 1, x:x + patch_size] = PICK_COLOUR
            frames[t, y:y + patch_size, x] = frames[t, y:y + patch_size, x + patch_size - 1] = PICK_COLOUR
    rows = -(-T // per_row)
    canvas = np.full((rows * (H + 2 * border), per_row * (W + 2 * border), 3), 255, np.uint8)
    for t in range(T):
        y, x = (t // per_row) * (H + 2 * border), (t % per_row) * (W + 2 * border)
        if t in hybrid:
            canvas[y:y + H + 2 * border, x:x + W + 2 * border] = HYBRID_COLOUR
        canvas[y + border:y + border + H, x + border:x + border + W] = frames[t]
    return canvas


def confusion_colours(counts: np.ndarray) -> np.ndarray:
    """(K, K) counts (rows: true class, columns: prediction) -> (K, K, 3) uint8, a pixel a cell: the cell's share
    of its row (on the diagonal, the class's recall) from HEAT_LOW (0) to HEAT_HIGH (1), linear in RGB; the rows of
    classes without videos in EMPTY_ROW_COLOUR."""
    counts = np.asarray(counts, np.float64)
    rows = counts.sum(1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    low, high = np.array(HEAT_LOW, np.float64), np.array(HEAT_HIGH, np.float64)
    colours = np.rint(low + share[..., None] * (high - low)).astype(np.uint8)
    colours[rows[:, 0] == 0] = EMPTY_ROW_COLOUR
    return colours


def draw_confusion_matrix(counts: np.ndarray, class_names=None, max_labels: int = 50, margin: int = 4) -> np.ndarray:
    """A heat map of a (K, K) confusion matrix, rows normalised (`confusion_colours`), classes in label order, with a
    caption saying how to read it -> (H, W, 3) uint8.

    Cells are sized to make the map about 800 pixels wide (at most 32; 2 pixels a class at 400 classes). With at
    most `max_labels` classes and their names, the rows and columns carry the names (cells of at least 12 pixels,
    the text's height), and cells of 24 pixels or more their counts; with more classes the map stands alone."""
    counts = np.asarray(counts)
    K = len(counts)
    labelled = class_names is not None and K <= max_labels
    assert not labelled or len(class_names) == K, f"{len(class_names)} class names for a matrix of {K} classes"
    cell = min(32, max(12 if labelled else 1, 800 // K))
    font = ImageFont.load_default()
    names = [str(name) for name in class_names] if labelled else []
    name_w = max((_text_size(font, name)[0] for name in names), default=0)
    left = top = margin + (name_w + 4 if labelled else 0)
    caption = ["rows: true class, columns: top-1 prediction",
               "colour: share of the row, white 0 to dark blue 1" + (", grey: no videos" if (counts.sum(1) == 0).any()
                                                                   else "")]
    line_h = max(_text_size(font, line)[1] for line in caption) + 3
    side = K * cell
    width = max(left + side, margin + max(_text_size(font, line)[0] for line in caption)) + margin
    image = Image.new("RGB", (width, top + side + 6 + len(caption) * line_h + margin), "white")
    image.paste(Image.fromarray(confusion_colours(counts).repeat(cell, 0).repeat(cell, 1)), (left, top))
    draw = ImageDraw.Draw(image)
    for i, name in enumerate(names):
        _put_text(draw, (left - 4, top + i * cell + cell / 2), name, font, (1, 0.5))
        w, h = _text_size(font, name)  # the column's name, turned to read upwards, its end just above the map
        if not w or not h:  # nothing inked (a name of spaces)
            continue
        strip = Image.new("L", (w, h))
        _put_text(ImageDraw.Draw(strip), (0, 0), name, font, (0, 0), fill=255)
        strip = strip.rotate(90, expand=True)
        image.paste((0, 0, 0), (left + i * cell + (cell - h) // 2, top - 4 - w), mask=strip)
    if labelled and cell >= 24:
        rows = np.maximum(counts.sum(1), 1)
        for (r, c), n in np.ndenumerate(counts):
            _put_text(draw, (left + c * cell + cell / 2, top + r * cell + cell / 2), str(int(n)), font, (0.5, 0.5),
                      fill=(255, 255, 255) if n / rows[r] > 0.5 else (0, 0, 0))
    for j, line in enumerate(caption):
        _put_text(draw, (margin, top + side + 6 + j * line_h), line, font, (0, 0))
    return np.asarray(image)


def _text_size(font, text: str) -> tuple[int, int]:
    l, t, r, b = font.getbbox(text)
    return r - l, b - t


def _put_text(draw, xy, text: str, font, align, fill=(0, 0, 0)) -> None:
    """`text` with the point `align` of its inked box ((0, 0) top left, (1, 0.5) middle of the right side, as
    fractions of its width and height) at `xy`; without anchors, which bitmap fonts lack."""
    l, t, r, b = font.getbbox(text)
    draw.text((round(xy[0] - l - align[0] * (r - l)), round(xy[1] - t - align[1] * (b - t))), text, fill=fill,
              font=font)


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round values (steps of 1, 2 or 5 x 10^n) covering [lo, hi]."""
    if hi <= lo:
        lo, hi = lo - 1, hi + 1
    raw = (hi - lo) / max(count - 1, 1)
    unit = 10 ** math.floor(math.log10(raw))
    step = next(m * unit for m in (1, 2, 5, 10) if m * unit >= raw)
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(int(math.ceil((hi - first) / step - 1e-9)) + 1)]


SERIES_COLOURS = [(0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167), (86, 180, 233), (230, 159, 0)]


def draw_line_plot(xs, ys, labels, x_label: str, y_label: str, title: str = "", size: tuple[int, int] = (640, 440),
                   margin: tuple[int, int, int, int] = (70, 40, 30, 55)) -> np.ndarray:
    """Points (xs[i], ys[i]) joined in order of x, each marked and labelled with labels[i], on axes with round
    ticks -> an (H, W, 3) uint8 image. margin: (left, top, right, bottom) pixels around the plot area."""
    return draw_series_plot([{"xs": xs, "ys": ys, "labels": labels}], x_label, y_label, title, size, margin)


def draw_series_plot(series: list[dict], x_label: str, y_label: str, title: str = "",
                     size: tuple[int, int] = (640, 440),
                     margin: tuple[int, int, int, int] = (70, 40, 30, 55)) -> np.ndarray:
    """Several lines on one pair of axes -> an (H, W, 3) uint8 image. Each series is a dict of `xs`, `ys` (its
    points, joined in order of x), and optionally `name` (a legend entry), `labels` (one beside each point), `lows`
    and `highs` (a vertical bar at each point, e.g. the min and max over seeds). A series' colour is its place in
    the list. margin: (left, top, right, bottom) pixels around the plot area."""
    width, height = size
    left, top, right, bottom = margin
    image = Image.new("RGB", size, "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    all_x = [x for one in series for x in one["xs"]]
    all_y = [y for one in series for key in ("ys", "lows", "highs") for y in one.get(key, ())]
    x_ticks, y_ticks = nice_ticks(min(all_x), max(all_x)), nice_ticks(min(all_y), max(all_y))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def at(x: float, y: float) -> tuple[float, float]:  # data -> pixels, y upwards
        return (left + (x - x0) / (x1 - x0) * (width - left - right),
                height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for x in x_ticks:
        px = at(x, y0)[0]
        draw.line([px, height - bottom, px, height - bottom + 5], fill="black")
        _put_text(draw, (px, height - bottom + 8), f"{x:g}", font, (0.5, 0))
    for y in y_ticks:
        py = at(x0, y)[1]
        draw.line([left - 5, py, left, py], fill="black")
        draw.line([left, py, width - right, py], fill=(225, 225, 225))
        _put_text(draw, (left - 8, py), f"{y:g}", font, (1, 0.5))
    _put_text(draw, ((left + width - right) / 2, height - 18), x_label, font, (0.5, 0.5))
    _put_text(draw, (8, top - 22), y_label, font, (0, 0.5))
    if title:
        _put_text(draw, (width / 2, 12), title, font, (0.5, 0.5))
    legend_x = width - right - 36 - max(_text_size(font, one.get("name") or "")[0] for one in series)  # by the widest
    for number, one in enumerate(series):
        colour = SERIES_COLOURS[number % len(SERIES_COLOURS)] if len(series) > 1 else PICK_COLOUR
        count = len(one["xs"])
        labels, lows, highs = (one.get(key) or [None] * count for key in ("labels", "lows", "highs"))
        points = sorted(zip(one["xs"], one["ys"], range(count)))
        draw.line([at(x, y) for x, y, _ in points], fill=colour, width=2)
        for x, y, i in points:
            px, py = at(x, y)
            if lows[i] is not None and highs[i] is not None:  # the bar, with caps
                (_, p_low), (_, p_high) = at(x, lows[i]), at(x, highs[i])
                draw.line([px, p_low, px, p_high], fill=colour, width=1)
                for cap in (p_low, p_high):
                    draw.line([px - 4, cap, px + 4, cap], fill=colour, width=1)
            marker = colour if len(series) > 1 else HYBRID_COLOUR
            draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=marker, outline="black")
            if labels[i] is not None:
                _put_text(draw, (px + 6, py - 6), str(labels[i]), font, (0, 1))
        if one.get("name"):  # the legend, top right inside the plot, a row a series
            row = top + 10 + 16 * number
            draw.line([legend_x, row, legend_x + 20, row], fill=colour, width=3)
            _put_text(draw, (legend_x + 26, row), one["name"], font, (0, 0.5))
    return np.asarray(image)


def save_png(image: np.ndarray, path: str) -> None:
    """Write an image atomically (temp file in the same folder, then rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".png.tmp")
    with os.fdopen(fd, "wb") as f:
        Image.fromarray(image).save(f, format="PNG")
    os.replace(tmp, path)
