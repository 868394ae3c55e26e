"""benchmarks/mosa_reference.py: its N-copy reference, fed adaptune's expert draws, is adaptune's MoSA step for step
(the equivalence tests/test_mosa.py proves on a two-layer net, here on a whole injected model with the two-pass loss),
and its reference-style masks are the partition of methods-core.md §2.4."""

from __future__ import annotations

import copy
import importlib.util
import sys
from collections import deque
from pathlib import Path

import pytest
import timm.optim
import torch
import torch.nn.functional as F
from conftest import tiny_backbone

from adaptune.batch import Batch
from adaptune.methods.mosa_split import split_modules
from adaptune.methods.registry import get_method
from adaptune.recipe import method_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("mosa_reference", REPO / "benchmarks" / "mosa_reference.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["mosa_reference"] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def sgd(model):
    groups = timm.optim.param_groups_weight_decay(model, 0.01)  # no decay on biases, as the engine's AdamW
    return torch.optim.SGD(groups, lr=0.5, momentum=0.9)


def test_reference_fed_adaptunes_draws_trains_into_adaptunes_model(bench):
    # SGD with momentum and weight decay: exact once the reference keeps zero gradients (torch 1.11's zero_grad), as
    # an expert's momentum starts at its first draw in both formulations
    cfg = method_config("mosa", dropout=0.0, seed=3, scale=1.0)
    torch.manual_seed(0)
    ours = tiny_backbone()
    spec = get_method("mosa")
    spec.inject(ours, cfg)
    ours.get_classifier().requires_grad_(True)
    ref = copy.deepcopy(ours)
    ref_modules = bench.to_reference(ref, draw=lambda: 0)
    splits = [m for _, m in split_modules(ours)]
    assert len(splits) == len(ref_modules) == 6
    queues = [deque() for _ in ref_modules]
    for m, q in zip(ref_modules, queues):
        m.draw = q.popleft  # each copy module replays its split module's draws, pass 1 then pass 2
    opt_ours, opt_ref = sgd(ours), sgd(ref)
    data = torch.Generator().manual_seed(5)
    ours.train()
    ref.train()
    kls = []
    for _ in range(4):
        x, y = torch.randn(6, 3, 32, 32, generator=data), torch.randint(5, (6,), generator=data)
        out = spec.training_loss(ours, cfg, Batch(x, y), F.cross_entropy)  # one doubled-batch forward
        for m, q in zip(splits, queues):
            q.extend(m.sampler.last_draw)
        out.total.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        total, z1, terms = bench.reference_step(ref, ref_modules, opt_ref, x, y, cfg.consistency_weight)  # two passes
        torch.testing.assert_close(z1, out.logits.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(total, out.total.detach(), atol=1e-5, rtol=1e-5)
        assert not any(queues)
        kls.append(terms["kl"])
    drawn = {k for m in ref_modules for k in m.draws}
    assert len(drawn) == 4 and splits[0].weight.abs().sum() > 0 and max(kls) > 1e-4  # the passes differ once trained
    for split, copies in zip(splits, ref_modules):
        assert copies.off_mask() == 0.0  # the dense copies never leave their masks: expert k is W ⊙ M_k
        for k, expert in enumerate(copies.experts):
            torch.testing.assert_close(expert.weight, split.weight * (split.owner == k), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(expert.bias, split.bias[k], atol=1e-5, rtol=1e-5)
    ours.eval()
    ref.eval()
    x = torch.randn(4, 3, 32, 32, generator=data)
    torch.testing.assert_close(ref(x), ours(x), atol=1e-5, rtol=1e-5)  # the "add" merge is adaptune's W / N


@pytest.mark.parametrize(("shape", "n"), [((112, 32), 4), ((7, 5), 3), ((13,), 2)])
def test_kthvalue_partition_is_exact_with_the_reference_chunk_sizes(bench, shape, n):
    masks = bench.kthvalue_partition(shape, n, torch.Generator().manual_seed(n))
    numel = masks[0].numel()
    assert masks.shape == (n, *shape) and torch.equal(masks.sum(0), torch.ones(shape, dtype=torch.long))
    assert masks.flatten(1).sum(1).tolist() == [(i + 1) * numel // n - i * numel // n for i in range(n)]


def test_to_reference_covers_only_what_the_released_up_split_is(bench):
    torch.manual_seed(0)
    model = tiny_backbone()
    get_method("mosa").inject(model, method_config("mosa", share="up"))
    with pytest.raises(ValueError, match=r"blocks.0.adapter.down: the reference variant covers split `up` Linears"):
        bench.to_reference(model, draw=lambda: 0)
    model = tiny_backbone()
    get_method("mosa").inject(model, method_config("mosa", init="bert"))
    with pytest.raises(ValueError, match=r"blocks.0.adapter.up: the reference's copies start from the up init"):
        bench.to_reference(model, draw=lambda: 0)
    model = tiny_backbone()
    get_method("mosa").inject(model, method_config("mosa"))
    modules = bench.to_reference(model, draw=lambda: 0, partition="independent")
    assert all(m.masks.sum(0).eq(1).all() for m in modules)
