"""Trainable parameters of each method's defaults on ViT-B/16, counted on the meta device (no weights), against the
counts computed in the specs (methods-others §7.12 / §10.5, methods-core §2.10; head excluded)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from adaptune.cli import app
from adaptune.loading import count_method_parameters
from adaptune.methods import list_methods

VIT_B = "vit_base_patch16_224"
# method -> (trainable parameters of the defaults without the head, where the number comes from)
EXPECTED = {
    "linear": (0, "nothing but the head"),
    "full": (85_798_656, "ViT-B/16 without its head (spec 8.1: 85.8M)"),
    "adapter": (156_768, "spec 7.12: bottleneck 8 with biases, one per block"),
    "adapter_plus": (156_768 + 12 * 768, "adapter + a per-channel scale per block"),
    "lora": (294_912, "spec 7.12: r = 8 on q and v (= NOAH's fused qkv count)"),
    "mosa_lora": (294_912, "LoRA r = 8 on q, v: B split into 4 experts, no bias"),
    "mosa": (350_400, "methods-core 2.10: 29,200 per block during training (private up bias per expert)"),
    "adapterx": (
        167_744,
        "methods-core 3.5: 12 x (norm2 1,536 + prompt γ, β 1,536 + router 64 x 16) + CLS 768 + 28 shared experts of "
        "2 x 64 x 32 + 96 + embeddings 28 x 16 (0.196% of ViT-B/16; paper: 0.20%)",
    ),
    "adaptformerx": (167_744, "adapterx with AdaptFormer experts: same structure"),
    "fact_tt": (21_504, "spec 7.7/10.5: FacT-TT r = 8, 1536r + 144r²"),
    "fact_tk": (86_528, "spec 7.7/10.5: FacT-TK r = 32, 1536r + 144r + r³"),
    "convpass": (327_552, "spec 7.9/10.5: dim 8, 24 bypasses of 13,648"),
    "compacter": (62_272, "spec 3.4: 24 Houlsby adapters 768 -> 96 -> 768, n 4, k 1: k(in+out)+out per PHM + 4³ rule"),
    "norm_tuning": (38_400, "LN-tune: 25 LayerNorms (2 per block + final) of 2 x 768"),
    "resadapter": (62_976, "spec 2(b): LoRA r 16 on patch_embed.proj (12,288 + 12,288) + norm_tuning's 38,400"),
    "vpt": (92_160, "spec 7.4/10.5: VPT-deep N = 10, 12 · N · 768"),
    "vpt_shallow": (76_800, "spec 7.4/10.5: VPT-shallow N = 100, N · 768"),
    "bitfit": (102_912, "spec 7.5/10.5: biases of qkv, proj, fc1, fc2, norm1, norm2 x 12 + patch embed + final norm"),
    "ssf": (205_824, "spec 7.6/10.5: γ, β after LN1/qkv/proj/LN2/fc1/fc2 x 12 + patch embed + final norm"),
    "repadapter": (239_808, "spec 7.8/10.5: dim 8, groups 2, with biases: 24 · (6,152 + 3,840)"),
}


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_default_parameter_counts_on_vit_b(method):
    assert count_method_parameters(VIT_B, method)["method"] == EXPECTED[method][0], EXPECTED[method][1]


def test_every_method_has_an_expected_count():
    assert set(list_methods()) <= set(EXPECTED), "add the new method's spec count to EXPECTED"


def test_methods_cli_prints_counts():
    result = CliRunner().invoke(app, ["methods", "--backbone", VIT_B])
    assert result.exit_code == 0, result.output
    assert "294,912" in result.stdout and "156,768" in result.stdout
