"""The data layer: built-in datasets, VTAB-1k list files, image folders, deterministic sampling, normalisation."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adaptune import data
from adaptune.batch import InputSpec
from adaptune.data import DatasetInfo, EpochSampler, build_eval_loader, build_loaders, describe
from adaptune.data.sources.builtin import BuiltinConfig
from adaptune.data.sources.folder import FolderConfig
from adaptune.data.sources.synthetic import SyntheticConfig, synthetic_split
from adaptune.data.sources.vtab import VTAB_CLASSES, VtabConfig
from adaptune.errors import DataError
from adaptune.recipe import DataConfig

REPO = Path(__file__).resolve().parents[1]
FASHION_SRC = Path("/usr/share/datasets/fashion-mnist")
FASHION_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def synthetic(**kw: object) -> DataConfig:
    syn = {k: kw.pop(k) for k in list(kw) if k in SyntheticConfig.__dataclass_fields__}
    syn_cfg = SyntheticConfig(**syn)  # type: ignore[arg-type]
    return DataConfig(source="synthetic", options=syn_cfg, **kw)  # type: ignore[arg-type]


def fashion(**kw: object) -> DataConfig:
    return DataConfig(source="builtin", options=BuiltinConfig(), **kw)  # type: ignore[arg-type]


def spec(size: int, mean=HALF[0], std=HALF[1], channels: int = 3) -> InputSpec:
    return InputSpec(shape=(channels, size, size), mean=tuple(mean), std=tuple(std))


def loaders(cfg: DataConfig, img_size: int = 16, batch_size: int = 8, seed: int = 0, **kw: object) -> data.Loaders:
    mean_std = data.normalization(cfg.normalize, *HALF)  # the "model" here normalises with 0.5 / 0.5
    return build_loaders(
        cfg, spec=spec(img_size, *mean_std), batch_size=batch_size, eval_batch_size=16, seed=seed, **kw
    )  # type: ignore[arg-type]


def pairs(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) of every batch."""
    return [(b.inputs, b.targets) for b in loader]


def first(loader) -> tuple[torch.Tensor, torch.Tensor]:
    return pairs(loader)[0]


def epoch_batches(ld: data.Loaders, epoch: int, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    ld.train_sampler.set_epoch(epoch)
    ld.train_sampler.set_start(start)
    return pairs(ld.train)


# ----------------------------------------------------------------------------------------------------------------
# fashion-mnist-1k


def test_fashion_describe_sizes_names():
    info = describe(fashion())
    assert info == DatasetInfo(10, FASHION_NAMES, {"train": 800, "val": 200, "test": 2000})
    assert describe(fashion(train_split="trainval", val_split=None)).split_sizes == {"train": 1000, "test": 2000}


def test_fashion_balanced_and_loader_shapes():
    ld = loaders(fashion(), img_size=24, batch_size=100)
    assert ld.val is not None and ld.test is not None
    for loader, per_class in ((ld.train, 80), (ld.val, 20), (ld.test, 200)):
        labels = torch.cat([y for _, y in pairs(loader)])
        assert torch.bincount(labels, minlength=10).tolist() == [per_class] * 10
    images, labels = first(ld.train)
    assert images.shape == (100, 3, 24, 24) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])  # gray replicated
    assert -1.0 <= images.min() < 0 < images.max() <= 1.0  # 0.5 / 0.5 normalisation


def _build_script():
    spec = importlib.util.spec_from_file_location("build_fashion_mnist_1k", REPO / "scripts/build_fashion_mnist_1k.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.mark.skipif(
    not (FASHION_SRC / "t10k-labels-idx1-ubyte.gz").exists(), reason="dataset-fashion-mnist not installed"
)
def test_fashion_npz_matches_build_script():
    expected = _build_script().build(FASHION_SRC)
    with np.load(REPO / "adaptune/datasets/fashion_mnist_1k.npz") as shipped:
        assert sorted(shipped.files) == sorted(expected)
        for key, value in expected.items():
            np.testing.assert_array_equal(shipped[key], value, err_msg=key)
            assert shipped[key].dtype == value.dtype, key
    assert not set(expected["train_source_index"]) & set(expected["val_source_index"])


