"""The structured built-in tasks, the shipped digits-1k task, and the accuracy suite's data path."""

from __future__ import annotations

import hashlib
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from adaptune.data import build_eval_loader, describe
from adaptune.data.sources import structured as st
from adaptune.data.sources.builtin import BuiltinConfig
from adaptune.recipe import DataConfig

REPO = Path(__file__).resolve().parents[1]
TASKS = sorted(st.TASKS)
N = 96  # images rendered per semantic check


def _module(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def builtin(name: str, seed: int = 0, **kw: object) -> DataConfig:
    return DataConfig(source="builtin", options=BuiltinConfig(name=name, seed=seed), **kw)  # type: ignore[arg-type]


def components(mask: np.ndarray) -> np.ndarray:
    """Number of 8-connected components of each (H, W) bool mask in (n, H, W), by max-label propagation."""
    n, h, w = mask.shape
    ids = np.where(mask, np.arange(1, h * w + 1).reshape(1, h, w), 0)
    while True:
        padded = np.pad(ids, ((0, 0), (1, 1), (1, 1)))
        neighbours = np.max([padded[:, i : i + h, j : j + w] for i in range(3) for j in range(3)], axis=0)
        grown = np.where(mask, neighbours, 0)
        if np.array_equal(grown, ids):
            return np.array([len(np.unique(x[x > 0])) for x in ids])
        ids = grown


# ----------------------------------------------------------------------------------------------------------------
# every structured task


@pytest.mark.parametrize("name", TASKS)
def test_sizes_names_and_balance(name):
    task = st.TASKS[name]
    info = describe(builtin(name))
    assert info.split_sizes == {"train": 800, "val": 200, "test": 2000}
    assert info.class_names == task.class_names and len(set(task.class_names)) == info.num_classes
    assert describe(builtin(name, train_split="trainval", val_split=None)).split_sizes == {"train": 1000, "test": 2000}
    for split, size in st.SPLIT_SIZES.items():
        counts = np.bincount(st.split_labels(name, split), minlength=info.num_classes)
        assert counts.sum() == size and counts.max() - counts.min() <= 1, (split, counts)


@pytest.mark.parametrize("name", TASKS)
def test_deterministic_by_seed_and_splits_independent(name):
    images, labels, _ = st.generate(name, "val", seed=0, with_info=False)
    assert images.shape == (200, 64, 64, 3) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert np.array_equal(labels, st.split_labels(name, "val"))
    again, labels_again, _ = st.generate(name, "val", seed=0, with_info=False)
    assert np.array_equal(images, again) and np.array_equal(labels, labels_again)
    other, _, _ = st.generate(name, "val", seed=1, n=20, with_info=False)
    assert not np.array_equal(images[:20], other)
    assert images.std() > 5  # not blank
    hashes = {hashlib.sha1(x.tobytes()).digest() for x in images}
    assert len(hashes) == len(images)
    for split in ("train", "test"):  # other splits: other streams, no image in common
        part, _, _ = st.generate(name, split, seed=0, n=100, with_info=False)
        assert not hashes & {hashlib.sha1(x.tobytes()).digest() for x in part}
        assert not np.array_equal(st.split_labels(name, split)[:200], labels)


def test_loaded_through_the_source_cached_and_read_only():
    source_cfg = builtin("location-1k", seed=3, train_split="trainval", val_split=None)
    from adaptune.data.sources import open_source

    data = open_source(source_cfg).load("trainval", "data.train_split")
    train, _ = st.split_arrays("location-1k", 3, "train")
    assert len(data.labels) == 1000 and data.images.channels == 3
    assert np.array_equal(np.asarray(data.images.read(0)), train[0])
    assert st.split_arrays("location-1k", 3, "train")[0] is train and not train.flags.writeable


# ----------------------------------------------------------------------------------------------------------------
# label semantics, checked on the rendered coverage


def test_count_objects_are_disjoint_and_counted():
    _, labels, info = st.generate("count-1k", "train", n=N)
    present = info["present"]
    assert np.array_equal(present.sum(1), labels + 3)
    for i in range(N):  # centre distance leaves >= 1.6 px between the discs holding any two objects
        cx, cy, r = (info[k][i][present[i]] for k in ("cx", "cy", "radius"))
        d = np.hypot(cx[:, None] - cx[None], cy[:, None] - cy[None]) - r[:, None] - r[None]
        assert d[~np.eye(len(cx), dtype=bool)].min() >= 1.6
    assert np.array_equal(components(info["alpha"] > 0.5), labels + 3)  # what is drawn: k separate blobs


def test_orientation_rotates_counter_clockwise_and_bins():
    _, labels, info = st.generate("orientation-1k", "train", n=N)
    step = 2 * math.pi / 16
    assert np.all(np.abs(info["angle"] / step - labels) <= 0.3 + 1e-9)
    c = st.SIDE / 2  # rendering at angle + 90 deg about a rotated centre == np.rot90 (counter-clockwise on screen)
    shape, cx, cy, scale, angle = (info[k][:16] for k in ("shape", "cx", "cy", "scale", "angle"))
    turned = st.shape_coverage(shape, cy, 2 * c - cx, scale, angle + math.pi / 2).full()
    assert np.abs(turned - np.rot90(info["alpha"][:16], axes=(1, 2))).mean() < 2e-3
    t = np.full(2, st.SHAPES.index("T"))  # the T's bar is "up": at 90 deg (counter-clockwise) it points left
    alpha = st.shape_coverage(t, np.full(2, c), np.full(2, c), np.full(2, 15.0), np.array([0.0, math.pi / 2])).full()
    ys, xs = np.mgrid[: st.SIDE, : st.SIDE] + 0.5
    mean_x, mean_y = ((alpha * g).sum((1, 2)) / alpha.sum((1, 2)) for g in (xs, ys))
    assert mean_y[0] < c - 2 and abs(mean_x[0] - c) < 0.1
    assert mean_x[1] < c - 2 and abs(mean_y[1] - c) < 0.1


def test_location_bins_the_centre_x():
    _, labels, info = st.generate("location-1k", "train", n=N)
    lo, hi = st.LOCATION_RANGE
    width = (hi - lo) / 16
    assert np.array_equal(np.floor((info["cx"] - lo) / width).astype(int), labels)
    symmetric = np.isin(info["shape"], [st.SHAPES.index(s) for s in ("circle", "square", "cross", "ring")])
    xs = np.arange(st.SIDE) + 0.5
    alpha = info["alpha"][symmetric]
    centroid = (alpha.sum(1) * xs).sum(1) / alpha.sum((1, 2))
    assert symmetric.sum() > 20 and np.abs(centroid - info["cx"][symmetric]).max() < 0.25
    assert np.array_equal(np.floor((centroid - lo) / width).astype(int), labels[symmetric])


def test_distance_is_the_nearest_objects_depth_bin():
    _, labels, info = st.generate("distance-1k", "train", n=N)
    depth = np.where(info["present"], info["depth"], np.inf)
    assert np.array_equal(np.argmin(depth, 1), np.zeros(N)) and info["present"][:, :2].all()
    assert np.array_equal(np.digitize(depth.min(1), st.DEPTH_EDGES) - 1, labels)
    rows = np.flatnonzero  # the lowest drawn row is the nearest object's foot (drawn last, never hidden)
    bottom = np.array([rows((a > 0.5).any(1)).max() + 1 for a in info["alpha"]])
    assert np.abs(bottom - np.minimum(info["base"][:, 0], st.SIDE)).max() <= 1.0
    estimate = st.HORIZON_K / (bottom - info["horizon"])  # depth read off the image and the horizon
    assert np.mean(np.digitize(estimate, st.DEPTH_EDGES) - 1 == labels) >= 0.9


def test_elevation_silhouette_matches_the_view():
    _, labels, info = st.generate("elevation-1k", "train", n=N)
    degrees = np.degrees(info["elevation"])
    assert np.array_equal(np.round((degrees - 5) / 10).astype(int), labels)
    assert np.all(np.abs(degrees - np.array(st.ELEVATIONS)[labels]) <= 2.5 + 1e-9)
    mask = info["alpha"] > 0.5
    height = np.array([np.ptp(np.flatnonzero(m.any(1))) + 1 for m in mask])
    width = np.array([np.ptp(np.flatnonzero(m.any(0))) + 1 for m in mask])
    e, r, h = info["elevation"], info["radius"], info["height"]
    assert np.abs(height - (h * np.cos(e) + 2 * r * np.sin(e))).max() <= 1.5
    assert np.abs(width - 2 * r).max() <= 1.5


def test_shapes_have_their_area():
    _, labels, info = st.generate("shapes-1k", "train", n=N)
    assert set(labels.tolist()) == set(range(len(st.SHAPES)))
    area = info["alpha"].sum((1, 2)) / info["scale"] ** 2
    assert np.all(np.abs(area / np.array(st.SHAPE_AREAS)[labels] - 1) < 0.08)


# ----------------------------------------------------------------------------------------------------------------
# digits-1k (shipped)


DIGITS_BUILD = "scripts/build_digits_1k.py"


def test_digits_sizes_balance_and_pixels():
    info = describe(builtin("digits-1k"))
    assert info.split_sizes == {"train": 800, "val": 200, "test": 797}
    assert info.class_names == tuple("0123456789")
    from adaptune.data.sources import open_source

    source = open_source(builtin("digits-1k"))
    for split, per_class in (("train", 80), ("val", 20)):
        data = source.load(split, "data.train_split")
        assert np.bincount(data.labels).tolist() == [per_class] * 10
    test = source.load("test", "data.test_split")
    assert data.images.channels == 1 and np.asarray(test.images.read(0)).shape == (8, 8)
    assert np.asarray(test.images.read(0)).max() <= 255 and np.bincount(test.labels).min() >= 70


def test_digits_selection_balanced_disjoint_fixed():
    build = _module(DIGITS_BUILD, "build_digits_1k")
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 150))
    picks = build.select(labels)
    assert [np.bincount(labels[picks[s]]).tolist() for s in ("train", "val", "test")] == [
        [80] * 10,
        [20] * 10,
        [50] * 10,
    ]
    assert len(np.unique(np.concatenate(list(picks.values())))) == len(labels)
    assert np.array_equal(build.select(labels)["val"], picks["val"])


