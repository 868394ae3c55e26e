"""The speed switches change speed, not results: torch.compile, channels-last, gradient checkpointing."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_recipe

from adaptune.artifacts import load_safetensors
from adaptune.train import train


def last_weights(run):
    tensors, _ = load_safetensors(run.run_dir / "checkpoints" / "last" / "adapter_model.safetensors")
    return tensors


def close(a, b, atol):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-4, msg=key)


@pytest.mark.slow
def test_a_compiled_run_matches_the_eager_one(tmp_path):
    sgd = {"epochs": 1, "lr": 0.1, "optimizer": "sgd"}  # SGD: AdamW's first steps turn 1e-9 gradient noise into lr
    eager = train(tiny_recipe("lora", train=sgd), out_dir=tmp_path / "eager")
    compiled = train(tiny_recipe("lora", train={**sgd, "compile": True}), out_dir=tmp_path / "compiled")
    close(last_weights(eager), last_weights(compiled), atol=1e-5)  # compiled kernels sum in another order


@pytest.mark.slow
def test_a_compiled_step_matches_the_eager_step():
    from conftest import tiny_backbone

    from adaptune.loading import inject_method

    class R:
        method_name = "lora"
        from adaptune.recipe import method_config

        method = method_config("lora")

    torch.manual_seed(0)
    model = tiny_backbone()
    inject_method(model, R())
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    grads = []
    for fn in (model, torch.compile(model)):
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(fn(x), y)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-6, rtol=1e-5)
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("switch", [{"train": {"channels_last": True}}, {"backbone": {"grad_checkpointing": True}}])
def test_channels_last_and_checkpointing_match(tmp_path, switch):
    base = {"epochs": 1, "lr": 0.1, "optimizer": "sgd"}  # AdamW's first steps turn 1e-9 gradient noise into lr
    plain = train(tiny_recipe("adapter", train=base), out_dir=tmp_path / "plain")
    sections = {k: dict(v) for k, v in switch.items()}
    sections["train"] = {**base, **sections.get("train", {})}
    switched = train(tiny_recipe("adapter", **sections), out_dir=tmp_path / "switched")
    close(last_weights(plain), last_weights(switched), atol=1e-6)
