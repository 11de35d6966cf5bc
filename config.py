"""Typed experiment configuration: YAML -> dataclasses, with `section.key=value` overrides.

One module for train.py and eval.py. A config file has four sections (data, model, train, eval); every key is
a dataclass field below, so a typo or a wrong type is an error that names the key, and a bad value is an error
that names the value. `Config.save` writes the resolved config, and `load_config` reads it back unchanged.
"""
from __future__ import annotations

import dataclasses
import os
import re
import tempfile
import types
import typing
from dataclasses import dataclass, field

import yaml


@dataclass
class DataConfig:
    dataset: str = "kinetics"  # kinetics (official CSV) | list ("relative/path.mp4 label" lines) | ssv2 (JSON + frames)
    root: str = ""  # videos (kinetics, list) or frame folders (ssv2); split sub-folders are resolved from here
    train_list: str = ""  # annotation file of each split; relative paths are taken from `root`
    val_list: str = ""
    test_list: str = ""
    labels_file: str = ""  # ssv2: something-something-v2-labels.json; kinetics/list: optional class-name list
    # kinetics: the folder of each split's videos, relative to root; empty: the first of train/ videos_train/
    # (val/ validate/ videos_val/, test/ ...) that exists, else root
    train_folder: str = ""
    val_folder: str = ""
    test_folder: str = ""
    # ssv2: the names of the frame files in each folder, "auto" (detected per folder: <id>_000000.jpeg as
    # preprocess/ssv2_to_frames.py writes them, <id>_000001.jpg, img_00001.jpg, ...) or a template with {id} and
    # {n}, e.g. "img_{n:05d}.jpg", numbered from frame_start
    frame_naming: str = "auto"
    frame_start: int = 0
    num_frames: int = 32
    sampling_rate: int = 8  # kinetics: frames between samples at `target_fps`
    target_fps: float = 30.0
    crop_size: int = 224
    train_jitter_scales: tuple[int, int] = (256, 320)  # short side drawn from this range in training
    inverse_uniform: bool = True  # draw the scale as 1/uniform(1/max, 1/min), as the original code does
    random_flip: bool = True
    color_jitter: bool = True
    rand_augment: str = ""  # e.g. "rand-m9-n2"; empty = off
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    device: str = "gpu"  # gpu: NVDEC/nvJPEG + GPU augmentation; cpu: same graph on the CPU
    num_threads: int = 4  # DALI CPU threads per process
    py_workers: int = 4  # worker processes of the Python sources (file reading, CPU decoding)
    allow_missing: bool = False  # false: any annotated video missing on disk is an error before training starts;
    # true: missing videos are left out, counted and listed (real Kinetics always lacks some YouTube videos)
    generate_demo: bool = False  # build the synthetic demo dataset (preprocess/make_demo_data.py) if root is absent
    max_bad_fraction: float = 0.01  # training stops with an error if more of an epoch's videos fail to decode
    # the index of each split's video list (pipelines/index.py), built once and memory-mapped by every process:
    # "auto" = a .kcenter-index folder beside the annotation file (else ~/.cache/kcenter-video/index), a folder
    # (relative to root), or "off" (the lists are read in full at every start)
    index_dir: str = "auto"
    # random erasing of each training clip, on the device after the loader (pipelines/batch_augment.py): one region
    # in every frame of a clip, drawn from (seed, epoch, video). VideoMAE's --reprob --remode --recount, PySlowFast's
    # AUG.RE_PROB, RE_MODE, RE_COUNT (their fine-tuning recipes: 0.25, pixel, 1)
    re_prob: float = 0.0  # probability that a clip is erased; 0 = off
    re_mode: str = "pixel"  # the fill: pixel (normal noise per pixel, the same in every frame) | rand (normal, per
    # channel) | const (0: the mean colour, in the normalised space)
    re_count: int = 1  # 1 to this many regions per erased clip, each of 1/count of the area drawn
    re_area: tuple[float, float] = (0.02, 1 / 3)  # the fraction of the frame a region covers, uniform in this range
    re_aspect: tuple[float, float] = (0.3, 1 / 0.3)  # its height / width, log-uniform in this range (timm's)
    # repeated augmentation (VideoMAE --num_sample, PySlowFast AUG.NUM_SAMPLE; VideoMAE fine-tunes SSv2 with 2): each
    # training video is decoded once and its clip augmented this many times, each view with its own crop scale and
    # place, flip, colour jitter, RandAugment, erasing and K-center start (view 0 draws as with 1). As VideoMAE's,
    # train.batch_size and micro_batch_size count videos: a micro-batch holds micro_batch_size x num_sample clips (the
    # views of a video adjacent), an epoch is still ceil(videos / batch_size) optimizer steps, and the loss is the
    # mean over the clips. VideoMAE also scales its lr by it (lr x total batch x num_sample / 256); train.lr is taken
    # as it is, so scale it by hand to follow that recipe. Training only: validation and testing are unchanged
    num_sample: int = 1

    def __post_init__(self):
        _check_choice("data.dataset", self.dataset, ("kinetics", "list", "ssv2"))
        _check_choice("data.device", self.device, ("gpu", "cpu"))
        _check_positive("data.num_frames", self.num_frames)
        _check_positive("data.sampling_rate", self.sampling_rate)
        _check_positive("data.target_fps", self.target_fps)
        _check_positive("data.crop_size", self.crop_size)
        lo, hi = self.train_jitter_scales
        if not self.crop_size <= lo <= hi:
            raise ValueError(f"data.train_jitter_scales must be crop_size ({self.crop_size}) <= min <= max (a short "
                             f"side below the crop leaves no {self.crop_size} x {self.crop_size} window), got "
                             f"{list(self.train_jitter_scales)}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"data.std must be positive, got {list(self.std)}")
        if self.frame_naming != "auto":
            try:
                sample = self.frame_naming.replace("{id}", "x").replace("{n", "{").format(self.frame_start)
            except (ValueError, IndexError, KeyError):
                sample = ""
            if "{n" not in self.frame_naming or not sample.lower().endswith((".jpg", ".jpeg")):
                raise ValueError(f"data.frame_naming must be 'auto' or a template with {{n}} (and optionally {{id}}) "
                                 f"naming .jpg/.jpeg files, e.g. 'img_{{n:05d}}.jpg', got {self.frame_naming!r}")
        if self.frame_start < 0:
            raise ValueError(f"data.frame_start must be >= 0, got {self.frame_start}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"data.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if not 0.0 <= self.re_prob <= 1.0:
            raise ValueError(f"data.re_prob must be in [0, 1], got {self.re_prob}")
        _check_choice("data.re_mode", self.re_mode, ("pixel", "rand", "const"))
        _check_positive("data.re_count", self.re_count)
        if not 0.0 < self.re_area[0] <= self.re_area[1] <= 1.0:
            raise ValueError(f"data.re_area must be 0 < min <= max <= 1 (fractions of the frame), got "
                             f"{list(self.re_area)}")
        if not 0.0 < self.re_aspect[0] <= self.re_aspect[1]:
            raise ValueError(f"data.re_aspect must be 0 < min <= max (height / width), got {list(self.re_aspect)}")
        if self.num_sample < 1:
            raise ValueError(f"data.num_sample (augmented views of each training video) must be >= 1, got "
                             f"{self.num_sample}")


ARCHS = ("vit", "timesformer", "motionformer")  # the families of models/__init__.py (ARCHS), by name


@dataclass
class ModelConfig:
    arch: str = "vit"  # vit | timesformer | motionformer (the paper's three K-center families)
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    num_classes: int = 400
    num_frames: int = 32  # input frames; must equal data.num_frames
    num_tokens: int = 1568  # tokens kept per clip (hybrid frames + k-center picks)
    num_hybrid_frames: int = 3  # whole frames: at linspace positions (vit), at the centres of segments (the others)
    num_segments: int = 8  # timesformer, motionformer: the frames are cut into this many segments, one token group
    # of grid^2 each (num_tokens = num_segments x grid^2); the vit samples all frames at once and does not read it
    spatial_coef: float = 1.0  # weight of the (h, w) coordinates in the k-center distance
    temporal_coef: float = 1.0  # weight of the t coordinate
    drop_rate: float = 0.0
    pos_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    pretrained: str = ""  # timm model name (needs the hub) or a local .pth/.safetensors file; empty = random init
    init_from: str = ""  # a checkpoint of this project to start a new run from (fine-tuning): its weights, a fresh
    # optimizer, schedule and epoch; the head is replaced when the class count differs
    init_skip: list[str] = field(default_factory=list)  # with init_from: parameters left at their initialisation,
    # by name, dotted prefix or pattern (e.g. head, blocks.*.temporal_fc)
    # activation checkpointing of each transformer block in training (PySlowFast MODEL.ACT_CHECKPOINT, VideoMAE
    # --use_checkpoint): its activations are recomputed in the backward instead of kept, less memory for about one
    # more forward of the blocks (bench/RESULTS.md). The same loss and gradients (dropout and drop path draw the same
    # masks again); the K-center sampler is never recomputed
    grad_checkpointing: bool = False
    # budget-elastic training: each optimizer step runs on a token budget drawn from these, a function of
    # (train.seed, step) (the same on every rank, rerun and resume), so that one model serves every budget at test
    # time (eval.budgets). A list of budgets, e.g. [392, 784, 1176, 1568], or a range "LO-HI" / "LO-HI/STEP" (HI
    # included, e.g. "392-1568/196") of which the budgets the family can run on are kept (README, "Token budgets at test time").
    # Validation and testing stay at num_tokens. Empty: off, every step at num_tokens
    train_budgets: list[int] | str = field(default_factory=list)

    def __post_init__(self):
        _check_choice("model.arch", self.arch, ARCHS)
        if self.init_from and self.pretrained:
            raise ValueError(f"model.init_from ({self.init_from}) and model.pretrained ({self.pretrained}) are both "
                             f"set: a run starts from one of them")
        if self.init_skip and not self.init_from:
            raise ValueError(f"model.init_skip {self.init_skip} is set without model.init_from")
        for name in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "num_classes", "num_frames",
                     "num_tokens", "num_segments"):
            _check_positive(f"model.{name}", getattr(self, name))
        if self.img_size % self.patch_size:
            raise ValueError(f"model.img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"model.embed_dim {self.embed_dim} is not a multiple of num_heads {self.num_heads}")
        if not 0 <= self.num_hybrid_frames <= self.num_frames:
            raise ValueError(f"model.num_hybrid_frames must be in [0, num_frames], got {self.num_hybrid_frames}")
        grid = (self.img_size // self.patch_size) ** 2
        hybrid = self.num_hybrid_frames * grid
        if not hybrid <= self.num_tokens <= self.num_frames * grid:
            raise ValueError(f"model.num_tokens {self.num_tokens} must be in [{hybrid}, {self.num_frames * grid}] "
                             f"({self.num_hybrid_frames} hybrid frames of {grid} patches, {self.num_frames} frames)")
        if hybrid < self.num_tokens and self.num_hybrid_frames == self.num_frames:
            raise ValueError("model.num_tokens leaves k-center picks but every frame is a hybrid frame")
        budgets = self.train_budget_candidates()
        outside = [b for b in budgets if not hybrid <= b <= self.num_frames * grid]
        if outside:  # every family's bounds; the segmented families' own rule is checked when the model is built
            shown = outside if isinstance(self.train_budgets, list) else repr(self.train_budgets)
            raise ValueError(f"model.train_budgets {shown} outside [{hybrid}, {self.num_frames * grid}]: a budget "
                             f"holds at least the {self.num_hybrid_frames} hybrid frames of {grid} patches and at most "
                             f"all {self.num_frames} x {grid} patches of the clip")

    def train_budget_candidates(self) -> list[int]:
        """model.train_budgets as a list: the list itself, or every count of the range (the model keeps those its
        family can run on); [] when off. A ValueError naming the key for a malformed value."""
        spec = self.train_budgets
        if isinstance(spec, list):
            if len(set(spec)) != len(spec):
                raise ValueError(f"model.train_budgets lists a budget twice: {spec}")
            return list(spec)
        match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*(?:/\s*(\d+)\s*)?", spec)
        if not match:
            raise ValueError(f"model.train_budgets {spec!r} must be a list of token counts or a range 'LO-HI' or "
                             f"'LO-HI/STEP' of positive integers (e.g. '392-1568/196')")
        low, high, step = int(match[1]), int(match[2]), int(match[3] or 1)
        if not 0 < low < high or step <= 0:
            raise ValueError(f"model.train_budgets {spec!r}: a range needs 0 < LO < HI and STEP > 0")
        return list(range(low, high + 1, step))


@dataclass
class TrainConfig:
    out_dir: str = "runs/exp"  # may name other settings, e.g. runs/demo_{model.arch}
    epochs: int = 15
    batch_size: int = 256  # global: micro_batch_size x world size x accumulation steps
    micro_batch_size: int = 8  # clips per process per forward pass
    lr: float = 1e-4
    min_lr: float = 1e-6
    warmup_epochs: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    label_smoothing: float = 0.2
    clip_grad: float = 0.0  # max gradient norm; 0 = off
    precision: str = "bf16"  # bf16 | fp16 (with a GradScaler) | fp32; bf16/fp16 fall back to fp32 on CPU
    seed: int = 0
    save_every_steps: int = 0  # also write last.pt every this many optimizer steps; 0 = once per epoch
    val_every_epochs: int = 1
    log_every_steps: int = 10
    num_vis_clips: int = 2  # clips drawn with their sampled patches to TensorBoard after each validation
    max_steps_per_epoch: int = 0  # cap on optimizer steps per epoch (smoke runs); 0 = the whole epoch
    deterministic: bool = False  # GPU: deterministic kernels, so a rerun or resume gives bit-identical weights
    # (slower; see README). The CPU path is deterministic without it.
    layer_decay: float = 1.0  # layer-wise learning-rate decay (VideoMAE --layer_decay, PySlowFast
    # SOLVER.LAYER_DECAY): block i of depth trains at lr x layer_decay^(depth - i), the embeddings at
    # layer_decay^(depth + 1), the final norm and head at lr; 1 = off
    model_ema: bool = False  # also keep an exponential moving average of the weights (VideoMAE --model_ema),
    # validated beside the model and saved in every checkpoint (eval.weights=ema tests it)
    model_ema_decay: float = 0.9999  # its decay per optimizer step (VideoMAE --model_ema_decay)
    model_ema_warmup: bool = False  # the decay ramps up as 1 - (1 + step)^(-2/3), capped at model_ema_decay (timm
    # ModelEmaV3's warmup), so that the average soon forgets the random initial weights
    # mixup / cutmix of each training micro-batch on the device, before the model (pipelines/batch_augment.py), with
    # soft targets that take label_smoothing in. VideoMAE's --mixup --cutmix --mixup_prob --mixup_switch_prob
    # --mixup_mode, PySlowFast's MIXUP.ALPHA, CUTMIX_ALPHA, PROB, SWITCH_PROB (their recipes: 0.8, 1.0, 1.0, 0.5, batch)
    mixup: float = 0.0  # alpha of mixup's lambda ~ Beta(alpha, alpha); 0 = off
    cutmix: float = 0.0  # alpha of cutmix's lambda (one box in every frame of a clip); 0 = off
    mixup_prob: float = 1.0  # probability that a micro-batch (pair, clip: mixup_mode) is mixed
    mixup_switch_prob: float = 0.5  # with mixup and cutmix both on: probability of cutmix
    mixup_mode: str = "batch"  # batch | pair | elem: one draw per micro-batch, per pair of clips, per clip (timm's)
    # torch.compile (inductor) of the model's tokens -> logits part (forward_tokens: patch embedding, blocks, head); the
    # K-center sampler before it stays eager (sequential data-dependent picks, already a Numba / Triton kernel).
    # Checkpoints keep plain state dict keys; the EMA copy runs eager. Dropout and drop path draw from inductor's
    # generator, not the eager one's, so a compiled run is close to, not bit-identical with, an eager one
    compile: bool = False

    def __post_init__(self):
        for name in ("epochs", "batch_size", "micro_batch_size", "val_every_epochs", "log_every_steps"):
            _check_positive(f"train.{name}", getattr(self, name))
        _check_positive("train.lr", self.lr)
        _check_choice("train.precision", self.precision, ("bf16", "fp16", "fp32"))
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"train.batch_size {self.batch_size} is not a multiple of "
                             f"micro_batch_size {self.micro_batch_size}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        for name in ("min_lr", "warmup_epochs", "weight_decay", "clip_grad", "save_every_steps", "max_steps_per_epoch"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"train.layer_decay must be in (0, 1] (1 = off), got {self.layer_decay}")
        if not 0.0 <= self.model_ema_decay < 1.0:
            raise ValueError(f"train.model_ema_decay must be in [0, 1), got {self.model_ema_decay}")
        for name in ("mixup", "cutmix"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} (the alpha of Beta(alpha, alpha); 0 = off) must be >= 0, got "
                                 f"{getattr(self, name)}")
        for name in ("mixup_prob", "mixup_switch_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"train.{name} must be in [0, 1], got {getattr(self, name)}")
        _check_choice("train.mixup_mode", self.mixup_mode, ("batch", "pair", "elem"))
        if (self.mixup or self.cutmix) and self.micro_batch_size == 1:
            raise ValueError(f"train.mixup {self.mixup} / train.cutmix {self.cutmix} mix the clips of a micro-batch "
                             f"with each other, and train.micro_batch_size 1 has no two to mix")


ENSEMBLES = ("sum_logits", "mean_softmax", "max")


@dataclass
class EvalConfig:
    num_clips: int = 1  # temporal clips per video: 1 x 3 crops, as the original code tests all six recipes
    num_crops: int = 3  # spatial crops per clip (1 = centre, 3 = left/centre/right along the long side)
    batch_size: int = 4  # videos per process per step (each brings num_clips x num_crops views)
    checkpoint: str = "last"  # last | best (chosen on data.val_list) | a path; the paper reports the last epoch
    ensemble: str = ""  # sum_logits | mean_softmax | max (of the logits) over a video's views; "" = the model
    # family's default, as the original code: sum_logits for the ViT
    out_dir: str = ""  # results.json and predictions.csv; default: train.out_dir
    weights: str = "model"  # model | ema: the checkpoint's trained weights, or their moving average (train.model_ema)
    # token budgets to test the checkpoint at, in one run with the same views and K-center seeds, e.g. [392, 784,
    # 1568, 2352]: accuracy, GFLOPs and clips/s of each in results.json, the log, TensorBoard and budgets.png. The ViT
    # takes any count from its hybrid frames' tokens to every patch; the segmented families segments x grid^2 (README,
    # "Token budgets at test time"). Empty: off, the test at model.num_tokens only
    budgets: list[int] = field(default_factory=list)

    def __post_init__(self):
        _check_positive("eval.num_clips", self.num_clips)
        _check_positive("eval.batch_size", self.batch_size)
        _check_choice("eval.num_crops", self.num_crops, (1, 3))
        _check_choice("eval.ensemble", self.ensemble, ("",) + ENSEMBLES)
        _check_choice("eval.weights", self.weights, ("model", "ema"))
        if not self.checkpoint:
            raise ValueError("eval.checkpoint must be 'last', 'best' or a path, got ''")
        if any(b <= 0 for b in self.budgets) or len(set(self.budgets)) != len(self.budgets):
            raise ValueError(f"eval.budgets must be distinct token counts > 0, got {self.budgets}")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        try:  # placeholders such as {model.arch}: one out_dir pattern serves every family
            self.train.out_dir = self.train.out_dir.format(data=self.data, model=self.model, train=self.train)
        except (KeyError, AttributeError, IndexError, ValueError) as e:
            raise ValueError(f"train.out_dir {self.train.out_dir!r}: cannot fill in its placeholder ({e}); "
                             f"use names such as {{model.arch}}") from None
        if self.model.num_frames != self.data.num_frames:
            raise ValueError(f"model.num_frames ({self.model.num_frames}) != data.num_frames ({self.data.num_frames})")
        if self.model.img_size != self.data.crop_size:
            raise ValueError(f"model.img_size ({self.model.img_size}) != data.crop_size ({self.data.crop_size})")
        grid = (self.model.img_size // self.model.patch_size) ** 2
        lowest, highest = self.model.num_hybrid_frames * grid, self.model.num_frames * grid
        outside = [b for b in self.eval.budgets if not lowest <= b <= highest]
        if outside:  # every family's bounds; the segmented families' own rule is checked when the model is built
            raise ValueError(f"eval.budgets {outside} outside [{lowest}, {highest}]: a budget holds at least the "
                             f"{self.model.num_hybrid_frames} hybrid frames of {grid} patches and at most all "
                             f"{self.model.num_frames} x {grid} patches of the clip")

    def to_dict(self) -> dict:
        return {f.name: _to_plain(dataclasses.asdict(getattr(self, f.name))) for f in dataclasses.fields(self)}

    def save(self, path: str) -> None:
        """Write the resolved config as YAML, atomically."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".config-", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)


def config_from_dict(raw: dict, source: str = "config") -> Config:
    """Build a Config from nested dicts, rejecting unknown sections/keys and wrong types."""
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    sections = {}
    for f in dataclasses.fields(Config):
        sections[f.name] = f.type if not isinstance(f.type, str) else typing.get_type_hints(Config)[f.name]
    unknown = set(raw) - set(sections)
    if unknown:
        raise ValueError(f"{source}: unknown config section(s) {sorted(unknown)}; known: {list(sections)}")
    built = {}
    for name, cls in sections.items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{source}: section '{name}' must be a mapping, got {values!r}")
        built[name] = _build_section(cls, values, name, source)
    return Config(**built)


def load_config(path: str, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML config and apply `section.key=value` overrides (values parsed as YAML)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of sections at the top level")
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ValueError(f"override {item!r} must look like section.key=value")
        section, name = parts
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ValueError(f"override {item!r}: section '{section}' is not a mapping")
        raw[section][name] = yaml.safe_load(value) if value.strip() else ""
    return config_from_dict(raw, source=path)


# ---------------------------------------------------------------------------------------------------------------
# Type checking of plain YAML values against the dataclass annotations.


def _build_section(cls, values: dict, section: str, source: str):
    hints = typing.get_type_hints(cls)
    unknown = set(values) - set(hints)
    if unknown:
        known = ", ".join(hints)
        raise ValueError(f"{source}: unknown config key(s) {', '.join(f'{section}.{k}' for k in sorted(unknown))} "
                         f"(known keys of '{section}': {known})")
    kwargs = {k: _coerce(v, hints[k], f"{section}.{k}", source) for k, v in values.items()}
    return cls(**kwargs)


def _coerce(value, tp, key: str, source: str):
    """Return `value` as type `tp`, or raise naming the key. Ints are accepted for floats, lists for tuples."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for option in inner[:-1]:  # the first type the value is (e.g. list[int] | str: a list, else a string)
            try:
                return _coerce(value, option, key, source)
            except (TypeError, ValueError):
                pass
        try:
            return _coerce(value, inner[-1], key, source)
        except TypeError:
            if len(inner) == 1:
                raise
            raise TypeError(f"{source}: {key} must be {' or '.join(_type_name(t) for t in inner)}, got "
                            f"{type(value).__name__} {value!r}") from None
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{source}: {key} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ValueError(f"{source}: {key} must have {len(args)} items, got {list(value)}")
            return tuple(_coerce(v, a, key, source) for v, a in zip(value, args))
        item_type = args[0] if args else typing.Any
        out = [_coerce(v, item_type, key, source) for v in value]
        return tuple(out) if origin is tuple else out
    if tp is typing.Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
        return float(value)  # PyYAML reads "1e-4" (no dot) as a string
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise TypeError(f"{source}: {key} must be {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) if typing.get_origin(tp) is None else str(tp)


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _to_plain(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _check_choice(key, value, choices):
    if value not in choices:
        raise ValueError(f"{key} must be one of {list(choices)}, got {value!r}")


def _check_positive(key, value):
    if not value > 0:
        raise ValueError(f"{key} must be > 0, got {value!r}")
