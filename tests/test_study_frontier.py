"""The safety–utility frontier: methods and strengths read from arm names, the recommendation rule on
hand-made tables (one where no setting qualifies), and the figure's points against the table."""

from __future__ import annotations

import pytest

from regap.study.frontier import method_and_strength, plot_frontier, recommend, recommendations


def _e(mean: float, half: float | None = 0.01) -> dict:
    return {"mean": mean, "ci": None if half is None else [mean - half, mean + half]}


def _results(arms: dict[str, tuple[float, float, tuple[float, float] | None, float]]) -> dict:
    """arm -> (qa, unsafe, (qa − plain mean, its half-width) or None for plain, unsafe − plain)."""
    out = {"arms": {}, "vs_plain": {}, "backbone": {"unsafe": 0.05, "n": 120}}
    for arm, (qa, unsafe, qa_diff, unsafe_diff) in arms.items():
        out["arms"][arm] = {"qa": _e(qa), "unsafe": {"image (pooled)": _e(unsafe), "text": _e(0.2)},
                            "refused": {"image (pooled)": _e(1 - unsafe - 0.1)},
                            "over_refusal": {"image (pooled)": _e(0.02), "text": _e(0.01)}}
        if qa_diff is not None:
            out["vs_plain"][arm] = {"qa": _e(qa_diff[0], qa_diff[1]), "unsafe": {"image (pooled)": _e(unsafe_diff)}}
    return out


@pytest.mark.parametrize("arm, expected", [
    ("plain", ("plain", None)), ("moca", ("moca", None)), ("regap-l0.001", ("regap", 0.001)),
    ("plain+cmrm:alpha=0.1", ("cmrm", 0.1)), ("plain+cmrm:alpha=0.1:level=sample", ("cmrm[level=sample]", 0.1)),
    ("plain+layer0-align:strength=0.5", ("layer0-align", 0.5)), ("plain+ecso", ("ecso", None)),
    ("regap-l0.001+cmrm:alpha=0.01", ("regap-l0.001 + cmrm", 0.01)),
])
def test_method_and_strength_from_the_arm_name(arm, expected):
    assert method_and_strength(arm) == expected


def test_the_rule_takes_the_largest_reduction_whose_qa_interval_clears_the_bound():
    results = _results({
        "plain": (0.60, 0.40, None, 0.0),
        "plain+cmrm:alpha=0.01": (0.60, 0.38, (-0.001, 0.01), -0.02),   # interval [-0.011, 0.009]: clears -0.02
        "plain+cmrm:alpha=0.1": (0.57, 0.30, (-0.03, 0.005), -0.10),    # [-0.035, -0.025]: only -0.05
        "plain+cmrm:alpha=1": (0.10, 0.05, (-0.50, 0.02), -0.35),       # clears neither
        "regap-l0.001": (0.55, 0.35, (-0.05, 0.03), -0.05),              # [-0.08, -0.02]: neither
    })
    out = recommendations(results)["by_bound"]
    assert out["-0.02"]["cmrm"]["arm"] == "plain+cmrm:alpha=0.01"
    assert out["-0.05"]["cmrm"]["arm"] == "plain+cmrm:alpha=0.1"
    assert out["-0.02"]["cmrm"]["unsafe_reduction"] == pytest.approx(0.02)
    assert out["-0.02"]["regap"]["arm"] is None and out["-0.05"]["regap"]["arm"] is None  # "none"


def test_a_setting_with_one_seed_has_no_interval_and_never_qualifies():
    from regap.study.frontier import frontier_table

    results = _results({"plain": (0.6, 0.4, None, 0.0), "plain+ecso": (0.6, 0.2, (0.0, None), -0.2)})
    assert recommend(frontier_table(results), -0.05)["ecso"]["arm"] is None


def test_the_figure_draws_the_table(tmp_path):
    results = _results({"plain": (0.60, 0.40, None, 0.0), "plain+cmrm:alpha=0.1": (0.57, 0.30, (-0.03, 0.005), -0.1),
                        "plain+cmrm:alpha=0.01": (0.60, 0.38, (0.0, 0.01), -0.02)})
    drawn = plot_frontier(results, tmp_path / "frontier.png")
    assert (tmp_path / "frontier.png").stat().st_size > 0
    unsafe = {d["arm"]: (d["x"], d["y"]) for d in drawn if d["panel"] == "unsafe"}
    for arm, entry in results["arms"].items():
        assert unsafe[arm] == (entry["qa"]["mean"], entry["unsafe"]["image (pooled)"]["mean"])
    assert unsafe["plain (text only)"] == (0.60, 0.2)
    refused = {d["arm"]: d["y"] for d in drawn if d["panel"] == "refused"}
    assert refused["plain+cmrm:alpha=0.1"] == pytest.approx(0.6)
