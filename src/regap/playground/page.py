"""What the page does on each action, without the widgets: check the input, run both sides, judge,
measure the gap, keep the case. `regap.playground.app` only lays out the page and wires it here,
so every path (bad input included) is testable without a browser.

Every user mistake ends as a message on the page, never as an exception that stops the server.
State that belongs to one browser tab (its last answers, which a saved case records) is a plain
dict the page keeps per session (`gr.State`); nothing here remembers one tab for another.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from regap.errors import RegapError
from regap.playground.gap import GapPanel, InputGap
from regap.playground.inputs import PageInput, page_input, starter_label
from regap.playground.session import JudgePanel, ModelPool, SideAnswer, answer, check_judges, defense_specs, run_sides

if TYPE_CHECKING:
    from PIL import Image

    from regap.models.lvlm import LVLM

SIDES = ("A", "B")
#: The most new tokens the page generates per answer (a CPU answers 512 tokens of a 0.5B model in
#: about a minute); `regap safety` and `regap chat` have no such cap.
MAX_NEW_TOKENS = 512


@dataclass
class SideChoice:
    """What a tab chose for one side: the model and the toggled defenses with their options."""

    model: str
    defenses: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class PageUpdate:
    """One refresh of the page; None leaves a field as it is. `clear` empties both sides' results
    (a new question starts)."""

    message: str | None = None
    preview: Image.Image | None = None
    answers: list[str | None] = field(default_factory=lambda: [None, None])
    verdicts: list[str | None] = field(default_factory=lambda: [None, None])
    gaps: list[str | None] = field(default_factory=lambda: [None, None])
    plots: list[Any] = field(default_factory=lambda: [None, None])
    settings: str | None = None
    state: dict[str, Any] | None = None
    clear: bool = False


def new_state() -> dict[str, Any]:
    """A tab's state at page load: no answers yet."""
    return {"last": None}


def _number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def verdicts_markdown(verdicts: dict[str, dict[str, Any]]) -> str:
    if not verdicts:
        return "_no judge selected_"
    lines = []
    for name, verdict in verdicts.items():
        unsafe = {True: "unsafe", False: "safe", None: "unsafe: n/a"}[verdict.get("unsafe")]
        extra = f" ({verdict['detail']['error']})" if verdict.get("label") == "error" else ""
        lines.append(f"- `{name}`: **{verdict['label']}** · {unsafe}{extra}")
    return "\n".join(lines)


def gap_markdown(gap: InputGap | None) -> str:
    if gap is None:
        return "No image: no image tokens to measure (text only)."
    ratio = gap.layer0 / gap.scene_layer0 if gap.scene_layer0 > 0 else float("inf")
    under = f" Measured under {', '.join(gap.defenses)}." if gap.defenses else ""
    return (f"**Layer-0 gap** of this image's {gap.n_image_tokens} tokens: **{_number(gap.layer0)}**; a typical "
            f"training scene: {_number(gap.scene_layer0)} (median of {gap.n_scenes}), ×{ratio:.3g}.{under}")


def settings_markdown(settings: Any) -> str:
    values = settings.to_dict()
    decoding = "greedy" if not values["do_sample"] else f"sampling (temperature {values['temperature']})"
    return (f"Decoding, the same for both sides: {decoding}, at most {values['max_new_tokens']} new tokens, "
            f"repetition penalty {values['repetition_penalty']}, seed {values['seed']}, engine `{values['engine']}`.")


