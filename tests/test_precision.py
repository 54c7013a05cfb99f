"""`dtype: auto`: the rule, the cached CPU probe, provenance, bad names, and training configs."""

from __future__ import annotations

import json

import pytest
import torch

from regap import precision
from regap.errors import RegapError
from regap.precision import CpuProbe, resolve_dtype


@pytest.fixture(autouse=True)
def _fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("REGAP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("REGAP_CACHE_TEST_ROOT", str(tmp_path))
    monkeypatch.delenv("REGAP_AUTO_DTYPE", raising=False)  # conftest pins auto; these tests check the rule
    precision.reset_for_tests()
    yield
    precision.reset_for_tests()


def _mock_probe(monkeypatch, fp32: float, bf16: float) -> list[int]:
    """A machine whose probe measures these times (a fresh cache, as on a new machine)."""
    import os
    import tempfile

    monkeypatch.setenv("REGAP_CACHE", tempfile.mkdtemp(dir=os.environ["REGAP_CACHE_TEST_ROOT"]))
    calls = []

    def fake() -> CpuProbe:
        calls.append(1)
        return CpuProbe(precision._probe_key(), fp32, bf16, "AVX2", 2)

    monkeypatch.setattr(precision, "run_cpu_probe", fake)
    return calls


def test_auto_is_float32_where_bf16_is_slow(monkeypatch, capsys):
    _mock_probe(monkeypatch, fp32=0.01, bf16=0.5)
    choice = resolve_dtype("auto", "cpu")
    assert choice.dtype == "float32" and "50.00x" in choice.reason
    assert "dtype auto -> float32" in capsys.readouterr().err  # printed once
    resolve_dtype("auto", "cpu")
    assert "dtype auto" not in capsys.readouterr().err


def test_auto_is_bfloat16_where_the_cpu_computes_it_natively(monkeypatch):
    _mock_probe(monkeypatch, fp32=0.03, bf16=0.01)
    choice = resolve_dtype("auto", "cpu")
    assert choice.dtype == "bfloat16" and choice.torch_dtype is torch.bfloat16
    assert "native bf16" in choice.reason


def test_auto_on_cuda_follows_bf16_support(monkeypatch):
    calls = _mock_probe(monkeypatch, fp32=0.01, bf16=0.5)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", "cuda").dtype == "bfloat16"
    precision.reset_for_tests()
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", "cuda:0").dtype == "float32"
    assert not calls  # the CPU probe is not run for a GPU


def test_the_probe_is_cached_per_machine(monkeypatch):
    import os
    from pathlib import Path

    calls = _mock_probe(monkeypatch, fp32=0.01, bf16=0.5)
    resolve_dtype("auto", "cpu")
    stored = json.loads((Path(os.environ["REGAP_CACHE"]) / "precision" / "cpu-bf16-probe.json").read_text())
    assert len(stored) == 1 and next(iter(stored.values()))["bfloat16_s"] == 0.5
    precision.reset_for_tests()  # a new process: memory gone, the file stays
    resolve_dtype("auto", "cpu")
    assert len(calls) == 1


def test_a_cache_that_cannot_be_written_only_costs_a_re_probe(monkeypatch, tmp_path):
    calls = _mock_probe(monkeypatch, fp32=0.01, bf16=0.5)
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("")
    monkeypatch.setenv("REGAP_CACHE", str(blocker))
    assert resolve_dtype("auto", "cpu").dtype == "float32" and len(calls) == 1


def test_the_real_probe_times_both_types_on_one_thread_and_restores_the_count():
    before = torch.get_num_threads()
    seen = []
    real_mm = torch.mm

    def spy(a, b):
        seen.append((a.dtype, torch.get_num_threads()))
        return real_mm(a, b)

    torch.mm = spy
    try:
        probe = precision.run_cpu_probe(rounds=3)
    finally:
        torch.mm = real_mm
    assert probe.float32_s > 0 and probe.bfloat16_s > 0 and probe.ratio > 0 and probe.threads == 1
    assert torch.get_num_threads() == before and {threads for _, threads in seen} == {1}
    timed = [dtype for dtype, _ in seen[2:]]  # after one warm-up each, the types alternate
    assert timed[:4] == [torch.float32, torch.bfloat16, torch.float32, torch.bfloat16]


def test_explicit_bf16_on_a_slow_cpu_warns_with_the_ratio(monkeypatch, capsys):
    _mock_probe(monkeypatch, fp32=0.01, bf16=0.5)
    choice = resolve_dtype("bfloat16", "cpu")
    assert choice.dtype == "bfloat16"
    assert "50.0x slower than float32" in capsys.readouterr().err


def test_bad_names_and_float16_on_cpu_are_one_line_errors():
    with pytest.raises(RegapError, match=r"unknown dtype 'float64'; valid: auto, float32, bfloat16, float16"):
        resolve_dtype("float64")
    with pytest.raises(RegapError, match="float16 is not supported on the CPU.*valid on the CPU: auto, float32, bfloat16"):
        resolve_dtype("fp16", "cpu")
    assert resolve_dtype("fp32").dtype == "float32"


def test_provenance_records_the_choice_and_reason(monkeypatch):
    from regap.provenance import provenance

    _mock_probe(monkeypatch, fp32=0.01, bf16=0.5)
    resolve_dtype("auto", "cpu")
    record = provenance(x=1)
    assert record["precision"] == [{"requested": "auto", "device": "cpu", "dtype": "float32",
                                    "reason": record["precision"][0]["reason"]}]
    assert "bf16 slow here" in record["precision"][0]["reason"]
    assert record["environment"]["cpu_capability"] and record["environment"]["usable_cpus"] >= 1


def test_load_model_resolves_auto(monkeypatch):
    from regap.models.loading.build import parse_dtype

    _mock_probe(monkeypatch, fp32=0.01, bf16=0.5)
    assert parse_dtype("auto") is torch.float32
    precision.reset_for_tests()
    _mock_probe(monkeypatch, fp32=0.05, bf16=0.01)
    assert parse_dtype("auto", "cpu") is torch.bfloat16


def test_training_config_auto_sets_dtype_and_mixed_precision(monkeypatch):
    from regap.train import load_config

    _mock_probe(monkeypatch, fp32=0.01, bf16=0.5)
    slow = load_config("tiny-stage1").resolved()
    assert (slow.dtype, slow.mixed_precision) == ("float32", "no")
    precision.reset_for_tests()
    _mock_probe(monkeypatch, fp32=0.05, bf16=0.01)
    fast = load_config("tiny-stage1").resolved()
    assert (fast.dtype, fast.mixed_precision) == ("bfloat16", "bf16")
    forced = load_config("tiny-stage1", ["dtype=float32"]).resolved()
    assert (forced.dtype, forced.mixed_precision) == ("float32", "no")


def test_mixed_precision_no_override_is_the_string_no():
    from regap.train import load_config

    config = load_config("tiny-stage1", ["dtype=float32", "mixed_precision=no"])
    assert config.mixed_precision == "no"
    with pytest.raises(RegapError, match=r"'dtype' is 'float64'; valid: auto, float32, bfloat16, float16"):
        load_config("tiny-stage1", ["dtype=float64"])


def test_mixed_precision_no_in_a_yaml_file(tmp_path):
    from regap.train import load_config

    path = tmp_path / "c.yaml"
    path.write_text("stage: 1\nmodel: tiny-random\ndata: {json: x.json}\nmixed_precision: no\n")
    assert load_config(path).mixed_precision == "no"


def test_shipped_configs_default_to_auto():
    from regap.train import load_config
    from regap.train.config import shipped_configs

    for name in shipped_configs():
        config = load_config(name)
        assert (config.dtype, config.mixed_precision) == ("auto", "auto"), name


def test_the_environment_can_fix_what_auto_means(monkeypatch):
    calls = _mock_probe(monkeypatch, fp32=0.05, bf16=0.01)
    monkeypatch.setenv("REGAP_AUTO_DTYPE", "float32")
    choice = resolve_dtype("auto", "cpu")
    assert (choice.dtype, choice.reason) == ("float32", "REGAP_AUTO_DTYPE=float32") and not calls
    assert resolve_dtype("bfloat16", "cpu").dtype == "bfloat16"  # an explicit request is kept
    precision.reset_for_tests()
    monkeypatch.setenv("REGAP_AUTO_DTYPE", "float64")
    with pytest.raises(RegapError, match="unknown dtype 'float64' in the environment variable REGAP_AUTO_DTYPE") as info:
        resolve_dtype("auto", "cpu")
    assert "\n" not in str(info.value)


def test_usable_cpus_follow_the_affinity_mask(monkeypatch):
    import os

    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no sched_getaffinity on this platform")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        assert precision.usable_cpu_count() == 1
        assert precision.use_usable_cpus() == 1
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def busy_warning_armed(monkeypatch):
    monkeypatch.setattr(precision, "_busy_warned", False)


def test_busy_cpus_warn_once_when_every_cpu_is_taken(monkeypatch, capsys, busy_warning_armed):
    import os

    monkeypatch.setattr(os, "getloadavg", lambda: (1.6, 1.4, 1.2))
    monkeypatch.setattr(precision, "other_runnable_tasks", lambda: 1)
    assert precision.warn_if_cpus_busy(2) is True
    assert "1-minute load 1.6, and other tasks are runnable now" in capsys.readouterr().err
    assert precision.warn_if_cpus_busy(2) is False  # once per process
    assert capsys.readouterr().err == ""


def test_idle_cpus_or_one_thread_do_not_warn(monkeypatch, capsys, busy_warning_armed):
    import os

    monkeypatch.setattr(precision, "other_runnable_tasks", lambda: 1)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.3, 0.5, 0.5))
    assert precision.warn_if_cpus_busy(2) is False
    monkeypatch.setattr(os, "getloadavg", lambda: (1.8, 1.8, 1.8))
    assert precision.warn_if_cpus_busy(1) is False  # one thread does not spin-wait on others
    # the load of a command that has just ended, with nothing else runnable now: no warning
    monkeypatch.setattr(precision, "other_runnable_tasks", lambda: 0)
    assert precision.warn_if_cpus_busy(2) is False
    assert capsys.readouterr().err == ""


def test_other_runnable_tasks_leave_this_process_out(tmp_path):
    loadavg = tmp_path / "loadavg"
    loadavg.write_text("2.01 2.01 2.00 3/88 16762\n")  # 3 runnable: this process and 2 others
    assert precision.other_runnable_tasks(str(loadavg)) == 2
    loadavg.write_text("0.10 0.20 0.30 1/88 16762\n")
    assert precision.other_runnable_tasks(str(loadavg)) == 0
    loadavg.write_text("garbage\n")
    assert precision.other_runnable_tasks(str(loadavg)) is None
    assert precision.other_runnable_tasks(str(tmp_path / "absent")) is None


def test_the_cli_warns_only_when_it_chose_the_threads(monkeypatch, capsys, busy_warning_armed):
    import os

    monkeypatch.setattr(os, "getloadavg", lambda: (1.8, 1.8, 1.8))
    monkeypatch.setattr(precision, "other_runnable_tasks", lambda: 2)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        precision.use_usable_cpus()
        assert capsys.readouterr().err == ""  # the user chose: no advice
        monkeypatch.delenv("OMP_NUM_THREADS")
        precision.use_usable_cpus()
        assert "set OMP_NUM_THREADS" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)
