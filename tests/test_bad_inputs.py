"""Every bad input a user can give, through the real command line (`adaptune.cli.main`): the exit code, one
``adaptune: error:`` line naming the key or file and the fix, no traceback, and nothing left behind.

One row per input: (id, how to set it up, the arguments, the exit code, a fragment of the message).
"""

from __future__ import annotations

import json
import pickle
import shutil
import signal
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_recipe

from adaptune.cli import main

TINY = tiny_recipe("lora").to_dict()


def write_recipe(path: Path, **changes) -> Path:
    """TINY with ``changes`` deep-merged (a value None deletes the key)."""
    raw = json.loads(json.dumps(TINY))
    for section, values in changes.items():
        if not isinstance(values, dict) or section not in raw:
            raw[section] = values
            continue
        for key, value in values.items():
            if value is None:
                raw[section].pop(key, None)
            else:
                raw[section][key] = value
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A finished LoRA run, a finished adapter run, a merged file, and a VTAB-1k-style data root."""
    from PIL import Image

    from adaptune.merge import merge
    from adaptune.train import train

    root = tmp_path_factory.mktemp("world")
    lora = train(tiny_recipe("lora", train={"epochs": 1}), out_dir=root / "lora").run_dir
    adapter = train(tiny_recipe("adapter", train={"epochs": 1}), out_dir=root / "adapter").run_dir
    merge(lora, root / "lora.safetensors")
    vtab = root / "vtab"
    for task in ("eurosat",):
        for split, n in (("train800", 4), ("val200", 2), ("train800val200", 6), ("test", 2)):
            (vtab / task / "images").mkdir(parents=True, exist_ok=True)
            lines = []
            for i in range(n):
                rel = f"images/{split}_{i}.png"
                Image.new("RGB", (8, 8), (30 * i, 0, 0)).save(vtab / task / rel)
                lines.append(f"{rel} {i % 2}")
            (vtab / task / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return {"lora": lora, "adapter": adapter, "merged": root / "lora.safetensors", "vtab": vtab}


def copy_run(world, tmp: Path, name: str = "lora", unfinished: bool = False) -> Path:
    run = tmp / f"{name}-copy"
    shutil.copytree(world[name], run)
    if unfinished:
        (run / "summary.json").unlink()
    return run


def edit_json(path: Path, fn) -> Path:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(fn(data)))
    return path


class Evil:
    def __reduce__(self):
        return (print, ("this ran",))


def crafted_state(run: Path) -> Path:
    torch.save({"optimizer": Evil(), "loop": {}, "rng": {}}, run / "checkpoints" / "last" / "trainer_state.pt")
    return run


def pickled_state(run: Path) -> Path:
    """A plain pickle (not torch.save's format) that would run code."""
    (run / "checkpoints" / "last" / "trainer_state.pt").write_bytes(pickle.dumps({"optimizer": Evil()}))
    return run


def state_without_optimizer(run: Path) -> Path:
    path = run / "checkpoints" / "last" / "trainer_state.pt"
    state = torch.load(path, weights_only=True)
    del state["optimizer"]
    torch.save(state, path)
    return run


def weights_of(model: str, path: Path) -> Path:
    import timm
    from safetensors.torch import save_file

    save_file(timm.create_model(model, pretrained=False).state_dict(), path)
    return path


V = "vit_tiny_patch16_224"  # a ViT with a fixed input size
# id -> (setup(world, tmp) -> argv, exit code, message fragment)
CASES = {
    # -- train: the recipe file
    "recipe-missing": (lambda w, t: ["train", str(t / "nope.yaml")], 2, "no such recipe file"),
    "recipe-not-utf8": (lambda w, t: ["train", str(_bytes(t / "r.yaml", b"name: \xff\xfe"))], 2, "not UTF-8"),
    "recipe-bad-yaml": (lambda w, t: ["train", str(_text(t / "r.yaml", "backbone: [1, 2\n"))], 2, "invalid YAML"),
    "recipe-a-list": (lambda w, t: ["train", str(_text(t / "r.yaml", "- 1\n- 2\n"))], 2, "must be a mapping"),
    "recipe-a-directory": (lambda w, t: ["train", str(t) + "/"], 2, "is a directory"),
    "unknown-section": (lambda w, t: ["train", str(write_recipe(t / "r.yaml", optimiser={}))], 2, "unknown section"),
    "duplicate-section": (
        lambda w, t: ["train", str(_text(t / "r.yaml", write_recipe(t / "a.yaml").read_text() + "train: {lr: 1}\n"))],
        2,
        "train: appears twice",
    ),
    "duplicate-key": (
        lambda w, t: ["train", str(_text(t / "r.yaml", "method: {name: lora, rank: 2, rank: 4}\n"))],
        2,
        "method.rank: appears twice",
    ),
    "typo-key": (lambda w, t: ["train", str(write_recipe(t / "r.yaml", train={"lrr": 1}))], 2, "did you mean 'lr'"),
    "wrong-type": (
        lambda w, t: ["train", str(write_recipe(t / "r.yaml", train={"epochs": "ten"}))],
        2,
        "train.epochs: expected an integer, got str 'ten'",
    ),
    "out-of-range": (lambda w, t: ["train", str(write_recipe(t / "r.yaml", train={"epochs": -1}))], 2, ">= 1"),
    "infinite-lr": (
        lambda w, t: (
            ["train", str(_text(t / "r.yaml", write_recipe(t / "a.yaml").read_text() + "\n")), "--set", "train.lr=.inf"]
        ),
        2,
        "train.lr: expected a finite number",
    ),
    "nan-weight-decay": (
        lambda w, t: ["train", str(write_recipe(t / "r.yaml")), "--set", "train.weight_decay=.nan"],
        2,
        "expected a finite number",
    ),
    "zero-lr": (
        lambda w, t: ["train", str(write_recipe(t / "r.yaml", train={"lr": 0}))],
        2,
        "train.lr: expected a value > 0",
    ),
    "zero-batch": (lambda w, t: ["train", str(write_recipe(t / "r.yaml", train={"batch_size": 0}))], 2, "batch_size"),
    "no-method": (lambda w, t: ["train", str(write_recipe(t / "r.yaml", method=None))], 2, "method: missing"),
    "unknown-method": (
        lambda w, t: ["train", str(write_recipe(t / "r.yaml", method={"name": "lorra"}))],
        2,
        "unknown method 'lorra'; did you mean 'lora'",
    ),
    "option-of-another-method": (
        lambda w, t: ["train", str(write_recipe(t / "r.yaml", method={"num_experts": 4}))],
        2,
        "method.num_experts: unknown key; it is an option of",
    ),
    "method-option-type": (
        lambda w, t: ["train", str(write_recipe(t / "r.yaml", method={"rank": "x"}))],
        2,
        "method.rank: expected an integer",
    ),
    "unknown-source": (
        lambda w, t: ["train", str(write_recipe(t / "r.yaml", data={"source": "vtba"}))],
        2,
        "unknown data source 'vtba'; did you mean 'vtab'",
    ),
    "flat-source-key": (
        lambda w, t: ["train", str(write_recipe(t / "r.yaml", data={"root": "/x"}))],
        2,
        "data.root: unknown key; it is an option of data source",
    ),
    "section-of-another-source": (
        lambda w, t: ["train", str(write_recipe(t / "r.yaml", data={"vtab": {"root": "/x"}}))],
        2,
        "data.vtab: options of data source 'vtab', but data.source is 'synthetic'",
    ),
    "vtab-root-missing": (
        lambda w, t: ["train", str(_vtab(t, root=str(t / "nowhere"), task="eurosat"))],
        2,
        "data.vtab.root: directory",
    ),
    "vtab-task-missing": (
        lambda w, t: ["train", str(_vtab(t, root=str(w["vtab"]), task="cifra"))],
        2,
        "no folder 'cifra'",
    ),
    "vtab-task-unset": (lambda w, t: ["train", str(_vtab(t, root=str(w["vtab"])))], 2, "data.vtab.task: not set"),
    "vtab-val-list-missing": (
        lambda w, t: ["train", str(_vtab(t, root=str(w["vtab"]), task="eurosat", val_split="val300"))],
        2,
        "data.val_split: list file",
    ),
    "unknown-builtin": (
        lambda w, t: [
            "train",
            str(
                write_recipe(
                    t / "r.yaml", data={"source": "builtin", "synthetic": None, "builtin": {"name": "mnist-fashion"}}
                )
            ),
        ],
        2,
        "data.builtin.name: unknown built-in dataset",
    ),
    "unknown-split": (
        lambda w, t: ["train", str(write_recipe(t / "r.yaml", data={"val_split": "valid"}))],
        2,
        "data.val_split: 'valid' is not a split",
    ),
    "img-size-wrong-length": (
        lambda w, t: ["train", str(write_recipe(t / "r.yaml", data={"img_size": [32, 32, 3]}))],
        2,
        "got a list of 3",
    ),
    "img-size-below-patch": (
        lambda w, t: ["train", str(write_recipe(t / "r.yaml", data={"img_size": 8}))],
        2,
        "smaller than test_vit's patch size",
    ),
    "img-size-disagrees": (
        lambda w, t: [
            "train",
            str(
                write_recipe(
                    t / "r.yaml",
                    backbone={"model": V, "img_size": 32, "model_kwargs": {"depth": 1}},
                    data={"img_size": 48},
                )
            ),
        ],
        2,
        "data.img_size: 48 does not fit vit_tiny_patch16_224, built for 32",
    ),
    "unknown-model": (
        lambda w, t: ["train", str(write_recipe(t / "r.yaml", backbone={"model": "vit_tiny_patch16_22"}))],
        2,
        "is not a timm model; did you mean",
    ),
    "model-option-rejected": (
        lambda w, t: ["train", str(write_recipe(t / "r.yaml", backbone={"model_kwargs": {"no_such_arg": 1}}))],
        2,
        "rejected an option",
    ),
    "weights-missing": (
        lambda w, t: ["train", str(write_recipe(t / "r.yaml", backbone={"pretrained": str(t / "w.safetensors")}))],
        2,
        "weights file",
    ),
    "weights-not-weights": (
        lambda w, t: ["train", str(write_recipe(t / "r.yaml", backbone={"pretrained": str(_text(t / "w.txt", "x"))}))],
        2,
        "is not a weights file",
    ),
    "weights-of-another-model": (
        lambda w, t: [
            "train",
            str(write_recipe(t / "r.yaml", backbone={"pretrained": str(weights_of("resnet10t", t / "w.safetensors"))})),
        ],
        2,
        "the weights do not fit 'test_vit'",
    ),
    "weights-package-unknown": (
        lambda w, t: ["train", str(write_recipe(t / "r.yaml", backbone={"pretrained": "package:resnet"}))],
        2,
        "unknown weights package",
    ),
    "targets-match-nothing": (
        lambda w, t: ["train", str(write_recipe(t / "r.yaml", method={"targets": ["blocks.*.atn.qkv"]}))],
        2,
        "method.targets: 'blocks.*.atn.qkv' matched no",
    ),
    "unknown-device": (
        lambda w, t: ["train", str(write_recipe(t / "r.yaml", train={"device": "gpu"}))],
        2,
        "is not a device",
    ),
    "set-without-value": (
        lambda w, t: ["train", str(write_recipe(t / "r.yaml")), "--set", "train.lr"],
        2,
        "expected key.path=value",
    ),
    "set-without-section": (
        lambda w, t: ["train", str(write_recipe(t / "r.yaml")), "--set", "lr=1"],
        2,
        "keys start with a section",
    ),
    "set-out-of-range": (
        lambda w, t: ["train", str(write_recipe(t / "r.yaml")), "--set", "train.epochs=0"],
        2,
        "--set train.epochs: train.epochs: expected a value >= 1",
    ),
    "out-is-a-file": (
        lambda w, t: ["train", str(write_recipe(t / "r.yaml")), "--out", str(_text(t / "f", "x"))],
        2,
        "is a file",
    ),
    "out-not-a-run": (
        lambda w, t: [
            "train",
            str(write_recipe(t / "r.yaml")),
            "--out",
            str(_text(t / "d" / "notes.txt", "mine").parent),
        ],
        2,
        "not empty and not an adaptune run directory",
    ),
    "out-holds-a-run": (
        lambda w, t: ["train", str(write_recipe(t / "r.yaml")), "--out", str(copy_run(w, t))],
        2,
        "already holds a run; continue it with --resume",
    ),
    "no-recipe": (lambda w, t: ["train"], 2, "missing RECIPE"),
    "unknown-option": (lambda w, t: ["train", "quickstart", "--bogus"], 2, "No such option: --bogus"),
    "nproc-zero": (lambda w, t: ["train", "quickstart", "--nproc", "0"], 2, "Invalid value for '--nproc'"),
    "unknown-command": (lambda w, t: ["trian"], 2, "No such command 'trian'"),
    # -- train --resume
    "resume-missing-dir": (lambda w, t: ["train", "--resume", str(t / "nope")], 2, "--resume: no such run directory"),
    "resume-not-a-run": (lambda w, t: ["train", "--resume", str(t)], 2, "not a run directory"),
    "resume-with-set": (
        lambda w, t: ["train", "--resume", str(copy_run(w, t, unfinished=True)), "--set", "train.lr=1"],
        2,
        "--set cannot change a run being resumed",
    ),
    "resume-with-other-out": (
        lambda w, t: ["train", "--resume", str(copy_run(w, t, unfinished=True)), "--out", str(t / "elsewhere")],
        2,
        "a resumed run stays in its directory",
    ),
    "resume-with-another-recipe": (
        lambda w, t: [
            "train",
            str(write_recipe(t / "r.yaml", train={"lr": 0.5})),
            "--resume",
            str(copy_run(w, t, unfinished=True)),
        ],
        2,
        "differs from the recipe of the run being resumed (train.",
    ),
    "resume-finished": (lambda w, t: ["train", "--resume", str(copy_run(w, t))], 2, "the run has finished"),
    "resume-edited-recipe": (
        lambda w, t: ["train", "--resume", str(_edit_run_recipe(copy_run(w, t, unfinished=True)))],
        2,
        "differs from the recipe the checkpoint was trained with (train.lr)",
    ),
    "resume-crafted-pickle": (
        lambda w, t: ["train", "--resume", str(crafted_state(copy_run(w, t, unfinished=True)))],
        2,
        "refused: it names code to run when loaded",
    ),
    "resume-plain-pickle": (
        lambda w, t: ["train", "--resume", str(pickled_state(copy_run(w, t, unfinished=True)))],
        2,
        "not a trainer state adaptune can load safely",
    ),
    "resume-state-without-optimizer": (
        lambda w, t: ["train", "--resume", str(state_without_optimizer(copy_run(w, t, unfinished=True)))],
        2,
        "no 'optimizer' in the trainer state",
    ),
    "resume-damaged-state": (
        lambda w, t: [
            "train",
            "--resume",
            str(_damage(copy_run(w, t, unfinished=True), "checkpoints/last/trainer_state.pt")),
        ],
        2,
        "trainer_state.pt: unreadable",
    ),
    # -- eval
    "eval-missing": (lambda w, t: ["eval", str(t / "nope")], 2, "no such file or directory"),
    "eval-not-an-artifact": (lambda w, t: ["eval", str(t)], 2, "neither a run directory"),
    "eval-unknown-split": (
        lambda w, t: ["eval", str(w["lora"]), "--split", "tset", "--out", str(t / "e")],
        2,
        "--split: 'tset'",
    ),
    "eval-unknown-checkpoint": (
        lambda w, t: ["eval", str(w["lora"]), "--checkpoint", "first"],
        2,
        "expected best, last or final",
    ),
    "eval-data-root-for-builtin": (
        lambda w, t: ["eval", str(w["lora"]), "--data-root", str(t)],
        2,
        "reads no files from a root",
    ),
    "eval-out-parent-missing": (
        lambda w, t: ["eval", str(w["lora"]), "--out", str(t / "a" / "b")],
        2,
        "does not exist",
    ),
    "eval-corrupt-file": (
        lambda w, t: ["eval", str(_bytes(t / "m.safetensors", b"\x10\x00\x00\x00garbage"))],
        2,
        "not a readable safetensors",
    ),
    "eval-truncated-file": (
        lambda w, t: ["eval", str(_truncated(w["merged"], t / "m.safetensors"))],
        2,
        "not a readable safetensors",
    ),
    "eval-no-manifest": (
        lambda w, t: ["eval", str(_plain_safetensors(t / "m.safetensors"))],
        2,
        "no adaptune manifest",
    ),
    "eval-manifest-not-object": (
        lambda w, t: ["eval", str(_manifest(copy_run(w, t), lambda m: [m]))],
        2,
        "not a JSON object",
    ),
    "eval-manifest-no-classes": (
        lambda w, t: [
            "eval",
            str(_manifest(copy_run(w, t), lambda m: {k: v for k, v in m.items() if k != "num_classes"})),
        ],
        2,
        "no valid num_classes",
    ),
    "eval-manifest-newer": (
        lambda w, t: ["eval", str(_manifest(copy_run(w, t), lambda m: {**m, "format_version": 99}))],
        2,
        "format_version 99 is newer than this adaptune",
    ),
    "eval-manifest-not-json": (
        lambda w, t: ["eval", str(_damage(copy_run(w, t), "adaptune_config.json"))],
        2,
        "not valid JSON",
    ),
    "eval-recipe-damaged": (
        lambda w, t: ["eval", str(_damage(copy_run(w, t), "recipe.yaml", b"[: ::"))],
        2,
        "recipe.yaml: not valid YAML",
    ),
    # -- merge
    "merge-out-exists": (
        lambda w, t: ["merge", str(w["lora"]), "--out", str(_text(t / "m.safetensors", "x"))],
        2,
        "already exists",
    ),
    "merge-out-in-run": (
        lambda w, t: ["merge", str(w["lora"]), "--out", str(w["lora"] / "m.safetensors")],
        2,
        "inside the run directory",
    ),
    "merge-out-parent-missing": (
        lambda w, t: ["merge", str(w["lora"]), "--out", str(t / "a" / "m.safetensors")],
        2,
        "does not exist",
    ),
    "merge-out-is-dir": (lambda w, t: ["merge", str(w["lora"]), "--out", str(t)], 2, "is a directory"),
    "merge-bad-dtype": (
        lambda w, t: ["merge", str(w["lora"]), "--out", str(t / "m.safetensors"), "--dtype", "fp8"],
        2,
        "--dtype",
    ),
    "merge-a-file": (
        lambda w, t: ["merge", str(w["merged"]), "--out", str(t / "m.safetensors")],
        2,
        "merge takes a run directory",
    ),
    "merge-no-out": (lambda w, t: ["merge", str(w["lora"])], 2, "Missing option '--out'"),
    "merge-tensor-shape": (
        lambda w, t: ["merge", str(_reshape_head(copy_run(w, t))), "--out", str(t / "m.safetensors")],
        2,
        "the checkpoint was made with another class count",
    ),
    # -- export
    "export-unknown-format": (
        lambda w, t: ["export", str(w["merged"]), "--format", "tflite", "--out", str(t / "m")],
        2,
        "unknown format 'tflite'",
    ),
    "export-timm-not-foldable": (
        lambda w, t: ["export", str(w["adapter"]), "--format", "timm", "--out", str(t / "m")],
        2,
        "cannot be folded into plain timm weights",
    ),
    "export-onnx-out-exists": (
        lambda w, t: ["export", str(w["merged"]), "--format", "onnx", "--out", str(_text(t / "m.onnx", "x"))],
        2,
        "already exists",
    ),
    "export-dir-out-not-empty": (
        lambda w, t: ["export", str(w["merged"]), "--format", "timm", "--out", str(_text(t / "d" / "x", "x").parent)],
        2,
        "already exists",
    ),
    "export-dir-out-is-file": (
        lambda w, t: ["export", str(w["merged"]), "--format", "timm", "--out", str(_text(t / "f", "x"))],
        2,
        "is a file",
    ),
    "export-file-out-is-dir": (
        lambda w, t: ["export", str(w["merged"]), "--format", "onnx", "--out", str(t)],
        2,
        "is a directory",
    ),
    "export-out-in-run": (
        lambda w, t: ["export", str(w["lora"]), "--format", "onnx", "--out", str(w["lora"] / "m.onnx")],
        2,
        "inside the run directory",
    ),
    "export-peft-qv-slices": (
        lambda w, t: ["export", str(w["lora"]), "--format", "peft", "--out", str(t / "p")],
        2,
        "PEFT's layout holds LoRA on whole Linear/Conv2d modules only",
    ),
    # -- sweep
    "sweep-not-vtab": (
        lambda w, t: ["sweep", str(write_recipe(t / "r.yaml")), "--tasks", "eurosat"],
        2,
        "a sweep runs VTAB-1k tasks",
    ),
    "sweep-unknown-preset": (
        lambda w, t: ["sweep", str(_vtab(t, root=str(w["vtab"]))), "--tasks", "vtab-natrual"],
        2,
        "unknown preset 'vtab-natrual'",
    ),
    "sweep-no-tasks": (
        lambda w, t: ["sweep", str(_vtab(t, root=str(w["vtab"]))), "--tasks", " , "],
        2,
        "no task given",
    ),
    "sweep-missing-task": (
        lambda w, t: ["sweep", str(_vtab(t, root=str(w["vtab"]))), "--tasks", "eurosat,dtd", "--out", str(t / "s")],
        2,
        "data.vtab.task: no folder 'dtd'",
    ),
    "sweep-no-tasks-option": (lambda w, t: ["sweep", "quickstart"], 2, "Missing option '--tasks'"),
}


def _text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _vtab(tmp: Path, **vtab) -> Path:
    split = {k: vtab.pop(k) for k in ("val_split",) if k in vtab}
    return write_recipe(tmp / "v.yaml", data={"source": "vtab", "synthetic": None, "vtab": vtab, **split})


def _edit_run_recipe(run: Path) -> Path:
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["train"]["lr"] = 0.5
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return run


def _damage(run: Path, rel: str, data: bytes = b"\x00garbage") -> Path:
    (run / rel).write_bytes(data)
    return run


def _truncated(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes()[:-100])
    return dst


def _plain_safetensors(path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, path)
    return path


def _manifest(run: Path, fn) -> Path:
    edit_json(run / "adaptune_config.json", fn)
    return run


def _reshape_head(run: Path) -> Path:
    from safetensors.torch import load_file, save_file

    for path in [run / "adapter_model.safetensors", *run.glob("checkpoints/*/adapter_model.safetensors")]:
        tensors = load_file(path)
        tensors["head.weight"] = torch.zeros(7, tensors["head.weight"].shape[1])
        save_file(tensors, path)
    return run


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    old = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as e:
            main(argv)
    finally:
        signal.signal(signal.SIGTERM, old)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_the_table_is_large_and_distinct():
    assert len(CASES) >= 60
    assert len({m for _, _, m in CASES.values()}) >= 55, "each row checks its own message"


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(case, world, tmp_path, capsys):
    setup, code, fragment = CASES[case]
    argv = setup(world, tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    got, out, err = run_cli(argv, capsys)
    lines = err.strip().splitlines()
    assert got == code, (argv, err)
    assert len(lines) == 1 and lines[0].startswith("adaptune: error: "), err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in err + out and "this ran" not in out
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert after == before, "a refused command leaves nothing behind"
