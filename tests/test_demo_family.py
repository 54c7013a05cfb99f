"""`regap demo --family`: which families run where, step markers per family, wiring to the report.

Cheap unit tests (no model is loaded); the end-to-end demo is in test_demo.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from regap.cli import main
from regap.errors import RegapError


def test_family_plan_places_each_family():
    from regap.study.demo import DemoSettings, family_plan

    settings = DemoSettings.fast()
    out = Path("runs/x")
    (mlp,) = family_plan(out, settings, "mlp")
    assert (mlp.name, mlp.folder, mlp.settings.model, mlp.step_prefix) == ("mlp", out, "tiny", "")
    (qformer,) = family_plan(out, settings, "qformer")
    assert (qformer.name, qformer.folder, qformer.settings.model, qformer.step_prefix) == \
        ("qformer", out / "qformer", "tiny-qformer", "qformer-")
    assert qformer.settings.train_steps == settings.train_steps and settings.model == "tiny"  # fast sizes kept, input unchanged
    assert [run.name for run in family_plan(out, settings, "both")] == ["mlp", "qformer"]
    with pytest.raises(RegapError, match="unknown demo family 'mixed'; valid: mlp, qformer, both"):
        family_plan(out, settings, "mixed")


def test_bad_family_fails_before_any_work(tmp_path, capsys):
    assert main(["demo", "--fast", "--family", "mixed", "--out", str(tmp_path / "run")]) == 2
    assert "unknown demo family 'mixed'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_step_markers_are_per_family_and_the_data_is_shared(tmp_path):
    from regap.study.demo import Demo, DemoSettings

    calls: list[str] = []
    mlp = Demo(tmp_path, DemoSettings.fast(), progress=False)
    qformer = Demo(tmp_path / "qformer", DemoSettings.fast(), progress=False, root=tmp_path, step_prefix="qformer-")
    for demo, who in ((mlp, "mlp"), (qformer, "qformer"), (mlp, "mlp"), (qformer, "qformer")):
        demo.step("train-plain", ["same params"], lambda who=who: calls.append(f"train-{who}"))
        demo.step("data", [16, 0], lambda who=who: calls.append(f"data-{who}"), shared=True)
    assert calls == ["train-mlp", "data-mlp", "train-qformer"]  # resumed: nothing ran twice, data once
    assert sorted(p.name for p in (tmp_path / ".steps").iterdir()) == ["data.json", "qformer-train-plain.json",
                                                                       "train-plain.json"]
    assert not (tmp_path / "qformer" / ".steps").exists()
    assert set(qformer.timings) == {"train-plain", "data"}


def test_run_families_runs_the_asked_families_and_one_report(tmp_path, monkeypatch):
    from regap.study import demo

    ran: list[tuple[str, Path, str]] = []

    def fake_family(run, root, progress):
        ran.append((run.name, run.folder, run.settings.model))
        run.folder.mkdir(parents=True, exist_ok=True)
        summary = {"setup": {"model": run.settings.model}}
        (run.folder / "summary.json").write_text(json.dumps(summary))
        return summary

    monkeypatch.setattr(demo, "_run_family", fake_family)
    summaries = demo.run_families(tmp_path, demo.DemoSettings.fast(), "both", progress=False)
    assert ran == [("mlp", tmp_path, "tiny"), ("qformer", tmp_path / "qformer", "tiny-qformer")]
    assert set(summaries) == {"mlp", "qformer"}
    assert "Connector families side by side" in (tmp_path / "report.md").read_text()
    ran.clear()
    only = tmp_path / "only"
    assert demo.run_demo(only, demo.DemoSettings.fast(), progress=False, family="qformer")["setup"]["model"] == "tiny-qformer"
    assert ran == [("qformer", only / "qformer", "tiny-qformer")] and (only / "report.html").is_file()
    assert "Q-Former: Modality gap" in (only / "report.md").read_text()


def test_an_undefined_correlation_does_not_stop_the_study(tmp_path):
    """A small run where every checkpoint answers alike: the study records why, the report says so."""
    from regap.analysis.correlate import Point, correlate_or_undefined, plot_correlation
    from regap.report.demo import build_report

    points = [Point(f"r{i}", f"plain@{i}", 1.0 + i, 10.0 * i, 0.5, 4) for i in range(4)]
    result = correlate_or_undefined(points)
    assert "constant" in result["undefined"] and result["n_points"] == 4 and "pearson" not in result
    (tmp_path / "correlate").mkdir()
    (tmp_path / "correlate" / "correlation.json").write_text(json.dumps(result))
    assert plot_correlation(result, tmp_path / "correlate" / "correlation.png").stat().st_size > 0
    build_report(tmp_path)
    assert "Correlation undefined: mir or the unsafe rate is constant" in (tmp_path / "report.md").read_text()
    assert "pearson" in correlate_or_undefined([Point("a", "a", 1, 1, 0.1, 4), Point("b", "b", 2, 2, 0.2, 4),
                                                Point("c", "c", 3, 3, 0.4, 4)], n_boot=20)
