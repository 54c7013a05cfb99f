"""`regap correlate`: numbers match scipy on the same points; bad input is named."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from scipy import stats

from regap.cli import main


def _run(folder, mir, unsafe_k, n=20):
    (folder / "gap").mkdir(parents=True)
    (folder / "safety").mkdir()
    (folder / "gap" / "gap.json").write_text(json.dumps({"mir": mir, "layer0_gap": mir * 2}))
    summary = {"judges": {"keyword": {"by_condition": [
        {"condition": "text", "unsafe": {"k": 0, "n": n}},
        {"condition": "blank", "unsafe": {"k": unsafe_k, "n": n}},
        {"condition": "noise", "unsafe": {"k": unsafe_k // 2, "n": n}},
    ]}}}
    (folder / "safety" / "summary.json").write_text(json.dumps(summary))
    return folder


def test_correlation_matches_scipy(tmp_path):
    mirs, ks = [2.0, 2.5, 3.1, 3.3, 4.0, 4.2], [2, 5, 9, 8, 15, 18]
    runs = [str(_run(tmp_path / f"r{i}", m, k)) for i, (m, k) in enumerate(zip(mirs, ks))]
    assert main(["correlate", *runs, "--out", str(tmp_path / "out"), "--n-boot", "300"]) == 0
    result = json.loads((tmp_path / "out" / "correlation.json").read_text())
    rates = [(k + k // 2) / 40 for k in ks]  # text excluded: pooled over image conditions
    assert [p["unsafe_rate"] for p in result["points"]] == pytest.approx(rates)
    assert result["pearson"]["r"] == pytest.approx(stats.pearsonr(mirs, rates).statistic)
    assert result["spearman"]["rho"] == pytest.approx(stats.spearmanr(mirs, rates).statistic)
    assert result["pearson"]["ci"][0] <= result["pearson"]["r"] <= result["pearson"]["ci"][1]
    assert result["fit"]["slope"] == pytest.approx(np.polyfit(mirs, rates, 1)[0])
    assert (tmp_path / "out" / "correlation.png").stat().st_size > 1000


def test_bad_inputs(tmp_path, capsys):
    a, b = _run(tmp_path / "a", 2.0, 3), _run(tmp_path / "b", 3.0, 5)
    assert main(["correlate", str(a), str(b), "--out", str(tmp_path / "o")]) == 2
    assert "at least 3" in capsys.readouterr().err
    (tmp_path / "c").mkdir()
    assert main(["correlate", str(a), str(b), str(tmp_path / "c"), "--out", str(tmp_path / "o")]) == 2
    assert "no gap.json" in capsys.readouterr().err


def test_few_runs_get_a_caution_and_rounded_intervals(tmp_path, capsys):
    runs = [str(_run(tmp_path / f"r{i}", m, k)) for i, (m, k) in enumerate(zip([2.0, 2.6, 3.3], [2, 7, 6]))]
    assert main(["correlate", *runs, "--out", str(tmp_path / "out"), "--n-boot", "200"]) == 0
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    intervals = re.findall(r"\[([^\]]*)\]", first)
    assert len(intervals) == 2 and all(re.fullmatch(r"-?\d\.\d{3}, -?\d\.\d{3}|nan, nan", i) for i in intervals)
    assert "caution: 3 runs are few for a correlation" in out
    many = [str(_run(tmp_path / f"m{i}", 2.0 + i / 4, 2 + i)) for i in range(10)]
    assert main(["correlate", *many, "--out", str(tmp_path / "out2"), "--n-boot", "50"]) == 0
    assert "caution:" not in capsys.readouterr().out
