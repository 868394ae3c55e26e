"""Model cards of timm / PEFT exports (front matter, body, the snippets run as written) and ``adaptune push``'s
upload plan and offline errors (the upload itself cannot be tried here)."""

from __future__ import annotations

import importlib
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_recipe
from PIL import Image

from adaptune import hub
from adaptune.errors import ArtifactError
from adaptune.export import export
from adaptune.exporters import model_card
from adaptune.loading import load_artifact
from adaptune.merge import logits


def front_matter(card: str) -> tuple[dict, str]:
    """(metadata, body) of a card; the metadata must be the first thing in the file."""
    match = re.match(r"^---\n(.*?)\n---\n(.*)$", card, flags=re.S)
    assert match, card[:200]
    return yaml.safe_load(match.group(1)), match.group(2)


def snippet(card: str) -> str:
    return re.search(r"```python\n(.*?)```", card, flags=re.S).group(1)


MANIFEST = {
    "format": "peft",
    "format_version": 2,
    "adaptune_version": "0.1.0",
    "timm_version": "1.0.31",
    "method": {"name": "lora", "rank": 8, "targets": ["*.attn.qkv"]},
    "backbone": {"model": "vit_base_patch16_224.augreg_in21k", "pretrained": True, "img_size": None},
    "num_classes": 3,
    "class_names": ["ant", "bee", "cat"],
    "trainable_parameters": 297_219,
    "input": {"shape": [3, 224, 224], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"},
    "recipe": {
        "name": "lora_flowers",
        "data": {
            "source": "hf",
            "train_split": "train",
            "val_split": "validation",
            "test_split": "test",
            "hf": {"root": "/home/me/private/flowers", "hub_id": "nelorth/oxford-flowers"},
        },
        "train": {"epochs": 10, "lr": 0.001, "seed": 3},
    },
}
EVALUATION = {
    "weights": "best",
    "epoch": 7,
    "epochs": 10,
    "steps": 250,
    "ema": False,
    "val_split": "validation",
    "val_top1": 91.25,
    "test_split": "test",
    "test_top1": 90.125,
}


def test_card_metadata_and_body():
    card = model_card.render(MANIFEST, EVALUATION, method_summary="LoRA", resize=(256, 256))
    meta, body = front_matter(card)
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "image-classification"
    assert meta["base_model"] == "timm/vit_base_patch16_224.augreg_in21k" and meta["base_model_relation"] == "adapter"
    assert meta["tags"] == ["image-classification", "adaptune", "lora", "peft", "timm"]
    assert meta["datasets"] == ["nelorth/oxford-flowers"] and "license" not in meta
    assert "# license: not set by adaptune; add the licence you publish under (the base weights are apache-2.0" in card
    (result,) = [r for r in meta["model-index"][0]["results"] if r["dataset"]["split"] == "test"]
    assert result["metrics"] == [{"type": "accuracy", "value": 90.12, "name": "top-1 accuracy (%)"}]
    assert result["dataset"]["type"] == "nelorth/oxford-flowers"
    assert "| val (`validation`) | best weights (epoch 7) | 91.25 |" in body
    assert "| test (`test`) | best weights (epoch 7) | 90.12 |" in body
    assert "Trained for 10 epochs, 250 optimizer steps" in body and "297,219" in body
    assert "resized to 256x256 (bicubic, the aspect ratio is not kept), then the centre 224x224 crop" in body
    assert "/home/me" not in card and "`root: .../flowers`" in body  # local paths are cut to their last part
    code = snippet(card)
    assert 'timm.create_model("vit_base_patch16_224.augreg_in21k", pretrained=True, num_classes=3)' in code
    assert 'PeftModel.from_pretrained(base, "USER/REPO")' in code and "crop_pct=0.875" in code


def test_card_without_evaluation_or_hub_weights():
    local = {**MANIFEST, "format": "timm", "backbone": {"model": "resnet18", "pretrained": "/w/resnet.safetensors"}}
    meta, body = front_matter(model_card.render(local))
    assert "base_model" not in meta and "model-index" not in meta and meta["library_name"] == "timm"
    assert "with weights from `.../resnet.safetensors` (not on the Hub)" in body
    assert "Not recorded with this export" in body
    assert 'timm.create_model("hf-hub:USER/REPO", pretrained=True)' in snippet(model_card.render(local))
    hub_model = {**MANIFEST, "backbone": {"model": "hf-hub:someone/vit-x", "pretrained": True}}
    assert front_matter(model_card.render(hub_model))[0]["base_model"] == "someone/vit-x"


def test_card_parses_with_huggingface_hub():
    huggingface_hub = pytest.importorskip("huggingface_hub")
    card = huggingface_hub.ModelCard(model_card.render(MANIFEST, EVALUATION))
    assert card.data.library_name == "peft" and card.data.base_model == "timm/vit_base_patch16_224.augreg_in21k"
    results = {(r.dataset_split, r.metric_value) for r in card.data.eval_results}
    assert results == {("test", 90.12), ("validation", 91.25)}


@pytest.mark.parametrize(("size", "resize"), [((224, 224), (256, 256)), ((32, 32), (32, 32)), ((384, 384), (438, 438))])
def test_crop_pct_makes_timm_resize_to_the_stored_size(size, resize):
    pct = model_card.crop_pct(size, resize)
    assert math.floor(size[1] / pct) == resize[1] and 0 < pct <= 1


# ----------------------------------------------------------------------------------------------------------------
# exports of a tiny LoRA run


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """LoRA on whole qkv matrices (the layout PEFT can hold), trained for one epoch."""
    from adaptune.train import train

    recipe = tiny_recipe(
        "lora",
        backbone={"model_kwargs": {"depth": 2}},
        method={"qkv": [], "targets": ["*.attn.qkv"]},
        train={"epochs": 1, "lr": 2e-2, "warmup_epochs": 0.0},
    )
    return train(recipe, out_dir=tmp_path_factory.mktemp("card") / "run").run_dir


@pytest.fixture(scope="module")
def exports(lora_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports")
    return {fmt: Path(export(lora_run, fmt, out / fmt)["out"]) for fmt in ("timm", "peft")}


def photo(tmp_path):
    """A non-square photo-like image: resizing it without keeping the aspect ratio is visible in the logits."""
    pixels = np.random.default_rng(0).integers(0, 255, (24, 40, 3), dtype=np.uint8)
    path = tmp_path / "photo.png"
    Image.fromarray(pixels).save(path)
    return path


def adaptune_logits(run_dir, path):
    """The run's model on the image as adaptune's pipeline prepares it (resize, normalise)."""
    from adaptune.data.pipeline import decode
    from adaptune.data.sources import ArrayImages, SplitData

    art = load_artifact(run_dir)
    spec = art.input
    split = SplitData(labels=np.zeros(1, np.int64), images=ArrayImages(np.asarray(Image.open(path))[None]))
    pixels = decode(split, 0, spec.size, spec.interpolation).float() / 255  # (3, H, W)
    mean, std = torch.tensor(spec.mean)[:, None, None], torch.tensor(spec.std)[:, None, None]
    return logits(art.model, ((pixels - mean) / std)[None])


@pytest.mark.parametrize("fmt", ["timm", "peft"])
def test_export_card_snippet_runs_as_written(fmt, lora_run, exports, tmp_path):
    if fmt == "peft":
        pytest.importorskip("peft")
    card = (exports[fmt] / "README.md").read_text()
    meta, body = front_matter(card)
    summary = json.loads((lora_run / "summary.json").read_text())
    assert meta["library_name"] == fmt and "base_model" not in meta  # random-init test_vit is on no Hub
    assert f"| test (`test`) | best weights (epoch 1) | {summary['test_top1_best']:.2f} |" in body
    code = snippet(card).replace('"image.jpg"', repr(str(photo(tmp_path))))
    code = code.replace('"hf-hub:USER/REPO"', repr(f"local-dir:{exports[fmt]}")).replace(
        '"USER/REPO"', repr(str(exports[fmt]))
    )
    scope: dict = {}
    exec(compile(code, f"README.md ({fmt})", "exec"), scope)
    expected = adaptune_logits(lora_run, photo(tmp_path)).softmax(-1)
    torch.testing.assert_close(scope["probs"], expected, atol=1e-5, rtol=0)


def test_exports_hold_the_card_and_the_evaluation(exports, lora_run):
    from adaptune.artifacts import load_safetensors

    summary = json.loads((lora_run / "summary.json").read_text())
    for fmt, out in exports.items():
        plan = hub.plan_upload(out)
        expected = {"timm": ["config.json", "model.safetensors"], "peft": ["adapter_config.json", hub.WEIGHTS["peft"]]}
        assert [f["path"] for f in plan["files"]] == ["README.md", *expected[fmt]]
        assert plan["format"] == fmt and plan["warnings"] == []
        evaluation = load_safetensors(out / hub.WEIGHTS[fmt])[1]["evaluation"]
        assert evaluation["weights"] == "best" and evaluation["epoch"] == summary["best_val_epoch"]
        assert evaluation["test_top1"] == summary["test_top1_best"] and evaluation["val_split"] == "val"
    again = export(exports["timm"], "timm", exports["timm"].parent / "again")  # a timm export passes it on
    assert load_artifact(again["out"]).manifest["evaluation"] == evaluation


# ----------------------------------------------------------------------------------------------------------------
# push


def test_plan_skips_hidden_files_and_refuses_what_is_no_export(exports, lora_run, tmp_path):
    (tmp_path / "copy").mkdir()
    for name in ("README.md", "config.json", "model.safetensors"):
        (tmp_path / "copy" / name).write_bytes((exports["timm"] / name).read_bytes())
    (tmp_path / "copy" / ".adaptune.lock").write_text("")
    (tmp_path / "copy" / ".cache").mkdir()
    (tmp_path / "copy" / ".cache" / "x").write_text("")
    (tmp_path / "copy" / "notes").mkdir()
    (tmp_path / "copy" / "notes" / "eval.txt").write_text("hi")
    plan = hub.plan_upload(tmp_path / "copy")
    assert [f["path"] for f in plan["files"]] == ["README.md", "config.json", "model.safetensors", "notes/eval.txt"]
    assert plan["total_bytes"] == sum((tmp_path / "copy" / f["path"]).stat().st_size for f in plan["files"])
    (tmp_path / "copy" / "README.md").unlink()
    assert "no README.md (model card)" in hub.plan_upload(tmp_path / "copy")["warnings"][0]
    assert "would upload 3 files" in hub.format_plan(hub.plan_upload(tmp_path / "copy"), "me/x")

    with pytest.raises(ArtifactError, match=r"a run directory, which timm and PEFT cannot load; export it first"):
        hub.plan_upload(lora_run)
    with pytest.raises(ArtifactError, match=r"no such directory; create the export first: adaptune export"):
        hub.plan_upload(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    torch.save({}, tmp_path / "plain" / "pytorch_model.bin")
    with pytest.raises(ArtifactError, match=r"not an adaptune timm or PEFT export .*--format timm"):
        hub.plan_upload(tmp_path / "plain")


@pytest.fixture
def hf_hub(monkeypatch, tmp_path):
    """huggingface_hub with no token anywhere (environment, token file)."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"), raising=False)
    return huggingface_hub


def test_push_offline_mode_is_one_clear_line(exports, hf_hub, monkeypatch):
    monkeypatch.setattr(hf_hub.constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at import
    with pytest.raises(hub.HubError, match=r"^the Hugging Face Hub is in offline mode \(HF_HUB_OFFLINE is set\).*"):
        hub.push(exports["timm"], "someone/lora-test", token="hf_not_a_real_token")
    assert hub.HubError.exit_code == 1


def test_push_without_a_token_or_huggingface_hub(exports, hf_hub, monkeypatch):
    with pytest.raises(ArtifactError, match=r"^no Hugging Face token; set HF_TOKEN to a write token .*hf auth login"):
        hub.push(exports["peft"], "someone/lora-test")
    with pytest.raises(ArtifactError, match=r"REPO_ID: 'a/b/c' "):
        hub.push(exports["peft"], "a/b/c", token="hf_x")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(
        ArtifactError, match=r"^adaptune push needs huggingface_hub; run: pip install 'adaptune\[hub\]'$"
    ):
        hub.push(exports["peft"], "someone/lora-test", token="hf_x")


def _transport(hf_hub):
    """The HTTP library huggingface_hub raises transport errors from (httpx, or a fork of it)."""
    return importlib.import_module(hf_hub.errors.HTTPError.__module__.split(".")[0])


@pytest.mark.parametrize(
    ("status", "error", "match"),
    [
        (None, hub.HubError, r"^cannot reach the Hugging Face Hub \(ConnectError: .*\); check the network"),
        (401, ArtifactError, r"^the Hub refused the token \(401 Unauthorized\); set HF_TOKEN"),
        (403, ArtifactError, r"^the token may not write to 'someone' \(403 Forbidden\)"),
        (503, hub.HubError, r"^the Hub answered 503 .*try adaptune push again later"),
    ],
)
def test_push_turns_network_and_auth_failures_into_one_line(exports, hf_hub, monkeypatch, status, error, match):
    http = _transport(hf_hub)
    request = http.Request("POST", "https://huggingface.co/api/repos/create")

    def create_repo(self, *args, **kwargs):
        if status is None:
            raise http.ConnectError("[Errno -2] Name or service not known", request=request)
        raise hf_hub.errors.HfHubHTTPError(f"{status} Client Error", response=http.Response(status, request=request))

    monkeypatch.setattr(hf_hub.HfApi, "create_repo", create_repo)
    with pytest.raises(error, match=match) as info:
        hub.push(exports["timm"], "someone/lora-test", token="hf_x")
    assert "\n" not in str(info.value)


def test_push_commits_the_planned_files_with_the_repo_id_in_the_card(exports, hf_hub, monkeypatch):
    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, **kwargs):
            calls["create_repo"] = (repo_id, kwargs)
            return hf_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_commit(self, repo_id, operations, **kwargs):
            calls["commit"] = (repo_id, {op.path_in_repo: op.path_or_fileobj for op in operations}, kwargs)
            return hf_hub.CommitInfo(
                commit_url=f"https://huggingface.co/{repo_id}/commit/abc",
                commit_message="",
                commit_description="",
                oid="abc",
            )

    monkeypatch.setattr(hf_hub, "HfApi", FakeApi)
    report = hub.push(exports["peft"], "someone/lora-test", private=True, token="hf_x")
    assert calls["create_repo"] == ("someone/lora-test", {"private": True, "exist_ok": True, "repo_type": "model"})
    repo_id, files, _ = calls["commit"]
    assert repo_id == "someone/lora-test" and sorted(files) == [f["path"] for f in report["files"]]
    card = files["README.md"].decode()
    assert 'PeftModel.from_pretrained(base, "someone/lora-test")' in card and "USER/REPO" not in card
    assert str(files["adapter_model.safetensors"]) == str(exports["peft"] / "adapter_model.safetensors")
    assert report["commit"] == "abc" and "pushed 3 files" in hub.format_push_report(report)
