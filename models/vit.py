"""K-center ViT: a plain ViT (timm blocks) over the patches chosen by K-centered sampling.

The sampler keeps `num_tokens` of a clip's T*h*w patches; only those are embedded. Each token gets the spatial
position embedding of its place in the frame (the 2-D ViT's, so ImageNet weights load as they are) plus a
learned temporal embedding of its true frame. Class token, timm `Block`s with fused attention, norm, linear head.

`KCenterViT` is also the frame the other families fill in (models/timesformer.py, models/motionformer.py): they
change how the sampler lays out the tokens (`segmented`: one group of grid^2 tokens per segment of the clip) and
the blocks (`make_block`, `run_blocks`); embedding, head, optimizer groups and 2-D weight loading are shared.

Token budgets: `forward(clip, num_tokens=N)` runs a trained model on N tokens instead of the `num_tokens` it was
built with (no weight depends on the count): the ViT on any N from its hybrid frames' tokens to every patch of the
clip, the segmented families on N = segments x grid^2 for a number of segments that divides the frames and holds the
hybrid segments (`token_budgets`). The same weights built with num_tokens=N (and those segments) compute the same.

Activation checkpointing (`set_grad_checkpointing`, timm's convention; model.grad_checkpointing): in training each
block runs under `torch.utils.checkpoint` and its activations are recomputed in the backward. Only the blocks: the
K-center sampler runs once per forward, before them, outside any checkpointed region.
"""
from __future__ import annotations

import logging
import os
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed, resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .kcenter import KCenterTokenSampler

log = logging.getLogger(__name__)