def test_fashion_selection_is_balanced_and_disjoint():
    build = _build_script()
    rng = np.random.default_rng(0)
    train_y, test_y = np.repeat(np.arange(10), 150), rng.permutation(np.repeat(np.arange(10), 300))
    picks = build.select(train_y, test_y)
    assert [np.bincount(train_y[picks[s]]).tolist() for s in ("train", "val")] == [[80] * 10, [20] * 10]
    assert np.bincount(test_y[picks["test"]]).tolist() == [200] * 10
    assert not set(picks["train"]) & set(picks["val"])
    assert np.array_equal(build.select(train_y, test_y)["val"], picks["val"])  # fixed, no RNG state


# ----------------------------------------------------------------------------------------------------------------
# synthetic


def test_synthetic_deterministic_by_seed():
    a = synthetic_split(SyntheticConfig(seed=1), "train")
    b = synthetic_split.__wrapped__(SyntheticConfig(seed=1), "train")  # bypass the cache: really regenerated
    c = synthetic_split.__wrapped__(SyntheticConfig(seed=2), "train")
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    assert not np.array_equal(a[0], synthetic_split(SyntheticConfig(seed=1), "val")[0][: len(a[0])])


def test_synthetic_sizes_and_learnable():
    cfg = SyntheticConfig(num_classes=6, train_per_class=10, val_per_class=3, test_per_class=5, image_size=20)
    info = describe(synthetic(**vars(cfg)))
    assert info.num_classes == 6 and info.split_sizes == {"train": 60, "val": 18, "test": 30}
    (xtr, ytr), (xte, yte) = synthetic_split(cfg, "train"), synthetic_split(cfg, "test")
    assert xtr.shape == (60, 20, 20, 3) and np.bincount(ytr).tolist() == [10] * 6
    feats = lambda x: x.reshape(len(x), -1).astype(np.float32) / 255
    means = np.stack([feats(xtr)[ytr == c].mean(0) for c in range(6)])
    gaps = np.linalg.norm(means[:, None] - means[None], axis=-1)[~np.eye(6, dtype=bool)]
    assert gaps.min() > 3.0  # every pair of class means is far apart
    pred = ((feats(xte)[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == yte).mean() >= 0.9  # nearest class mean: far above chance (1/6)


def test_synthetic_tiny_model_learns_in_a_few_steps():
    torch.manual_seed(0)
    ld = loaders(synthetic(num_classes=4, train_per_class=32), img_size=16, batch_size=32)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4))
    for epoch in range(5):
        for images, labels in epoch_batches(ld, epoch):
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            with torch.no_grad():  # plain SGD by hand: torch.optim's first step imports dynamo (seconds)
                for p in model.parameters():
                    p -= 0.05 * p.grad
    assert ld.test is not None
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in pairs(ld.test))
    assert correct / 32 >= 0.75  # 20 steps; chance is 0.25


# ----------------------------------------------------------------------------------------------------------------
# VTAB-1k list files


def write_vtab(root: Path, task: str, counts: dict[str, int], num_labels: int, size: int = 6) -> None:
    """A NOAH-layout task with solid-colour PNGs: image i of a split has colour (i, 2i, 3i) and label i % num_labels."""
    for split, n in counts.items():
        (root / task / "images" / split).mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(n):
            rel = f"images/{split}/{i:06d}.png"
            Image.new("RGB", (size, size + 2), (i, 2 * i, 3 * i)).save(root / task / rel)
            lines.append(f"{rel} {i % num_labels}\n")
        (root / task / f"{split}.txt").write_text("".join(lines))


VTAB_COUNTS = {"train800": 8, "val200": 3, "train800val200": 11, "test": 5}


