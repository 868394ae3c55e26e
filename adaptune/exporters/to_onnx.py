"""``--format onnx``: one ``.onnx`` file (opset 17, dynamic batch dimension, the manifest in
``metadata_props["adaptune"]``), read back with onnxruntime.

Uses torch's TorchScript-based exporter (``dynamo=False``): it needs no extra package (the ``torch.export`` based one
needs ``onnxscript``), exports test_vit about 6x faster here, and is still shipped by the pinned torch.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from adaptune.errors import ArtifactError
from adaptune.exporters.registry import ExportContext, ExportFormat, Runner, register

INPUT_NAME = "inputs"
OUTPUT_NAME = "logits"


def _modules():
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise ArtifactError("--format onnx needs onnx and onnxruntime; run: pip install 'adaptune[onnx]'") from None
    return onnx, onnxruntime


def write(ctx: ExportContext, tmp: Path) -> None:
    import torch

    onnx, _ = _modules()
    with warnings.catch_warnings():  # the tracer's notes on Python constants and the exporter's deprecation
        warnings.simplefilter("ignore")
        torch.onnx.export(
            ctx.model,
            (ctx.trace_inputs,),
            str(tmp),
            dynamo=False,
            opset_version=17,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    proto = onnx.load(str(tmp))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "adaptune", json.dumps(ctx.manifest)
    onnx.save(proto, str(tmp))


def load(ctx: ExportContext, tmp: Path) -> tuple[Runner, str]:
    import torch

    _, ort = _modules()
    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])

    def run(inputs: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {INPUT_NAME: inputs.numpy()})[0])

    return run, f"onnxruntime {ort.__version__}"


register(
    ExportFormat(
        name="onnx",
        summary="one .onnx file, dynamic batch dimension (every method)",
        kind="file",
        write=write,
        load=load,
        suffix=".onnx",
    )
)
