"""`regap demo --fast` end to end on the real tiny preset: every section, every figure, resumable."""

from __future__ import annotations

import json

import pytest

from regap.cli import main

pytestmark = pytest.mark.integration

SECTIONS = ("setup", "notes", "training", "gap", "safety", "defenses", "utility", "comparison", "correlation",
            "timings_seconds", "provenance")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory, real_tiny):
    out = tmp_path_factory.mktemp("demo") / "run"
    assert main(["demo", "--fast", "--out", str(out)]) == 0
    return out


def test_summary_has_every_section(demo_dir):
    summary = json.loads((demo_dir / "summary.json").read_text())
    assert set(SECTIONS) <= set(summary)
    assert len(summary["gap"]) == 4 and len(summary["safety"]) == 4  # 2 lambdas x 2 checkpoints
    assert summary["correlation"]["n_points"] == 4
    for row in summary["safety"].values():
        assert {"text", "blank", "noise", "natural", "typo"} <= set(row["unsafe"])
    assert set(summary["defenses"]) == {"plain@2", "regap-l1@2"}
    assert {c["condition"] for c in summary["comparison"]} == {"text", "blank", "noise", "natural", "typo"}


def test_report_contains_each_figure(demo_dir):
    html = (demo_dir / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4  # training, gap layers, safety conditions, correlation
    markdown = (demo_dir / "report.md").read_text()
    for figure in ("training_curves.png", "gap_compare/gap_layers.png", "safety_conditions.png", "correlate/correlation.png"):
        assert f"]({figure})" in markdown


def test_rerun_reuses_finished_steps(demo_dir):
    markers = {p.name: p.stat().st_mtime for p in (demo_dir / ".steps").iterdir()}
    assert main(["demo", "--fast", "--out", str(demo_dir)]) == 0
    assert {p.name: p.stat().st_mtime for p in (demo_dir / ".steps").iterdir()} == markers
