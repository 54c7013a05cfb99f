"""`bench/rehearse.py` at real width and reduced depth: regap's 7B code paths at 576 image tokens and
d = 4,096 (stage 1 from the shipped config with ReGap, `regap gap`'s exact analysis, both generation
engines at 617-token prompts, stage-2 LoRA), so shape-dependent faults show up in the suite.

Two LM layers and two CLIP layers (both at their real widths, 4,096 and 1,024) rather than half the
7B depth: four LM layers plus the full vision tower take several times longer on 2 CPU cores and
about 4.5 GB at their peak. The full-depth run is a benchmark (`bench/README.md`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "rehearse.py"


@pytest.fixture(scope="module")
def rehearse():
    spec = importlib.util.spec_from_file_location("regap_bench_rehearse", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.mark.slow
def test_reduced_depth_rehearsal_runs_every_step_at_real_shapes(rehearse, tmp_path, monkeypatch, one_thread):
    from regap import precision

    # the dtype the hardware computes fast (bf16 where native), as a user's run would pick it
    monkeypatch.delenv("REGAP_AUTO_DTYPE", raising=False)
    precision.reset_for_tests()
    out = tmp_path / "rehearse.json"
    code = rehearse.main(["--layers", "2", "--vision-layers", "2", "--threads", "1", "--out", str(out),
                          "--workdir", str(tmp_path / "work")])
    precision.reset_for_tests()
    report = json.loads(out.read_text())
    steps = report["steps"]
    assert {name: step["status"] for name, step in steps.items()} == {name: "ok" for name in rehearse.STEPS}, \
        {name: step.get("reason") for name, step in steps.items()}
    assert code == 0

    build = steps["build"]
    assert (build["image_tokens"], build["hidden"], build["template"]) == (576, 4096, "vicuna_v1")
    stage1 = steps["stage1"]
    assert (stage1["image_tokens"], stage1["hidden"], stage1["tokens_per_sample"]) == (576, 4096, 617)
    assert stage1["steps"] == 2 and stage1["regap_lam"] == 1.0
    assert all(math.isfinite(v) for v in stage1["loss"]) and all(g is not None and g > 0 for g in stage1["gap"])
    assert stage1["efficiency"]["fraction_of_peak_cpu"] > 0 and stage1["estimate_gib"]["sequence"] == 617
    gap = steps["gap"]
    assert (gap["width"], gap["pairs"], gap["image_tokens"], gap["layers"]) == (4096, 8, 8 * 576, 3)
    assert math.isfinite(gap["mir"])
    generate = steps["generate"]
    assert generate["prompt_tokens"] == 617
    for engine in ("transformers", "static"):
        assert generate["engines"][engine]["status"] == "ok" and generate["engines"][engine]["new_tokens"] == [8, 8]
    stage2 = steps["stage2"]
    # a vicuna_v1 conversation with its system prompt, a question and an answer: at least the 617 tokens
    assert stage2["steps"] == 1 and stage2["tokens_per_sample"] >= 617 and math.isfinite(stage2["loss"][0])
    assert stage2["trainable_parameters"] > 0 and stage2["lora"]["r"] == 128
