"""Backbone families: every registered family's branch functions recombine to exactly its timm block's forward."""

from __future__ import annotations

import pytest
import timm
import torch

from adaptune.families import auto_block_classes, family_of, list_families

# One small model per family, and a batch for it. A family added without a model here fails
# `test_every_family_has_a_model`, so its branches cannot go unchecked.
MODELS = {
    "vit": lambda: timm.create_model("test_vit", pretrained=False, img_size=32, depth=1),
    "vit_respost": lambda: timm.create_model(
        "test_vit", pretrained=False, img_size=32, depth=1, block_fn=timm.models.vision_transformer.ResPostBlock
    ),
    "swin": lambda: timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        img_size=64,
        window_size=4,
        embed_dim=16,
        depths=(1, 1, 2, 1),
        num_heads=(1, 1, 2, 2),
    ),
    "convnext": lambda: timm.create_model("convnext_atto", pretrained=False),
    "efficientnet": lambda: timm.create_model("tf_efficientnet_lite0", pretrained=False),
    "resnet": lambda: timm.create_model("resnet10t", pretrained=False),
}
SIZE = {"vit": 32, "vit_respost": 32}


def test_every_family_has_a_model():
    assert {f.name for f in list_families()} == set(MODELS)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_family_blocks_are_found_and_branches_recombine(name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    blocks = [m for m in model.modules() if type(m) in auto_block_classes()]
    assert blocks and all(family_of(b).name == name for b in blocks)
    family = family_of(blocks[0])
    if not family.has_sub_blocks:
        return
    inputs: list[torch.Tensor] = []
    handle = blocks[0].register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    size = SIZE.get(name, 64)
    with torch.no_grad():
        model(torch.randn(2, 3, size, size))
        handle.remove()
        x = inputs[0]
        block = blocks[0]
        x1 = x + family.attn(block, x, (), {})
        out = x1 + family.mlp(block, x1)
        torch.testing.assert_close(out, block(x), rtol=0, atol=1e-6)
        if family.pre_norm:
            torch.testing.assert_close(family.mlp(block, x1), family.mlp_ffn(block, family.mlp_norm(block, x1)))
            assert family.norm2 and getattr(block, family.norm2) is not None
