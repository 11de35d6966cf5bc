"""GFLOPs of one view of a K-center model, at its own token budget or another (bench/bench_model.py, eval.py).

Counted with `torch.utils.flop_counter` on meta tensors, so nothing is computed and no memory is used: the
transformer (attention included: on meta, SDPA runs as matrix products the counter sees; on the CPU its fused kernel
would not be counted) plus the K-center sampler's distance products (its PyTorch loop, `_kcenter_batched`).
Multiply-adds count 2.
"""
from __future__ import annotations

import copy

import torch
from torch.utils.flop_counter import FlopCounterMode

from .kcenter import _kcenter_batched


def meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose parameters and buffers are meta tensors of the same shapes (no data is copied)."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    memo.update({id(b): torch.empty_like(b, device="meta") for b in model.buffers()})
    return copy.deepcopy(model, memo)


def view_gflops(model, num_tokens: int | None = None) -> float:
    """Forward GFLOPs of one view of `model` (a KCenterViT family) on `num_tokens` tokens (None: its own budget):
    the transformer on meta tensors plus the sampler's distance products. `model` itself is left as it is."""
    layout = model.token_layout(num_tokens)
    twin = meta_copy(model)
    K, pixels = layout.num_tokens, twin.patch_embed.proj.weight[0].numel()  # C*p*p values per patch
    tokens = torch.randn(1, K, pixels, device="meta")
    index = torch.zeros(1, K, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        twin.forward_tokens(tokens, index, index)
        if layout.num_kcenter_tokens:  # (pixels, t, h, w) points of each run
            points = torch.randn(layout.num_runs, layout.candidates_per_run, pixels + 3, device="meta")
            _kcenter_batched(points, layout.picks_per_run, torch.zeros(layout.num_runs, dtype=torch.long,
                                                                       device="meta"))
    return counter.get_total_flops() / 1e9
