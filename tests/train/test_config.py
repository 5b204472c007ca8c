import pytest

from dinov3.train.config import (BUILTIN, ConfigError, backbone_kwargs, config_from_text, dump_config, load_config,
                                 resume_config, validate_config)
from dinov3.train.schedules import Schedule


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_builtin_recipes_load_and_build_kwargs(name):
    cfg = load_config(name)
    kw = backbone_kwargs(cfg)
    size = cfg["crops"]["global_crops_size"]
    assert kw["img_size"] == (max(size) if isinstance(size, list) else size)  # the largest of a high-res stage
    assert kw["patch_size"] == cfg["student"]["patch_size"]
    assert {"embed_dim", "depth", "num_heads"} <= set(kw)


def test_overrides_are_dotted_and_yaml_parsed(tmp_path):
    cfg = load_config("tiny", ["schedules.lr.peak=2e-3", "ibot.mask_ratio_min_max=[0.2, 0.4]", "gram.ckpt=null",
                               "train.parallel=fsdp"])
    assert cfg["schedules"]["lr"]["peak"] == 2e-3
    assert cfg["ibot"]["mask_ratio_min_max"] == [0.2, 0.4]
    assert cfg["gram"]["ckpt"] is None
    path = tmp_path / "c.yaml"
    path.write_text("base: tiny\ntrain:\n  batch_size_per_gpu: 3\n")
    cfg = load_config(str(path), ["train.seed=7"])
    assert cfg["train"]["batch_size_per_gpu"] == 3 and cfg["train"]["seed"] == 7
    assert cfg["student"]["arch"] == "vit_tiny"


@pytest.mark.parametrize("bad", ["crops.global_crops_size=30", "ibot.mask_ratio_min_max=[0.5, 0.1]",
                                 "train.parallel=zero3", "student.arch=vit_giant", "train.centering=none",
                                 "schedules.lr.kind=step", "noequals"])
def test_bad_config_raises(bad):
    with pytest.raises(ValueError):
        load_config("tiny", [bad])


def test_unknown_config_name_raises():
    with pytest.raises(ValueError, match="neither a built-in"):
        load_config("vit_none_such")


