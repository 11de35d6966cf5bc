"""K-center TimeSformer: divided space-time attention over mosaic frames of K-center tokens.

The clip's T frames are cut into S segments (8 of 4 frames at the paper's setting). Each segment gives one group of
grid^2 tokens: a hybrid segment its centre frame whole, every other segment a k-center run that keeps one patch per
place (h, w), sorted by place, so the group reads as a 14x14 "mosaic" frame whose patches come from different
frames. Each token carries the spatial embedding of its place and the temporal embedding of its true frame.

A block (TimeSformer's divided attention, as the original kcenter_timesformer): temporal attention across the S
groups at each place (no class token), a zero-initialised `temporal_fc` and a residual; then spatial attention
within each group over its tokens and a copy of the class token, whose S outputs are averaged; then the MLP.
Attention and MLP are timm's; a 2-D ViT's `attn` and `norm1` are copied into `temporal_attn` and
`temporal_norm1`, so with `temporal_fc` at zero the temporal branch starts as a no-op.
"""
from __future__ import annotations

import re

import torch
from einops import rearrange
from timm.layers import DropPath, Mlp
from timm.models.vision_transformer import Attention
from torch import Tensor, nn

from .vit import KCenterViT


class DividedSpaceTimeBlock(nn.Module):
    """(B, 1 + G*P, D) -> same: a class token, then G groups of P tokens, the same place at the same index."""

    def __init__(self, *, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, norm_layer=nn.LayerNorm):
        super().__init__()
        self.temporal_norm1 = norm_layer(dim)
        self.temporal_attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                       proj_drop=proj_drop)
        self.temporal_fc = nn.Linear(dim, dim)
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: Tensor, groups: int) -> Tensor:
        cls, x = x[:, :1], x[:, 1:]  # (B, 1, D), (B, G*P, D)
        B = x.shape[0]
        # temporal: the G tokens of each place attend to each other
        xt = rearrange(x, "b (g p) d -> (b p) g d", g=groups)
        xt = self.temporal_fc(self.drop_path(self.temporal_attn(self.temporal_norm1(xt))))
        x = x + rearrange(xt, "(b p) g d -> b (g p) d", b=B)
        # spatial: each group with its own copy of the class token
        xs = rearrange(x, "b (g p) d -> (b g) p d", g=groups)
        xs = torch.cat([cls.expand(-1, groups, -1).reshape(B * groups, 1, -1), xs], dim=1)  # (B*G, 1 + P, D)
        xs = self.drop_path(self.attn(self.norm1(xs)))
        cls_out = xs[:, :1].unflatten(0, (B, groups)).mean(1)  # (B, 1, D): the groups' class outputs averaged
        x = torch.cat([cls, x], dim=1) + torch.cat([cls_out, rearrange(xs[:, 1:], "(b g) p d -> b (g p) d", b=B)], 1)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class KCenterTimeSformer(KCenterViT):
    """See the module docstring. Same arguments as `KCenterViT`; num_tokens must be num_segments x grid^2."""

    segmented = True
    one_per_place = sort_by_place = True  # each k-center group is a mosaic: one patch per place, in place order

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for block in self.blocks:  # the temporal branch starts as a no-op in every block, as the original's
            nn.init.zeros_(block.temporal_fc.weight)
            nn.init.zeros_(block.temporal_fc.bias)

    def make_block(self, **kwargs) -> nn.Module:
        return DividedSpaceTimeBlock(**kwargs)

    def run_blocks(self, x: Tensor) -> Tensor:
        groups = (x.shape[1] - 1) // self.group_size  # the segments of this forward's token budget
        for block in self.blocks:
            x = self.call_block(block, x, groups)
        return x

    def adapt_2d_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """The ViT's spatial attention and its norm also initialise the temporal ones, as the original does."""
        temporal = {re.sub(r"^(blocks\.\d+\.)(attn|norm1)\.", lambda m: f"{m[1]}temporal_{m[2]}.", key): value
                    for key, value in state.items() if re.match(r"^blocks\.\d+\.(attn|norm1)\.", key)}
        return {**state, **{key: value.clone() for key, value in temporal.items()}}
