"""`regap playground`: a local web page with two models side by side (regap.playground)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from regap.commands.options import ATTN_IMPLEMENTATION, DTYPE, MODEL_HELP, RegapCommand, max_new_tokens_option
from regap.errors import RegapError, RunInterrupted

DEFAULT_MODELS = ("tiny-llava", "tiny-llava-regap")


def playground_command(
    model: Optional[list[str]] = typer.Option(None, "--model", "-m", help=MODEL_HELP, show_default=False),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to serve on; 0.0.0.0 opens the page (and the "
                                                        "models it may load) to the network."),
    port: int = typer.Option(7860, "--port", help="Port to serve on."),
    cases: Path = typer.Option(Path("playground-cases.jsonl"), "--cases",
                               help="Case file that 'Save case' appends to (read back by "
                                    "`regap safety --prompts jsonl:FILE`)."),
    max_new_tokens: int = max_new_tokens_option(64),
    dtype: str = DTYPE,
    attn_implementation: Optional[str] = ATTN_IMPLEMENTATION,
) -> None:
    """Open a local red-teaming page: two models answer the same request and image, with defenses to
    toggle, offline judges' verdicts, and the modality gap of the current input. Give --model twice
    for side A, then side B (default: tiny-llava and tiny-llava-regap)."""
    from regap.playground import require_gradio
    from regap.playground.cases import check_cases_path
    from regap.playground.page import MAX_NEW_TOKENS

    require_gradio()  # before loading any model: a missing extra is one line, at once
    models = list(model or [])
    if len(models) > 2:
        raise RegapError(f"--model is given {len(models)} times; the page has two sides (give it at most twice)")
    models += list(DEFAULT_MODELS[len(models):])
    if not 0 < port < 65536:
        raise RegapError(f"--port must lie in [1, 65535], got {port}")
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise RegapError(f"--max-new-tokens must lie in [1, {MAX_NEW_TOKENS}], got {max_new_tokens}")
    check_cases_path(cases)
    from regap.playground.app import build_app, launch

    start = time.perf_counter()
    typer.echo(f"loading {models[0]} and {models[1]} …", err=True)
    blocks = build_app(models[0], models[1], cases=cases, max_new_tokens=max_new_tokens, dtype=dtype,
                       attn_implementation=attn_implementation)
    typer.echo(f"models ready in {time.perf_counter() - start:.0f} s; serving on http://{host}:{port} "
               "(Ctrl-C stops)", err=True)
    try:
        launch(blocks, host=host, port=port)
    except OSError as exc:
        raise RegapError(f"cannot serve on {host}:{port}: {exc}") from None
    # Gradio returns once Ctrl-C (or SIGTERM, which the CLI turns into Ctrl-C) has closed the server:
    # exit as every regap command does then (130, or 143 for SIGTERM), saying what was kept.
    raise RunInterrupted(f"the playground stopped serving http://{host}:{port}",
                         f"saved cases are in {cases}; run the same command to serve it again")


def register(app: typer.Typer) -> None:
    app.command("playground", cls=RegapCommand)(playground_command)
