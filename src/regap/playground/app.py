"""The page's layout (Gradio Blocks) and its wiring to `regap.playground.page`.

The request, its image and the decoding settings are shared; each side has its model, its
defenses, its streamed answer, the judges' verdicts and the gap panel. Element ids (`#request`,
`#answer-a`, ...) are stable for the browser tests and for anyone scripting the page.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import gradio as gr

from regap.playground.inputs import IMAGE_CHOICES, starter_requests
from regap.playground.page import SIDES, Playground, PageUpdate, SideChoice, new_state, pool_with
from regap.playground.session import DEFENSES, JUDGES, WITH_STRENGTH

if TYPE_CHECKING:
    from regap.models.lvlm import LVLM

DEFAULT_MODELS = ("tiny-llava", "tiny-llava-regap")
INTRO = """# regap playground
Two LLaVA-style models answer the same request with the same image and decoding settings. Attach a blank
image to a request the language model refuses, see whether the vision-language model now answers, and
whether ReGap or a defense brings the refusal back. Each side shows the offline judges' verdicts and the
**gap of this input**: how far this image's tokens sit from the model's text tokens at the LLM input
(layer 0) and at every layer, next to a typical training scene. Save a case to replay it with
`regap safety --prompts jsonl:FILE`."""
_OPTION_LABELS = {"cmrm": "CMRM α (0-1)", "layer0-align": "layer0-align strength (0-1)"}


#: A frame around the preview, so a blank white image is seen as an image.
CSS = "#preview img { outline: 1px solid #bbb; }"


def _theme() -> Any:
    """System fonts only: the default theme fetches web fonts, and the page must work offline."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])


class _Side:
    """One side's widgets."""

    def __init__(self, letter: str, model: str) -> None:
        key = letter.lower()
        with gr.Column():
            self.model = gr.Textbox(value=model, label=f"Model {letter}", elem_id=f"model-{key}",
                                    info="a preset, a regap model folder or an HF LLaVA checkpoint")
            self.defenses = gr.CheckboxGroup(list(DEFENSES), value=[], label="Defenses (stacked in this order)",
                                             elem_id=f"defenses-{key}")
            with gr.Row():
                self.options = {name: gr.Number(value=1.0, label=_OPTION_LABELS[name], elem_id=f"{name}-{key}")
                                for name in WITH_STRENGTH}
            self.answer = gr.Textbox(label="Answer", lines=5, max_lines=12, interactive=False,
                                     elem_id=f"answer-{key}")
            self.verdicts = gr.Markdown(elem_id=f"verdicts-{key}")
            self.gap = gr.Markdown(elem_id=f"gap-{key}")
            self.plot = gr.Plot(show_label=False, elem_id=f"plot-{key}")

    def inputs(self) -> list[Any]:
        return [self.model, self.defenses, *self.options.values()]

    def outputs(self) -> list[Any]:
        return [self.answer, self.verdicts, self.gap, self.plot]


def _choice(values: Sequence[Any]) -> SideChoice:
    model, defenses, *options = values
    return SideChoice(model or "", list(defenses or []), dict(zip(WITH_STRENGTH, options)))


