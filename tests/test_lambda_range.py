"""`regap lambda-range`: equal stage-1 runs at several λ summarised from their training probes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from regap.cli import main
from regap.errors import RegapError


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


# ---- RULE.md as code -------------------------------------------------------------------------------

LAMBDAS = [0.0, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]


def _sweep(losses: list[float]) -> dict:
    return {"runs": [{"lambda": lam, "caption_loss": loss} for lam, loss in zip(LAMBDAS, losses)]}


def test_step1_reproduces_the_committed_sweeps_knee_and_candidates():
    from regap.study.lambda_range import knee

    committed = Path(__file__).resolve().parents[1] / "results" / "lambda-range" / "stage1_sweep.json"
    step = knee(json.loads(committed.read_text()))
    assert step["knee"] == 1e-4 and step["candidates"] == [1e-6, 1e-5, 1e-4]
    assert step["bound"] == pytest.approx(1.03 * 0.7387673482298851)


def test_step1_takes_the_largest_lambda_within_the_bound_and_fills_candidates_below_1e7():
    from regap.study.lambda_range import knee

    # 1e-3 is within 3 % though 1e-4 is not: the knee is the largest qualifying λ, not the first to fail
    assert knee(_sweep([1.0, 1.0, 1.0, 1.0, 1.05, 1.02, 1.2, 1.3]))["candidates"] == [1e-5, 1e-4, 1e-3]
    low = knee(_sweep([1.0, 1.01, 1.2, 1.2, 1.2, 1.2, 1.2, 1.2]))  # only 1e-7 qualifies
    assert low["knee"] == 1e-7 and low["candidates"] == [1e-7, 1e-6, 1e-5]
    none = knee(_sweep([1.0, 1.5, 1.5, 1.5, 1.5, 1.5, 1.5, 1.5]))  # nothing qualifies: λ_k = 1e-7
    assert none["knee"] == 1e-7 and none["within_bound"] == [] and none["candidates"] == [1e-7, 1e-6, 1e-5]
    assert knee(_sweep([1.0, 1.0, 1.0, 1.5, 1.5, 1.5, 1.5, 1.5]))["candidates"] == [1e-7, 1e-6, 1e-5]


def _check(qa: dict[str, float]) -> dict:
    return {"results": {"arms": {arm: {"qa": {"mean": value}} for arm, value in qa.items()}}}


def test_step2_takes_the_largest_candidate_that_keeps_qa_else_the_smallest():
    from regap.study.lambda_range import choose_lambda_star

    candidates = [1e-6, 1e-5, 1e-4]
    step = choose_lambda_star(_check({"plain": 0.60, "regap-l1e-06": 0.61, "regap-l1e-05": 0.56,
                                      "regap-l0.0001": 0.54}), candidates)
    assert step["lambda_star"] == 1e-5 and step["arm"] == "regap-l1e-05"  # 0.56 >= 0.55; 0.54 is not
    worst = choose_lambda_star(_check({"plain": 0.60, "regap-l1e-06": 0.5, "regap-l1e-05": 0.5,
                                       "regap-l0.0001": 0.5}), candidates)
    assert worst["lambda_star"] == 1e-6 and "no candidate" in worst["reason"]
    with pytest.raises(RegapError, match="no held-out QA for regap-l0.0001"):
        choose_lambda_star(_check({"plain": 0.6, "regap-l1e-06": 0.6, "regap-l1e-05": 0.6}), candidates)


def test_step2_is_decided_by_the_candidates_it_reads_from_the_largest_down():
    from regap.study.lambda_range import choose_lambda_star

    candidates = [1e-6, 1e-5, 1e-4]
    top = choose_lambda_star(_check({"plain": 0.60, "regap-l0.0001": 0.58}), candidates)
    assert top["lambda_star"] == 1e-4 and top["not_needed"] == ["regap-l1e-05", "regap-l1e-06"]
    assert top["candidates"]["regap-l1e-06"] == {"lambda": 1e-6, "qa": None, "qa_minus_plain": None,
                                                 "keeps_utility": None, "needed": False}
    middle = choose_lambda_star(_check({"plain": 0.60, "regap-l0.0001": 0.50, "regap-l1e-05": 0.57}), candidates)
    assert middle["lambda_star"] == 1e-5 and middle["not_needed"] == ["regap-l1e-06"]
    # both larger candidates fail: the smallest is λ* whatever its QA, so it need not be trained
    bottom = choose_lambda_star(_check({"plain": 0.60, "regap-l0.0001": 0.50, "regap-l1e-05": 0.52}), candidates)
    assert bottom["lambda_star"] == 1e-6 and "whether or not" in bottom["reason"]
    with pytest.raises(RegapError, match="no held-out QA for regap-l1e-05 yet, and the rule needs it"):
        choose_lambda_star(_check({"plain": 0.60, "regap-l0.0001": 0.50, "regap-l1e-06": 0.60}), candidates)
    with pytest.raises(RegapError, match="no held-out QA for plain"):
        choose_lambda_star(_check({"regap-l0.0001": 0.60}), candidates)


def test_lambda_choose_reads_the_committed_files_and_writes_its_choice(tmp_path, capsys):
    sweep = tmp_path / "stage1_sweep.json"
    sweep.write_text(json.dumps(_sweep([1.0, 1.0, 1.0, 1.0, 1.0, 1.2, 1.2, 1.2])))
    (tmp_path / "check").mkdir()
    (tmp_path / "check" / "summary.json").write_text(json.dumps(_check(
        {"plain": 0.6, "regap-l1e-06": 0.6, "regap-l1e-05": 0.6, "regap-l0.0001": 0.6})))
    assert main(["lambda-choose", "--sweep", str(sweep), "--check", str(tmp_path / "check"),
                 "--out", str(tmp_path / "check")]) == 0
    assert "λ* = 0.0001" in capsys.readouterr().out
    assert json.loads((tmp_path / "check" / "lambda_choice.json").read_text())["arm"] == "regap-l0.0001"
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "summary.json").write_text(json.dumps(_check({"plain": 0.6, "regap-l0.0001": 0.6})))
    assert main(["lambda-choose", "--sweep", str(sweep), "--check", str(tmp_path / "partial")]) == 0
    out = capsys.readouterr().out
    assert "regap-l1e-05: not measured (the rule does not need it)" in out and "λ* = 0.0001" in out
    assert main(["lambda-choose", "--sweep", str(tmp_path / "nope.json"), "--check", str(tmp_path)]) == 2
    assert "stage-1 sweep summary not found" in capsys.readouterr().err
