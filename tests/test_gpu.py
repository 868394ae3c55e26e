"""CUDA paths: mixed precision training and evaluation. Skipped without a GPU."""

from __future__ import annotations

import pytest
from conftest import tiny_recipe

from adaptune.train import train

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("method", ["lora", "mosa"])
def test_cuda_training_learns(tmp_path, method, precision):
    recipe = tiny_recipe(method, tmp_path, train={"device": "cuda", "precision": precision, "epochs": 3, "lr": 1e-2})
    summary = train(recipe).summary
    assert summary["test_top1_last"] > 50.0  # 4 easy synthetic classes: chance is 25%
    assert summary["peak_memory_mb"] > 0
