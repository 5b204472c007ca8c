import pytest

from dinov3.train.config import BUILTIN, backbone_kwargs, load_config
from dinov3.train.schedules import Schedule


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_builtin_recipes_load_and_build_kwargs(name):
    cfg = load_config(name)
    kw = backbone_kwargs(cfg)
    assert kw["img_size"] == cfg["crops"]["global_crops_size"]
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