def vtab(root: Path, task: str, **kw: object) -> DataConfig:
    return DataConfig(source="vtab", options=VtabConfig(root=str(root), task=task), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("task", ["cifar", "cifar100", "cifar_100", "CIFAR-100"])
def test_vtab_aliases_and_split_mapping(tmp_path, task):
    write_vtab(tmp_path, "cifar", VTAB_COUNTS, num_labels=5)
    info = describe(vtab(tmp_path, task))
    assert info.num_classes == 100 and info.class_names[:2] == ("0", "1")
    assert info.split_sizes == {"train": 8, "val": 3, "test": 5}
    trainval = describe(vtab(tmp_path, task, train_split="trainval", val_split="val200", test_split="test.txt"))
    assert trainval.split_sizes == {"train": 11, "val": 3, "test": 5}


def test_vtab_alias_folder_and_known_counts(tmp_path):
    write_vtab(tmp_path, "oxford_pet", VTAB_COUNTS, num_labels=3)  # NOAH's folder name for Pets
    assert describe(vtab(tmp_path, "pets")).num_classes == 37
    write_vtab(tmp_path, "oxford_flowers102", VTAB_COUNTS, num_labels=3)
    assert describe(vtab(tmp_path, "flowers102")).num_classes == 102
    assert len(VTAB_CLASSES) == 19 and VTAB_CLASSES["sun397"] == 397 and VTAB_CLASSES["smallnorb_ele"] == 9


def test_vtab_unknown_task_counts_labels(tmp_path):
    write_vtab(tmp_path, "my_task", {"train800": 4, "val200": 2, "test": 7}, num_labels=7)
    assert describe(vtab(tmp_path, "my_task")).num_classes == 7  # max label 6 (in test.txt) + 1


def test_vtab_images_resized_and_normalised(tmp_path):
    write_vtab(tmp_path, "eurosat", VTAB_COUNTS, num_labels=10)
    cfg = vtab(tmp_path, "eurosat", normalize="none", interpolation="nearest")
    ld = loaders(cfg, img_size=4, batch_size=8)
    assert ld.val is not None and ld.test is not None
    images, labels = first(ld.test)  # dataset order
    assert images.shape == (5, 3, 4, 4) and labels.tolist() == [0, 1, 2, 3, 4]
    expected = torch.tensor([[i, 2 * i, 3 * i] for i in range(5)], dtype=torch.float32) / 255
    torch.testing.assert_close(images.mean((2, 3)), expected)
    assert sorted(torch.cat([y for _, y in pairs(ld.train)]).tolist()) == sorted(i % 10 for i in range(8))


def test_vtab_errors(tmp_path):
    write_vtab(tmp_path, "dtd", {"train800": 2, "test": 2}, num_labels=2)
    with pytest.raises(DataError, match=r"data\.val_split: list file .*val200\.txt' does not exist .*null to skip"):
        describe(vtab(tmp_path, "dtd"))
    assert describe(vtab(tmp_path, "dtd", val_split=None)).split_sizes == {"train": 2, "test": 2}
    with pytest.raises(DataError, match=r"data\.vtab\.task: no folder 'dtdd' under .*did you mean 'dtd'"):
        describe(vtab(tmp_path, "dtdd"))
    with pytest.raises(DataError, match=r"data\.vtab\.task: not set; set data\.vtab\.task"):
        describe(vtab(tmp_path, None))
    with pytest.raises(DataError, match=r"data\.vtab\.root: directory '.*nowhere' does not exist"):
        describe(vtab(tmp_path / "nowhere", "dtd"))
    with pytest.raises(DataError, match=r"data\.vtab\.root: not set"):
        describe(DataConfig(source="vtab", options=VtabConfig(task="dtd")))
    (tmp_path / "dtd" / "test.txt").write_text("images/test/000000.png\n")
    with pytest.raises(DataError, match=r"data\.test_split: .*test\.txt:1: expected `relative/path label`"):
        describe(vtab(tmp_path, "dtd", val_split=None))


def test_vtab_label_out_of_range_and_unreadable_image(tmp_path):
    write_vtab(tmp_path, "kitti", {"train800": 6, "val200": 2, "test": 2}, num_labels=6)  # KITTI has 4 classes
    with pytest.raises(DataError, match=r"data\.train_split: .*train800\.txt has label 5 but task 'kitti' has 4"):
        loaders(vtab(tmp_path, "kitti"))
    write_vtab(tmp_path, "svhn", {"train800": 2, "val200": 2, "test": 2}, num_labels=2)
    (tmp_path / "svhn" / "images" / "train800" / "000001.png").write_bytes(b"not a png")
    ld = loaders(vtab(tmp_path, "svhn"))
    with pytest.raises(DataError, match=r"data\.vtab\.root: cannot read image '.*000001\.png'"):
        list(ld.train)


# ----------------------------------------------------------------------------------------------------------------
# image folders


def write_folder(root: Path, layout: dict[str, dict[str, int]]) -> None:
    for split, classes in layout.items():
        for cls, n in classes.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("L", (5, 7), 40 * i).save(root / split / cls / f"{i}.png")  # grayscale: converted to RGB
            (root / split / cls / "notes.txt").write_text("not an image")


def test_folder_layout(tmp_path):
    write_folder(tmp_path, {"train": {"zebra": 3, "ant": 2, "cat": 1}, "test": {"ant": 2, "zebra": 1}})
    cfg = DataConfig(source="folder", options=FolderConfig(root=str(tmp_path)), val_split=None)
    info = describe(cfg)
    assert info.class_names == ("ant", "cat", "zebra") and info.split_sizes == {"train": 6, "test": 3}
    ld = loaders(cfg, img_size=8, batch_size=4)
    assert ld.val is None and ld.test is not None
    images, labels = first(ld.test)
    assert images.shape == (3, 3, 8, 8) and labels.tolist() == [0, 0, 2]
    assert sorted(torch.cat([y for _, y in pairs(ld.train)]).tolist()) == [0, 0, 1, 2, 2, 2]


def test_folder_ignores_hidden_folders(tmp_path):
    write_folder(tmp_path, {"train": {"a": 1, ".ipynb_checkpoints": 1, "b": 1}})
    cfg = DataConfig(source="folder", options=FolderConfig(root=str(tmp_path)), val_split=None, test_split=None)
    assert describe(cfg) == DatasetInfo(2, ("a", "b"), {"train": 2})


def test_folder_errors(tmp_path):
    write_folder(tmp_path, {"train": {"a": 1, "b": 1}, "test": {"a": 1, "c": 1}})
    with pytest.raises(DataError, match=r"data\.val_split: no folder 'val' under .*set data\.val_split: null"):
        describe(DataConfig(source="folder", options=FolderConfig(root=str(tmp_path))))
    with pytest.raises(DataError, match=r"data\.test_split: class folder '.*c' is not a class of the training split"):
        describe(DataConfig(source="folder", options=FolderConfig(root=str(tmp_path)), val_split=None))
    with pytest.raises(DataError, match=r"data\.train_split: no folder 'trian' .*did you mean 'train'"):
        describe(
            DataConfig(source="folder", options=FolderConfig(root=str(tmp_path)), train_split="trian", val_split=None)
        )


def test_folder_trainval_combines_train_and_val(tmp_path):
    write_folder(tmp_path, {"train": {"a": 2, "b": 1}, "val": {"a": 1, "b": 1}})
    cfg = DataConfig(
        source="folder",
        options=FolderConfig(root=str(tmp_path)),
        train_split="trainval",
        val_split="val",
        test_split=None,
    )
    assert describe(cfg).split_sizes == {"train": 5, "val": 2}


# ----------------------------------------------------------------------------------------------------------------
# builtin errors, eval loader


def test_builtin_errors():
    with pytest.raises(DataError, match=r"data\.builtin\.name: unknown built-in dataset 'fashion-mnist'; did you mean"):
        describe(DataConfig(options=BuiltinConfig(name="fashion-mnist")))
    with pytest.raises(DataError, match=r"data\.val_split: 'valid' is not a split of synthetic; did you mean 'val'"):
        describe(synthetic(val_split="valid"))
    with pytest.raises(DataError, match=r"train\.batch_size: 64 is larger than the 32 training images"):
        loaders(synthetic(train_per_class=8), batch_size=64, drop_last=True)


def test_build_eval_loader():
    loader = build_eval_loader(fashion(), "trainval", spec=spec(12), batch_size=250)
    labels = torch.cat([y for _, y in pairs(loader)])
    assert len(loader) == 4 and torch.bincount(labels).tolist() == [100] * 10
    with pytest.raises(DataError, match=r"--split: 'tets' is not a split of fashion-mnist-1k; did you mean 'test'"):
        build_eval_loader(fashion(), "tets", spec=spec(12), batch_size=8)


# ----------------------------------------------------------------------------------------------------------------
# sampling: determinism, sharding, resume


def test_epoch_sampler_deterministic_per_seed_and_epoch():
    def order(seed: int, epoch: int) -> list[int]:
        s = EpochSampler(50, batch_size=4, seed=seed)
        s.set_epoch(epoch)
        return list(s)

    assert order(0, 3) == order(0, 3) and sorted(order(0, 3)) == list(range(50))
    assert order(0, 3) != order(0, 4) and order(0, 3) != order(1, 3)
    assert order(1, 0) != order(0, 1)  # seeds and epochs are mixed, not added


@pytest.mark.parametrize("size", [10, 11])
def test_epoch_sampler_shards(size):
    shards = []
    for rank in range(2):
        s = EpochSampler(size, batch_size=2, seed=5, rank=rank, world_size=2)
        s.set_epoch(2)
        shards.append(list(s))
        assert len(s) == len(shards[-1]) == (6 if size == 11 else 5)
    assert set(shards[0]) | set(shards[1]) == set(range(size))
    if size == 10:
        assert not set(shards[0]) & set(shards[1])
    else:  # padded with the first index of the permutation
        assert len(set(shards[0]) & set(shards[1])) == 1


def test_epoch_sampler_set_start():
    s = EpochSampler(23, batch_size=4, seed=0)
    s.set_epoch(1)
    full = list(s)
    s.set_start(2)
    assert len(s) == 15 and list(s) == full[8:]
    s.set_epoch(1)  # same epoch: the skip stays
    assert len(s) == 15
    s.set_epoch(2)  # next epoch: starts from the beginning
    assert len(s) == 23
    s.set_start(6)
    assert len(s) == 0 and list(s) == []


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_mid_epoch_sees_identical_batches(world_size):
    cfg = fashion(hflip=True, val_split=None, test_split=None)
    for rank in range(world_size):
        ld = loaders(cfg, img_size=12, batch_size=16, seed=3, rank=rank, world_size=world_size)
        full = epoch_batches(ld, epoch=2)
        resumed = loaders(cfg, img_size=12, batch_size=16, seed=3, rank=rank, world_size=world_size)
        tail = epoch_batches(resumed, epoch=2, start=5)
        assert len(resumed.train) == len(tail) == len(full) - 5
        for (x, y), (xr, yr) in zip(full[5:], tail):
            assert torch.equal(x, xr) and torch.equal(y, yr)


def test_hflip_deterministic_per_epoch_and_train_only():
    cfg = fashion(hflip=True, val_split="train", test_split=None)
    ld = loaders(cfg, img_size=12, batch_size=800)
    order = {}
    for epoch in (0, 1):
        ld.train_sampler.set_epoch(epoch)
        order[epoch] = list(ld.train_sampler)
    (x0, _), (x1, _) = epoch_batches(ld, 0)[0], epoch_batches(ld, 1)[0]
    ref = first(build_eval_loader(cfg, "train", spec=spec(12), batch_size=800))[0]
    flipped = {}
    for epoch, x in ((0, x0), (1, x1)):
        ref_e = ref[order[epoch]]
        is_flip = torch.tensor([torch.equal(a, b.flip(-1)) and not torch.equal(a, b) for a, b in zip(x, ref_e)])
        is_same = torch.tensor([torch.equal(a, b) for a, b in zip(x, ref_e)])
        assert bool((is_flip | is_same).all())
        flipped[epoch] = is_flip
        assert 0.4 < is_flip.float().mean() < 0.6
    assert not torch.equal(flipped[0], flipped[1])
    assert ld.val is not None and torch.equal(torch.cat([x for x, _ in pairs(ld.val)]), ref)  # evaluation never flips


def test_loaders_leave_global_rng_alone():
    ld = loaders(fashion(hflip=True, test_split=None), img_size=8, batch_size=64)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    epoch_batches(ld, 0)
    assert ld.val is not None
    list(ld.val)
    assert torch.equal(torch.rand(3), expected)  # where an epoch starts cannot shift model randomness


def test_workers_match_main_process():
    cfg = fashion(hflip=True, val_split=None, test_split=None)
    main = epoch_batches(loaders(cfg, img_size=8, batch_size=200), epoch=1)
    ld = loaders(fashion(hflip=True, val_split=None, test_split=None, workers=2), img_size=8, batch_size=200)
    parallel = epoch_batches(ld, epoch=1)  # workers copy the sampler (epoch 1) when the iterator starts
    assert len(main) == len(parallel) == 4
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(main, parallel))
    assert bool(ld.train.dataset.filled.all())  # type: ignore[attr-defined]  # workers filled the shared cache


