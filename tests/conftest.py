from __future__ import annotations

import pytest
import torch


def tiny_backbone(num_classes: int = 5, model: str = "test_vit", **kwargs):
    """A frozen tiny timm model (random weights) through adaptune's own backbone factory."""
    from adaptune.backbone import create_backbone
    from adaptune.recipe import BackboneConfig

    if model == "test_vit":
        kwargs.setdefault("img_size", 32)
    kwargs.setdefault("head_init", "timm")  # a zero head would make every logit 0 and parity checks vacuous
    return create_backbone(BackboneConfig(model=model, **kwargs), num_classes)


def tiny_recipe(name: str = "linear", tmp_path=None, **sections):
    """A validated recipe on the synthetic built-in dataset and test_vit; sections override keys per section."""
    from adaptune.recipe import recipe_from_dict

    raw = {
        "name": "tiny",
        "backbone": {"model": "test_vit", "img_size": 32},
        "method": {"name": name},
        "data": {
            "source": "synthetic",
            "synthetic": {"num_classes": 4, "train_per_class": 8, "val_per_class": 4, "test_per_class": 4},
        },
        "train": {"epochs": 2, "batch_size": 8, "lr": 1e-3, "warmup_epochs": 0.5, "log_every": 1000},
        "output": {"dir": str(tmp_path / "run") if tmp_path is not None else None},
    }
    for key, values in sections.items():
        raw.setdefault(key, {}).update(values)
    return recipe_from_dict(raw)


def interrupted_and_resumed(recipe, out_dir, at_step: int):
    """Train ``recipe`` into ``out_dir``, Ctrl-C it (a real SIGINT) at step ``at_step``, resume it to the end; the
    resumed run's result."""
    import os
    import signal

    from adaptune.train import Interrupted, train

    def interrupt(step: int) -> None:
        if step == at_step:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        train(recipe, out_dir=out_dir, on_step=interrupt)
    return train(recipe, out_dir=out_dir, resume=True)


def last_weights(run_dir) -> dict[str, torch.Tensor]:
    """The tensors of a run's ``checkpoints/last/adapter_model.safetensors``."""
    from adaptune.artifacts import load_safetensors

    return load_safetensors(run_dir / "checkpoints" / "last" / "adapter_model.safetensors")[0]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
