"""The ``csv`` and ``hf`` (Hugging Face `datasets`) data sources, on data each test writes itself."""

from __future__ import annotations

import json
import pickle
import sys

import numpy as np
import pytest
import torch
from conftest import tiny_recipe
from PIL import Image

from adaptune.batch import InputSpec
from adaptune.data import build_eval_loader, build_loaders, describe
from adaptune.data.sources import open_source
from adaptune.errors import DataError
from adaptune.recipe import recipe_from_dict

SPEC = InputSpec(shape=(3, 8, 8), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def data_cfg(source: str, options: dict, **common):
    """A validated ``data`` section (through the recipe validator, as a recipe file would be)."""
    raw = {"backbone": {"model": "test_vit"}, "method": {"name": "linear"}, "data": {"source": source, **common}}
    raw["data"][source] = options
    return recipe_from_dict(raw).data


def image(value: int, size: tuple[int, int] = (8, 8)) -> Image.Image:
    return Image.fromarray(np.full((*size, 3), value, dtype=np.uint8))


def write_csv(path, rows, header="path,label"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def write_images(folder, names, start=0):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        image(start + 10 * i).save(folder / name)


# ----------------------------------------------------------------------------------------------------------------
# csv


@pytest.fixture
def csv_data(tmp_path):
    """data/{train,val,test}.csv over data/img/*.png: 3 classes by name, one absolute path, blank lines, a BOM."""
    root = tmp_path / "data"
    write_images(root / "img", [f"{i}.png" for i in range(9)])
    names = ["zebra", "ant", "cat"]
    rows = [f"img/{i}.png,{names[i % 3]},extra" for i in range(6)]
    rows[1] = f"{root / 'img' / '1.png'},ant,extra"  # an absolute path is used as it is
    train = write_csv(root / "train.csv", [*rows[:3], "", *rows[3:]], header="path,label,note")
    train.write_bytes(b"\xef\xbb\xbf" + train.read_bytes())  # a byte-order mark (Excel's UTF-8 CSV)
    write_csv(root / "val.csv", ["img/6.png,cat", "img/7.png,zebra"])
    write_csv(root / "test.csv", ["img/8.png,ant"])
    return root


def csv_options(root, **extra):
    return {"train": str(root / "train.csv"), "val": str(root / "val.csv"), "test": str(root / "test.csv"), **extra}


def test_csv_layout_names_sizes_labels_and_images(csv_data):
    cfg = data_cfg("csv", csv_options(csv_data))
    info = describe(cfg)
    assert info.class_names == ("ant", "cat", "zebra") and info.split_sizes == {"train": 6, "val": 2, "test": 1}
    split = open_source(cfg).load("train", "data.train_split")
    assert split.labels.tolist() == [2, 0, 1, 2, 0, 1]
    assert np.asarray(split.images.read(3))[0, 0].tolist() == [30, 30, 30]  # img/3.png
    ld = build_loaders(cfg, spec=SPEC, batch_size=4, eval_batch_size=4, seed=0)
    batch = next(iter(ld.val))
    assert batch.inputs.shape == (2, 3, 8, 8) and batch.targets.tolist() == [1, 2]
    expected = (60 / 255 - 0.5) / 0.5  # img/6.png, normalised
    torch.testing.assert_close(batch.inputs[0], torch.full((3, 8, 8), expected))


def test_csv_trainval_root_and_eval_split(csv_data, monkeypatch):
    monkeypatch.chdir(csv_data.parent)
    options = {"root": "data", "train": "train.csv", "val": "val.csv"}
    cfg = data_cfg("csv", options, train_split="trainval", test_split=None)
    assert describe(cfg).split_sizes == {"train": 8, "val": 2}  # trainval: the train and val files together
    loader = build_eval_loader(cfg, "val", spec=SPEC, batch_size=8)
    assert next(iter(loader)).targets.tolist() == [1, 2]


def test_csv_integer_labels_and_class_order(tmp_path):
    write_images(tmp_path, ["a.png", "b.png", "c.png"])
    write_csv(tmp_path / "train.csv", ["a.png,1", "b.png,0", "c.png,2"])
    cfg = data_cfg("csv", {"train": str(tmp_path / "train.csv")}, val_split=None, test_split=None)
    assert describe(cfg).class_names == ("0", "1", "2")
    named = data_cfg(
        "csv", {"train": str(tmp_path / "train.csv"), "classes": ["cat", "dog", "eel"]}, val_split=None, test_split=None
    )
    source = open_source(named)
    assert source.class_names == ("cat", "dog", "eel")
    assert source.load("train", "data.train_split").labels.tolist() == [1, 0, 2]  # integers index the classes
    write_csv(tmp_path / "named.csv", ["a.png,eel", "b.png,cat", "c.png,dog"])
    by_name = data_cfg(
        "csv", {"train": str(tmp_path / "named.csv"), "classes": ["eel", "dog", "cat"]}, val_split=None, test_split=None
    )
    assert open_source(by_name).load("train", "data.train_split").labels.tolist() == [0, 2, 1]


@pytest.mark.parametrize(
    ("text", "options", "match"),
    [
        (None, {}, r"data\.csv\.train: file '.*train\.csv' does not exist; set data\.csv\.train"),
        ("a.png,x\n", {}, r"train\.csv:1: no header row .*add a first line naming the columns"),
        ("file,label\na.png,x\n", {}, r"train\.csv:1: no column 'path' in the header \(columns: file, label\)"),
        ("path,lable\na.png,x\n", {}, r"no column 'label' .*did you mean 'lable'.*set data\.csv\.label_column"),
        ("path,label\na.png,x\nb.png\n", {}, r"data\.csv\.train: .*train\.csv:3: expected 2 columns \(path,label\)"),
        ("path,label\na.png,x\nb.png,\n", {}, r"train\.csv:3: empty label; fix or remove the row"),
        ("path,label\na.png,x\ngone.png,x\n", {}, r"train\.csv:3: image '.*gone\.png' not found \(1 of 2 rows"),
        ("path,label\na.png,0\nb.png,2\n", {}, r"class '1' has no rows in .*train\.csv.*renumber them"),
        (
            "path,label\na.png,x\n",
            {"classes": ["x", "y"]},
            r"class 'y' has no rows .*remove it from data\.csv\.classes",
        ),
        ("path,label\na.png,x\nb.png,z\n", {"classes": ["x"]}, r"train\.csv:3: unknown label 'z'.*data\.csv\.classes"),
        ("path,label\n\n", {}, r"train\.csv has a header but no rows"),
        ("", {}, r"train\.csv is empty; write a header row"),
    ],
)
def test_csv_errors_name_the_file_line_and_fix(tmp_path, text, options, match):
    write_images(tmp_path, ["a.png", "b.png"])
    train = tmp_path / "train.csv"
    if text is not None:
        train.write_text(text)
    with pytest.raises(DataError, match=match):
        describe(data_cfg("csv", {"train": str(train), **options}, val_split=None, test_split=None))


def test_csv_split_errors(csv_data):
    write_csv(csv_data / "test.csv", ["img/8.png,cow"])
    with pytest.raises(DataError, match=r"data\.csv\.test: .*test\.csv:2: unknown label 'cow' \(classes: ant, cat"):
        describe(data_cfg("csv", csv_options(csv_data)))
    with pytest.raises(DataError, match=r"data\.val_split: split 'val' needs data\.csv\.val; .*data\.val_split: null"):
        describe(data_cfg("csv", {"train": str(csv_data / "train.csv")}))
    with pytest.raises(
        DataError,
        match=r"data\.val_split: 'validation' is not a split of the csv source .*use one of train, val, test, trainval",
    ):
        describe(data_cfg("csv", csv_options(csv_data), val_split="validation"))
    with pytest.raises(DataError, match=r"data\.csv\.train: not set"):
        describe(data_cfg("csv", {}))
    with pytest.raises(DataError, match=r"data\.csv\.root: directory .* does not exist"):
        describe(data_cfg("csv", {"train": "train.csv", "root": str(csv_data / "missing")}))


# ----------------------------------------------------------------------------------------------------------------
# hf (Hugging Face datasets)

CLASSES = ["ant", "bee", "cat", "dog"]


@pytest.fixture
def hf_disk(tmp_path):
    """A DatasetDict (train / validation / test) with an Image column and a ClassLabel, written with save_to_disk."""
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})

    def split(n: int, seed: int):
        labels = [i % len(CLASSES) for i in range(n)]
        rng = np.random.default_rng(seed)
        images = [Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)) for _ in labels]
        return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)

    dd = datasets.DatasetDict(train=split(16, 0), validation=split(8, 1), test=split(8, 2))
    dd.save_to_disk(str(tmp_path / "ds"))
    return tmp_path / "ds"


