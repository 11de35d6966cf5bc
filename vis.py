"""Pictures: what K-center sampling keeps (every frame of a clip, unchosen patches dimmed, hybrid frames framed), and
a plain line plot (eval.py's accuracy against cost of each token budget), drawn with PIL alone."""
from __future__ import annotations

import os
import tempfile

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

HYBRID_COLOUR = (255, 140, 0)  # border of frames kept whole
PICK_COLOUR = (0, 200, 255)  # outline of k-center patches


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


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round values (steps of 1, 2 or 5 x 10^n) covering [lo, hi]."""
    if hi <= lo:
        lo, hi = lo - 1, hi + 1
    raw = (hi - lo) / max(count - 1, 1)
    unit = 10 ** math.floor(math.log10(raw))
    step = next(m * unit for m in (1, 2, 5, 10) if m * unit >= raw)
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(int(math.ceil((hi - first) / step - 1e-9)) + 1)]


def draw_line_plot(xs, ys, labels, x_label: str, y_label: str, title: str = "", size: tuple[int, int] = (640, 440),
                   margin: tuple[int, int, int, int] = (70, 40, 30, 55)) -> np.ndarray:
    """Points (xs[i], ys[i]) joined in order of x, each marked and labelled with labels[i], on axes with round
    ticks -> an (H, W, 3) uint8 image. margin: (left, top, right, bottom) pixels around the plot area."""
    width, height = size
    left, top, right, bottom = margin
    image = Image.new("RGB", size, "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    x_ticks, y_ticks = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def at(x: float, y: float) -> tuple[float, float]:  # data -> pixels, y upwards
        return (left + (x - x0) / (x1 - x0) * (width - left - right),
                height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for x in x_ticks:
        px = at(x, y0)[0]
        draw.line([px, height - bottom, px, height - bottom + 5], fill="black")
        draw.text((px, height - bottom + 8), f"{x:g}", fill="black", font=font, anchor="mt")
    for y in y_ticks:
        py = at(x0, y)[1]
        draw.line([left - 5, py, left, py], fill="black")
        draw.line([left, py, width - right, py], fill=(225, 225, 225))
        draw.text((left - 8, py), f"{y:g}", fill="black", font=font, anchor="rm")
    draw.text(((left + width - right) / 2, height - 18), x_label, fill="black", font=font, anchor="mm")
    draw.text((8, top - 22), y_label, fill="black", font=font, anchor="lm")
    if title:
        draw.text((width / 2, 12), title, fill="black", font=font, anchor="mm")
    points = sorted(zip(xs, ys, labels))
    draw.line([at(x, y) for x, y, _ in points], fill=PICK_COLOUR, width=2)
    for x, y, label in points:
        px, py = at(x, y)
        draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=HYBRID_COLOUR, outline="black")
        draw.text((px + 6, py - 6), str(label), fill="black", font=font, anchor="lb")
    return np.asarray(image)


def save_png(image: np.ndarray, path: str) -> None:
    """Write an image atomically (temp file in the same folder, then rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".png.tmp")
    with os.fdopen(fd, "wb") as f:
        Image.fromarray(image).save(f, format="PNG")
    os.replace(tmp, path)
