"""An exact, cheap lower bound on the distance between two patches, for the k-center samplers.

Summing a group of g coordinates loses information but never overestimates the distance (Cauchy-Schwarz:
sum_j (x_j - c_j)^2 over the group >= g * (mean(x) - mean(c))^2). A point's min-distance to the chosen centers
only changes when a new center is nearer than it, so a point whose bound to the new center is already beyond its
min-distance can be skipped. Video patches are smooth: after the first picks, ~97% of the points of a clip are
skipped this way at the paper's setting (bench/RESULTS.md); on white noise almost none are. Used by the fused
Triton kernel (models/kcenter_triton.py) and the compiled CPU loop (models/kcenter_cpu.py).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

# Values per group: 4 rows of a 16-pixel patch in one channel. Replayed at the paper's setting on synthetic video
# clips (bench/RESULTS.md), groups of 8/16/32/64/128 read 5.5/8.7/13.2/17.2/15.4x fewer values per pick than a
# full scan: a coarser summary is cheaper to read and the bound it gives is nearly as tight.
GROUP = 64
# A point is skipped only if its bound beats its min-distance by more than fp32 rounding of either.
SLACK = 1.0 + 1e-4


def lower_bound_summary(points: Tensor, group: int = GROUP, pad_to_power_of_2: bool = True,
                        dtype: torch.dtype = torch.float32) -> Tensor:
    """(..., N, D) -> (..., N, R) `dtype` with ||s(x) - s(c)||^2 <= ||x - c||^2 for every pair.

    The first floor(D/group)*group values are summarised by their group sums / sqrt(group) (= sqrt(g) * mean),
    accumulated in `dtype`; the remaining D mod group values (the 3 position coordinates at the paper's D = 771)
    are kept as they are. With `pad_to_power_of_2`, R is padded with zeros (for the kernel's loads).
    """
    D = points.shape[-1]
    full = D // group * group
    sums = points[..., :full].unflatten(-1, (full // group, group)).sum(-1, dtype=dtype)
    parts = [sums / math.sqrt(group), points[..., full:].to(dtype)]
    width = full // group + D - full
    if pad_to_power_of_2 and width & (width - 1):
        parts.append(sums.new_zeros(*sums.shape[:-1], (1 << width.bit_length()) - width))
    return torch.cat(parts, -1).contiguous()