def test_hf_disk_dataset_trains_a_tiny_run(hf_disk, tmp_path):
    from adaptune.train import train

    base = tiny_recipe("lora", tmp_path, backbone={"model_kwargs": {"depth": 2}}, train={"epochs": 1})
    recipe = base.replace(data=data_cfg("hf", {"root": str(hf_disk)}, img_size=None))  # val -> validation
    info = describe(recipe.data)
    assert info.class_names == tuple(CLASSES) and info.split_sizes == {"train": 16, "val": 8, "test": 8}
    result = train(recipe, out_dir=tmp_path / "run")
    manifest = json.loads((result.run_dir / "adaptune_config.json").read_text())
    assert manifest["class_names"] == CLASSES and manifest["num_classes"] == 4
    assert result.summary["steps"] == 2 and result.summary["test_top1_last"] is not None
    assert (result.run_dir / "recipe.yaml").read_text().count("source: hf") == 1


def test_hf_reader_pickles_as_a_path_and_reopens(hf_disk):
    import datasets

    cfg = data_cfg("hf", {"root": str(hf_disk)}, train_split="trainval", val_split="test", test_split=None)
    split = open_source(cfg).load("trainval", "data.train_split")
    assert len(split.images) == 24 and split.labels.tolist() == [i % 4 for i in range(16)] + [i % 4 for i in range(8)]
    payload = pickle.dumps(split.images)
    assert len(payload) < 2000  # the folder and split names, not the images
    clone = pickle.loads(payload)
    assert clone._rows is None
    expected = np.asarray(datasets.load_from_disk(str(hf_disk))["validation"][3]["image"])
    assert np.array_equal(np.asarray(clone.read(16 + 3)), expected) and clone.read(0).mode == "RGB"


