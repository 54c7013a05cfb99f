"""Other training sources turned into conversations, and a deterministic mixer.

* ``text_only_samples``: instruction data (``{"instruction", "input"?, "output"?}``, the
  Alpaca layout) as text-only conversations. Rows without an output have no training
  target: they are skipped and counted, unless ``keep_without_output`` asks for them as
  prompt-only samples (for generation / evaluation, not for training).
* ``vlguard_to_llava``: VLGuard's ``train.json`` as LLaVA conversations, one per
  instruction-response pair.
* ``mix``: an interleaved ``(dataset, item)`` index list with exact, seeded proportions.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence, Sized

from regap.data.llava_json import (
    IMAGE_TOKEN,
    ConversationSample,
    LlavaJsonDataset,
    _Malformed,
    read_rows,
    safe_relative_path,
)
from regap.errors import RegapError
from regap.files import stable_random

# --------------------------------------------------------------------------- text only


@dataclass
class TextOnlySamples:
    """Text-only conversations read from an instruction file, with what was skipped."""

    source: str
    samples: list[ConversationSample] = field(default_factory=list)
    skipped_without_output: int = 0
    malformed: list[tuple[int, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> ConversationSample:
        return self.samples[index]

    def __iter__(self) -> Iterator[ConversationSample]:
        return iter(self.samples)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "loaded": len(self.samples),
            "skipped_without_output": self.skipped_without_output,
            "malformed": [{"index": i, "reason": r} for i, r in self.malformed],
        }


def _optional_text(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _Malformed(f"'{key}' must be a string, got {type(value).__name__}")
    return value


def text_only_samples(path: str | Path, *, keep_without_output: bool = False) -> TextOnlySamples:
    """Read a JSON list (or JSONL) of instruction rows as text-only conversations.

    The user turn is ``instruction``, followed by a blank line and ``input`` when that is
    non-empty (Alpaca); the assistant turn is ``output``. A row whose ``output`` is missing
    or blank is skipped and counted in ``skipped_without_output`` (or, with
    ``keep_without_output``, kept as a single user turn). Rows that are not objects, lack a
    non-empty string ``instruction``, have non-string fields or contain ``<image>`` are
    reported in ``malformed`` by index. Other keys (e.g. ``category``) go to ``meta``.
    """
    path = Path(path)
    rows, bad_lines, _ = read_rows(path)
    result = TextOnlySamples(source=str(path), malformed=list(bad_lines))
    for index, row in rows:
        try:
            if not isinstance(row, dict):
                raise _Malformed(f"row is not an object ({type(row).__name__})")
            instruction = row.get("instruction")
            if not isinstance(instruction, str) or not instruction.strip():
                raise _Malformed("missing or empty 'instruction'")
            extra = _optional_text(row, "input")
            output = _optional_text(row, "output")
            if any(IMAGE_TOKEN in text for text in (instruction, extra, output)):
                raise _Malformed(f"{IMAGE_TOKEN} marker in a text-only row")
        except _Malformed as exc:
            result.malformed.append((index, str(exc)))
            continue
        if not output.strip() and not keep_without_output:
            result.skipped_without_output += 1
            continue
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [{"role": "user", "content": user}]
        if output.strip():
            messages.append({"role": "assistant", "content": output})
        raw_id = row.get("id")
        sample_id = str(raw_id) if isinstance(raw_id, (str, int)) else f"{path.stem}-{index}"
        meta = {k: v for k, v in row.items() if k not in ("id", "instruction", "input", "output")}
        result.samples.append(ConversationSample(id=sample_id, image=None, messages=messages, meta=meta))
    result.malformed.sort()
    return result


# --------------------------------------------------------------------------- VLGuard

VLGUARD_INSTRUCTION_KEYS = ("instruction", "safe_instruction", "unsafe_instruction")


def vlguard_rows(train_json: str | Path) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
    """Convert VLGuard ``train.json`` rows to LLaVA rows; return ``(rows, malformed)``.

    Each ``instr-resp`` pair becomes one conversation ``id = f"{id}-{k}"`` with the human
    turn ``"<image>\\n" + instruction`` and the gpt turn ``response``. Extra keys on each
    row: ``vlguard_id``, ``safe_image``, ``instruction_kind`` (the pair's key) and
    ``safe_pair`` (safe image and safe instruction: the only case VLGuard answers
    helpfully), plus the source's harm categories when present. ``malformed`` indices are
    positions in ``train.json`` (a bad pair drops only that pair).
    """
    source, bad_lines, _ = read_rows(train_json)
    out: list[dict[str, Any]] = []
    malformed = list(bad_lines)
    for index, row in source:
        try:
            if not isinstance(row, dict):
                raise _Malformed(f"row is not an object ({type(row).__name__})")
            image = row.get("image")
            if not isinstance(image, str) or not image.strip():
                raise _Malformed("missing or empty 'image'")
            safe_relative_path(image)
            safe = row.get("safe")
            if not isinstance(safe, bool):
                raise _Malformed(f"'safe' must be true or false, got {safe!r}")
            pairs = row.get("instr-resp")
            if not isinstance(pairs, list) or not pairs:
                raise _Malformed("missing or empty 'instr-resp'")
            raw_id = row.get("id", index)
            if not isinstance(raw_id, (str, int)) or isinstance(raw_id, bool):
                raise _Malformed(f"'id' must be a string or integer, got {type(raw_id).__name__}")
        except _Malformed as exc:
            malformed.append((index, str(exc)))
            continue
        extras = {k: row[k] for k in ("harmful_category", "harmful_subcategory") if k in row}
        for k, pair in enumerate(pairs):
            if not isinstance(pair, dict):
                malformed.append((index, f"instr-resp pair {k} is not an object"))
                continue
            kinds = [key for key in VLGUARD_INSTRUCTION_KEYS if key in pair]
            if len(kinds) != 1:
                wanted = "/".join(VLGUARD_INSTRUCTION_KEYS)
                malformed.append((index, f"instr-resp pair {k} needs exactly one of {wanted}, has {kinds}"))
                continue
            instruction, response = pair[kinds[0]], pair.get("response")
            if not isinstance(instruction, str) or not instruction.strip():
                malformed.append((index, f"instr-resp pair {k} has an empty or non-string instruction"))
                continue
            if not isinstance(response, str) or not response.strip():
                malformed.append((index, f"instr-resp pair {k} has an empty or non-string 'response'"))
                continue
            human = instruction if instruction.startswith(IMAGE_TOKEN) else f"{IMAGE_TOKEN}\n{instruction}"
            out.append(
                {
                    "id": f"{raw_id}-{k}",
                    "image": image,
                    "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": response}],
                    "vlguard_id": str(raw_id),
                    "safe_image": safe,
                    "instruction_kind": kinds[0],
                    "safe_pair": safe and kinds[0] != "unsafe_instruction",
                    **extras,
                }
            )
    return out, sorted(malformed)


def vlguard_to_llava(
    train_json: str | Path,
    image_root: str | Path,
    *,
    out_path: str | Path | None = None,
) -> LlavaJsonDataset:
    """VLGuard ``train.json`` as a validated `LlavaJsonDataset` (images under ``image_root``).

    The dataset's report merges VLGuard-level problems (indices into ``train.json``) with
    missing images. ``out_path``, if given, receives the converted rows as a LLaVA JSON
    list (all converted rows, including those whose image is missing).
    """
    rows, malformed = vlguard_rows(train_json)
    dataset = LlavaJsonDataset.from_rows(rows, image_root, source=str(train_json))
    dataset.report.malformed = sorted(malformed + dataset.report.malformed)
    if out_path is not None:
        target = Path(out_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return dataset


# --------------------------------------------------------------------------- mixing


def _stream_rng(seed: int, *parts: object) -> random.Random:
    return stable_random("regap-mix", seed, *parts, sep="|")


def _apportion(weights: Sequence[float], length: int) -> list[int]:
    """Largest-remainder split of ``length`` in proportion to ``weights`` (ties: lower index)."""
    total = float(sum(weights))
    quotas = [w / total * length for w in weights]
    counts = [math.floor(q) for q in quotas]
    order = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[: length - sum(counts)]:
        counts[i] += 1
    return counts


def mix(
    datasets: Sequence[Sized | int],
    weights: Sequence[float],
    seed: int = 0,
    *,
    length: int | None = None,
) -> list[tuple[int, int]]:
    """A deterministic interleaving of several datasets as ``(dataset, item)`` pairs.

    ``datasets`` are sized sequences or plain sizes. Dataset ``d`` gets exactly its
    largest-remainder share of ``weights[d] / sum(weights) * length`` positions
    (``length`` defaults to the total size of the datasets with a positive weight); its
    items are drawn as seeded permutations, a fresh one each time it is exhausted, so no
    item repeats before all have been used; the positions are shuffled with the seed.
    """
    sizes = [d if isinstance(d, int) else len(d) for d in datasets]
    if len(sizes) != len(weights):
        raise RegapError(f"mix: {len(sizes)} datasets but {len(weights)} weights")
    if not sizes:
        raise RegapError("mix: no datasets given")
    for d, (size, weight) in enumerate(zip(sizes, weights)):
        if not math.isfinite(weight) or weight < 0:
            raise RegapError(f"mix: weight {d} must be a finite number >= 0 (got {weight})")
        if weight > 0 and size <= 0:
            raise RegapError(f"mix: dataset {d} is empty but has weight {weight}")
    if sum(weights) <= 0:
        raise RegapError("mix: all weights are zero")
    if length is None:
        length = sum(size for size, weight in zip(sizes, weights) if weight > 0)
    if length < 0:
        raise RegapError(f"mix: length must be >= 0 (got {length})")
    counts = _apportion(weights, length)

    labels = [d for d, count in enumerate(counts) for _ in range(count)]
    _stream_rng(seed, "order").shuffle(labels)
    streams: dict[int, list[int]] = {}
    cursor = [0] * len(sizes)
    out: list[tuple[int, int]] = []
    for d in labels:
        epoch, offset = divmod(cursor[d], sizes[d])
        if offset == 0:
            permutation = list(range(sizes[d]))
            _stream_rng(seed, "items", d, epoch).shuffle(permutation)
            streams[d] = permutation
        out.append((d, streams[d][offset]))
        cursor[d] += 1
    return out
