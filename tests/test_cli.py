"""The command line as scripts use it: exit codes, one-line errors on stderr, --json on stdout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from adaptune.cli import app
from adaptune.methods.registry import get_method, list_methods

runner = CliRunner()
README = Path(__file__).parents[1] / "README.md"

TINY = {
    "backbone": {"model": "test_vit", "img_size": 32},
    "method": {"name": "lora", "rank": 2},
    "data": {"source": "synthetic", "synthetic": {"num_classes": 3, "train_per_class": 4}},
    "train": {"epochs": 1, "batch_size": 4},
}


def recipe_file(tmp_path: Path, **changes) -> Path:
    raw = json.loads(json.dumps(TINY))
    for section, values in changes.items():
        raw[section].update(values)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_help_is_instant_and_imports_no_torch():
    code = "import sys; from adaptune.cli import app; assert 'torch' not in sys.modules and 'timm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("train", "eval", "methods", "recipes"):
        assert command in result.output


def test_train_json_and_eval(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", str(recipe_file(tmp_path)), "--out", str(out), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["run_dir"] == str(out) and summary["method"] == "lora"
    result = runner.invoke(app, ["eval", str(out), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["samples"] == 24 and 0 <= metrics["top1"] <= 100  # 3 classes x 8 test images


def test_set_overrides_and_dry_run(tmp_path):
    result = runner.invoke(
        app, ["train", str(recipe_file(tmp_path)), "--set", "method.rank=4", "--set", "train.lr=5e-3", "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.stdout)
    assert resolved["method"]["rank"] == 4 and resolved["train"]["lr"] == 5e-3
    assert "# matched modules (6):" in result.stdout and "blocks.0.attn.qkv" in result.stdout
    assert "trainable params:" in result.stdout
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"train": {"lrr": 1}}, r"tiny\.yaml:\d+: train\.lrr: unknown key; did you mean 'lr'\?"),
        ({"train": {"epochs": "ten"}}, r"tiny\.yaml:\d+: train\.epochs: expected an integer, got str 'ten'"),
        ({"method": {"name": "mosaa"}}, r"method\.name: unknown method 'mosaa'; did you mean 'mosa'"),
        (
            {"backbone": {"model": "vit_tiny_patch16_22"}},
            r"backbone\.model: 'vit_tiny_patch16_22' is not a timm model; did you mean",
        ),
        ({"method": {"targets": ["blocks.*.atn.qkv"]}}, r"method\.targets: 'blocks\.\*\.atn\.qkv' matched no"),
        (
            {"data": {"source": "vtab", "synthetic": None, "vtab": {"root": "/nonexistent", "task": "cifar"}}},
            r"data\.vtab\.root.*/nonexistent",
        ),
    ],
)
def test_bad_recipes_exit_2_with_one_line(tmp_path, changes, message):
    result = runner.invoke(app, ["train", str(recipe_file(tmp_path, **changes)), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("adaptune: error: ")
    assert "Traceback" not in result.output
    import re

    assert re.search(message, lines[0]), lines[0]


def test_debug_shows_the_traceback(tmp_path):
    result = runner.invoke(app, ["train", str(recipe_file(tmp_path, train={"lrr": 1})), "--debug"])
    assert result.exit_code != 0 and result.exception is not None


def test_eval_of_a_missing_run_dir(tmp_path):
    result = runner.invoke(app, ["eval", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "no such" in result.stderr


def test_methods_lists_the_registry():
    result = runner.invoke(app, ["methods", "--json"])
    assert result.exit_code == 0
    assert [m["name"] for m in json.loads(result.stdout)] == list_methods()


def test_recipes_lists_the_shipped_recipes():
    result = runner.invoke(app, ["recipes"])
    assert result.exit_code == 0 and "quickstart" in result.stdout


def test_readme_generated_sections_are_current():
    """The methods table and recipe reference come from the registry and the config dataclasses."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("update_readme", README.parent / "scripts" / "update_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = README.read_text()
    assert module.render(text) == text, "README is stale: run python scripts/update_readme.py"
    for name in list_methods():
        assert f"| `{name}` | {get_method(name).summary} |" in text


def test_ctrl_c_exits_130_and_resume_finishes(tmp_path):
    """A real SIGINT to a real `adaptune train` process: last checkpoint saved, exit 130, then --resume completes."""
    import signal

    path = recipe_file(tmp_path, train={"epochs": 40, "log_every": 1})
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "adaptune", "train", str(path), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # wait until training is under way
        if line.startswith("step 2/"):
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "adaptune: error: interrupted at step" in err and f"adaptune train --resume {out}" in err
    assert (out / "checkpoints" / "last" / "trainer_state.pt").is_file()
    done = subprocess.run(
        [*cmd[:3], "train", "--resume", str(out), "--json", "--quiet"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["steps"] == 40 * 3  # 12 images, batch 4


def test_version_and_shell_completion(monkeypatch):
    from adaptune import __version__

    # Typer detects the user's shell from the parent process (absent under CI runners and `nohup`); Typer's own
    # switch turns `--show-completion` into an option that takes the shell's name
    monkeypatch.setenv("_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION", "1")

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"adaptune {__version__}"
    result = runner.invoke(app, ["--show-completion", "bash"])
    assert result.exit_code == 0 and "_adaptune_completion" in result.stdout, result.output
    assert "--install-completion" in runner.invoke(app, ["--help"]).stdout
