"""Request records, the load report, and the registry that maps a spec string to a loader.

A *spec* names where requests come from: `NAME` for a built-in set or `NAME:PATH` for a
public benchmark on disk (`advbench:/data/harmful_behaviors.csv`). Loaders are plain
generator functions registered with `@register_source` (in `SOURCES`, a `regap.registry.Registry`),
so a user's own format plugs in the same way as the built-in ones.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from regap.errors import RegapError
from regap.registry import Registry
from regap.specs import parse_path_spec

logger = logging.getLogger(__name__)

#: The two labels a request can carry. "benign" requests measure over-refusal.
LABELS = ("harmful", "benign")


@dataclass(frozen=True)
class Request:
    """One evaluation request.

    `image` is a POSIX path relative to `image_root` (never absolute) so run records stay
    portable; `resolved_image()` joins them. `extra` keeps dataset fields that some
    condition or judge needs (e.g. FigStep's `instruction`, XSTest's `focus`).
    """

    id: str
    prompt: str
    category: str
    source: str
    label: str = "harmful"
    image: str | None = None
    image_root: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id.strip():
            raise ValueError("request id must be a non-empty string")
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError(f"request {self.id!r}: prompt must be a non-empty string")
        if self.label not in LABELS:
            raise ValueError(f"request {self.id!r}: label must be one of {LABELS}, got {self.label!r}")

    @property
    def is_harmful(self) -> bool:
        return self.label == "harmful"

    def resolved_image(self) -> Path | None:
        """Absolute image path, or None for a text-only request."""
        if self.image is None:
            return None
        return Path(self.image_root or ".") / self.image

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Skipped(NamedTuple):
    """A row that was not loaded. `line` is 1-based (a CSV header is line 1); None where
    the format has no lines (JSON objects)."""

    line: int | None
    reason: str
    item: str | None = None


class ImageIssue(NamedTuple):
    """An item dropped because of its image: the item id and the path as given."""

    item: str
    path: str


@dataclass
class LoadReport:
    """What happened while loading: every dropped item is listed here, none silently."""

    source: str
    path: str | None = None
    loaded: int = 0
    truncated: bool = False  # stopped early because of `limit`
    sampled_from: int | None = None  # `sample`: how many items the random subset was drawn from
    sample_seed: int | None = None
    skipped: list[Skipped] = field(default_factory=list)
    missing_images: list[ImageIssue] = field(default_factory=list)
    unsafe_paths: list[ImageIssue] = field(default_factory=list)

    def skip(self, line: int | None, reason: str, item: str | None = None) -> None:
        self.skipped.append(Skipped(line, reason, item))

    @property
    def n_dropped(self) -> int:
        return len(self.skipped) + len(self.missing_images) + len(self.unsafe_paths)

    @property
    def clean(self) -> bool:
        return self.n_dropped == 0

    def summary(self, examples: int = 5) -> str:
        """One line for logs and the CLI, with the first few offenders named."""
        where = f" ({self.path})" if self.path else ""
        parts = [f"{self.source}{where}: loaded {self.loaded}"]
        if self.truncated:
            parts.append("stopped at limit")
        if self.sampled_from is not None:
            parts.append(f"random sample of {self.loaded} from {self.sampled_from} (seed {self.sample_seed})")
        if self.skipped:
            shown = ", ".join(_describe_skip(s) for s in self.skipped[:examples])
            more = f", +{len(self.skipped) - examples} more" if len(self.skipped) > examples else ""
            parts.append(f"skipped {len(self.skipped)} malformed ({shown}{more})")
        if self.missing_images:
            shown = ", ".join(i.item for i in self.missing_images[:examples])
            more = ", ..." if len(self.missing_images) > examples else ""
            parts.append(f"{len(self.missing_images)} missing image(s) ({shown}{more})")
        if self.unsafe_paths:
            shown = ", ".join(f"{i.item}: {i.path}" for i in self.unsafe_paths[:examples])
            more = ", ..." if len(self.unsafe_paths) > examples else ""
            count = len(self.unsafe_paths)
            parts.append(f"{count} image path(s) outside the data root rejected ({shown}{more})")
        return "; ".join(parts)


def _describe_skip(s: Skipped) -> str:
    where = f"line {s.line}" if s.line is not None else (s.item or "?")
    return f"{where}: {s.reason}"


#: A loader gets the spec's path (None for built-ins), the report to fill, and its options;
#: it yields requests in file order.
Loader = Callable[..., Iterable[Request]]


@dataclass(frozen=True)
class SourceInfo:
    name: str
    loader: Loader
    needs_path: bool
    description: str
    options: tuple[str, ...]  # keyword-only parameters the loader accepts
    any_options: bool  # the loader takes **kwargs


#: Every request source by name; a loader's options are its parameters after `path, report`.
SOURCES: Registry[Loader] = Registry("request source", skip=2)


def register_source(
    name: str, *, needs_path: bool = True, description: str | None = None, replace: bool = False
) -> Callable[[Loader], Loader]:
    """Register a loader under `name` (decorator).

    The loader is called as `loader(path, report, **options)`; options are its
    keyword-only parameters, so unknown options are caught before it runs.
    """

    def decorator(fn: Loader) -> Loader:
        doc = description if description is not None else (inspect.getdoc(fn) or "").split("\n")[0]
        return SOURCES.register(name, replace=replace, needs_path=needs_path, description=doc)(fn)

    return decorator


def unregister_source(name: str) -> None:
    """Remove a source (mainly for tests and notebooks)."""
    SOURCES.unregister(name)


def available_sources() -> list[str]:
    """Registered source names, sorted."""
    return SOURCES.names()


def source_info(name: str) -> SourceInfo:
    """The registry entry for `name`, or a RegapError listing the valid names."""
    entry = SOURCES.entry(name)
    return SourceInfo(entry.name, entry.obj, entry.info["needs_path"], entry.info["description"], entry.options,
                      entry.any_options)


def parse_spec(spec: str) -> tuple[str, Path | None]:
    """Split `NAME` / `NAME:PATH` at the first colon (so `C:\\...` paths survive); `regap.specs`."""
    return parse_path_spec(spec, "request source")


def load_requests_with_report(
    spec: str, *, limit: int | None = None, sample: int | None = None, seed: int = 0, **options: Any
) -> tuple[list[Request], LoadReport]:
    """Load requests from `spec` and say what was dropped and why.

    `limit` keeps the first N loaded items in file order, so a limited run is a prefix of
    the full run. `sample` keeps N items drawn at random (numpy's generator seeded with
    `seed`) from all of them, in file order: benchmark files are sorted by category, so
    their first N rows cover only the first categories. The draw takes a prefix of one
    seeded permutation, so with the same seed a smaller sample is part of a larger one.
    Ids are checked for uniqueness here, whatever the loader.
    """
    for what, value in (("limit", limit), ("sample", sample)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise RegapError(f"{what} must be a non-negative integer, got {value!r}")
    if limit is not None and sample is not None:
        raise RegapError("give limit (the first N items) or sample (N random items), not both")
    if sample is not None:
        requests, report = load_requests_with_report(spec, **options)
        return _sample(requests, report, sample, seed)
    name, path = parse_spec(spec)
    info = source_info(name)
    if info.needs_path and path is None:
        raise RegapError(f"request source {info.name!r} needs a path: {info.name}:/path/to/data")
    if not info.needs_path and path is not None:
        raise RegapError(f"request source {info.name!r} is built in and takes no path; use {info.name!r}")
    _, options = SOURCES.resolve(info.name, options)

    report = LoadReport(source=info.name, path=str(path) if path is not None else None)
    requests: list[Request] = []
    if limit == 0:
        report.truncated = True
        return requests, report
    seen: set[str] = set()
    items: Iterator[Request] = iter(info.loader(path, report, **options))
    try:
        for request in items:
            if not isinstance(request, Request):
                raise TypeError(f"loader for {info.name!r} yielded {type(request).__name__}, not Request")
            if request.id in seen:
                report.skip(None, f"duplicate id {request.id!r}", request.id)
                continue
            seen.add(request.id)
            requests.append(request)
            if limit is not None and len(requests) >= limit:
                report.truncated = True
                break
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()  # release the file a generator loader still holds open
    report.loaded = len(requests)
    return requests, report


def _sample(requests: list[Request], report: LoadReport, n: int, seed: int) -> tuple[list[Request], LoadReport]:
    import numpy as np

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise RegapError(f"seed must be a non-negative integer, got {seed!r}")
    chosen = sorted(np.random.default_rng(seed).permutation(len(requests))[:n].tolist())
    report.sampled_from, report.sample_seed = len(requests), seed
    report.loaded = len(chosen)
    return [requests[i] for i in chosen], report


def load_requests(spec: str, *, limit: int | None = None, sample: int | None = None, seed: int = 0,
                  **options: Any) -> list[Request]:
    """Load requests from `spec`; dropped items are summarised in one warning log line."""
    requests, report = load_requests_with_report(spec, limit=limit, sample=sample, seed=seed, **options)
    if not report.clean:
        logger.warning("%s", report.summary())
    return requests
