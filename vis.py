"""Pictures of what K-center sampling keeps: every frame of a clip, unchosen patches dimmed, hybrid frames framed."""
from __future__ import annotations

import os
import tempfile

import numpy as np
import torch
from PIL import Image

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


def save_png(image: np.ndarray, path: str) -> None:
    """Write an image atomically (temp file in the same folder, then rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".png.tmp")
    with os.fdopen(fd, "wb") as f:
        Image.fromarray(image).save(f, format="PNG")
    os.replace(tmp, path)
