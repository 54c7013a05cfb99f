"""`regap lambda-range`: equal stage-1 runs at several λ summarised from their training probes."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from regap.cli import main


def _run(folder: Path, lam: float, gap: float, loss: float, steps: int = 8, finished: bool = True,
         max_steps: int = 8) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"regap": {"lam": lam}, "max_steps": max_steps, "seed": 0}))
    rows = [{"step": s, "caption_loss": loss + (0.5 if s < steps - 2 else 0.0)} for s in range(1, steps + 1)]
    rows[3]["probe_gap0"], rows[3]["probe_norm_ratio0"] = gap * 2, 9.0
    rows[-1].update(probe_gap0=gap, probe_norm_ratio0=3.0, probe_mir=1.5)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if finished:
        (folder / "projector.safetensors").write_bytes(b"")
    return folder


def test_runs_are_read_at_their_last_probe_and_sorted_by_lambda(tmp_path, capsys):
    runs = [_run(tmp_path / "b", 1e-3, 40.0, 1.0), _run(tmp_path / "a", 0.0, 2e5, 0.8)]
    assert main(["lambda-range", *map(str, runs), "--out", str(tmp_path / "out"), "--tail", "2"]) == 0
    summary = json.loads((tmp_path / "out" / "stage1_sweep.json").read_text())
    assert [r["lambda"] for r in summary["runs"]] == [0.0, 1e-3]
    first = summary["runs"][0]
    assert first["probe_gap0"] == 2e5 and first["probe_gap0_step"] == 8 and first["probe_mir"] == 1.5
    assert first["caption_loss"] == 0.8  # the last 2 steps only
    assert (tmp_path / "out" / "figures" / "stage1_sweep.png").stat().st_size > 0
    assert "| 0 | 8/8 | 200,000 | 3 | 1.5 | 0.8 |" in capsys.readouterr().out
    assert summary["notes"] == []


def test_unequal_or_unfinished_runs_are_flagged(tmp_path):
    from regap.study.lambda_range import summarise

    runs = [_run(tmp_path / "a", 0.0, 10.0, 1.0), _run(tmp_path / "b", 1e-4, 5.0, 1.0, steps=4, finished=False,
                                                         max_steps=16)]
    notes = " ".join(summarise(runs)["notes"])
    assert "differ in length" in notes and "not finished yet: b" in notes


def test_a_folder_that_is_not_a_run_is_one_line(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    assert main(["lambda-range", str(tmp_path / "x"), "--out", str(tmp_path / "o")]) == 2
    assert "not a regap training run" in capsys.readouterr().err
