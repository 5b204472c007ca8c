"""load_pretrained: official-layout files (.pth raw or nested, .safetensors), strict round trips, errors."""

import pytest
import torch

from dinov3.models import CheckpointMismatchError, load_pretrained, vit_small
from dinov3.models.checkpoint import extract_backbone_state_dict


def make(**kw):
    base = dict(embed_dim=32, depth=2, num_heads=2, patch_size=8, attn_backend="reference")
    base.update(kw)
    return vit_small(**base)


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    m = make().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m


def _same_outputs(a, b):
    x = torch.randn(2, 3, 16, 24)
    with torch.no_grad():
        oa, ob = a.forward_features(x), b.forward_features(x)
    for k in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens", "x_prenorm"):
        torch.testing.assert_close(ob[k], oa[k], rtol=0, atol=0)


@pytest.mark.parametrize("wrap", ["raw", "teacher_backbone", "model", "state_dict_module", "ssl_model"])
def test_pth_round_trip(tmp_path, source, wrap):
    sd = source.state_dict()
    if wrap == "teacher_backbone":
        # a training checkpoint: teacher with backbone and head entries
        obj = {"teacher": {**{f"backbone.{k}": v for k, v in sd.items()}, "dino_head.mlp.0.weight": torch.ones(2)},
               "iteration": 7}
    elif wrap == "ssl_model":
        # the whole SSL arch: student and teacher backbones (student perturbed: must not be picked), compiled
        obj = {"model": {**{f"student.backbone._orig_mod.{k}": v + 1 for k, v in sd.items()},
                         **{f"teacher.backbone._orig_mod.{k}": v for k, v in sd.items()},
                         "teacher.dino_head.last_layer.weight": torch.ones(3)}, "optimizer": {}}
    elif wrap == "model":
        obj = {"model": sd}
    elif wrap == "state_dict_module":
        obj = {"state_dict": {f"module.{k}": v for k, v in sd.items()}}
    else:
        obj = sd
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    dst = load_pretrained(make().eval(), path)
    assert set(dst.state_dict()) == set(sd)
    for k, v in sd.items():
        assert torch.equal(dst.state_dict()[k], v), k
    _same_outputs(source, dst)


def test_safetensors_round_trip(tmp_path, source):
    from safetensors.torch import save_file

    path = tmp_path / "ckpt.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    dst = load_pretrained(make().eval(), path)
    _same_outputs(source, dst)


def test_meta_model_is_materialised(tmp_path, source):
    path = tmp_path / "ckpt.pth"
    torch.save(source.state_dict(), path)
    dst = load_pretrained(make(device="meta"), path).eval()
    assert not any(t.is_meta for t in list(dst.parameters()) + list(dst.buffers()))
    assert dst.rope_embed.periods.dtype == torch.float32
    _same_outputs(source, dst)


def test_official_key_names_load_strictly_into_torch_module(source):
    # load_state_dict(strict=True) is what the official hub code does with released files
    dst = make()
    dst.load_state_dict(source.state_dict(), strict=True)
    assert "blocks.1.attn.qkv.bias_mask" in dst.state_dict() and "rope_embed.periods" in dst.state_dict()


def test_another_size_gives_clear_error(source):
    other = make(embed_dim=64, num_heads=4)
    with pytest.raises(CheckpointMismatchError) as info:
        load_pretrained(other, source.state_dict())
    msg = str(info.value)
    assert "mis-shaped" in msg and "cls_token: checkpoint (1, 1, 32) vs model (1, 1, 64)" in msg
    assert "another size" in msg


def test_missing_and_unexpected_keys_listed(source):
    sd = dict(source.state_dict())
    del sd["blocks.1.ls2.gamma"]
    sd["blocks.2.norm1.weight"] = torch.ones(32)
    with pytest.raises(CheckpointMismatchError) as info:
        load_pretrained(make(), sd)
    msg = str(info.value)
    assert "missing (1): blocks.1.ls2.gamma" in msg
    assert "unexpected (1): blocks.2.norm1.weight" in msg


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_pretrained(make(), tmp_path / "nope.pth")
    path = tmp_path / "list.pth"
    torch.save([torch.ones(1)], path)
    with pytest.raises(TypeError):
        load_pretrained(make(), path)
    path = tmp_path / "empty.pth"
    torch.save({"optimizer": {"lr": 1.0}}, path)
    with pytest.raises(CheckpointMismatchError, match="no tensors"):
        load_pretrained(make(), path)


def test_extract_does_not_strip_partial_prefixes():
    sd = {"model.x": torch.ones(1), "y": torch.ones(1)}
    assert set(extract_backbone_state_dict(sd)) == {"model.x", "y"}


def test_untied_norm_hint_and_flags():
    from dinov3.models.checkpoint import untie_flags

    sat = make(untie_global_and_local_cls_norm=True).state_dict()
    assert untie_flags(sat) == {"untie_global_and_local_cls_norm": True, "untie_cls_and_patch_norms": False}
    with pytest.raises(CheckpointMismatchError, match="untie_global_and_local_cls_norm=True"):
        load_pretrained(make(), sat)
    with pytest.raises(CheckpointMismatchError, match="untie_cls_and_patch_norms=False"):
        load_pretrained(make(untie_cls_and_patch_norms=True), make().state_dict())


def test_read_backbone_folders_and_metadata(tmp_path, source):
    import json

    from safetensors.torch import save_file

    from dinov3.models.checkpoint import MODEL_KWARGS_METADATA, WeightsFileError, read_backbone

    with pytest.raises(WeightsFileError, match="is a folder; give a weights file"):
        read_backbone(tmp_path)
    (tmp_path / "m.onnx").write_bytes(b"onnx")
    with pytest.raises(WeightsFileError, match="an ONNX graph runs in an ONNX runtime"):
        read_backbone(tmp_path / "m.onnx")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(WeightsFileError, match="describes a 'vit' model, not a DINOv3 ViT"):
        read_backbone(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "dinov3_vit"}))
    with pytest.raises(WeightsFileError, match="no model.safetensors beside its config.json"):
        read_backbone(tmp_path)
    path = tmp_path / "w.safetensors"
    tensors = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(tensors, str(path), metadata={MODEL_KWARGS_METADATA: json.dumps({"embed_dim": 32, "bogus": 1})})
    with pytest.raises(WeightsFileError, match="metadata of .*: unknown DinoVisionTransformer argument.s. bogus"):
        read_backbone(path)
    save_file(tensors, str(path), metadata={MODEL_KWARGS_METADATA: "{not json"})
    with pytest.raises(WeightsFileError, match="metadata is not valid JSON"):
        read_backbone(path)
