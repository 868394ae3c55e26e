"""DDP on CPU (gloo) through `adaptune train --nproc 2`: the same run as one process with the global batch."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
import yaml

from adaptune.artifacts import load_safetensors

RECIPE = {
    "backbone": {"model": "test_vit", "img_size": 32},
    "method": {"name": "lora", "rank": 2},
    "data": {"source": "synthetic", "synthetic": {"num_classes": 4, "train_per_class": 8}},
    "train": {"epochs": 2, "batch_size": 8, "lr": 1e-2, "warmup_epochs": 0, "threads": 1},
}


def run(tmp_path, name, nproc, batch_size):
    raw = json.loads(json.dumps(RECIPE))
    raw["train"]["batch_size"] = batch_size
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "adaptune", "train", str(path), "--out", str(tmp_path / name), "--json", "--quiet"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, "only rank 0 reports"
    return json.loads(lines[0])


def test_two_processes_match_one_process_with_the_global_batch(tmp_path):
    ddp = run(tmp_path, "ddp", nproc=2, batch_size=8)
    single = run(tmp_path, "single", nproc=1, batch_size=16)
    assert ddp["steps"] == single["steps"] == 4
    a, _ = load_safetensors(tmp_path / "ddp" / "checkpoints" / "last" / "adapter_model.safetensors")
    b, _ = load_safetensors(tmp_path / "single" / "checkpoints" / "last" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)
    # validation and test metrics are summed over the processes' shards: the whole split, as on one process
    assert ddp["test_top1_last"] == single["test_top1_last"]
    assert ddp["best_val_top1"] == single["best_val_top1"]