class KCenterViT(nn.Module):
    # how eval.py combines a video's views by default: the original sums the ViT's logits (utils/meters.py)
    test_ensemble = "sum_logits"
    # the token layout: False = one k-center run over every non-hybrid frame, picks in pick order (the ViT);
    # True = `num_segments` groups of grid^2 tokens, one per segment (TimeSformer, Motionformer)
    segmented = False
    one_per_place = sort_by_place = False
    grad_checkpointing = False  # `set_grad_checkpointing`

    def __init__(self, *, num_classes: int, num_frames: int = 32, img_size: int = 224, patch_size: int = 16,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, num_tokens: int = 1568, num_hybrid_frames: int = 3,
                 pixel_std: float = 0.5, temporal_coef: float = 1.0, spatial_coef: float = 1.0,
                 drop_rate: float = 0.0, pos_drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, num_segments: int = 8):
        super().__init__()
        grid = img_size // patch_size
        self.num_groups = num_segments if self.segmented else 1  # token groups the blocks see at num_tokens
        self.group_size = grid * grid if self.segmented else None  # tokens per group: a budget sets the group count
        if self.segmented and num_tokens != num_segments * grid * grid:
            raise ValueError(f"model.num_tokens {num_tokens} must be model.num_segments x {grid}x{grid} places = "
                             f"{num_segments * grid * grid} for {type(self).__name__}: one token group per segment")
        self.sampler = KCenterTokenSampler(
            num_frames=num_frames, img_size=img_size, patch_size=patch_size, num_tokens=num_tokens,
            num_hybrid_frames=num_hybrid_frames, pixel_std=pixel_std, temporal_coef=temporal_coef,
            spatial_coef=spatial_coef, num_segments=self.num_groups, one_per_place=self.one_per_place,
            sort_by_place=self.sort_by_place)
        # timm's module holds the conv weights (so 2-D checkpoints load by name); it is applied as a linear map
        # to the chosen patches only, whose pixels are already laid out (c, p1, p2) like the conv kernel
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=3, embed_dim=embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim))  # [cls, row-major places]
        self.time_embed = nn.Parameter(torch.zeros(1, num_frames, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList([
            self.make_block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                            proj_drop=drop_rate, attn_drop=attn_drop_rate, drop_path=rate,
                            norm_layer=partial(nn.LayerNorm, eps=1e-6))
            for rate in rates])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes)
        self._init_weights()

    def make_block(self, **kwargs) -> nn.Module:
        """One transformer block (keyword arguments as timm's `Block`)."""
        return Block(**kwargs)

    def run_blocks(self, x: Tensor) -> Tensor:
        """(B, 1 + K, D) -> (B, 1 + K, D): the class token, then the tokens group-major."""
        for block in self.blocks:
            x = self.call_block(block, x)
        return x

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of every block in training (timm's method; PySlowFast MODEL.ACT_CHECKPOINT,
        VideoMAE --use_checkpoint): less memory for one more forward of the blocks in the backward."""
        self.grad_checkpointing = enable

    def call_block(self, block: nn.Module, x: Tensor, *args) -> Tensor:
        """block(x, *args); under activation checkpointing when it is on and a backward will follow. Non-reentrant
        checkpointing restores the RNG state for the recomputation, so dropout and drop path draw the same masks as
        in the forward, and the loss and gradients are those without checkpointing."""
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, *args, use_reentrant=False)
        return block(x, *args)

    def adapt_2d_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """A 2-D ViT state dict as this model takes it (the ViT: as it is)."""
        return state

    def _init_weights(self):
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.time_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def token_budgets(self) -> range | list[int]:
        """The token counts this model can run on. The ViT: from its hybrid frames' tokens (no k-center picks) to
        every patch of the clip (all picked). The segmented families: segments x grid^2, one group of grid^2 tokens
        per segment, for every number of segments that divides the frames and is at least the hybrid segments (their
        blocks attend within and across groups of grid^2, whatever their count; a token's time embedding is that of
        its true frame)."""
        sampler, per_frame = self.sampler, self.sampler.grid ** 2
        if self.segmented:
            return [s * per_frame for s in range(1, sampler.num_frames + 1)
                    if sampler.num_frames % s == 0 and s >= sampler.num_hybrid_frames]
        lowest = sampler.num_hybrid_frames * per_frame
        return range(lowest, (sampler.num_frames * per_frame if sampler.num_hybrid_frames < sampler.num_frames
                              else lowest) + 1)

    def check_budget(self, num_tokens: int) -> None:
        """A ValueError naming the valid budgets if this model cannot run on `num_tokens` tokens."""
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int):
            raise ValueError(f"a token budget is an int, got {type(num_tokens).__name__} {num_tokens!r}")
        budgets = self.token_budgets()
        if num_tokens not in budgets:
            name, sampler = type(self).__name__, self.sampler
            if self.segmented:
                raise ValueError(f"token budget {num_tokens!r} is not one {name} can run on: its tokens are segments "
                                 f"x {self.group_size} (one group per segment; the segments divide the "
                                 f"{sampler.num_frames} frames and hold the {sampler.num_hybrid_frames} hybrid "
                                 f"segments), valid budgets: {', '.join(map(str, budgets))}")
            raise ValueError(f"token budget {num_tokens!r} is outside [{budgets[0]}, {budgets[-1]}], the budgets "
                             f"{name} can run on: from its {sampler.num_hybrid_frames} hybrid frames of {sampler.grid ** 2} "
                             f"patches to all {sampler.num_frames} x {sampler.grid ** 2} patches of the clip")

    def token_layout(self, num_tokens: int | None = None):
        """The sampler's `TokenLayout` of a budget (None: `num_tokens` as built); an error naming the valid ones."""
        if num_tokens is None:
            return self.sampler.layout()
        self.check_budget(num_tokens)
        return self.sampler.layout(num_tokens, num_tokens // self.group_size if self.segmented else 1)

    def select_tokens(self, clip: Tensor, start: Tensor | None = None, seeds: Tensor | None = None,
                      num_tokens: int | None = None):
        """clip (B, C, T, H, W) -> tokens (B, K, C*p*p), t_index (B, K), s_index (B, K).
        The k-center starts: `start` (B,), else a function of `seeds` (B,), else random (KCenterTokenSampler).
        K is `num_tokens`, a budget of `token_budgets` (None: the model's own)."""
        layout = self.token_layout(num_tokens)
        return self.sampler(clip, start=start, seeds=seeds, num_tokens=layout.num_tokens,
                            num_segments=layout.num_segments)

    def forward_tokens(self, tokens: Tensor, t_index: Tensor, s_index: Tensor) -> Tensor:
        proj = self.patch_embed.proj
        x = F.linear(tokens, proj.weight.flatten(1), proj.bias)  # (B, K, D)
        # F.embedding, not pos_embed[0, index]: the backward of advanced indexing accumulates in a thread-dependent
        # order on the CPU, so two runs of one command would end with different weights
        x = x + F.embedding(s_index + 1, self.pos_embed[0]) + F.embedding(t_index, self.time_embed[0])
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = self.pos_drop(torch.cat([cls, x], dim=1))  # (B, 1 + K, D)
        x = self.norm(self.run_blocks(x))
        return self.head(self.head_drop(x[:, 0]))

    def forward(self, clip: Tensor, start: Tensor | None = None, seeds: Tensor | None = None,
                num_tokens: int | None = None) -> Tensor:
        """clip (B, C, T, H, W) -> logits (B, classes), on `num_tokens` tokens (None: the model's own)."""
        tokens, t_index, s_index = self.select_tokens(clip, start, seeds, num_tokens)
        return self.forward_tokens(tokens.to(self.pos_embed.dtype), t_index, s_index)

    # the parameters before the blocks: layer 0 of the layer-wise learning-rate decay
    embedding_names = ("patch_embed", "cls_token", "pos_embed", "time_embed")

    def layer_id(self, name: str) -> int:
        """The layer of parameter `name` in layer-wise learning-rate decay, numbered as BEiT's and VideoMAE's
        get_num_layer_for_vit: 0 the embeddings (all before the blocks), i + 1 block i (the whole block, whatever its
        attention: the TimeSformer's temporal and spatial branches, the Motionformer's trajectory projections), depth
        + 1 the final norm and the head. VideoMAE gives any name it does not know layer depth + 1; the time
        embedding, which its ViT lacks, is an input embedding here and gets layer 0. A parameter of none of these
        parts is an error, so that one added to the model is placed on purpose rather than at the full rate."""
        part = name.split(".")[0]
        if part == "blocks":
            return int(name.split(".")[1]) + 1
        if part in self.embedding_names:
            return 0
        if part in ("norm", "head"):
            return len(self.blocks) + 1
        raise ValueError(f"parameter {name!r} has no layer for layer-wise learning-rate decay: add it to "
                         f"{type(self).__name__}.layer_id")

    def param_groups(self, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
        """AdamW groups: no decay on embeddings of position/time, the class token, norms and biases.

        layer_decay 1: the two groups (decayed, not), in the order earlier checkpoints hold their optimizer state.
        Below 1 (layer-wise learning-rate decay, VideoMAE's --layer_decay), one group per layer and weight decay,
        lowest layer first, each with `layer_id` and `lr_scale` = layer_decay ** (depth + 1 - layer_id): the final
        norm and head at the full rate, block i at layer_decay ** (depth - i), the embeddings at layer_decay **
        (depth + 1); the optimizer's builder multiplies the learning rate by it. The pretrained lower layers, which
        fine-tuning should move least, are the ones slowed most."""
        no_decay = {"pos_embed", "time_embed", "cls_token"}
        named = [(name, p, p.ndim > 1 and name not in no_decay) for name, p in self.named_parameters()
                 if p.requires_grad]
        if layer_decay == 1.0:
            return [{"params": [p for _, p, decayed in named if decayed], "weight_decay": weight_decay},
                    {"params": [p for _, p, decayed in named if not decayed], "weight_decay": 0.0}]
        depth, groups = len(self.blocks), {}
        for name, p, decayed in named:
            layer = self.layer_id(name)
            group = groups.setdefault((layer, not decayed), {
                "params": [], "weight_decay": weight_decay if decayed else 0.0, "layer_id": layer,
                "lr_scale": layer_decay ** (depth + 1 - layer)})
            group["params"].append(p)
        return [groups[key] for key in sorted(groups)]


def load_pretrained_2d(model: KCenterViT, source: str) -> list[str]:
    """Initialise from a 2-D ViT: a local .pth/.pt/.bin/.safetensors state dict, or a timm model name.

    Copies the patch embedding, class token, spatial position embedding (resampled if the grid differs), blocks
    and final norm; the head keeps its fresh initialisation. The temporal embedding is set to zero, as the
    original does, so the model starts as the image model, blind to the frame order. Returns the names of the
    model's parameters that were loaded.
    """
    state = model.adapt_2d_state(_read_2d_state_dict(source))
    own = model.state_dict()
    wanted = {k: v for k, v in state.items() if k in own and not k.startswith("head.")}
    if "pos_embed" in wanted and wanted["pos_embed"].shape != own["pos_embed"].shape:
        grid = model.patch_embed.grid_size
        wanted["pos_embed"] = resample_abs_pos_embed(wanted["pos_embed"], new_size=list(grid), num_prefix_tokens=1)
    mismatched = [k for k, v in wanted.items() if v.shape != own[k].shape]
    if mismatched:
        raise ValueError(f"pretrained weights from {source}: shapes differ for "
                         + ", ".join(f"{k} {tuple(wanted[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched))
    if not any(k.startswith("blocks.") for k in wanted):
        raise ValueError(f"pretrained weights from {source}: no ViT block weights found (keys like "
                         f"{list(state)[:3]}); expected a timm VisionTransformer state dict")
    model.load_state_dict(wanted, strict=False)
    with torch.no_grad():
        model.time_embed.zero_()
    missing = sorted(k for k in own if k not in wanted and not k.startswith(("head.", "time_embed")))
    if missing:
        log.warning("pretrained weights from %s lack %d tensors, left at init: %s", source, len(missing), missing[:8])
    return sorted(wanted)


def _read_2d_state_dict(source: str) -> dict[str, Tensor]:
    if os.path.isfile(source):
        if source.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(source)
        else:
            try:  # tensors and plain values only: a file that would run code to load is refused
                state = torch.load(source, map_location="cpu", weights_only=True)
            except Exception as e:
                first = (str(e).strip().splitlines() or [""])[0].split(". ")[0]
                raise ValueError(f"pretrained weights {source} cannot be read as a state dict of tensors "
                                 f"(weights_only load): {type(e).__name__}: {first}") from None
        for key in ("model", "state_dict", "model_state"):  # common checkpoint wrappers
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        return {k.removeprefix("module."): v for k, v in state.items()}
    if any(source.endswith(ext) for ext in (".pth", ".pt", ".bin", ".safetensors")) or os.sep in source:
        raise FileNotFoundError(f"pretrained weights file not found: {source}")
    import timm
    try:
        return timm.create_model(source, pretrained=True, num_classes=0).state_dict()
    except Exception as e:  # unknown name, or the hub is unreachable (no network)
        raise RuntimeError(f"could not load pretrained weights '{source}' from timm: {e}. Download the weights "
                           f"where the hub is reachable and set model.pretrained to the local file") from e
