"""`--attn-implementation` on the commands that run a model: the kernel is switched after loading,
named in every run's provenance, and part of the model fingerprint (so a run on one kernel never
reuses another kernel's cached generations)."""

from __future__ import annotations

import json

import pytest

from regap.cli import main
from regap.errors import RegapError
from regap.models.attention import llm_attention, set_llm_attention
from regap.models.fingerprint import model_fingerprint
from regap.models.random_tiny import tiny_random_lvlm


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from regap.models import save_model

    return str(save_model(tiny_random_lvlm(), tmp_path_factory.mktemp("m") / "model", include_backbones=True))


def test_load_model_switches_the_kernel_and_checks_the_name_before_loading(saved):
    from regap.models import load_model

    assert llm_attention(load_model(saved)) == "sdpa"  # the library's default is kept when none is asked
    assert llm_attention(load_model(saved, attn_implementation="eager")) == "eager"
    # the bad kernel is named, although the model does not exist either: nothing was loaded
    with pytest.raises(RegapError, match=r"attn_implementation \(--attn-implementation\) is 'flash'; valid"):
        load_model("no-such-model", attn_implementation="flash")


def test_the_fingerprint_names_a_kernel_other_than_sdpa_and_keeps_sdpa_fingerprints():
    model = tiny_random_lvlm(seed=0)
    on_sdpa = model_fingerprint(model)
    set_llm_attention(model, "eager")
    on_eager = model_fingerprint(model)
    set_llm_attention(model, "sdpa")
    assert on_eager != on_sdpa
    assert model_fingerprint(model) == on_sdpa  # switching back restores the same fingerprint


def test_safety_runs_keep_their_kernel_in_provenance_and_do_not_share_generations(tmp_path):
    from regap.safety.runner import SafetyRun, run_safety

    out = tmp_path / "run"
    common = dict(model="tiny-random", out=out, limit=2, conditions=["text"], max_new_tokens=2, batch_size=2)
    eager = run_safety(SafetyRun(**common, attn_implementation="eager"), progress=False, model=tiny_random_lvlm())
    assert eager["provenance"]["attn_implementation"] == "eager"
    sdpa = run_safety(SafetyRun(**common), progress=False, model=tiny_random_lvlm())
    assert sdpa["provenance"]["attn_implementation"] == "sdpa"
    assert sdpa["provenance"]["model_fingerprint"] != eager["provenance"]["model_fingerprint"]
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 4  # the sdpa run generated its own two answers instead of reusing eager's


def test_the_vllm_engine_refuses_a_transformers_kernel(tmp_path):
    from regap.safety.runner import SafetyRun, run_safety

    with pytest.raises(RegapError, match="vllm engine picks its own attention backend"):
        run_safety(SafetyRun(model="tiny-random", out=tmp_path / "v", engine="vllm", attn_implementation="eager"),
                   progress=False)


def test_chat_gap_and_safety_commands_take_the_flag(saved, tmp_path, capsys):
    assert main(["chat", "--model", saved, "--max-new-tokens", "2", "--attn-implementation", "eager", "--json",
                 "hello"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["provenance"]["attn_implementation"] == "eager"
    out = tmp_path / "gap"
    assert main(["gap", "--model", saved, "--out", str(out), "--pairs", "4", "--n-boot", "0", "--images", "noise",
                 "--attn-implementation", "eager"]) == 0
    assert json.loads((out / "gap.json").read_text())["provenance"]["attn_implementation"] == "eager"
    assert main(["gap", "--model", saved, "--out", str(tmp_path / "bad"), "--attn-implementation", "flash"]) == 2
    assert "--attn-implementation is 'flash'" in capsys.readouterr().err
    run = tmp_path / "safety"
    assert main(["safety", "--model", saved, "--out", str(run), "--limit", "1", "--conditions", "blank",
                 "--max-new-tokens", "2", "--attn-implementation", "eager"]) == 0
    assert json.loads((run / "summary.json").read_text())["provenance"]["attn_implementation"] == "eager"


def test_utility_records_the_kernel_it_ran(saved, tmp_path):
    from regap.utility import UtilityRun, run_utility

    summary = run_utility(UtilityRun(model=saved, out=tmp_path / "u", tasks="over-refusal", refusal_limit=1,
                                     max_new_tokens=2, attn_implementation="eager"))
    assert summary["provenance"]["attn_implementation"] == "eager"
    with pytest.raises(RegapError, match="is 'flash'"):
        run_utility(UtilityRun(model=saved, out=tmp_path / "bad", tasks="over-refusal", attn_implementation="flash"))


def test_a_calibration_file_records_its_kernel_and_fits_only_that_kernel(saved, tmp_path, capsys):
    from regap.defenses.calibration_files import load_calibration
    from regap.models import load_model

    path = tmp_path / "cmrm.safetensors"
    assert main(["defense", "calibrate", "cmrm", "--model", saved, "--out", str(path), "--pairs", "2",
                 "--attn-implementation", "eager"]) == 0
    assert json.loads(path.with_suffix(".json").read_text())["attn_implementation"] == "eager"
    shapes = {"shifts": ("L", "d")}
    assert load_calibration(path, "cmrm", load_model(saved, attn_implementation="eager"), shapes).kind == "cmrm"
    with pytest.raises(RegapError, match="attention kernel 'eager'; this model runs 'sdpa': pass --attn-implementation"):
        load_calibration(path, "cmrm", load_model(saved), shapes)
