"""Where evaluation requests come from: built-in starter sets and public safety benchmarks.

    >>> from regap.safety.sources import load_requests
    >>> harmful = load_requests("starter-harmful", limit=10)
    >>> mmsb = load_requests("mmsafetybench:/data/MM-SafetyBench", image_type="SD")

See docs/safety-sources.md for the spec syntax and every format.
"""

from regap.safety.sources.core import (
    LABELS,
    SOURCES,
    ImageIssue,
    LoadReport,
    Request,
    Skipped,
    SourceInfo,
    available_sources,
    load_requests,
    load_requests_with_report,
    parse_spec,
    register_source,
    source_info,
    unregister_source,
)

# Importing the loader modules registers the built-in sources.
from regap.safety.sources import builtin, multimodal, text  # noqa: E402,F401  isort: skip
from regap.safety.sources.multimodal import MMSB_PAIRING, Pairing

__all__ = [
    "LABELS",
    "MMSB_PAIRING",
    "SOURCES",
    "ImageIssue",
    "LoadReport",
    "Pairing",
    "Request",
    "Skipped",
    "SourceInfo",
    "available_sources",
    "load_requests",
    "load_requests_with_report",
    "parse_spec",
    "register_source",
    "source_info",
    "unregister_source",
]
