"""Data sources. Each module registers itself; adding a source is one file and one import line here."""

from adaptune.data.sources import builtin, csv, digits, folder, hf_datasets, structured, synthetic, vtab  # noqa: F401
from adaptune.data.sources.registry import (
    ArrayImages,
    FileImages,
    Source,
    SourceSpec,
    SplitData,
    get_source,
    list_sources,
    open_source,
    option_owners,
    register,
)

__all__ = [
    "ArrayImages",
    "FileImages",
    "Source",
    "SourceSpec",
    "SplitData",
    "get_source",
    "list_sources",
    "open_source",
    "option_owners",
    "register",
]
