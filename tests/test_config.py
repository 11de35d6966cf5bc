import pytest
import yaml

from config import Config, load_config


def write(tmp_path, data, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_defaults_roundtrip_and_overrides(tmp_path):
    path = write(tmp_path, {"data": {"num_frames": 8}, "model": {"num_frames": 8, "num_tokens": 600}})
    cfg = load_config(path, ["train.lr=3e-4", "data.mean=[0.4, 0.4, 0.4]", "model.pretrained=", "eval.num_crops=1"])
    assert cfg.train.lr == 3e-4 and cfg.data.mean == (0.4, 0.4, 0.4) and cfg.model.pretrained == ""
    assert cfg.eval.num_crops == 1 and cfg.data.num_frames == 8
    cfg.save(str(tmp_path / "resolved.yaml"))
    assert load_config(str(tmp_path / "resolved.yaml")) == cfg


def test_paper_configs_load():
    for name in ("kcenter_vit_kinetics", "kcenter_vit_ssv2", "demo", "kcenter_timesformer_kinetics",
                 "kcenter_timesformer_ssv2", "kcenter_motionformer_kinetics", "kcenter_motionformer_ssv2"):
        cfg = load_config(f"configs/{name}.yaml")
        assert isinstance(cfg, Config)
    recipes = {name: load_config(f"configs/kcenter_{name}.yaml") for name in
               ("timesformer_kinetics", "timesformer_ssv2", "motionformer_kinetics", "motionformer_ssv2")}
    assert [(c.model.arch, c.model.num_hybrid_frames, c.train.batch_size, c.train.lr, c.train.min_lr)
            for c in recipes.values()] == [
        ("timesformer", 4, 64, 2.5e-5, 2.5e-7), ("timesformer", 0, 64, 2.5e-5, 2.5e-7),
        ("motionformer", 1, 256, 1e-4, 1e-6), ("motionformer", 0, 256, 1e-4, 1e-6)]
    assert all((c.model.num_tokens, c.model.num_segments, c.train.epochs) == (1568, 8, 15) for c in recipes.values())
    k400 = load_config("configs/kcenter_vit_kinetics.yaml")
    assert (k400.data.num_frames, k400.model.num_tokens, k400.model.num_hybrid_frames) == (32, 1568, 3)
    assert (k400.train.batch_size, k400.train.lr, k400.train.epochs, k400.train.label_smoothing) == (256, 1e-4, 15, 0.2)



def test_the_videomae_recipe_is_the_papers_model_with_videomaes_fine_tuning():
    recipe, paper = (load_config(f"configs/{name}.yaml") for name in
                     ("kcenter_vit_kinetics_videomae", "kcenter_vit_kinetics"))
    assert recipe.model == paper.model  # the K-center ViT-B: frames, tokens, hybrid frames, weights
    for key in ("num_frames", "sampling_rate", "crop_size", "train_jitter_scales", "mean", "std"):
        assert getattr(recipe.data, key) == getattr(paper.data, key), key
    d, t, e = recipe.data, recipe.train, recipe.eval  # VideoMAE's ViT-B K400 fine-tuning (the values' sources: there)
    assert (d.rand_augment, d.num_sample, d.re_prob, d.re_mode, d.re_count, d.color_jitter) == \
        ("rand-m7-n4-mstd0.5-inc1", 2, 0.25, "pixel", 1, False)
    assert (t.epochs, t.batch_size, t.micro_batch_size, t.lr, t.min_lr, t.warmup_epochs) == \
        (75, 384, 6, 5e-4 * 384 / 256, 1e-6 * 384 / 256, 5)
    assert (t.weight_decay, t.betas, t.layer_decay, t.label_smoothing, t.clip_grad) == (0.05, (0.9, 0.999), 0.75, 0.1, 0)
    assert (t.mixup, t.cutmix, t.mixup_prob, t.mixup_switch_prob, t.mixup_mode) == (0.8, 1.0, 1.0, 0.5, "batch")
    assert (t.model_ema, t.model_ema_decay, recipe.model.grad_checkpointing, t.compile) == (False, 0.9999, False, False)
    assert (e.num_clips, e.num_crops) == (5, 3)
    # and the paper's recipes have none of the toolbox on
    for name in ("kcenter_vit_kinetics", "kcenter_vit_ssv2", "kcenter_timesformer_kinetics",
                 "kcenter_timesformer_ssv2", "kcenter_motionformer_kinetics", "kcenter_motionformer_ssv2"):
        c = load_config(f"configs/{name}.yaml")
        assert (c.data.num_sample, c.data.re_prob, c.train.mixup, c.train.cutmix, c.train.layer_decay,
                c.train.model_ema, c.model.grad_checkpointing, c.train.compile) == \
            (1, 0.0, 0.0, 0.0, 1.0, False, False, False), name


@pytest.mark.parametrize("data,match", [
    ({"data": {"num_frame": 8}}, "data.num_frame"),  # typo in a key
    ({"train": {"lr": "fast"}}, "train.lr must be float"),
    ({"train": {"epochs": 1.5}}, "train.epochs must be int"),
    ({"data": {"random_flip": 1}}, "data.random_flip must be bool"),
    ({"data": {"mean": [0.5, 0.5]}}, "data.mean must have 3 items"),
    ({"optim": {"lr": 1}}, "unknown config section"),
    ({"data": {"dataset": "imagenet"}}, "'imagenet'"),
    ({"train": {"batch_size": 10, "micro_batch_size": 4}}, "not a multiple"),
    ({"model": {"num_tokens": 100}}, "model.num_tokens 100"),
    ({"data": {"num_frames": 16}}, r"model.num_frames \(32\) != data.num_frames \(16\)"),
    ({"data": {"train_jitter_scales": [320, 256]}}, "train_jitter_scales"),
    ({"data": {"train_jitter_scales": [200, 320]}}, r"crop_size \(224\) <= min"),
    ({"eval": {"ensemble": "mean"}}, r"eval.ensemble must be one of .*'mean'"),
    ({"eval": {"checkpoint": ""}}, "eval.checkpoint must be 'last', 'best' or a path"),
    ({"train": {"deterministic": "yes"}}, "train.deterministic must be bool"),
    ({"train": {"mixup": -0.2}}, r"train.mixup \(the alpha of Beta\(alpha, alpha\); 0 = off\) must be >= 0, got -0.2"),
    ({"train": {"cutmix": "on"}}, "train.cutmix must be float, got str 'on'"),
    ({"train": {"mixup_prob": 1.5}}, r"train.mixup_prob must be in \[0, 1\], got 1.5"),
    ({"train": {"mixup_switch_prob": -0.1}}, r"train.mixup_switch_prob must be in \[0, 1\], got -0.1"),
    ({"train": {"mixup_mode": "row"}}, r"train.mixup_mode must be one of \['batch', 'pair', 'elem'\], got 'row'"),
    ({"train": {"cutmix": 1.0, "batch_size": 4, "micro_batch_size": 1}}, "train.micro_batch_size 1 has no two to mix"),
    ({"data": {"re_prob": 2}}, r"data.re_prob must be in \[0, 1\], got 2"),
    ({"data": {"re_mode": "noise"}}, r"data.re_mode must be one of \['pixel', 'rand', 'const'\], got 'noise'"),
    ({"data": {"re_count": 0}}, "data.re_count must be > 0, got 0"),
    ({"data": {"re_area": [0.4, 0.1]}}, r"data.re_area must be 0 < min <= max <= 1 .*got \[0.4, 0.1\]"),
    ({"data": {"re_aspect": [0, 3]}}, r"data.re_aspect must be 0 < min <= max .*got \[0.0, 3.0\]"),
    ({"data": {"num_sample": 0}}, r"data.num_sample \(augmented views of each training video\) must be >= 1, got 0"),
    ({"data": {"num_sample": 1.5}}, "data.num_sample must be int, got float 1.5"),
])
def test_bad_configs_name_the_key_or_value(tmp_path, data, match):
    with pytest.raises((ValueError, TypeError), match=match):
        load_config(write(tmp_path, data))


@pytest.mark.parametrize("override,match", [
    ("train.layer_decay=0", r"train.layer_decay must be in \(0, 1\] \(1 = off\), got 0.0"),
    ("train.layer_decay=1.5", r"train.layer_decay must be in \(0, 1\] \(1 = off\), got 1.5"),
    ("train.model_ema=maybe", "train.model_ema must be bool, got str 'maybe'"),
    ("train.model_ema_decay=1", r"train.model_ema_decay must be in \[0, 1\), got 1.0"),
    ("train.model_ema_warmup=1", "train.model_ema_warmup must be bool"),
    ("eval.weights=average", r"eval.weights must be one of \['model', 'ema'\], got 'average'"),
])
def test_layer_decay_and_ema_settings_are_checked(tmp_path, override, match):
    cfg = load_config(write(tmp_path, {}))
    assert (cfg.train.layer_decay, cfg.train.model_ema, cfg.eval.weights) == (1.0, False, "model")  # off by default
    with pytest.raises((ValueError, TypeError), match=match):
        load_config(write(tmp_path, {}), [override])


def test_bad_overrides(tmp_path):
    path = write(tmp_path, {})
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(path, ["lr=1"])
    with pytest.raises(ValueError, match="train.lrr"):
        load_config(path, ["train.lrr=1"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))


def test_mixing_and_erasing_are_off_by_default_and_their_keys_load(tmp_path):
    from pipelines.batch_augment import BatchAugment
    for name in ("kcenter_vit_kinetics", "kcenter_vit_ssv2", "kcenter_timesformer_kinetics", "demo"):
        cfg = load_config(f"configs/{name}.yaml")
        assert (cfg.train.mixup, cfg.train.cutmix, cfg.data.re_prob) == (0.0, 0.0, 0.0)  # the paper's recipes
        assert cfg.data.num_sample == 1
        assert not BatchAugment.from_config(cfg).mixes
    # VideoMAE's fine-tuning flags, as overrides
    cfg = load_config(write(tmp_path, {}), ["train.mixup=0.8", "train.cutmix=1", "train.mixup_mode=pair",
                                            "train.mixup_switch_prob=0.3", "data.re_prob=0.25", "data.re_mode=rand",
                                            "data.re_count=2", "data.re_area=[0.05, 0.2]"])
    augment = BatchAugment.from_config(cfg)
    assert (augment.mixup, augment.cutmix, augment.mixup_mode, augment.mixup_switch_prob, augment.mixup_prob) == \
        (0.8, 1.0, "pair", 0.3, 1.0)
    assert (augment.re_prob, augment.re_mode, augment.re_count, augment.re_area, augment.re_aspect) == \
        (0.25, "rand", 2, (0.05, 0.2), (0.3, 1 / 0.3))
    assert (augment.seed, augment.num_classes, augment.label_smoothing) == (0, 400, 0.2)
    cfg.save(str(tmp_path / "resolved.yaml"))
    assert load_config(str(tmp_path / "resolved.yaml")) == cfg
