"""Every registered method through the same contract (STYLE practice 10). No per-method branches here:
method-specific numbers come from the MethodSpec."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from conftest import tiny_backbone

from adaptune.artifacts import adapter_state_dict, load_adapter_state, load_safetensors, save_safetensors
from adaptune.batch import Batch, Loss
from adaptune.methods import get_method, list_methods
from adaptune.methods.common import adapter_modules, own_state_keys
from adaptune.recipe import method_config

METHODS = list_methods()


def injected(name: str, seed: int = 0):
    """A tiny backbone with method ``name`` injected the way the engine does it (`loading.inject_method`)."""
    from adaptune.loading import inject_method

    torch.manual_seed(seed)
    model = tiny_backbone()
    spec = get_method(name)
    inject_method(model, _Recipe(name, method_config(name)))
    return model, spec


class _Recipe:
    """The two recipe fields `inject_method` reads."""

    def __init__(self, name, cfg):
        self.method_name, self.method = name, cfg


def declared_backbone(model, name) -> set[str]:
    spec = get_method(name)
    return set(spec.trainable_backbone(model, method_config(name))) if spec.trainable_backbone else set()


def perturb(model: torch.nn.Module, seed: int = 1) -> None:
    """Move every trainable tensor away from its (often zero) init so parity checks are not trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_registry_has_the_core_methods():
    assert {"linear", "full", "adapter", "lora", "mosa"} <= set(METHODS)


@pytest.mark.parametrize("name", METHODS)
def test_default_config_is_valid_and_injects(name):
    model, spec = injected(name)
    assert spec.summary and spec.config_cls is type(method_config(name))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


@pytest.mark.parametrize("name", METHODS)
def test_only_declared_parameters_train(name):
    """Everything that trains is the head, a module the method created, or a backbone part it declares."""
    model, spec = injected(name)
    head = {id(p) for p in model.get_classifier().parameters()}
    declared = declared_backbone(model, name)
    owned = set()
    for path, module in adapter_modules(model):
        for key in own_state_keys(module):
            owned.add(f"{path}.{key}" if path else key)
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert id(p) in head or pname in owned or pname in declared, f"{pname} trains but nothing declares it"
        else:
            assert pname not in declared, f"{pname} is declared trainable but does not require grad"
    assert owned or declared or name == "linear", "the method created nothing and declared nothing"


@pytest.mark.parametrize("name", METHODS)
def test_identity_at_init(name, images):
    spec = get_method(name)
    if not spec.identity_at_init:
        pytest.skip(f"{name} declares identity_at_init=False")
    torch.manual_seed(0)
    plain = tiny_backbone().eval()
    model, _ = injected(name)
    model.load_state_dict(plain.state_dict(), strict=False)
    model.eval()
    torch.testing.assert_close(model(images), plain(images), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", METHODS)
def test_one_step_changes_only_trainable_parameters(name, images):
    model, spec = injected(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    batch = Batch(images, torch.tensor([0, 1, 2]))
    loss_fn = torch.nn.functional.cross_entropy
    if spec.training_loss is not None:
        out = spec.training_loss(model, method_config(name), batch, loss_fn)
    else:
        logits = model(images)
        out = Loss(loss_fn(logits, batch.targets), logits, {"ce": loss_fn(logits, batch.targets)})
    assert isinstance(out, Loss) and out.logits.shape == (3, 5) and torch.isfinite(out.total)
    assert out.terms and torch.allclose(sum(out.terms.values()), out.total), "the terms must add up to the total"
    out.total.backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    params = dict(model.named_parameters())
    assert changed & trainable, "nothing trainable changed"
    frozen_changed = {k for k in changed if k in params and k not in trainable}
    assert not frozen_changed


@pytest.mark.parametrize("name", METHODS)
def test_consolidate_and_fold_parity(name, images):
    model, spec = injected(name)
    perturb(model)
    model.eval()
    expected = model(images)
    deploy = copy.deepcopy(model)
    if spec.consolidate is not None:
        spec.consolidate(deploy)
        deploy.eval()
        torch.testing.assert_close(deploy(images), expected, atol=spec.merge_atol, rtol=1e-5)
    if spec.fold is None:
        return
    spec.fold(deploy)
    deploy.eval()
    torch.testing.assert_close(deploy(images), expected, atol=spec.merge_atol, rtol=1e-5)
    plain = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=5).eval()
    assert list(deploy.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(deploy.state_dict(), strict=True)
    torch.testing.assert_close(plain(images), expected, atol=spec.merge_atol, rtol=1e-5)


@pytest.mark.parametrize("name", METHODS)
def test_adapter_state_round_trip(name, images, tmp_path):
    model, spec = injected(name, seed=0)
    perturb(model)
    model.eval()
    expected = model(images)
    save_safetensors(adapter_state_dict(model), tmp_path / "a.safetensors", {"format_version": 2})
    state, manifest = load_safetensors(tmp_path / "a.safetensors")
    assert manifest == {"format_version": 2}
    torch.manual_seed(123)  # a different init everywhere the state does not reach
    fresh = tiny_backbone()
    torch.manual_seed(0)  # ...but the same frozen backbone weights
    fresh.load_state_dict(tiny_backbone().state_dict())
    from adaptune.loading import inject_method

    inject_method(fresh, _Recipe(name, method_config(name)))
    load_adapter_state(fresh, state, tmp_path / "a.safetensors")
    fresh.eval()
    torch.testing.assert_close(fresh(images), expected, atol=1e-6, rtol=0)
