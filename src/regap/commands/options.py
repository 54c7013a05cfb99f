"""Command-line options that several commands share, defined once so their names, help and checks agree.

* The model and run options (`--model`, `--out`, `--dtype`, `--seed`, `--projector`,
  `--attn-implementation`, ...) are built here and used by every command that has them. `-o` is
  `--out` everywhere; `--option KEY=VALUE` where `-o` used to be `--option` (safety, judge-validate,
  judge-calibrate) still works for one minor version, with a note.
* Options of registered things use one grammar (`regap.specs`): `--option` (judges),
  `--source-option`, `--condition-option` and `--defense-option` take `KEY=VALUE`, or
  `NAME:KEY=VALUE` when several are given, with JSON values, checked by the registry (keys with
  "did you mean", types, ranges) before any model loads. `--defense` also takes the stacked
  form `NAME:KEY=VALUE:KEY=VALUE`, is repeatable and splits at commas.
* `RegapCommand` / `RegapGroup` render help without a value placeholder for flags and with
  docstrings re-flowed, and carry the `-o` compatibility.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from regap.errors import RegapError
from regap.registry import Registry
from regap.specs import looks_like_option, parse_option, parse_spec

# --------------------------------------------------------------------------- checks run while parsing


def _check_seed(value: Optional[int]) -> Optional[int]:
    from regap.checks import check_seed

    return value if value is None else check_seed(value)


def _check_level(value: float) -> float:
    if not 0.0 < value < 1.0:
        raise RegapError(f"--level must lie strictly between 0 and 1 (e.g. 0.95), got {value}")
    return value


def _check_out(ctx: typer.Context, value: Optional[Path]) -> Optional[Path]:
    """`--out key=value` is an option given to the wrong flag, not a folder called so."""
    if value is None or not looks_like_option(str(value)):
        return value
    flags = {opt for param in ctx.command.params for opt in getattr(param, "opts", ())}
    if "--option" in flags:
        hint = "give options with --option KEY=VALUE"
    elif any(param.name == "overrides" for param in ctx.command.params):
        hint = "give overrides after CONFIG as key=value"
    else:
        hint = "see --help for this command's options"
    raise RegapError(f"--out {value}: -o/--out is the output path, and this reads as KEY=VALUE; {hint}")


# --------------------------------------------------------------------------- shared options

MODEL_HELP = "Preset name (see regap models), regap model folder or HF LLaVA checkpoint."
DTYPE_HELP = ("Weights' dtype: auto (bfloat16 where the device computes it fast, else float32), float32, bfloat16 "
              "or float16 (GPU only). It is part of the model fingerprint, so caches and calibration files are "
              "kept per dtype.")
SEED_HELP = ("Seed of every random choice the command makes (sampled requests, image pairs, splits, bootstrap, "
             "decoding); the same seed gives the same result.")


def model_option(default: Any = "tiny") -> Any:
    """`--model/-m` (required with `default=...`)."""
    return typer.Option(default, "--model", "-m", help=MODEL_HELP)


def dtype_option(default: Optional[str] = "auto", show_default: Any = True) -> Any:
    """`--dtype`, with the command's default."""
    return typer.Option(default, "--dtype", help=DTYPE_HELP, show_default=show_default)


def out_option(writes: str, default: Any = ...) -> Any:
    """`--out/-o`: `writes` says what goes there; `default=...` makes it required."""
    return typer.Option(default, "--out", "-o", help=f"Where the results go: {writes}.", callback=_check_out)


def max_new_tokens_option(default: int) -> Any:
    return typer.Option(default, "--max-new-tokens", help="Most tokens generated per answer.")


def batch_size_option(default: int) -> Any:
    return typer.Option(default, "--batch-size", help="Requests run through the model together (memory vs speed; "
                                                      "results do not depend on it).")


MODEL = model_option()
DTYPE = dtype_option()
SEED = typer.Option(0, "--seed", help=SEED_HELP, callback=_check_seed)
PROJECTOR = typer.Option(None, "--projector", help="Projector checkpoint (.safetensors) to load into the model first.")
LEVEL = typer.Option(0.95, "--level", help="Confidence level of the intervals, between 0 and 1.", callback=_check_level)

#: `--attn-implementation` on the commands that load a model to run it (`regap.models.attention`).
ATTN_IMPLEMENTATION = typer.Option(
    None, "--attn-implementation",
    help="The LLM's attention kernel: eager, sdpa (transformers' default), flash_attention_2 (GPU, needs its "
         "package), ... Default: the library's choice. It changes speed and rounding, not the model; it is "
         "part of the model fingerprint, so caches and calibration files are kept per kernel.")

JUDGE_OPTION = typer.Option(
    None, "--option",
    help="Judge option KEY=VALUE, or JUDGE:KEY=VALUE with several judges (repeatable; JSON values), e.g. "
         "--option model=gpt-4o-mini or --option openai:rpm=60.")
SOURCE_OPTION = typer.Option(
    None, "--source-option",
    help="Request-source option KEY=VALUE, or SOURCE:KEY=VALUE with several sources (repeatable; JSON values), "
         "e.g. --source-option functional_categories=standard.")
CONDITION_OPTION = typer.Option(
    None, "--condition-option",
    help="Image-condition option KEY=VALUE, or CONDITION:KEY=VALUE with several conditions (repeatable; JSON "
         "values), e.g. --condition-option blank:size=224.")
DEFENSE = typer.Option(
    None, "--defense",
    help="Inference-time defense NAME, or NAME:KEY=VALUE[:KEY=VALUE...] (repeatable, or comma-separated); the "
         "first is outermost; regap defense list names them.")