def build_app(model_a: str | LVLM = DEFAULT_MODELS[0], model_b: str | LVLM = DEFAULT_MODELS[1], *,
              cases: str | Path = "playground-cases.jsonl", max_new_tokens: int = 64, dtype: str = "auto",
              attn_implementation: str | None = None) -> gr.Blocks:
    """The playground page (a `gr.Blocks`; `launch` serves it). The two models are loaded now:
    each a preset name, a regap folder, an HF LLaVA checkpoint, or an already loaded `LVLM`."""
    pool, names = pool_with([model_a, model_b], dtype=dtype, attn_implementation=attn_implementation)
    playground = Playground(pool, cases, max_new_tokens=max_new_tokens)
    with gr.Blocks(title="regap playground", analytics_enabled=False) as blocks:
        state = gr.State(new_state())
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=3):
                starter = gr.Dropdown(starter_requests(), value=None, label="Starter requests",
                                      elem_id="starter")
                request = gr.Textbox(label="Request", lines=3, elem_id="request",
                                     placeholder="a request to try, or pick a starter request")
                label = gr.Radio(["harmful", "benign"], value="harmful", label="The request is (kept with the case)",
                                 elem_id="label")
            with gr.Column(scale=2):
                choice = gr.Radio([(text, key) for key, text in IMAGE_CHOICES.items()], value="blank",
                                  label="Image", elem_id="image-choice")
                upload = gr.File(label="Image file (for upload)", type="filepath", elem_id="upload")
            with gr.Column(scale=2):
                preview = gr.Image(label="The image both models get", type="pil", format="png",
                                   interactive=False, height=220, elem_id="preview")
                # its own line: a preview finishing late must not overwrite what "Ask both" reported
                preview_note = gr.Markdown(elem_id="preview-note")
        with gr.Row():
            judges = gr.CheckboxGroup(list(JUDGES), value=list(JUDGES), label="Judges (offline)", elem_id="judges")
            max_new = gr.Number(value=max_new_tokens, precision=0, label="Max new tokens", elem_id="max-new-tokens")
        settings = gr.Markdown(playground_settings(playground, max_new_tokens), elem_id="settings")
        with gr.Row():
            ask = gr.Button("Ask both", variant="primary", elem_id="ask")
            save = gr.Button("Save case", elem_id="save")
            cases_box = gr.Textbox(value=str(cases), label="Case file (JSONL)", elem_id="cases")
        message = gr.Markdown(elem_id="message")
        with gr.Row():
            sides = [_Side(letter, name) for letter, name in zip(SIDES, names)]

        def to_outputs(update: PageUpdate) -> dict[Any, Any]:
            out: dict[Any, Any] = {}
            if update.message is not None:
                out[message] = update.message
            if update.preview is not None or update.clear:
                out[preview] = update.preview
            if update.settings is not None:
                out[settings] = update.settings
            if update.state is not None:
                out[state] = update.state
            for side, answer, verdicts, gap, plot in zip(sides, update.answers, update.verdicts, update.gaps,
                                                         update.plots):
                for widget, value in ((side.answer, answer), (side.verdicts, verdicts), (side.gap, gap)):
                    if value is not None or update.clear:
                        out[widget] = value if value is not None else ""
                if plot is not None or update.clear:
                    out[side.plot] = plot
            return out

        def on_ask(state_value, request_value, choice_value, upload_value, judges_value, max_new_value, *side_values):
            n = len(sides[0].inputs())
            chosen = [_choice(side_values[i * n:(i + 1) * n]) for i in range(len(sides))]
            for update in playground.ask(state_value, request_value, choice_value, upload_value, judges_value,
                                         max_new_value, chosen):
                yield to_outputs(update)

        def on_preview(request_value, choice_value, upload_value):
            image, note = playground.preview(request_value, choice_value, upload_value)
            return image, note

        def on_starter(value):
            return value or "", playground.label_for(value)

        side_inputs = [widget for side in sides for widget in side.inputs()]
        all_outputs = [message, preview, settings, state, *[w for side in sides for w in side.outputs()]]
        ask.click(on_ask, [state, request, choice, upload, judges, max_new, *side_inputs], all_outputs)
        starter.change(on_starter, [starter], [request, label]).then(
            on_preview, [request, choice, upload], [preview, preview_note])
        choice.change(on_preview, [request, choice, upload], [preview, preview_note])
        upload.change(on_preview, [request, choice, upload], [preview, preview_note])
        max_new.change(lambda value: playground_settings(playground, value), [max_new], [settings])
        save.click(playground.save, [state, cases_box, label], [message])
    return blocks


def playground_settings(playground: Playground, max_new_tokens: Any) -> str:
    """The decoding settings line, or what is wrong with the number given."""
    from regap.errors import RegapError
    from regap.playground.page import settings_markdown

    try:
        return settings_markdown(playground.settings(max_new_tokens))
    except RegapError as exc:
        return f"⚠ {exc}"


#: Largest upload the server accepts; image files beyond it are not worth decoding on a CPU.
MAX_UPLOAD = "50mb"


def launch(blocks: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, **options: Any) -> Any:
    """Serve the page on host:port without a share link (blocks until stopped unless
    `prevent_thread_lock=True`)."""
    return blocks.queue().launch(server_name=host, server_port=port, share=False, inbrowser=False,
                                 ssr_mode=False, max_file_size=MAX_UPLOAD, theme=_theme(), css=CSS, **options)
