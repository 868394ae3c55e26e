"""Export formats. Each module registers itself; adding a format is one file and one import line here."""

from adaptune.exporters import to_onnx, to_peft, to_program, to_timm  # noqa: F401
from adaptune.exporters.registry import ExportContext, ExportFormat, get_format, list_formats, register

__all__ = ["ExportContext", "ExportFormat", "get_format", "list_formats", "register"]