class Playground:
    """The page's actions over one model pool, one set of judges and one gap panel (shared by
    every tab, as the weights are); `cases` is the default case file."""

    def __init__(self, pool: ModelPool, cases: str | Path, max_new_tokens: int = 64,
                 gap_panel: GapPanel | None = None) -> None:
        self.pool = pool
        self.cases = Path(cases)
        self.max_new_tokens = max_new_tokens
        self.judges = JudgePanel()
        self.gap_panel = gap_panel or GapPanel()

    # ---- inputs ------------------------------------------------------------------------------
    def settings(self, max_new_tokens: Any) -> Any:
        from regap.models import DecodingSettings

        try:
            tokens = int(max_new_tokens)
        except (TypeError, ValueError):
            raise RegapError(f"max new tokens must be a whole number, got {max_new_tokens!r}") from None
        if not 1 <= tokens <= MAX_NEW_TOKENS:
            raise RegapError(f"max new tokens must lie in [1, {MAX_NEW_TOKENS}], got {tokens}")
        return DecodingSettings(max_new_tokens=tokens, batch_size=1)

    def preview(self, request: str | None, choice: str, upload: str | None) -> tuple[Image.Image | None, str]:
        """The image the models would get, or a message; an empty request shows nothing yet."""
        if not (request or "").strip() and choice != "upload":
            return None, ""
        try:
            return page_input(request or "-", choice, upload).image, ""
        except RegapError as exc:
            return None, f"⚠ {exc}"

    @staticmethod
    def label_for(request: str | None) -> str:
        return starter_label(request or "")

    # ---- asking ------------------------------------------------------------------------------
    def ask(self, state: dict[str, Any] | None, request: str | None, choice: str, upload: str | None,
            judges: Sequence[str], max_new_tokens: Any, sides: Sequence[SideChoice]) -> Iterator[PageUpdate]:
        """Both sides answer the request (streamed), then the judges' verdicts and the gap of the
        input per side. Bad input yields one message and stops; the tab's state keeps its last run."""
        state = dict(state or new_state())
        try:
            yield from self._ask(state, request, choice, upload, judges, max_new_tokens, sides)
        except RegapError as exc:
            yield PageUpdate(message=f"⚠ {exc}", state=state)
        except Exception as exc:  # noqa: BLE001  a bug: reported on the page and in the log; the server goes on
            traceback.print_exc()
            yield PageUpdate(message=f"⚠ internal error ({type(exc).__name__}: {exc}); details in the server log",
                             state=state)

    def _ask(self, state: dict[str, Any], request: str | None, choice: str, upload: str | None,
             judges: Sequence[str], max_new_tokens: Any, sides: Sequence[SideChoice]) -> Iterator[PageUpdate]:
        from regap.defenses import get_defense

        page = page_input(request, choice, upload)
        judge_names = check_judges(judges)
        settings = self.settings(max_new_tokens)
        specs = []
        for letter, side in zip(SIDES, sides):
            try:
                specs.append(defense_specs(side.defenses, side.options))
            except RegapError as exc:
                raise RegapError(f"side {letter}: {exc}") from None
        loading = [side.model.strip() for side in sides if not self.pool.loaded(side.model)]
        yield PageUpdate(message=f"loading {', '.join(loading)} …" if loading else "answering …", preview=page.image,
                         settings=settings_markdown(settings), clear=True, answers=["", ""])
        pooled = []
        for letter, side in zip(SIDES, sides):
            try:
                pooled.append(self.pool.get(side.model))
            except RegapError as exc:
                raise RegapError(f"side {letter}: {exc}") from None
        defenses = [[get_defense(spec) for spec in side_specs] for side_specs in specs]
        jobs = [lambda on_text, p=p, d=d: answer(p, page, d, settings, on_text) for p, d in zip(pooled, defenses)]
        results: list[SideAnswer | None] = [None, None]
        for live, results in run_sides(jobs):
            yield PageUpdate(answers=[r.text if r is not None and r.error is None else text
                                      for text, r in zip(live, results)])
        finished = [r if r is not None else SideAnswer(error="no answer") for r in results]
        errors = [f"side {letter}: {r.error}" for letter, r in zip(SIDES, finished) if r.error]
        verdicts = [self.judges.verdicts(judge_names, page.request, r.text) if r.error is None else {}
                    for r in finished]
        yield PageUpdate(answers=[r.text if r.error is None else f"⚠ {r.error}" for r in finished],
                         verdicts=[verdicts_markdown(v) if r.error is None else "" for v, r in zip(verdicts, finished)],
                         message="measuring the gap of this input …" if page.image is not None else None)
        gaps: list[InputGap | None] = [None, None]
        for index, (p, d) in enumerate(zip(pooled, defenses)):
            if page.image is None:
                continue
            try:
                with p.lock:
                    gaps[index] = self.gap_panel.input_gap(p.model, p.fingerprint, page.image, page.request, d)
            except RegapError as exc:
                errors.append(f"side {SIDES[index]} gap: {exc}")
        state["last"] = self._record(page, settings, judge_names, sides, pooled, finished, verdicts, gaps)
        plots = [self._plot(side.model, gap) for side, gap in zip(sides, gaps)]
        yield PageUpdate(gaps=[gap_markdown(g) for g in gaps], plots=plots, state=state,
                         message="⚠ " + "; ".join(errors) if errors else "done: save the case to keep it")

    @staticmethod
    def _plot(label: str, gap: InputGap | None) -> Any:
        from regap.playground.gap import plot_gap

        return plot_gap({label: gap}) if gap is not None else None

    @staticmethod
    def _record(page: PageInput, settings: Any, judges: list[str], sides: Sequence[SideChoice], pooled: list[Any],
                answers: list[SideAnswer], verdicts: list[dict[str, Any]], gaps: list[InputGap | None]) -> dict[str, Any]:
        """What a saved case holds about the last run (plain JSON values)."""
        return {
            "request": page.request, "request_id": page.request_id, "condition": page.condition,
            "text_sent": page.text, "upload": str(page.upload) if page.upload else None,
            "condition_details": page.details, "decoding": settings.to_dict(), "judges": judges,
            "sides": {letter: {"model": side.model.strip(), "model_fingerprint": p.fingerprint,
                               "defenses": a.defenses, "answer": a.text, "new_tokens": a.new_tokens,
                               "error": a.error, "verdicts": v, "gap": g.to_dict() if g is not None else None}
                      for letter, side, p, a, v, g in zip(SIDES, sides, pooled, answers, verdicts, gaps)},
        }

    # ---- keeping a case ----------------------------------------------------------------------
    def save(self, state: dict[str, Any] | None, cases: str | None, label: str) -> str:
        """Append the tab's last run to the case file; the message says where it went."""
        from regap.playground.cases import save_case

        last = (state or {}).get("last")
        if not last:
            return "⚠ nothing to save yet: ask both models first"
        try:
            record = save_case(
                (cases or "").strip() or self.cases, request=last["request"], request_id=last["request_id"],
                label=label, condition=last["condition"], text_sent=last["text_sent"],
                upload=Path(last["upload"]) if last.get("upload") else None,
                extra={k: last[k] for k in ("condition_details", "decoding", "judges", "sides")})
        except RegapError as exc:
            return f"⚠ {exc}"
        path = Path((cases or "").strip() or self.cases)
        replay = "benchmark" if record.get("image") else last["condition"]
        return (f"saved case `{record['id']}` to `{path}`; replay: "
                f"`regap safety --prompts jsonl:{path} --conditions {replay} --out RUN`")


def pool_with(models: Sequence[str | LVLM], dtype: str = "auto", attn_implementation: str | None = None,
              capacity: int | None = None) -> tuple[ModelPool, list[str]]:
    """A pool holding `models` (names are loaded now; a loaded LVLM is added under its config's
    name) and the names the sides start with."""
    from regap.models.fingerprint import model_fingerprint
    from regap.playground.session import PooledModel

    pool = ModelPool(dtype=dtype, attn_implementation=attn_implementation,
                     capacity=capacity or max(2, len(set(map(str, models)))))
    names = []
    for model in models:
        if isinstance(model, str):
            names.append(pool.get(model).name)
        else:
            names.append(pool.add(PooledModel(model.config.name or "model", model, model_fingerprint(model))))
    return pool, names