DEFENSE_OPTION = typer.Option(
    None, "--defense-option",
    help="Defense option KEY=VALUE, or DEFENSE:KEY=VALUE with several defenses (repeatable; JSON values), e.g. "
         "--defense-option cmrm:alpha=0.5.")


# --------------------------------------------------------------------------- registry options


def scoped_options(texts: Optional[list[str]], names: list[str], registry: Registry[Any],
                   flag: str) -> dict[str, dict[str, Any]]:
    """`KEY=VALUE` (for the only NAME given) or `NAME:KEY=VALUE` (for one of several) ->
    {name: {key: value}}, each name's options checked by `registry` (keys, types, ranges)."""
    options: dict[str, dict[str, Any]] = {name: {} for name in names}
    for text in texts or []:
        name, key, value = _scoped(text, names, registry, flag)
        options[name][key] = value
    return {name: registry.resolve(name, given)[1] for name, given in options.items() if given}


def _scoped(text: str, names: list[str], registry: Registry[Any], flag: str) -> tuple[str, str, Any]:
    """The NAME (one of `names`), KEY and VALUE of one `flag` text."""
    try:
        scope, key, value = parse_option(text, flag)
    except RegapError as exc:
        raise RegapError(f"{exc} (the output folder is --out)" if flag == "--option" else str(exc)) from None
    if not names:
        raise RegapError(f"{flag} {text!r}: no {registry.plural} given to set it for")
    if scope is None:
        if len(names) != 1:
            raise RegapError(f"{flag} {text!r}: several {registry.plural} given ({', '.join(names)}); "
                             f"name one: NAME:{text}")
        return names[0], key, value
    by_key = {Registry.key(name): name for name in names}
    if Registry.key(scope) not in by_key:
        raise RegapError(f"{flag} {text!r}: {scope!r} is not one of the {registry.plural} given ({', '.join(names)})")
    return by_key[Registry.key(scope)], key, value


def defense_specs(values: Optional[list[str]], options: Optional[list[str]] = None,
                  hidden_state: bool = False) -> list[str]:
    """`--defense` values (repeatable, each comma-separated) with `--defense-option` texts folded in
    (`cmrm` + `alpha=0.5` -> `cmrm:alpha=0.5`); every defense is built once here, so a bad name,
    key, type or range (or, with `hidden_state`, one that does not act on hidden states) fails
    before any model loads."""
    from regap.defenses import DEFENSES, get_defense
    from regap.defenses.base import check_hidden_state

    specs = [part.strip() for value in values or [] for part in value.split(",") if part.strip()]
    names = [parse_spec(spec)[0] for spec in specs]
    for text in options or []:
        name, key, _ = _scoped(text, names, DEFENSES, "--defense-option")
        if sum(Registry.key(n) == Registry.key(name) for n in names) > 1:
            raise RegapError(f"--defense-option {text!r}: {name} is in the stack twice; give its options in "
                             "--defense NAME:KEY=VALUE")
        index = next(i for i, n in enumerate(names) if Registry.key(n) == Registry.key(name))
        specs[index] = f"{specs[index]}:{key}={text.partition('=')[2].strip()}"
    built = [get_defense(spec) for spec in specs]
    if hidden_state:
        check_hidden_state(built)
    return specs


# --------------------------------------------------------------------------- help and `-o` compatibility


def reflow(text: Optional[str]) -> Optional[str]:
    """A docstring's paragraphs as single lines, so help never breaks a sentence where the source did."""
    if not text:
        return text
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(p if p.startswith("\b") else " ".join(line.strip() for line in p.splitlines())
                       for p in paragraphs)


def _without_flag_metavars(params: list[Any]) -> list[Any]:
    """Flags take no value: show none (typer's rich help would print `<bool>`)."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


def _legacy_short_option(args: list[str]) -> list[str]:
    """`--option KEY=VALUE` -> `--option KEY=VALUE`, with a deprecation note, in the commands where `-o`
    was `--option` before it became `--out`."""
    from regap.deprecation import deprecated

    out: list[str] = []
    tokens = iter(args)
    for token in tokens:
        if token == "--":
            out.extend([token, *tokens])
            break
        value = None
        if token == "-o":
            value = next(tokens, None)
            if value is None or not looks_like_option(value):
                out.extend([token] if value is None else [token, value])
                continue
        elif token.startswith("-o") and not token.startswith("--") and looks_like_option(token[2:]):
            value = token[2:]
        if value is None:
            out.append(token)
            continue
        deprecated("--option KEY=VALUE for judge options", "--option KEY=VALUE (-o is now --out)")
        out.extend(["--option", value])
    return out


class RegapCommand(TyperCommand):
    """A typer command with regap's help rendering and the `--option KEY=VALUE` compatibility."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.help, self.short_help = reflow(self.help), reflow(self.short_help)

    def get_params(self, ctx: Any) -> list[Any]:
        return _without_flag_metavars(super().get_params(ctx))

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if any("--option" in getattr(param, "opts", ()) for param in self.params):
            args = _legacy_short_option(args)
        return super().parse_args(ctx, args)


class RegapGroup(TyperGroup):
    """A typer group with regap's help rendering."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.help, self.short_help = reflow(self.help), reflow(self.short_help)

    def get_params(self, ctx: Any) -> list[Any]:
        return _without_flag_metavars(super().get_params(ctx))


__all__ = [
    "ATTN_IMPLEMENTATION", "CONDITION_OPTION", "DEFENSE", "DEFENSE_OPTION", "DTYPE", "JUDGE_OPTION", "LEVEL", "MODEL",
    "PROJECTOR", "RegapCommand", "RegapGroup", "SEED", "SOURCE_OPTION", "batch_size_option", "defense_specs",
    "dtype_option", "max_new_tokens_option", "model_option", "out_option", "parse_option", "reflow", "scoped_options",
]