@pytest.mark.skipif(_module(DIGITS_BUILD, "build_digits_1k").find_source() is None, reason="scikit-learn not installed")
def test_digits_npz_matches_build_script():
    build = _module(DIGITS_BUILD, "build_digits_1k")
    expected = build.build(build.find_source())
    with np.load(REPO / "adaptune/datasets/digits_1k.npz") as shipped:
        assert sorted(shipped.files) == sorted(expected)
        for key, value in expected.items():
            np.testing.assert_array_equal(shipped[key], value, err_msg=key)
            assert shipped[key].dtype == value.dtype, key


# ----------------------------------------------------------------------------------------------------------------
# the accuracy suite


@pytest.fixture(scope="module")
def suite():
    return _module("benchmarks/accuracy_suite.py", "accuracy_suite")


def test_suite_finds_recipes_and_puts_them_on_the_protocol(suite):
    from adaptune.recipe import load_recipe

    names = suite.shipped_recipes()
    assert "quickstart" in names and all(n.startswith("quickstart") for n in names)
    p = suite.Protocol(epochs=3, img_size=48)
    for name in names:
        recipe = load_recipe(suite.recipe_path(name), suite.protocol_overrides("count-1k", 5, p))
        d = recipe.data
        assert (d.train_split, d.val_split, d.test_split, d.img_size, d.hflip) == ("trainval", None, "test", 48, False)
        assert d.options.name == "count-1k" and recipe.train.epochs == 3 and recipe.train.seed == 5
        assert recipe.backbone.pretrained == "package:efficientnet-lite0"


