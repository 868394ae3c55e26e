"""Training augmentation (timm's crops, RandAugment, erasing, Mixup): deterministic per sample, the same with
workers, exactly resumable, evaluation centre-cropped, and the model's randomness untouched."""

from __future__ import annotations

import torch
from conftest import interrupted_and_resumed, last_weights, tiny_recipe

from adaptune.batch import InputSpec
from adaptune.data import build_eval_loader, build_loaders
from adaptune.data.pipeline import center_crop
from adaptune.data.sources.synthetic import SyntheticConfig
from adaptune.recipe import AugmentConfig, DataConfig
from adaptune.train import train

FULL = AugmentConfig(crop="random_resized", auto_augment="rand-m9-mstd0.5", re_prob=0.5, mixup=0.8, cutmix=1.0)
SPEC = InputSpec(shape=(3, 24, 24), mean=(0.5,) * 3, std=(0.5,) * 3)


def data(augment: AugmentConfig, **kw) -> DataConfig:
    return DataConfig(
        source="synthetic", options=SyntheticConfig(num_classes=4, train_per_class=8), augment=augment, **kw
    )


def epoch(cfg: DataConfig, e: int, start: int = 0, **kw):
    ld = build_loaders(cfg, spec=SPEC, batch_size=8, eval_batch_size=16, seed=3, **kw)
    ld.train_sampler.set_epoch(e)
    ld.train_sampler.set_start(start)
    return ld, [(b.inputs, b.targets) for b in ld.train]


def test_augmentations_are_deterministic_resumable_and_leave_rng_alone():
    cfg = data(FULL, hflip=True)
    torch.manual_seed(0)
    expected = torch.rand(2)
    torch.manual_seed(0)
    _, a = epoch(cfg, 1)
    assert torch.equal(torch.rand(2), expected), "augmenting does not draw from the model's generators"
    _, b = epoch(cfg, 1)
    _, tail = epoch(cfg, 1, start=2)
    _, other = epoch(cfg, 2)
    assert all(torch.equal(x, y) and torch.equal(s, t) for (x, s), (y, t) in zip(a, b, strict=True))
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a[2:], tail, strict=True)), "resume sees the same"
    assert not torch.equal(a[0][0], other[0][0]), "another epoch, other augmentations"
    _, parallel = epoch(data(FULL, hflip=True, workers=2), 1)
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a, parallel, strict=True)), "workers change nothing"


def test_mixup_gives_soft_targets_and_crops_the_model_size():
    ld, batches = epoch(data(FULL), 0)
    x, y = batches[0]
    assert x.shape == (8, 3, 24, 24) and y.shape == (8, 4)
    torch.testing.assert_close(y.sum(1), torch.ones(8))
    assert ld.train.dataset.size == (27, 27)  # stored at 24 / 0.875 for the crop


def test_evaluation_centre_crops_the_stored_images():
    cfg = data(AugmentConfig(crop="random", resize=30))
    plain = data(AugmentConfig(), img_size=None)
    spec30 = InputSpec(shape=(3, 30, 30), mean=(0.5,) * 3, std=(0.5,) * 3)
    stored = next(iter(build_eval_loader(plain, "test", spec=spec30, batch_size=64))).inputs
    cropped = next(iter(build_eval_loader(cfg, "test", spec=SPEC, batch_size=64))).inputs
    torch.testing.assert_close(cropped, center_crop(stored, (24, 24)))
    _, batches = epoch(cfg, 0)
    assert batches[0][0].shape == (8, 3, 24, 24) and batches[0][1].ndim == 1


def test_training_with_augmentation_resumes_exactly(tmp_path):
    augment = {"crop": "random_resized", "auto_augment": "rand-m7", "re_prob": 0.3, "mixup": 0.4}
    recipe = tiny_recipe("lora", data={"augment": augment, "hflip": True}, train={"epochs": 2})
    lines: list[str] = []
    straight = train(recipe, out_dir=tmp_path / "a", log=lines.append)
    assert not any(line.startswith("prefix cache: on") for line in lines)
    resumed = interrupted_and_resumed(recipe, tmp_path / "b", at_step=5)
    a, b = last_weights(straight.run_dir), last_weights(resumed.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
