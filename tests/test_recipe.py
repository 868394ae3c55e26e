"""Recipe validation: every problem reported at once, each as file:line: key: problem; did-you-mean for typos."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from adaptune.errors import RecipeError
from adaptune.recipe import load_recipe, method_config, recipe_from_dict

RECIPES = sorted((Path(__file__).parents[1] / "adaptune" / "recipes").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


GOOD = """\
backbone:
  model: test_vit
  img_size: 32
method:
  name: linear
data:
  source: synthetic
train:
  epochs: 1
  lr: 1e-3
"""


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    # the resolved copy written into a run directory loads back to the same recipe
    again = recipe_from_dict(yaml.safe_load(recipe.to_yaml()))
    assert again.to_dict() == recipe.to_dict()


def test_shipped_recipes_exist():
    assert {"quickstart"} <= {p.stem for p in RECIPES}


def test_good_recipe_and_defaults(tmp_path):
    r = load_recipe(write(tmp_path, GOOD))
    assert r.train.lr == 1e-3 and isinstance(r.train.lr, float)  # YAML reads 1e-3 as a string; we accept it
    assert r.method_name == "linear" and r.data.source == "synthetic" and r.name == "r"


def test_errors_are_collected_with_file_line_and_key(tmp_path):
    text = GOOD.replace("  epochs: 1", "  epochs: -3\n  lrr: 0.1").replace("source: synthetic", "source: synthetc")
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, text))
    problems = e.value.problems
    assert len(problems) == 3
    path = str(tmp_path / "r.yaml")
    assert (
        f"{path}:7: data.source: unknown data source 'synthetc'; did you mean 'synthetic'? "
        "(available: builtin, csv, folder, hf, synthetic, vtab)" in problems
    )
    assert f"{path}:9: train.epochs: expected a value >= 1, got -3" in problems
    assert any(p.startswith(f"{path}:10: train.lrr: unknown key; did you mean 'lr'") for p in problems)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            GOOD.replace("img_size: 32", "img_size: big"),
            r"r\.yaml:3: backbone\.img_size: expected an integer or \[an integer, an integer\] or null, got str 'big'",
        ),
        (
            GOOD.replace("name: linear", "name: lorra"),
            r"r\.yaml:5: method\.name: unknown method 'lorra'; did you mean 'lora'",
        ),
        (GOOD + "optimiser: {}\n", r"r\.yaml:11: optimiser: unknown section"),
        (GOOD.replace("method:\n  name: linear\n", ""), r"method: missing; add `method: \{name: adapter\}`"),
        ("backbone: [1, 2\n", r"r\.yaml:\d+: invalid YAML"),
        (GOOD.replace("  name: linear", "  name: linear\n  rank: 4"), r"r\.yaml:6: method\.rank: unknown key"),
    ],
)
def test_bad_recipes(tmp_path, text, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(write(tmp_path, text))


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match=r"nope\.yaml: no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")


def test_overrides_go_through_the_validator(tmp_path):
    path = write(tmp_path, GOOD)
    r = load_recipe(path, ["train.lr=5e-3", "train.epochs=4", "data.synthetic.num_classes=7"])
    assert (r.train.lr, r.train.epochs, r.data.options.num_classes) == (5e-3, 4, 7)
    with pytest.raises(RecipeError, match=r"--set train\.epochs: train\.epochs: expected a value >= 1, got 0"):
        load_recipe(path, ["train.epochs=0"])
    with pytest.raises(RecipeError, match=r"--set lr: keys start with a section"):
        load_recipe(path, ["lr=1"])
    with pytest.raises(RecipeError, match=r"--set train\.lr: expected key\.path=value"):
        load_recipe(path, ["train.lr"])


def test_method_options_validate_against_the_method_config():
    cfg = method_config("lora", rank=4)
    assert cfg.rank == 4
    with pytest.raises(RecipeError, match=r"method\.rank: expected a value >= 1, got 0"):
        method_config("lora", rank=0)


def test_base_recipes_merge_and_errors_name_the_file_that_holds_the_key(tmp_path):
    write(tmp_path, GOOD.replace("  epochs: 1", "  epochs: 1\n  batch_size: 7"))  # r.yaml
    child = tmp_path / "child.yaml"
    child.write_text("base: r.yaml\nmethod: {name: lora, rank: 4}\ntrain: {lr: 5e-3}\n")
    r = load_recipe(child)
    assert (r.name, r.method_name, r.method.rank) == ("child", "lora", 4)
    assert (r.train.lr, r.train.epochs, r.train.batch_size) == (5e-3, 1, 7)  # merged: child wins, base fills in
    assert "base" not in r.to_dict() and load_recipe(child).to_dict() == r.to_dict()
    bad_base = write(tmp_path, GOOD.replace("  epochs: 1", "  epochs: 0"))
    with pytest.raises(RecipeError, match=rf"{bad_base}:9: train\.epochs: expected a value >= 1"):
        load_recipe(child)
    child.write_text("base: r.yaml\ntrain: {lrr: 1}\n")
    with pytest.raises(RecipeError, match=rf"{child}:2: train\.lrr: unknown key"):
        load_recipe(child)


def test_shipped_base_and_bad_bases(tmp_path):
    child = tmp_path / "c.yaml"
    child.write_text("base: quickstart\nmethod: {name: linear}\ntrain: {epochs: 2}\n")
    r = load_recipe(child)
    assert (r.method_name, r.train.epochs, r.backbone.model) == ("linear", 2, "tf_efficientnet_lite0")
    child.write_text("base: nowhere.yaml\n")
    with pytest.raises(RecipeError, match=r"c\.yaml:1: base: no recipe 'nowhere\.yaml'"):
        load_recipe(child)
    child.write_text("base: c.yaml\n")
    with pytest.raises(RecipeError, match=r"base: 'c\.yaml' leads back to c\.yaml"):
        load_recipe(child)
    child.write_text("base: [1]\n")
    with pytest.raises(RecipeError, match=r"base: expected a shipped recipe name or a path"):
        load_recipe(child)


def test_another_data_source_replaces_the_base_section(tmp_path):
    write(tmp_path, GOOD.replace("  source: synthetic\n", "  source: synthetic\n  synthetic: {num_classes: 3}\n"))
    child = tmp_path / "child.yaml"
    child.write_text(f"base: r.yaml\ndata: {{source: folder, folder: {{root: {tmp_path}}}}}\n")
    r = load_recipe(child)
    assert r.data.source == "folder" and r.data.options.root == str(tmp_path)


def test_bare_off_is_the_choice_off_in_files_and_overrides(tmp_path):
    # YAML 1.1 reads `off` as false; a choice spelled "off" is what the user meant
    from adaptune.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("method: {name: linear}\ntrain: {prefix_cache: off}\n")
    assert load_recipe(path).train.prefix_cache == "off"
    path.write_text("method: {name: linear}\n")
    assert load_recipe(path, ["train.prefix_cache=off"]).train.prefix_cache == "off"
