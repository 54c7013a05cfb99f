"""One side of the page: a model from the shared pool, its defense stack, its answer streamed
while it is generated, and the verdicts of the offline judges.

Models are large, so one pool per server holds them and every browser session borrows from it;
what a session chose (which model on which side, which defenses, its last answers) lives in that
session's own state (`regap.playground.app`). A model runs one generation at a time (its lock):
defenses attach hooks to the model while they run, and must not reach another session's answer.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from regap.errors import RegapError

if TYPE_CHECKING:
    from regap.defenses.base import Defense
    from regap.models.generation import DecodingSettings
    from regap.models.lvlm import LVLM
    from regap.playground.inputs import PageInput

#: The defenses a side can toggle, in stacking order (the first is outermost), and the option
#: each exposes on the page (the others run with their defaults).
DEFENSES = ("adashield-s", "ecso", "cmrm", "layer0-align", "coca")  # CoCA decodes by itself: last
#: The defenses whose strength the page sets (CMRM's α, layer0-align's strength); the option's
#: name and range are the defense's own (`strength_option`, `option_ranges`).
WITH_STRENGTH = ("cmrm", "layer0-align")
#: The judges that need no service and no large model (`relevance` embeds with MiniLM, shipped
#: by the offline extra).
JUDGES = ("refusal-lexicon", "relevance", "keyword")


@dataclass
class PooledModel:
    """A loaded model, its fingerprint, and the lock a generation holds."""

    name: str
    model: LVLM
    fingerprint: str
    lock: threading.Lock = field(default_factory=threading.Lock)


class ModelPool:
    """Models by name, loaded once and shared by every session; at most `capacity` at once (the
    least recently used one is dropped when another is loaded)."""

    def __init__(self, dtype: str = "auto", attn_implementation: str | None = None, capacity: int = 2) -> None:
        if capacity < 1:
            raise RegapError(f"the model pool needs room for at least one model, got {capacity}")
        self.dtype, self.attn_implementation, self.capacity = dtype, attn_implementation, capacity
        self._models: OrderedDict[str, PooledModel] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def loaded(self, name: str) -> bool:
        return (name or "").strip() in self._models

    def add(self, pooled: PooledModel) -> str:
        """Hold an already loaded model (the Python API's `build_app(model)`); returns the name it
        is held under: its own, or with a suffix when another model has that name."""
        with self._lock:
            name, number = pooled.name, 2
            while name in self._models and self._models[name].model is not pooled.model:
                name, number = f"{pooled.name}-{number}", number + 1
            pooled.name = name
            self._models[name] = pooled
            self.capacity = max(self.capacity, len(self._models))
            return name

    def get(self, name: str) -> PooledModel:
        """The model named `name` (a preset, a regap folder or an HF LLaVA checkpoint), loaded on
        first use; a name that cannot be loaded is a RegapError from `load_model`."""
        from regap.models import load_model
        from regap.models.fingerprint import model_fingerprint

        name = (name or "").strip()
        if not name:
            raise RegapError("no model given: name a preset (e.g. tiny-llava), a regap model folder or an HF "
                             "LLaVA checkpoint")
        with self._lock:
            loading = self._loading.setdefault(name, threading.Lock())
        with loading:  # one load per name; another session asking for it waits for this one
            with self._lock:
                if name in self._models:
                    self._models.move_to_end(name)
                    return self._models[name]
            model = load_model(name, dtype=self.dtype, attn_implementation=self.attn_implementation)
            model.eval()
            pooled = PooledModel(name, model, model_fingerprint(model))
            with self._lock:
                self._models[name] = pooled
                while len(self._models) > self.capacity:
                    self._models.popitem(last=False)
            return pooled


def defense_specs(names: Sequence[str], strengths: dict[str, Any]) -> list[str]:
    """Defense specs (`cmrm:alpha=0.5`) for the toggled `names`, in stacking order, each with the
    strength the page gave; checked by the registry (an unknown name, a strength that is not a
    number or is out of its range is a RegapError)."""
    from regap.defenses import check_strength

    unknown = [name for name in names if name not in DEFENSES]
    if unknown:
        raise RegapError(f"unknown defense {unknown[0]!r}; the page offers: {', '.join(DEFENSES)}")
    specs = []
    for name in DEFENSES:
        if name not in names:
            continue
        if name in WITH_STRENGTH:
            if strengths.get(name) is None:
                raise RegapError(f"defense {name}: give its strength (a number)")
            option, value = check_strength(name, strengths[name])
            specs.append(f"{name}:{option}={value}")
        else:
            specs.append(name)
    return specs


def check_judges(names: Sequence[str]) -> list[str]:
    unknown = [name for name in names if name not in JUDGES]
    if unknown:
        raise RegapError(f"unknown judge {unknown[0]!r}; the page offers: {', '.join(JUDGES)}")
    return [name for name in JUDGES if name in names]


class JudgePanel:
    """The offline judges, built once per server (the relevance judge loads its embedder once)."""

    def __init__(self) -> None:
        self._judges: dict[str, Any] = {}
        self._lock = threading.Lock()

    def judge(self, name: str) -> Any:
        from regap.safety.judges import get_judge

        with self._lock:
            if name not in self._judges:
                self._judges[name] = get_judge(name)
            return self._judges[name]

    def verdicts(self, names: Sequence[str], request: str, response: str) -> dict[str, dict[str, Any]]:
        """Each judge's verdict on `response` to `request` (the request as written, which is what
        `regap safety` judges against too); a judge that fails gives an `error` verdict."""
        from regap.safety.judges import JudgeInput

        out = {}
        for name in check_judges(names):
            judge = self.judge(name)
            with self._lock:  # judges are not documented as thread-safe
                verdict = judge.judge_batch([JudgeInput(prompt=request, response=response)])[0]
            out[name] = verdict.to_dict()
        return out


@dataclass
class SideAnswer:
    """What one side produced: the final answer (after its defenses), or the error that stopped it."""

    text: str = ""
    new_tokens: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    defenses: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None


def _streamer(tokenizer: Any, on_text: Callable[[str, bool], None]) -> Any:
    """A transformers streamer that hands each finished piece of text to `on_text(text, end)`;
    `end` closes one generate call (a defense such as ECSO makes several)."""
    from transformers import TextStreamer

    class PageStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            on_text(text, stream_end)

    return PageStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def answer(pooled: PooledModel, page: PageInput, defenses: Sequence[Defense], settings: DecodingSettings,
           on_text: Callable[[str, bool], None]) -> SideAnswer:
    """Generate this side's answer to `page` through its defense stack, streaming the text."""
    from regap.defenses import build_generate
    from regap.models.generation import streaming

    start = time.perf_counter()
    with pooled.lock:
        generate = build_generate(pooled.model, list(defenses), engine=settings.engine)
        with streaming(_streamer(pooled.model.tokenizer, on_text)):
            result = generate([page.text], [page.image], settings)
    return SideAnswer(result.texts[0], result.new_tokens[0], result.details[0],
                      [d.describe() for d in defenses], time.perf_counter() - start)


