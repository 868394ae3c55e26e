"""The deployment path: merge parity for every method, folded files in plain timm, exports verified, bad input.

Every registered method is trained once (a few steps, a large learning rate so the adapters move) into a module-wide
run directory; the tests read those runs and never change them. Method-specific facts come from the MethodSpec.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import timm
import torch
from conftest import tiny_recipe
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from adaptune.artifacts import load_safetensors
from adaptune.batch import InputSpec
from adaptune.cli import app
from adaptune.errors import ArtifactError, ParityError
from adaptune.export import export
from adaptune.loading import load_artifact
from adaptune.merge import logits, merge
from adaptune.methods import registry
from adaptune.methods.registry import get_method, list_methods
from adaptune.recipe import load_recipe

METHODS = list_methods()
FOLDABLE = [m for m in METHODS if get_method(m).foldable]
NOT_FOLDABLE = [m for m in METHODS if not get_method(m).foldable]
# Methods with training-time structure (split experts) are the hard export case: the fast suite exports them, the
# slow suite every method.
EXPORT_FAST = [m if get_method(m).consolidate is not None else pytest.param(m, marks=pytest.mark.slow) for m in METHODS]
NUM_CLASSES = 4
runner = CliRunner()


def train_tiny(method: str, out_dir, **method_options):
    from adaptune.train import train

    recipe = tiny_recipe(
        method,
        backbone={"model_kwargs": {"depth": 2}},
        method=method_options,
        train={"epochs": 1, "lr": 2e-2, "warmup_epochs": 0.0},
        data={"synthetic": {"num_classes": NUM_CLASSES, "train_per_class": 4, "val_per_class": 2, "test_per_class": 4}},
    )
    return train(recipe, out_dir=out_dir).run_dir


def plain_timm():
    """The backbone as plain timm builds it, no adaptune involved."""
    return timm.create_model("test_vit", pretrained=False, img_size=32, depth=2, num_classes=NUM_CLASSES)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {m: train_tiny(m, root / m) for m in METHODS}


@pytest.fixture(scope="module")
def merged(runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("merged")
    return {m: (root / f"{m}.safetensors", merge(runs[m], root / f"{m}.safetensors")) for m in METHODS}


@pytest.fixture(scope="module")
def images():
    return InputSpec(shape=(3, 32, 32)).example(4)


@pytest.fixture(scope="module")
def reference(runs, images):
    """Each run's logits on ``images``, computed from the run directory."""
    return {m: logits(load_artifact(runs[m]).model, images) for m in METHODS}


def snapshot(path):
    """Every file under ``path`` with its content hash: to prove a run directory was not touched."""
    files = [p for p in path.rglob("*") if p.is_file()]
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("adaptune: error: "), result.stderr
    return lines[0]


# ----------------------------------------------------------------------------------------------------------------
# merge


def test_trained_adapters_are_not_trivial(runs, images, reference):
    """The parity checks below have teeth: every method's trained model differs from its untrained backbone."""
    for method in METHODS:
        trained, _ = load_safetensors(runs[method] / "adapter_model.safetensors")
        if not [k for k in trained if not k.startswith("head.")]:
            continue  # the method trains the head only: nothing to merge
        torch.manual_seed(load_recipe(runs[method] / "recipe.yaml").train.seed)
        untouched = plain_timm()  # same seed, same init as training's backbone
        untouched.load_state_dict({k: trained[k] for k in ("head.weight", "head.bias")}, strict=False)
        effect = (reference[method] - logits(untouched, images)).abs().max().item()
        assert effect > 100 * get_method(method).merge_atol, (method, effect)


@pytest.mark.parametrize("method", METHODS)
def test_merge_parity_form_and_manifest(method, runs, merged, images, reference):
    path, report = merged[method]
    spec = get_method(method)
    assert report["form"] == ("folded" if spec.foldable else "merged")
    assert report["max_abs_diff"] <= report["tolerance"]
    assert path.is_file() and report["keys"] > 0 and report["seconds"] > 0
    _, manifest = load_safetensors(path)
    assert manifest["form"] == report["form"] and manifest["method"]["name"] == method
    assert manifest["backbone"]["model"] == "test_vit" and manifest["num_classes"] == NUM_CLASSES
    assert manifest["recipe"]["method"]["name"] == method and manifest["adaptune_version"]
    assert manifest["format_version"] == 2 and manifest["merge"]["max_abs_diff"] == report["max_abs_diff"]
    assert bool(manifest["extra_modules"]) == (report["form"] == "merged")
    reloaded = load_artifact(path)
    assert reloaded.manifest["form"] == report["form"]
    torch.testing.assert_close(logits(reloaded.model, images), reference[method], atol=report["tolerance"], rtol=0)


