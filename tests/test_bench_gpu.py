"""`bench/gpu.py` at tiny shapes on the CPU (`--smoke`), so the GPU benchmark cannot rot."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"


@pytest.fixture(scope="module")
def gpu_bench():
    spec = importlib.util.spec_from_file_location("regap_bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs with one torch thread (conftest.one_thread)."""


@pytest.mark.slow
def test_smoke_runs_every_section_and_records_a_failing_setting(gpu_bench, tmp_path, monkeypatch, capsys):
    real = gpu_bench.train_setting

    def out_of_memory_once(model, data, workdir, batch, checkpointing, regap_on, *rest):
        if batch == 2 and regap_on:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
        return real(model, data, workdir, batch, checkpointing, regap_on, *rest)

    monkeypatch.setattr(gpu_bench, "train_setting", out_of_memory_once)
    out = tmp_path / "gpu.json"
    assert gpu_bench.main(["--smoke", "--out", str(out), "--workdir", str(tmp_path / "work")]) == 0
    report = json.loads(out.read_text())
    assert report["smoke"] and report["llm_parameters"] > 0 and report["versions"]["torch"] == torch.__version__

    train = report["train"]
    assert train["tokens_per_sample"] == gpu_bench.TINY.sample_tokens
    statuses = {(s["batch"], s["regap"]): s["status"] for s in train["settings"]}
    assert statuses == {(4, False): "ok", (4, True): "ok", (2, False): "ok", (2, True): "oom"}
    for s in train["settings"]:
        if s["status"] == "ok":
            assert s["samples_per_s"] > 0 and s["measured_steps"] == gpu_bench.SMOKE.measure_steps
            assert s["pct_of_peak"] is None  # no peak known for a CPU
            assert math.isfinite(s["final_loss"]) and (s["final_gap"] is not None) == s["regap"]
    assert set(train["regap_overhead_pct"]) == {"b4_gc"}  # the pair with a failed half has none
    assert "simulated" in next(s for s in train["settings"] if s["status"] == "oom")["error"]

    gap = report["gap"]
    assert gap["status"] == "ok" and gap["pairs"] == gpu_bench.SMOKE.gap_pairs and math.isfinite(gap["mir"])
    assert gap["mir_protocol_s"] == pytest.approx(gap["collect_s"] + gap["analyse_s"])
    boot = gap["bootstrap"]
    assert boot["status"] == "ok" and boot["replicates"] == gpu_bench.SMOKE.gap_boot and len(boot["mir_ci"]) == 2

    rows = {(r["engine"], r.get("batch")): r for r in report["generate"]["rows"]}
    for engine in ("transformers", "static"):
        for batch in gpu_bench.SMOKE.gen_batches:
            row = rows[(engine, batch)]
            assert row["status"] == "ok" and row["generated_tokens"] == row["expected_tokens"] > 0, row
            assert row["tokens_per_s"] > 0
    vllm = rows.get(("vllm", None))
    assert vllm is None or vllm["status"] == "skipped: vllm is not installed"
    assert report["syncs"]["status"].startswith("skipped")

    printed = capsys.readouterr().out
    assert "| workload | regap |" in printed and "| oom |" in printed and str(out) in printed


def test_a_spent_time_budget_skips_and_records(gpu_bench, tmp_path):
    out = tmp_path / "gpu.json"
    assert gpu_bench.main(["--smoke", "--out", str(out), "--sections", "train,gap", "--budget-s", "0",
                           "--workdir", str(tmp_path / "work")]) == 0
    report = json.loads(out.read_text())
    assert all(s["status"].startswith("skipped: time budget") for s in report["train"]["settings"])
    assert report["gap"]["status"].startswith("skipped: time budget") and "generate" not in report


def test_without_cuda_it_exits_with_one_line(gpu_bench, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_bench.main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1 and "CUDA" in captured.err


def test_bad_arguments_name_the_option(gpu_bench, capsys):
    with pytest.raises(SystemExit):
        gpu_bench.main(["--smoke", "--engines", "tensorrt"])
    assert "--engines: unknown tensorrt" in capsys.readouterr().err