def test_eval_loaders_shard_without_padding():
    cfg = synthetic(num_classes=3, val_per_class=3)  # 9 validation images over 2 ranks
    seen = []
    for rank in range(2):
        ld = loaders(cfg, rank=rank, world_size=2)
        assert ld.val is not None
        seen += [x for x, _ in pairs(ld.val)]
    assert sum(len(x) for x in seen) == 9
    full = first(loaders(cfg, batch_size=16).val)[0]
    assert torch.equal(torch.cat(seen)[torch.argsort(torch.tensor([*range(0, 9, 2), *range(1, 9, 2)]))], full)


# ----------------------------------------------------------------------------------------------------------------
# caching and normalisation


def test_cache_and_no_cache_agree(monkeypatch):
    cached = loaders(fashion(hflip=True, test_split=None), img_size=20, batch_size=100)
    assert cached.train.dataset.store is not None  # type: ignore[attr-defined]
    monkeypatch.setattr(data, "CACHE_BUDGET_BYTES", 800 * 20 * 20)  # room for the train split only
    budget = loaders(fashion(hflip=True, test_split=None), img_size=20, batch_size=100)
    assert budget.train.dataset.store is not None and budget.val.dataset.store is None  # type: ignore[union-attr]
    uncached = loaders(fashion(hflip=True, test_split=None, cache=False), img_size=20, batch_size=100)
    assert uncached.train.dataset.store is None  # type: ignore[attr-defined]
    for epoch in (0, 1):  # epoch 0 fills the cache, epoch 1 reads it
        a, b = epoch_batches(cached, epoch), epoch_batches(uncached, epoch)
        assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))


@pytest.mark.parametrize(
    ("normalize", "mean", "std"),
    [
        ("model", (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)),
        ("imagenet", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ("inception", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ("none", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    ],
)
def test_normalisation_choices(tmp_path, normalize, mean, std):
    write_vtab(tmp_path, "svhn", {"train800": 4, "val200": 4, "test": 1}, num_labels=2)
    cfg = vtab(tmp_path, "svhn", normalize=normalize)
    model_mean_std = data.normalization(normalize, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    ld = build_loaders(cfg, spec=spec(4, *model_mean_std), batch_size=2, eval_batch_size=4, seed=0)
    assert ld.val is not None
    images, _ = first(ld.val)  # image 3 has pixels (3, 6, 9)
    expected = (torch.tensor([3.0, 6.0, 9.0]) / 255 - torch.tensor(mean)) / torch.tensor(std)
    torch.testing.assert_close(images[3], expected.view(3, 1, 1).expand(3, 4, 4))
    single = build_eval_loader(cfg, "val", spec=spec(4, *model_mean_std), batch_size=4)
    torch.testing.assert_close(first(single)[0], images)
