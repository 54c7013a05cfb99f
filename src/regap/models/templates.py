"""Conversation templates: turn chat messages into one string plus the spans that are targets.

Three templates:
* `chat`: the tokenizer's own chat template (what the LLM was aligned with; the default);
* `plain`: LLaVA's stage-1 template: the user turn is just the image, the caption is the target;
* `vicuna_v1`: LLaVA-1.5's stage-2 template (SYSTEM USER: ... ASSISTANT: ...</s>).

Targets are returned as character spans of the rendered string; tokenisation later maps
them to token labels. Images stay as literal `<image>` markers in the string.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from regap.errors import RegapError

IMAGE_MARKER = "<image>"
TEMPLATES = ("chat", "plain", "vicuna_v1")

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass
class Rendered:
    text: str
    target_spans: list[tuple[int, int]]


class Template(Protocol):
    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> Rendered: ...


def _check_roles(messages: list[dict[str, str]]) -> None:
    for index, message in enumerate(messages):
        if message.get("role") not in ("system", "user", "assistant"):
            raise RegapError(f"message {index} has role {message.get('role')!r}; expected system, user or assistant")
        if not isinstance(message.get("content"), str):
            raise RegapError(f"message {index} has no text content")


class ChatTemplate:
    """The tokenizer's chat template; assistant spans found by rendering growing prefixes."""

    def __init__(self, tokenizer: Any) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise RegapError("the tokenizer has no chat template; use --template vicuna_v1 or plain")
        self.tokenizer = tokenizer

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> Rendered:
        _check_roles(messages)
        text = self._render(messages, add_generation_prompt)
        spans: list[tuple[int, int]] = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(messages[:index], add_generation_prompt=True)
            through = self._render(messages[: index + 1], add_generation_prompt=False)
            if not text.startswith(before) or not text.startswith(through):
                raise RegapError("the chat template does not render conversations as growing prefixes; use vicuna_v1")
            spans.append((len(before), len(through)))
        return Rendered(text, spans)


class PlainTemplate:
    """LLaVA `plain`: `<image>` + caption + newline; only the caption (and newline) is a target."""

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> Rendered:
        _check_roles(messages)
        user = [m for m in messages if m["role"] == "user"]
        answers = [m for m in messages if m["role"] == "assistant"]
        if not user:
            raise RegapError("plain template needs a user turn")
        markers = user[0]["content"].count(IMAGE_MARKER)
        prefix = IMAGE_MARKER * markers
        if add_generation_prompt or not answers:
            return Rendered(prefix, [])
        caption = answers[0]["content"] + "\n"
        return Rendered(prefix + caption, [(len(prefix), len(prefix) + len(caption))])


class VicunaV1Template:
    """LLaVA-1.5's conversation format; assistant answers plus the end-of-sequence are targets."""

    def __init__(self, eos_token: str) -> None:
        self.eos = eos_token

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> Rendered:
        _check_roles(messages)
        system = VICUNA_SYSTEM
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        text, spans = system + " ", []
        for message in messages:
            if message["role"] == "user":
                text += "USER: " + message["content"] + " "
            elif message["role"] == "assistant":
                text += "ASSISTANT:"
                start = len(text)
                text += " " + message["content"] + self.eos
                spans.append((start, len(text)))
        if add_generation_prompt:
            text += "ASSISTANT:"
        return Rendered(text, spans)


# ---- Jinja chat templates for exported HF folders ----------------------------------------------
#
# HF's multimodal chat path (`processor.apply_chat_template`, `pipeline("image-text-to-text")`,
# lmms-eval's `llava_hf`) passes message contents as lists of parts: {"type": "image"} and
# {"type": "text", "text": ...}. These templates render such lists the way regap renders the
# same conversation: an image part becomes the `<image>` marker and a newline (LLaVA's
# convention, `inputs.with_image_marker`), text parts are copied; plain-string contents are
# rendered unchanged. The processor then expands each marker into the image's tokens.

_FLATTEN_PARTS = (
    "{%- set _regap = namespace(messages=[]) -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set _regap.messages = _regap.messages + [message] -%}"
    "{%- else -%}"
    "{%- set _part = namespace(text='') -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set _part.text = _part.text + MARKER -%}"
    "{%- elif item['type'] == 'text' -%}{%- set _part.text = _part.text + item['text'] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set _regap.messages = _regap.messages + [{'role': message['role'], 'content': _part.text}] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = _regap.messages %}"  # no trailing '-': the wrapped template's text is untouched
)


def _jinja_string(text: str) -> str:
    """A Jinja string literal (Jinja unescapes literals like Python's unicode-escape; JSON fits)."""
    import json

    return json.dumps(text)


def hf_chat_template(name: str, tokenizer: Any) -> str:
    """A Jinja chat template for HF processors that renders like regap's template `name` and
    accepts image/text content parts (see above)."""
    flatten = _FLATTEN_PARTS.replace("MARKER", _jinja_string(IMAGE_MARKER + "\n"))
    if name == "chat":
        if not getattr(tokenizer, "chat_template", None) or not isinstance(tokenizer.chat_template, str):
            raise RegapError("the tokenizer has no (single) chat template to export")
        return flatten + tokenizer.chat_template
    if name == "vicuna_v1":
        eos = _jinja_string(tokenizer.eos_token or "</s>")
        return flatten + (
            "{%- set system = " + _jinja_string(VICUNA_SYSTEM) + " -%}"
            "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{%- set system = messages[0]['content'] -%}{%- set messages = messages[1:] -%}"
            "{%- endif -%}"
            "{{- system + ' ' -}}"
            "{%- for message in messages -%}"
            "{%- if message['role'] == 'user' -%}{{- 'USER: ' + message['content'] + ' ' -}}"
            "{%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT: ' + message['content'] + " + eos + " -}}"
            "{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
        )
    if name == "plain":
        marker = _jinja_string(IMAGE_MARKER)
        return flatten + (
            "{%- set users = messages | selectattr('role', 'equalto', 'user') | list -%}"
            "{%- set answers = messages | selectattr('role', 'equalto', 'assistant') | list -%}"
            "{%- if users -%}{{- " + marker + " * (users[0]['content'].split(" + marker + ") | length - 1) -}}{%- endif -%}"
            "{%- if answers and not add_generation_prompt -%}{{- answers[0]['content'] + '\\n' -}}{%- endif -%}"
        )
    raise RegapError(f"unknown template {name!r}; valid: {', '.join(TEMPLATES)}")


def get_template(name: str, tokenizer: Any) -> Template:
    if name == "chat":
        return ChatTemplate(tokenizer)
    if name == "plain":
        return PlainTemplate()
    if name == "vicuna_v1":
        return VicunaV1Template(tokenizer.eos_token or "</s>")
    raise RegapError(f"unknown template {name!r}; valid: {', '.join(TEMPLATES)}")