@pytest.mark.parametrize("method", FOLDABLE)
def test_folded_file_is_plain_timm(method, runs, merged, images, reference):
    """Folded weights load into `timm.create_model` with strict=True; no adaptune code reads the file."""
    path, report = merged[method]
    state = load_file(str(path))
    model = plain_timm().eval()
    assert sorted(state) == sorted(model.state_dict())  # exactly timm's keys (safetensors sorts them)
    model.load_state_dict(state, strict=True)
    with torch.inference_mode():
        torch.testing.assert_close(model(images), reference[method], atol=report["tolerance"], rtol=0)


def test_merge_never_changes_the_run_directory(runs, tmp_path):
    before = snapshot(runs["lora"])
    merge(runs["lora"], tmp_path / "a.safetensors", checkpoint="last", fold=False)
    assert snapshot(runs["lora"]) == before


def test_no_fold_and_bf16(runs, tmp_path, images, reference):
    unfolded = merge(runs["lora"], tmp_path / "unfolded.safetensors", fold=False)
    assert unfolded["form"] == "merged" and unfolded["extra_modules"]
    half = merge(runs["lora"], tmp_path / "bf16.safetensors", dtype="bf16")
    tensors, manifest = load_safetensors(tmp_path / "bf16.safetensors")
    assert manifest["dtype"] == "bf16" and {t.dtype for t in tensors.values()} == {torch.bfloat16}
    # parity is checked in fp32; rounding to bf16 is reported separately and is much larger
    assert half["max_abs_diff"] <= half["tolerance"] < half["cast_max_abs_diff"]
    model = plain_timm().eval()
    model.load_state_dict(tensors, strict=True)
    assert (logits(model, images) - reference["lora"]).abs().max().item() == pytest.approx(half["cast_max_abs_diff"])


def test_failed_parity_writes_nothing(runs, tmp_path, monkeypatch):
    spec = get_method("lora")

    def broken_fold(model):
        spec.fold(model)
        with torch.no_grad():
            model.blocks[0].attn.qkv.weight.mul_(1.5)

    monkeypatch.setitem(registry._REGISTRY, "lora", dataclasses.replace(spec, fold=broken_fold))
    with pytest.raises(ParityError, match=r"largest logit difference .* exceeds the tolerance .*; nothing was written"):
        merge(runs["lora"], tmp_path / "m.safetensors")
    result = runner.invoke(app, ["merge", str(runs["lora"]), "--out", str(tmp_path / "m.safetensors")])
    assert result.exit_code == 1 and "exceeds the tolerance" in one_error_line(result)
    assert list(tmp_path.iterdir()) == []


def test_merge_cli(runs, tmp_path):
    out = tmp_path / "m.safetensors"
    result = runner.invoke(app, ["merge", str(runs["mosa"]), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["form"] == "merged" and report["out"] == str(out) and out.is_file()
    result = runner.invoke(app, ["merge", str(runs["lora"]), "--out", str(tmp_path / "f.safetensors")])
    assert result.exit_code == 0 and "largest logit difference" in result.stdout and "folded" in result.stdout


# ----------------------------------------------------------------------------------------------------------------
# export


@pytest.mark.parametrize("method", METHODS)
def test_onnx_parity_with_dynamic_batch(method, runs, merged, tmp_path, images, reference):
    import onnx
    import onnxruntime as ort

    out = tmp_path / "model.onnx"
    report = export(runs[method], "onnx", out)
    assert report["max_abs_diff"] <= report["tolerance"] and report["verified_with"].startswith("onnxruntime")
    proto = onnx.load(str(out))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    manifest = json.loads({p.key: p.value for p in proto.metadata_props}["adaptune"])
    assert manifest["format"] == "onnx" and manifest["method"]["name"] == method
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"inputs": images.numpy()})[0])  # batch 4: neither traced nor checked
    torch.testing.assert_close(got, reference[method], atol=report["tolerance"], rtol=0)
    assert session.run(None, {"inputs": images[:1].numpy()})[0].shape == (1, NUM_CLASSES)