def test_hf_imagefolder_and_single_dataset(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    for split, n in (("train", 2), ("test", 1)):
        for cls in ("owl", "bat"):
            write_images(tmp_path / "folder" / split / cls, [f"{i}.png" for i in range(n)])
    cfg = data_cfg("hf", {"root": str(tmp_path / "folder")}, val_split=None)  # format: auto -> imagefolder
    info = describe(cfg)
    assert info.class_names == ("bat", "owl") and info.split_sizes == {"train": 4, "test": 2}
    assert (tmp_path / "cache").is_dir()  # datasets' Arrow copy went to its cache, not into the data folder

    features = datasets.Features({"img": datasets.Image(), "kind": datasets.Value("string")})
    single = datasets.Dataset.from_dict({"img": [image(0), image(9), image(99)], "kind": ["b", "a", "b"]}, features)
    single.save_to_disk(str(tmp_path / "single"))
    options = {"root": str(tmp_path / "single"), "image_column": "img", "label_column": "kind"}
    source = open_source(data_cfg("hf", options, val_split=None, test_split=None))
    assert source.class_names == ("a", "b") and source.load("train", "k").labels.tolist() == [1, 0, 1]
    ordered = open_source(data_cfg("hf", {**options, "classes": ["b", "a"]}, val_split=None, test_split=None))
    assert ordered.load("train", "k").labels.tolist() == [0, 1, 0]


def test_hf_errors(hf_disk, tmp_path):
    datasets = pytest.importorskip("datasets")
    with pytest.raises(DataError, match=r"data\.hf\.image_column: no column 'img' .*columns: image, label"):
        describe(data_cfg("hf", {"root": str(hf_disk), "image_column": "img"}))
    with pytest.raises(DataError, match=r"data\.hf\.label_column: no column 'labels' .*did you mean 'label'"):
        describe(data_cfg("hf", {"root": str(hf_disk), "label_column": "labels"}))
    with pytest.raises(DataError, match=r"data\.test_split: 'holdout' is not a split of the data set .*validation"):
        describe(data_cfg("hf", {"root": str(hf_disk)}, test_split="holdout"))
    with pytest.raises(
        DataError, match=r"data\.hf\.classes: column 'label' is a ClassLabel .*remove data\.hf\.classes"
    ):
        describe(data_cfg("hf", {"root": str(hf_disk), "classes": ["x"]}))
    with pytest.raises(DataError, match=r"data\.hf\.root: directory .* does not exist"):
        describe(data_cfg("hf", {"root": str(tmp_path / "nothing")}))
    with pytest.raises(DataError, match=r"data\.hf\.root: not set"):
        describe(data_cfg("hf", {}))

    features = datasets.Features({"image": datasets.Value("string"), "label": datasets.ClassLabel(names=["a"])})
    datasets.Dataset.from_dict({"image": ["x.png"], "label": [0]}, features).save_to_disk(str(tmp_path / "paths"))
    with pytest.raises(DataError, match=r"column 'image' is Value\(.*string.*not an Image feature; cast it"):
        describe(data_cfg("hf", {"root": str(tmp_path / "paths")}, val_split=None, test_split=None))

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    unlabelled = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"image": [image(1), image(2)], "label": [0, 1]}, features),
        test=datasets.Dataset.from_dict({"image": [image(3)], "label": [-1]}, features),
    )
    unlabelled.save_to_disk(str(tmp_path / "unlabelled"))
    with pytest.raises(DataError, match=r"data\.test_split: split 'test' .* rows without a label \(-1\)"):
        describe(data_cfg("hf", {"root": str(tmp_path / "unlabelled")}, val_split=None))
    other = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["b", "a"])})
    renamed = datasets.DatasetDict(
        train=unlabelled["train"], test=datasets.Dataset.from_dict({"image": [image(3)], "label": [0]}, other)
    )
    renamed.save_to_disk(str(tmp_path / "renamed"))
    with pytest.raises(DataError, match=r"split 'test' .* names its classes differently .*\(b, a vs a, b\)"):
        describe(data_cfg("hf", {"root": str(tmp_path / "renamed")}, val_split=None))
    lopsided = datasets.Dataset.from_dict({"image": [image(1)], "label": [1]}, features)
    lopsided.save_to_disk(str(tmp_path / "lopsided"))
    with pytest.raises(DataError, match=r"data\.train_split: class 'a' has no image in split 'train'"):
        describe(data_cfg("hf", {"root": str(tmp_path / "lopsided")}, val_split=None, test_split=None))


def test_hf_without_datasets_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "ds").mkdir()
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(
        DataError, match=r"^data\.source: hf needs the `datasets` package; run: pip install 'adaptune\[hf\]'$"
    ):
        describe(data_cfg("hf", {"root": str(tmp_path / "ds")}))
