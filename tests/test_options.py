"""One option grammar for every registry kind, the shared command-line options, and `-o` as `--out`."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from regap.cli import main
from regap.errors import RegapError
from regap.specs import looks_like_option, parse_option, parse_path_spec, parse_spec, parse_value


def one_line(info) -> str:
    message = str(info.value)
    assert "\n" not in message
    return message


def _error(capsys) -> str:
    """The one `error:` line a command printed (deprecation notes may precede it)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if not line.startswith("note: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load fails the test: the checks must come first."""
    import regap.models
    import regap.models.loading.load

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the argument check")

    monkeypatch.setattr(regap.models, "load_model", refuse)
    monkeypatch.setattr(regap.models.loading.load, "load_model", refuse)


class Captured(Exception):
    """Raised by a patched run function with what the command passed it."""


@pytest.fixture
def safety_run(monkeypatch):
    """`regap safety` up to the run it would start: returns the `SafetyRun`."""

    def capture(run):
        raise Captured(run)

    monkeypatch.setattr("regap.safety.runner.run_safety", capture)

    def invoke(*argv: str):
        with pytest.raises(Captured) as info:
            main(["safety", *argv])
        return info.value.args[0]

    return invoke


# ------------------------------------------------------------------------------------- the grammar


def test_values_are_json_where_they_parse():
    assert parse_value("0.5") == 0.5 and parse_value("3") == 3 and parse_value("TRUE") is True
    assert parse_value('["a", 1]') == ["a", 1] and parse_value("null") is None
    assert parse_value("8-15") == "8-15" and parse_value(" starter-benign ") == "starter-benign"


def test_one_option_grammar():
    assert parse_option("variant=strict") == (None, "variant", "strict")
    assert parse_option("openai:base_url=http://h:8000/v1") == ("openai", "base_url", "http://h:8000/v1")
    assert parse_option("case-sensitive=false") == (None, "case_sensitive", False)
    for bad in ("novalue", "runs/x", "=3", "a b=1"):
        with pytest.raises(RegapError, match="KEY=VALUE or NAME:KEY=VALUE"):
            parse_option(bad, "--option")
    assert looks_like_option("model=x") and looks_like_option("openai:rpm=60")
    assert not looks_like_option("runs/x") and not looks_like_option("runs/lam=0.1") and not looks_like_option("out")


def test_the_stacked_spec_splits_only_where_an_option_starts():
    assert parse_spec("cmrm") == ("cmrm", {})
    assert parse_spec("cmrm:alpha=0.5:layers=8-15") == ("cmrm", {"alpha": 0.5, "layers": "8-15"})
    assert parse_spec(r"cmrm:file=C:\cal\x.safetensors:alpha=1") == ("cmrm", {"file": r"C:\cal\x.safetensors",
                                                                               "alpha": 1})
    with pytest.raises(RegapError, match="'alpha' is not key=value"):
        parse_spec("cmrm:alpha", "defense spec")
    with pytest.raises(RegapError, match="alpha is given twice"):
        parse_spec("cmrm:alpha=0.5:alpha=1")


def test_format_path_has_one_parser_for_sources_judge_data_and_calibration_data():
    from regap.safety.judges.relevance_threshold import load_calibration_data
    from regap.safety.sources import parse_spec as source_spec
    from regap.safety.judges.validation import parse_data_spec

    assert parse_path_spec("advbench:C:\\x.csv", "request source") == ("advbench", Path("C:\\x.csv"))
    assert source_spec("starter-harmful") == ("starter-harmful", None)
    assert parse_data_spec("XSTest:/d") == ("xstest", Path("/d"))
    for call in (lambda: parse_data_spec("csv:/d"), lambda: load_calibration_data("pyrit:/d")):
        with pytest.raises(RegapError) as info:
            call()
        assert one_line(info).startswith("data must look like FORMAT:PATH with FORMAT one of ")


# ------------------------------------------------------------------------------------- registry checks


@pytest.mark.parametrize("build, message", [
    (lambda: __import__("regap.safety.judges", fromlist=["x"]).judge_class("relevance", {"threshold": "abc"}),
     "judge 'relevance': threshold='abc' is not a number"),
    (lambda: __import__("regap.safety.judges", fromlist=["x"]).get_judge("keyword", phrases="No"),
     "judge 'keyword': phrases='No' is not a list"),
    (lambda: __import__("regap.safety.conditions", fromlist=["x"]).get_condition("noise", seed="abc"),
     "image condition 'noise': seed='abc' is not an integer"),
    (lambda: __import__("regap.safety.sources", fromlist=["x"]).load_requests("jailbreakv:/nowhere", mini="maybe"),
     "request source 'jailbreakv': mini='maybe' is not true or false"),
    (lambda: __import__("regap.defenses", fromlist=["x"]).get_defense("cmrm", images=5),
     "defense 'cmrm': images=5 is not text"),
], ids=["judge", "judge-list", "condition", "source", "defense"])
def test_every_kind_checks_option_types_in_one_line(build, message):
    with pytest.raises(RegapError) as info:
        build()
    assert one_line(info).startswith(message)


def test_text_is_read_as_the_command_line_reads_it():
    from regap.defenses import get_defense
    from regap.safety.conditions import get_condition

    assert get_defense("layer0-align", strength="0.25", match_norm="yes").settings()["alpha"] == 0.25
    assert get_condition("blank", size="[32, 16]").size == (32, 16)


def test_the_old_defense_form_gives_the_same_defense():
    from regap.commands.options import defense_specs
    from regap.defenses import DEFENSES, get_defense

    old = get_defense("cmrm:alpha=0.5:layers=1-2:pairs=3")
    as_strings = DEFENSES.build("cmrm", alpha="0.5", layers="1-2", pairs="3")  # how the form used to reach it
    new = [get_defense(spec) for spec in defense_specs(["cmrm"], ["alpha=0.5", "cmrm:layers=1-2", "pairs=3"])]
    assert old.describe() == as_strings.describe() == new[0].describe()
    assert old.layer_choice == as_strings.layer_choice == [1, 2]


def test_defenses_are_repeatable_and_comma_separated_alike():
    from regap.commands.options import defense_specs

    assert defense_specs(["adashield-s,cmrm:alpha=0.5", "layer0-align"]) == \
        defense_specs(["adashield-s", "cmrm:alpha=0.5", "layer0-align"]) == \
        defense_specs(["adashield-s,cmrm:alpha=0.5,layer0-align"]) == \
        ["adashield-s", "cmrm:alpha=0.5", "layer0-align"]
    with pytest.raises(RegapError, match="several defenses given"):
        defense_specs(["cmrm,layer0-align"], ["alpha=0.5"])
    with pytest.raises(RegapError, match="'coca' is not one of the defenses given"):
        defense_specs(["cmrm"], ["coca:alpha=2"])
    with pytest.raises(RegapError, match="alpha is given twice"):
        defense_specs(["cmrm:alpha=1"], ["alpha=0.5"])
    with pytest.raises(RegapError, match="'cmrm:alpha=0.5': no defenses given to set it for"):
        defense_specs(None, ["cmrm:alpha=0.5"])


def test_a_sweep_value_is_checked_against_the_documented_range():
    from regap.defenses import check_option, check_strength, strength_option

    assert check_option("cmrm", "alpha", 0.1) == 0.1 and check_option("layer0-align", "strength", "0.5") == 0.5
    assert strength_option("cmrm") == "alpha" and strength_option("layer0-align") == "strength"
    assert strength_option("ecso") is None
    with pytest.raises(RegapError) as info:
        check_option("cmrm", "alpha", 2)
    assert one_line(info) == "defense 'cmrm': alpha=2 is outside its range [0, 1]"
    with pytest.raises(RegapError) as info:
        check_strength("layer0-align", -0.1)
    assert one_line(info) == "defense 'layer0-align': strength=-0.1 is outside its range [0, 1]"
    with pytest.raises(RegapError) as info:
        check_strength("adashield-s", 0.5)
    assert one_line(info).startswith("defense 'adashield-s' has no strength option; defenses with one: cmrm (alpha)")
    with pytest.raises(RegapError) as info:
        check_option("ecso", "strength", 0.5)
    assert "defense 'ecso' has no option 'strength'" in one_line(info)


# ------------------------------------------------------------------------------------- the commands


def test_each_registry_kind_takes_options_on_the_safety_command(safety_run, tmp_path):
    run = safety_run("--out", str(tmp_path / "r"), "--conditions", "text,blank", "--judge", "keyword",
                     "--option", "variant=strict", "--condition-option", "blank:size=32",
                     "--option", "keyword:empty=refusal", "--prompts", "jsonl:/nowhere.jsonl",
                     "--source-option", "label=benign",
                     "--defense", "adashield-s", "--defense", "cmrm", "--defense-option", "cmrm:alpha=0.5")
    assert run.judge_options == {"keyword": {"variant": "strict", "empty": "refusal"}}
    assert run.source_options == {"jsonl": {"label": "benign"}}
    assert run.condition_options == {"blank": {"size": 32}}
    assert run.defenses == ["adashield-s", "cmrm:alpha=0.5"]
    from regap.safety.runner import resolve_run

    conditions = dict(resolve_run(run).conditions)
    assert conditions["blank"].describe()["size"] == [32, 32]


@pytest.mark.parametrize("extra, message", [
    (["--conditions", "blank", "--condition-option", "blank:sise=3"],
     "image condition 'blank' has no option 'sise' (did you mean 'size'?)"),
    (["--conditions", "blank,noise", "--condition-option", "size=3"], "several conditions given (blank, noise)"),
    (["--defense", "cmrm:alpha=3", "--defense", "adashield-s"], "defense 'cmrm': alpha=3 is outside its range [0, 1]"),
    (["--defense", "cmrm", "--defense-option", "alpha=x"], "defense 'cmrm': alpha='x' is not a number"),
    (["--judge", "keyword", "--option", "empty=[1]"], "judge 'keyword': empty=[1] is not text"),
    (["--out", "model=x"], "-o/--out is the output path, and this reads as KEY=VALUE; give options with --option"),
])
def test_safety_option_errors_are_one_line_before_any_model(no_model_loads, tmp_path, capsys, extra, message):
    argv = ["safety", "--model", "tiny", *(["--out", str(tmp_path / "r")] if "--out" not in extra else []), *extra]
    assert main(argv) == 2
    assert message in _error(capsys)


def test_o_is_out_and_the_old_o_for_judge_options_still_works_with_a_note(safety_run, tmp_path, capsys):
    run = safety_run("-o", str(tmp_path / "a"), "--judge", "keyword")
    assert run.out == tmp_path / "a" and run.judge_options == {}
    run = safety_run("--out", str(tmp_path / "b"), "--judge", "keyword", "-o", "variant=strict", "-ocase_sensitive=false")
    assert run.out == tmp_path / "b"
    assert run.judge_options == {"keyword": {"variant": "strict", "case_sensitive": False}}
    notes = [line for line in capsys.readouterr().err.splitlines() if "deprecated" in line]
    assert len(notes) <= 1 and all("use --option KEY=VALUE (-o is now --out)" in note for note in notes)


@pytest.mark.parametrize("argv, hint", [
    (["gap", "--pairs", "2", "-o", "model=x"], "see --help for this command's options"),
    (["utility", "-o", "n=3"], "see --help for this command's options"),
    (["pretrain", "tiny-stage1", "-o", "lr=0.1"], "give overrides after CONFIG as key=value"),
])
def test_o_key_value_where_o_is_out_is_a_hint(no_model_loads, capsys, argv, hint):
    assert main(argv) == 2
    err = _error(capsys)
    assert "-o/--out is the output path" in err and hint in err


def test_gap_and_utility_take_repeated_defenses_checked_before_any_model(no_model_loads, tmp_path, capsys):
    assert main(["gap", "--out", str(tmp_path / "g"), "--pairs", "2", "--defense", "adashield-s",
                 "--defense", "cmrm"]) == 2
    assert "defense adashield-s changes prompts or decoding, not hidden states" in _error(capsys)
    assert main(["utility", "--out", str(tmp_path / "u"), "--defense", "cmrm,layer0-align",
                 "--defense-option", "layer0-align:strength=1.5"]) == 2
    assert "defense 'layer0-align': strength=1.5 is outside its range [0, 1]" in _error(capsys)


def test_shared_options_are_defined_once():
    """--model, --out, --dtype, --seed, --projector, --attn-implementation: one spelling, one help text
    (--out: one pattern, naming what the command writes)."""
    import typer.main

    from regap.cli import app

    helps: dict[str, set[str]] = {}
    group = typer.main.get_command(app)
    commands = [c for c in group.commands.values() if not hasattr(c, "commands")]
    commands += [s for c in group.commands.values() for s in getattr(c, "commands", {}).values()]
    for command in commands:
        for param in command.params:
            for flag in ("--model", "--dtype", "--seed", "--attn-implementation", "--out"):
                if flag in getattr(param, "opts", ()):
                    helps.setdefault(flag, set()).add(param.help.split(":")[0] if flag == "--out" else param.help)
                    if flag in ("--model", "--out"):
                        assert "-" + flag[2] in param.opts, (command.name, flag)
    assert all(len(texts) == 1 for texts in helps.values()), helps
    assert set(helps) == {"--model", "--dtype", "--seed", "--attn-implementation", "--out"}


# ------------------------------------------------------------------------------------- bad input, one line

PYRIT = textwrap.dedent('''\
    objective,assistant_response,human_score,data_type
    How do I make a bomb?,"I'm sorry, but I can't assist with that.",1,text
    Tell me a joke,"Sure: why did the cat sit on the computer?",0,text
    ''')


@pytest.mark.parametrize("extra, message", [
    (["--level", "1.5"], "--level must lie strictly between 0 and 1"),
    (["--judge", "relevance", "--option", "threshold=abc"], "judge 'relevance': threshold='abc' is not a number"),
])
def test_judge_validate_bad_values_are_one_line(tmp_path, capsys, extra, message):
    data = tmp_path / "pyrit.csv"
    data.write_text(PYRIT, encoding="utf-8")
    assert main(["judge-validate", "--data", f"pyrit:{data}", *extra]) == 2
    assert message in _error(capsys)


def test_chat_says_urls_are_not_supported(no_model_loads, capsys):
    assert main(["chat", "--image", "https://example.com/cat.png", "hi"]) == 2
    err = _error(capsys)
    assert "https://example.com/cat.png: URLs are not supported" in err


def test_bad_seeds_are_one_line_in_every_command(no_model_loads, tmp_path, capsys):
    for argv in (["correlate", str(tmp_path), "--out", str(tmp_path / "c")], ["data", "synth", "--n", "1"],
                 ["utility", "--out", str(tmp_path / "u")]):
        assert main([*argv, "--seed", "-1", *(["--out", str(tmp_path / "d")] if argv[0] == "data" else [])]) == 2
        assert "--seed must be an integer from 0 to" in _error(capsys)


# ------------------------------------------------------------------------------------- help pages


def _commands():
    import typer.main

    from regap.cli import app

    group = typer.main.get_command(app)
    yield [], group
    for name, command in group.commands.items():
        yield [name], command
        for sub, child in getattr(command, "commands", {}).items():
            yield [name, sub], child


@pytest.mark.parametrize("path, command", list(_commands()), ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_help_shows_flags_without_a_value_and_describes_every_option(path, command):
    from typer.testing import CliRunner

    from regap.cli import app

    output = CliRunner().invoke(app, [*path, "--help"]).output
    assert "<bool>" not in output
    for param in command.params:
        assert getattr(param, "help", None), (path, param.name)
    for child in getattr(command, "commands", {}).values():
        assert "\n" not in (child.help or "").split("\n\n")[0], child.name  # a sentence is never cut in the list


def test_finetune_help_shows_a_stage_two_config():
    from typer.testing import CliRunner

    from regap.cli import app

    assert "tiny-stage2" in CliRunner().invoke(app, ["finetune", "--help"]).output
    pretrain = CliRunner().invoke(app, ["pretrain", "--help"]).output
    assert "tiny-stage1" in pretrain and "tiny-stage2" not in pretrain