@pytest.mark.parametrize("method", EXPORT_FAST)
def test_exported_program_parity(method, runs, merged, tmp_path, images, reference):
    path, _ = merged[method]
    out = tmp_path / "model.pt2"
    report = export(path, "exported-program", out)  # from the merged file: export takes either
    assert report["max_abs_diff"] <= report["tolerance"]
    extra = {"adaptune.json": ""}
    program = torch.export.load(str(out), extra_files=extra)
    assert json.loads(extra["adaptune.json"])["method"]["name"] == method
    with torch.inference_mode():
        torch.testing.assert_close(program.module()(images), reference[method], atol=report["tolerance"], rtol=0)


@pytest.mark.parametrize("method", FOLDABLE)
def test_timm_export_loads_with_local_dir(method, runs, tmp_path, images, reference):
    out = tmp_path / "exported"
    report = export(runs[method], "timm", out)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "test_vit" and config["num_classes"] == NUM_CLASSES
    assert config["label_names"] == [f"class_{i}" for i in range(NUM_CLASSES)]
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.inference_mode():
        torch.testing.assert_close(model(images), reference[method], atol=report["tolerance"], rtol=0)
    again = load_artifact(out)  # eval and export read the exported directory too
    assert again.manifest["form"] == "folded" and again.manifest["format"] == "timm"


def test_timm_export_of_an_unfolded_merged_file_folds_it(runs, tmp_path, images):
    merge(runs["lora"], tmp_path / "unfolded.safetensors", fold=False)
    report = export(tmp_path / "unfolded.safetensors", "timm", tmp_path / "exported")
    assert report["max_abs_diff"] <= report["tolerance"]
    state = load_file(str(tmp_path / "exported" / "model.safetensors"))
    plain_timm().load_state_dict(state, strict=True)


