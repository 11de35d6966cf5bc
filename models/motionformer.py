"""K-center Motionformer: trajectory attention over groups of K-center tokens.

The clip's T frames are cut into S segments (8 of 4 frames at the paper's setting); each gives one group of
grid^2 tokens: a hybrid segment its centre frame whole, every other segment grid^2 k-center picks among its
patches (no place constraint), in pick order. Each token carries the spatial embedding of its place and the
temporal embedding of its true frame.

Trajectory attention (Motionformer's, as the original kcenter_motionformer uses it): each patch query attends to
each of the S groups separately (a softmax per group), which gives one point per group, its S-step trajectory;
then a second attention along that trajectory, with the query projected from the trajectory point in the query's
own group. The class token attends to every token. Blocks are timm's `Block` with this attention in place of
timm's, so a 2-D ViT's weights load by name; `proj_q` and `proj_k` keep their fresh initialisation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from .vit import KCenterViT


class TrajectoryAttention(nn.Module):
    """(B, 1 + G*P, D) -> same: a class token, then G groups of P = `group_size` tokens (group-major)."""

    def __init__(self, dim: int, *, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, group_size: int = 1, qk_norm: bool = False, scale_norm: bool = False,
                 **unused):  # the rest of what timm's Block passes to its attention (norm_layer, device, ...)
        super().__init__()
        if qk_norm or scale_norm:
            raise ValueError("TrajectoryAttention has no qk_norm / scale_norm")
        # tokens per group (grid^2): the group count follows from the tokens, so one model runs any token budget
        self.group_size, self.num_heads = group_size, num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj_q = nn.Linear(dim, dim, bias=qkv_bias)
        # The original's proj_kv also projects values, then attends over the trajectory points themselves
        # (Motionformer's `use_original_code`, its default); the value half is never used, so it is not built.
        self.proj_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        B, N, C = x.shape
        P, h = self.group_size, self.num_heads
        G = (N - 1) // P
        assert G * P == N - 1, f"{N - 1} tokens are not groups of {P}"
        q, k, v = self.qkv(x).reshape(B, N, 3, h, C // h).permute(2, 0, 3, 1, 4)  # each (B, h, N, d)
        cls_out = F.scaled_dot_product_attention(q[:, :, :1], k, v)  # the class token attends to every token
        cls_out = cls_out.transpose(1, 2).reshape(B, 1, C)

        # each patch query attends to each group separately: one point per group, its trajectory
        k_, v_ = (t[:, :, 1:].unflatten(2, (G, P)) for t in (k, v))  # (B, h, G, P, d)
        space = torch.einsum("bhsd,bhgpd->bhsgp", q[:, :, 1:] * self.scale, k_).softmax(-1)
        trajectory = torch.einsum("bhsgp,bhgpd->bhsgd", self.attn_drop(space), v_)  # (B, h, S, G, d)
        trajectory = trajectory.permute(0, 2, 3, 1, 4).reshape(B, G * P, G, C)  # (B, S, G, C)

        # attention along the trajectory, queried by its point in the query's own group
        own = trajectory.view(B, G, P, G, C).diagonal(dim1=1, dim2=3)  # (B, P, C, G): group g's point of g's tokens
        own = own.permute(0, 3, 1, 2).reshape(B, G * P, C)  # (B, S, C)
        q2 = self.proj_q(own).reshape(B, G * P, h, C // h) * self.scale  # (B, S, h, d)
        k2 = self.proj_k(trajectory).reshape(B, G * P, G, h, C // h)  # (B, S, G, h, d)
        along = torch.einsum("bshd,bsghd->bshg", q2, k2).softmax(-1)
        out = torch.einsum("bshg,bsghd->bshd", along, trajectory.reshape(B, G * P, G, h, C // h))
        x = torch.cat([cls_out, out.reshape(B, G * P, C)], dim=1)
        return self.proj_drop(self.proj(x))


class KCenterMotionformer(KCenterViT):
    """See the module docstring. Same arguments as `KCenterViT`; num_tokens must be num_segments x grid^2."""

    # the original's forward returns softmax scores in eval, which its test sums over views (utils/meters.py)
    test_ensemble = "mean_softmax"
    segmented = True

    def make_block(self, **kwargs) -> nn.Module:
        block = Block(attn_layer=TrajectoryAttention, **kwargs)  # timm builds its attention from the class
        block.attn.group_size = self.group_size
        return block
