"""One registry for conditions, judges, defenses and request sources: the same rules for all four."""

from __future__ import annotations

import pytest

from regap.errors import RegapError
from regap.registry import Registry, accepted_options


class Thing:
    def __init__(self, size: int = 1, colour: str = "red") -> None:
        self.size, self.colour = size, colour


class Anything:
    def __init__(self, **options) -> None:
        self.options = options


def one_line(info: pytest.ExceptionInfo) -> str:
    message = str(info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- the class


def test_lookup_is_case_folded_and_aliases_share_the_object():
    things = Registry("thing")
    things.register("Square", "box")(Thing)
    assert things.names() == ["box", "square"]
    assert things.get("SQUARE") is Thing and things.get("  Box ") is Thing
    assert "square" in things and "BOX" in things and "circle" not in things
    assert things.entry("sQuArE").name == "square"


def test_a_second_registration_of_a_name_is_an_error_unless_replaced():
    things = Registry("thing")
    things.register("square")(Thing)
    with pytest.raises(ValueError, match="thing 'square' is already registered"):
        things.register("SQUARE")(Anything)
    with pytest.raises(ValueError, match="already registered"):
        things.register("square")(Thing)  # the same class twice is still a second registration
    assert things.get("square") is Thing
    things.register("square", replace=True)(Anything)
    assert things.get("square") is Anything
    things.unregister("Square")
    assert "square" not in things


@pytest.mark.parametrize("name", ["", "  ", "a:b", "a,b", "two words"])
def test_names_that_the_command_line_cannot_say_are_refused(name):
    with pytest.raises(ValueError, match="invalid thing name"):
        Registry("thing").register(name)(Thing)


def test_unknown_name_lists_the_valid_ones_and_suggests_the_closest():
    things = Registry("thing")
    things.register("square")(Thing)
    things.register("circle")(Thing)
    with pytest.raises(RegapError) as info:
        things.get("sqaure")
    assert one_line(info) == "unknown thing 'sqaure' (did you mean 'square'?); valid things: circle, square"
    with pytest.raises(RegapError) as info:
        things.get("zzz")
    assert one_line(info) == "unknown thing 'zzz'; valid things: circle, square"


def test_unknown_option_keys_are_named_with_the_accepted_ones():
    things = Registry("thing")
    things.register("square")(Thing)
    with pytest.raises(RegapError) as info:
        things.build("square", colur="blue")
    assert one_line(info) == "thing 'square' has no option 'colur' (did you mean 'colour'?); accepted: size, colour"
    with pytest.raises(RegapError, match="has no options 'a', 'b';"):
        things.build("square", a=1, b=2)
    built = things.build("square", colour="blue")
    assert (built.size, built.colour) == (1, "blue")


def test_defaults_per_name_and_any_options():
    things = Registry("thing")
    things.register("big", defaults={"size": 10})(Thing)
    assert things.build("big").size == 10 and things.build("big", size=3).size == 3
    with pytest.raises(ValueError, match="default option"):
        things.register("huge", defaults={"weight": 1})(Thing)
    things.register("free")(Anything)
    assert things.build("free", whatever=1).options == {"whatever": 1}


def test_options_of_classes_and_loaders():
    class Plain:
        pass

    def loader(path, report, *, label="x", **extra):
        return []

    assert accepted_options(Thing) == (("size", "colour"), False)
    assert accepted_options(Plain) == ((), False)  # object.__init__: no options (not `args, kwargs`)
    assert accepted_options(loader, skip=2) == (("label",), True)


# --------------------------------------------------------------------------- the four kinds


def test_conditions_use_the_registry():
    from regap.safety.conditions import CONDITIONS, ImageCondition, get_condition, register_condition

    blank = get_condition("BLANK-Black")
    assert blank.name == "blank-black" and blank.describe() == get_condition("blank-black").describe()
    with pytest.raises(RegapError) as info:
        get_condition("blnk")
    assert "unknown image condition 'blnk' (did you mean 'blank'?); valid conditions: " in one_line(info)
    with pytest.raises(RegapError) as info:
        get_condition("blank", colr="red")
    assert one_line(info) == ("image condition 'blank' has no option 'colr' (did you mean 'color'?); "
                              "accepted: size, color")
    with pytest.raises(ValueError, match="image condition 'blank' is already registered"):
        register_condition("blank")(type("Other", (ImageCondition,), {}))
    assert CONDITIONS.get("blank").__name__ == "Blank"


def test_judges_use_the_registry():
    from regap.safety.judges import JUDGES, Judge, get_judge, judge_class, register_judge

    assert get_judge("KeyWord").name == "keyword"
    with pytest.raises(RegapError) as info:
        get_judge("keywrd")
    assert "unknown judge 'keywrd' (did you mean 'keyword'?); valid judges: " in one_line(info)
    with pytest.raises(RegapError) as info:
        judge_class("llamaguard", {"modell": "x"})  # checked without loading any weights
    message = one_line(info)
    assert message.startswith("judge 'llamaguard' has no option 'modell' (did you mean 'model'?); accepted: model, ")
    with pytest.raises(ValueError, match="judge 'keyword' is already registered"):
        register_judge("keyword")(type("Other", (Judge,), {}))
    assert JUDGES.get("keyword").__name__ == "KeywordJudge"


def test_defenses_use_the_registry():
    from regap.defenses import DEFENSES, Defense, get_defense, register_defense

    shield = get_defense("AdaShield-S")
    assert shield.name == "adashield-s" and shield.describe() == get_defense("adashield-s").describe()
    assert get_defense("CMRM:alpha=0.5").settings()["alpha"] == 0.5
    with pytest.raises(RegapError) as info:
        get_defense("cmr")
    assert one_line(info) == ("unknown defense 'cmr' (did you mean 'cmrm'?); "
                              "valid defenses: adashield-s, cmrm, coca, ecso, layer0-align")
    with pytest.raises(RegapError) as info:
        get_defense("coca:alpah=1")
    assert one_line(info) == "defense 'coca' has no option 'alpah' (did you mean 'alpha'?); accepted: alpha, principle"
    with pytest.raises(ValueError, match="defense 'ecso' is already registered"):
        register_defense("ecso")(type("Other", (Defense,), {}))
    assert DEFENSES.get("ecso").__name__ == "ECSO"


@pytest.mark.parametrize("spec", ["ecso:args=1", "ecso:kwargs=1", "adashield-s:args=1"])
def test_a_bad_defense_option_is_a_user_error_not_a_type_error(spec):
    """ECSO has no constructor options: its inherited `object.__init__(*args, **kwargs)` used to
    pass the key check, so `ecso:args=1` raised a TypeError from the constructor."""
    from regap.defenses import get_defense

    with pytest.raises(RegapError) as info:
        get_defense(spec)
    assert "has no option" in one_line(info)


def test_sources_use_the_registry(tmp_path):
    from regap.safety.sources import SOURCES, load_requests, register_source, source_info

    assert [r.source for r in load_requests("Starter-Harmful", limit=1)] == ["starter-harmful"]
    assert source_info("MMSafetyBench").options == ("image_type", "scenarios")
    with pytest.raises(RegapError) as info:
        load_requests(f"advbnch:{tmp_path}")
    assert "unknown request source 'advbnch' (did you mean 'advbench'?); valid request sources: " in one_line(info)
    with pytest.raises(RegapError) as info:
        load_requests("jsonl:x.jsonl", lable="benign")
    assert one_line(info) == "request source 'jsonl' has no option 'lable' (did you mean 'label'?); accepted: label"
    with pytest.raises(ValueError, match="request source 'jsonl' is already registered"):
        register_source("jsonl")(lambda path, report: iter(()))
    assert SOURCES.entry("jsonl").info["needs_path"] is True