@pytest.mark.parametrize("method", NOT_FOLDABLE)
def test_timm_export_refuses_non_foldable_methods(method, runs, tmp_path):
    with pytest.raises(ArtifactError, match=rf"--format timm: method '{method}' is not linear.*--format onnx"):
        export(runs[method], "timm", tmp_path / "exported")
    result = runner.invoke(app, ["export", str(runs[method]), "--format", "timm", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--format onnx" in one_error_line(result)
    assert list(tmp_path.iterdir()) == []


def test_export_cli(runs, tmp_path):
    out = tmp_path / "m.onnx"
    result = runner.invoke(app, ["export", str(runs["mosa"]), "--format", "onnx", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "largest logit difference" in result.stdout and out.is_file()
    result = runner.invoke(app, ["export", str(runs["mosa"]), "--format", "tflite", "--out", str(tmp_path / "m")])
    assert (
        result.exit_code == 2
        and "--format: unknown format 'tflite'; use one of exported-program, onnx, peft, timm" in one_error_line(result)
    )


# ----------------------------------------------------------------------------------------------------------------
# PEFT


@pytest.fixture(scope="module")
def whole_module_lora(tmp_path_factory):
    """LoRA on whole modules (the fused qkv as one matrix, and fc1), the layout PEFT can hold."""
    return train_tiny("lora", tmp_path_factory.mktemp("peft") / "run", qkv=[], targets=["*.attn.qkv", "*.mlp.fc1"])


def test_peft_export_layout(whole_module_lora, tmp_path):
    report = export(whole_module_lora, "peft", tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 8
    assert config["target_modules"] == [f"blocks.{i}.{m}" for i in range(2) for m in ("attn.qkv", "mlp.fc1")]
    assert config["modules_to_save"] == ["head"]
    tensors, manifest = load_safetensors(tmp_path / "peft" / "adapter_model.safetensors")
    assert manifest["format"] == "peft" and manifest["method"]["name"] == "lora"
    assert tensors["base_model.model.blocks.0.attn.qkv.lora_A.weight"].shape == (8, 64)
    assert tensors["base_model.model.blocks.0.attn.qkv.lora_B.weight"].shape == (192, 8)
    assert tensors["base_model.model.head.weight"].shape == (NUM_CLASSES, 64)
    assert len(tensors) == 2 * 4 + 2 and report["format"] == "peft"


def test_peft_export_loads_in_peft(whole_module_lora, tmp_path, images):
    peft = pytest.importorskip("peft")
    export(whole_module_lora, "peft", tmp_path / "peft")
    model, _, recipe = load_artifact(whole_module_lora)
    torch.manual_seed(recipe.train.seed)
    base = plain_timm()  # the frozen backbone as training built it
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    with torch.inference_mode():
        torch.testing.assert_close(loaded(images), logits(model, images), atol=1e-4, rtol=0)


def test_peft_export_refuses_qkv_slices(runs, tmp_path):
    with pytest.raises(ArtifactError, match=r"--format peft: .* LoRA on whole Linear/Conv2d modules only .*qkv: \[\]"):
        export(runs["lora"], "peft", tmp_path / "peft")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing written


def copy_run(run, tmp_path):
    import shutil

    return shutil.copytree(run, tmp_path / "run")


def rewrite(path, change):
    """Rewrite a safetensors file with ``change(tensors, manifest)`` applied."""
    tensors, manifest = load_safetensors(path)
    change(tensors, manifest)
    save_file(tensors, str(path), metadata={"adaptune": json.dumps(manifest)})


def corrupt(path):
    path.write_bytes(b"\x13\x00\x00\x00\x00\x00\x00\x00{not json at all}")


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def newer_format(path):
    rewrite(path, lambda tensors, manifest: manifest.update(format_version=99))


def other_class_count(path):
    head = {"head.weight": torch.zeros(3, 64), "head.bias": torch.zeros(3)}
    rewrite(path, lambda tensors, manifest: tensors.update(head))


def other_backbone(path):
    def change(tensors, manifest):
        key = next(k for k in tensors if k.endswith("lora_a.weight"))
        tensors[key] = torch.zeros(8, 96)

    rewrite(path, change)


BAD_RUNS = {
    corrupt: "not a readable safetensors file",
    truncate: "not a readable safetensors file",
    newer_format: "format_version 99 is newer than this adaptune",
    other_class_count: "made with another class count",
    other_backbone: "made with another backbone or method options",
}


@pytest.mark.parametrize("damage", BAD_RUNS, ids=lambda f: f.__name__)
def test_bad_run_checkpoint(damage, runs, tmp_path):
    run = copy_run(runs["lora"], tmp_path)
    damage(run / "checkpoints" / "best" / "adapter_model.safetensors")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for args in (
        ["merge", str(run), "--out", str(out_dir / "m.safetensors")],
        ["export", str(run), "--format", "onnx", "--out", str(out_dir / "m.onnx")],
        ["eval", str(run), "--out", str(out_dir / "eval")],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert BAD_RUNS[damage] in one_error_line(result)
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("damage", [corrupt, truncate, newer_format, other_class_count], ids=lambda f: f.__name__)
def test_bad_merged_file(damage, merged, tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(merged["lora"][0].read_bytes())
    damage(path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for args in (
        ["export", str(path), "--format", "exported-program", "--out", str(out_dir / "m.pt2")],
        ["eval", str(path), "--out", str(out_dir / "eval")],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert BAD_RUNS[damage] in one_error_line(result)
    assert list(out_dir.iterdir()) == []


def test_newer_run_manifest(runs, tmp_path):
    run = copy_run(runs["lora"], tmp_path)
    config = json.loads((run / "adaptune_config.json").read_text())
    (run / "adaptune_config.json").write_text(json.dumps({**config, "format_version": 3}))
    result = runner.invoke(app, ["merge", str(run), "--out", str(tmp_path / "m.safetensors")])
    assert result.exit_code == 2 and "format_version 3 is newer than this adaptune" in one_error_line(result)
    assert not (tmp_path / "m.safetensors").exists()


def test_adapter_checkpoint_is_not_a_merged_file(runs, tmp_path):
    result = runner.invoke(app, ["eval", str(runs["lora"] / "adapter_model.safetensors")])
    assert result.exit_code == 2 and "an adapter checkpoint, not a merged model; pass its run directory" in (
        one_error_line(result)
    )


@pytest.mark.parametrize(
    "args",
    [
        ["merge", "{run}", "--out", "{missing}/m.safetensors"],
        ["export", "{run}", "--format", "onnx", "--out", "{missing}/m.onnx"],
        ["export", "{run}", "--format", "timm", "--out", "{missing}/dir"],
        ["eval", "{run}", "--out", "{missing}/eval"],
    ],
    ids=["merge", "onnx", "timm", "eval"],
)
def test_output_in_a_missing_directory(args, runs, tmp_path):
    missing = tmp_path / "nope"
    args = [a.format(run=runs["lora"], missing=missing) for a in args]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert f"directory '{missing}' does not exist; create it first" in one_error_line(result)
    assert not missing.exists()


def test_existing_export_directory_is_not_overwritten(runs, tmp_path):
    (tmp_path / "exported").mkdir()
    (tmp_path / "exported" / "keep.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="already exists; choose another name, or pass --overwrite to replace it"):
        export(runs["lora"], "timm", tmp_path / "exported")
    assert [p.name for p in (tmp_path / "exported").iterdir()] == ["keep.txt"]