class _Live:
    """The text a side shows while it generates: the current generate call's text so far."""

    def __init__(self) -> None:
        self.text = ""
        self._closed = False

    def add(self, piece: str, end: bool) -> None:
        if self._closed:  # a new generate call (the next pass of a multi-pass defense)
            self.text, self._closed = "", False
        self.text += piece
        self._closed = end


def run_sides(jobs: Sequence[Callable[[Callable[[str, bool], None]], SideAnswer]],
              interval: float = 0.15) -> Iterator[tuple[list[str], list[SideAnswer | None]]]:
    """Run each side's job in its own thread; yield (live texts, finished answers) as text arrives,
    at most every `interval` seconds, and once more when every side is done. A side that fails
    finishes with its error; the other goes on."""
    events: queue.Queue[int] = queue.Queue()
    live = [_Live() for _ in jobs]
    done: list[SideAnswer | None] = [None] * len(jobs)

    def work(index: int, job: Callable[[Callable[[str, bool], None]], SideAnswer]) -> None:
        def on_text(piece: str, end: bool) -> None:
            live[index].add(piece, end)
            events.put(index)

        try:
            done[index] = job(on_text)
        except RegapError as exc:
            done[index] = SideAnswer(error=str(exc))
        except Exception as exc:  # noqa: BLE001  the page reports it and the server goes on
            traceback.print_exc()
            done[index] = SideAnswer(error=f"internal error ({type(exc).__name__}: {exc}); details in the server log")
        events.put(index)

    threads = [threading.Thread(target=work, args=(i, job), daemon=True) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    last = 0.0
    while any(thread.is_alive() for thread in threads) or not events.empty():
        try:
            events.get(timeout=interval)
        except queue.Empty:
            continue
        now = time.monotonic()
        if now - last >= interval:
            last = now
            yield [side.text for side in live], list(done)
    for thread in threads:
        thread.join()
    yield [side.text for side in live], list(done)