@pytest.mark.parametrize(("task", "split"), [("digits-1k", "test"), ("shapes-1k", "val")])
def test_suite_reference_sees_adaptunes_inputs(suite, task, split):
    import timm
    import torch

    from adaptune.data import input_spec
    from adaptune.recipe import load_recipe

    p = suite.Protocol(img_size=40)
    recipe = load_recipe(suite.recipe_path("quickstart"), suite.protocol_overrides(task, 0, p))
    model = timm.create_model(suite.MODEL, pretrained=False, num_classes=10)
    spec = input_spec(model, recipe)
    loader = build_eval_loader(recipe.data, split, spec=spec, batch_size=256)
    ours_x = torch.cat([b.inputs for b in loader])
    ours_y = torch.cat([b.targets for b in loader])
    cfg = timm.data.resolve_data_config({}, model=model)
    ref_x, ref_y = suite.reference_inputs(task, split, p, cfg["mean"], cfg["std"], cfg["interpolation"])
    assert ref_x.shape == ours_x.shape == (len(ours_y), 3, 40, 40)
    assert torch.equal(ref_y, ours_y)
    torch.testing.assert_close(ref_x, ours_x, rtol=0, atol=1e-6)
    assert ref_x.std() > 0.1


def test_suite_reuses_runs_unless_a_shared_key_changed(suite):
    stored = {"name": "a", "train": {"lr": 1e-3, "epochs": 10}, "output": {"dir": "x"}}
    assert suite.stale_keys(stored, {"name": "b", "train": {"lr": 1e-3, "epochs": 10, "ema": False}}) == []
    assert suite.stale_keys(stored, {"train": {"lr": 4e-3, "epochs": 10}, "output": {"dir": "y"}}) == ["train.lr"]


def test_suite_reuses_a_finished_run_of_the_same_resolved_recipe_under_another_name(suite, tmp_path):
    import yaml

    tried = {"name": "tried", "method": {"name": "adapter", "bottleneck": 64}, "train": {"lr": 3e-3}, "output": {}}
    for run, recipe, finished in [("tried-1-s0", tried, True), ("other-2-s0", {**tried, "train": {"lr": 1e-3}}, True)]:
        (tmp_path / run).mkdir()
        (tmp_path / run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        if finished:
            (tmp_path / run / "summary.json").write_text("{}")
    shipped = {**tried, "name": "quickstart", "output": {"dir": "elsewhere"}}
    assert suite.same_finished_run(tmp_path, shipped) == tmp_path / "tried-1-s0"
    assert suite.same_finished_run(tmp_path, {**shipped, "train": {"lr": 6e-3}}) is None
    (tmp_path / "tried-1-s0" / "summary.json").unlink()
    assert suite.same_finished_run(tmp_path, shipped) is None, "an unfinished run is not reused"