def test_schedules():
    const = Schedule(start=0.0, peak=1.0, end=1.0, warmup_iters=4, total_iters=10)
    assert [const(i) for i in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    cos = Schedule(start=0.0, peak=1.0, end=0.1, warmup_iters=2, total_iters=12, kind="cosine")
    assert cos(2) == pytest.approx(1.0)
    assert cos(7) == pytest.approx(0.55)  # half way through the cosine
    assert cos(12) == pytest.approx(0.1) and cos(100) == pytest.approx(0.1)
    vals = [cos(i) for i in range(2, 13)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


# ---------------------------------------------------------------------------------------------- strictness
@pytest.mark.parametrize("bad,message", [
    ("train.foo=1", "unknown key 'train.foo' in section 'train'"),
    ("train.batch_size=abc", "did you mean 'train.batch_size_per_gpu'?"),
    ("iterations=10", "did you mean 'train.iterations'?"),
    ("train.batch_size_per_gpu=abc", "train.batch_size_per_gpu: expected an integer, got 'abc'"),
    ("train.batch_size_per_gpu=2.5", "train.batch_size_per_gpu: expected an integer, got 2.5"),
    ("train.compile=3", "train.compile: expected true or false, got 3"),
    ("schedules.lr.peak=fast", "schedules.lr.peak: expected a number, got 'fast'"),
    ("schedules.lr.peek=1e-3", "did you mean 'schedules.lr.peak'?"),
    ("crops.global_crops_scale=[0.4]", "crops.global_crops_scale: expected a list of 2 numbers"),
    ("gram.max_updates=many", "gram.max_updates: expected an integer or null"),
    ("student.model_kwargs.foo=1", "unknown key 'student.model_kwargs.foo'"),
    ("student.model_kwargs.qkv_bias=maybe", "student.model_kwargs.qkv_bias: expected true or false"),
    ("train.seed.deep=1", "train.seed is a value, not a section"),
    ("train.batch_size_per_gpu=1", "KoLeo"),
    ("train.autocast_dtype=fp16", "fp16 autocast needs loss scaling"),
    ("train.kernel_backend=fast", "expected one of 'auto', 'reference', 'triton', 'cuda'"),
    ("crops.local_crops_scale=[0.5, 0.1]", "0 < min <= max <= 1"),
    ("schedules.momentum.peak=1.5", "schedules.momentum.peak=1.5: must be in [0, 1]"),
    ("checkpointing.max_to_keep=-1", "0 keeps every checkpoint"),
    ("dino.koleo_topk=17", "[1, 16]"),
    ("crops.blur_probabilities=[0, 1.5, 0]", "3 probabilities in [0, 1]"),
    ("crops.blur_probabilities=[0, 0.5]", "crops.blur_probabilities: expected a list of 3 numbers"),
    ("crops.color_jitter_hue=0.7", "crops.color_jitter_hue=0.7: must be in [0, 0.5]"),
    ("crops.grayscale_probability=-0.1", "must be in [0, 1]"),
    ("crops.blur_sigma=[0, 2]", "0 < min <= max"),
    ("gram.teacher_momentum=1.5", "gram.teacher_momentum=1.5: must be in [0, 1] or null"),
])
def test_strict_config_names_the_key_and_the_expected_type(bad, message):
    with pytest.raises(ConfigError) as exc:
        load_config("tiny", [bad])
    assert message in str(exc.value)


def test_strict_config_accepts_what_is_valid():
    cfg = load_config("tiny", ["train.batch_size_per_gpu=1", "dino.koleo_loss_weight=0",  # no KoLeo: one row is fine
                               "schedules.lr.peak=1", "gram.max_updates=null", "student.model_kwargs.in_chans=3",
                               "student.model_kwargs.pos_embed_rope_jitter_coords=1.2"])
    assert cfg["schedules"]["lr"]["peak"] == 1 and cfg["gram"]["max_updates"] is None


def test_yaml_typo_and_syntax_error_are_located(tmp_path):
    typo = tmp_path / "typo.yaml"
    typo.write_text("base: tiny\ntrain:\n  iteratoins: 5\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.iteratoins'.*did you mean 'train.iterations'"):
        load_config(str(typo))
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  seed: 1\n   iterations: 5\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: invalid YAML at line 3"):
        load_config(str(broken))


# ---------------------------------------------------------------------------------------------- resume
def test_resume_config_is_the_checkpoints_and_classifies_changes():
    saved = config_from_text(dump_config(load_config("tiny", ["schedules.lr.peak=3e-3", "train.seed=3"])))
    cfg, changes = resume_config(saved, [], iteration=10)
    assert cfg == saved and changes == {}  # nothing repeated: the checkpoint's values stay
    cfg, changes = resume_config(saved, ["train.log_every=5", "train.iterations=400", "train.num_workers=2"],
                                 iteration=10)
    assert changes == {"train.log_every": (1, 5), "train.iterations": (200, 400), "train.num_workers": (0, 2)}
    with pytest.raises(ConfigError) as exc:
        resume_config(saved, ["train.batch_size_per_gpu=8", "schedules.lr.peak=1e-3", "train.iterations=100"],
                      iteration=10)
    text = str(exc.value)
    for key in ("train.batch_size_per_gpu", "schedules.lr.peak", "train.iterations"):  # shorter: not harmless
        assert key in text
    cfg, changes = resume_config(saved, ["train.batch_size_per_gpu=8"], iteration=10, allow_change=True)
    assert cfg["train"]["batch_size_per_gpu"] == 8
    with pytest.raises(ConfigError, match="below the checkpoint's iteration 10"):
        resume_config(saved, ["train.iterations=5"], iteration=10, allow_change=True)


def test_config_of_an_early_checkpoint_still_loads():
    text = dump_config(load_config("tiny")) + "teacher: {}\n"  # a section early versions wrote
    validate_config(config_from_text(text))


# ---------------------------------------------------------------------------------------------- the official recipe
# Values read from the official configs (facebookresearch/dinov3, dinov3/configs/): the ViT recipes mirror
# train/dinov3_vit7b16_pretrain.yaml (OFFICIAL_EPOCH_LENGTH 1000, freeze_last_layer_epochs 5, clip_grad 30,
# horizontal_flips false, untie_global_and_local_cls_norm true, lr 5e-5, momentum 0.994) and, for the Gram phase,
# train/dinov3_vit7b16_gram_anchor.yaml (lr 3e-5, momentum 0.999); the defaults mirror ssl_default_config.yaml
# (OFFICIAL_EPOCH_LENGTH 1250, freeze_last_layer_epochs 1).
@pytest.mark.parametrize("name", ["vits16", "vitb16", "vitl16"])
def test_vit_recipes_follow_the_7b_pretrain_and_gram_anchor_configs(name):
    cfg = load_config(name)
    assert cfg["optim"]["clip_grad"] == 30.0
    assert cfg["crops"]["horizontal_flips"] is False
    assert cfg["student"]["model_kwargs"]["untie_global_and_local_cls_norm"] is True
    assert backbone_kwargs(cfg)["untie_global_and_local_cls_norm"] is True
    assert cfg["optim"]["freeze_last_layer_iters"] == 5 * 1000
    assert cfg["gram"]["teacher_momentum"] == 0.999
    assert cfg["gram"]["lr_multiplier"] == pytest.approx(3e-5 / 5e-5)
    assert cfg["gram"]["use_loss"] and cfg["crops"]["gram_teacher_no_distortions"]


def test_defaults_follow_the_official_augmentation_and_default_config():
    cfg = load_config(None)
    c = cfg["crops"]
    # GaussianBlur(p) hands 1 - p to RandomApply: p=1.0 on global crop 1, 0.1 on global crop 2, 0.5 on local crops.
    assert c["blur_probabilities"] == [1 - 1.0, 1 - 0.1, 1 - 0.5]
    assert c["blur_sigma"] == [0.1, 2.0]
    assert (c["color_jitter_probability"], c["color_jitter_brightness"], c["color_jitter_contrast"],
            c["color_jitter_saturation"], c["color_jitter_hue"]) == (0.8, 0.4, 0.4, 0.2, 0.1)
    assert c["grayscale_probability"] == 0.2 and c["solarize_probability"] == 0.2
    assert cfg["optim"]["freeze_last_layer_iters"] == 1 * 1250
    assert cfg["optim"]["clip_grad"] == 3.0 and c["horizontal_flips"] is True


def test_photometric_augmentations_can_all_be_turned_off():
    cfg = load_config("tiny", ["crops.color_jitter_probability=0", "crops.grayscale_probability=0",
                               "crops.blur_probabilities=[0, 0, 0]", "crops.solarize_probability=0"])
    assert cfg["crops"]["blur_probabilities"] == [0, 0, 0]
