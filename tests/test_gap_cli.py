"""`regap gap` end to end: files written, comparison, bad input."""

from __future__ import annotations

import json

import pytest

from regap.cli import main
from regap.errors import RegapError


@pytest.fixture
def saved_random(tmp_path):
    from regap.models import save_model
    from regap.models.random_tiny import tiny_random_lvlm

    def make(name: str, layers: int = 2):
        model = tiny_random_lvlm()
        if layers != 2:
            from regap.models.random_tiny import tiny_llm

            model.llm = tiny_llm(model.tokenizer, layers=layers)
        return str(save_model(model, tmp_path / name, include_backbones=True))

    return make


def test_gap_writes_json_and_plot(saved_random, tmp_path, capsys):
    model = saved_random("a")
    out = tmp_path / "out"
    assert main(["gap", "--model", model, "--out", str(out), "--pairs", "8", "--n-boot", "50",
                 "--images", "noise", "--batch-size", "4"]) == 0
    record = json.loads((out / "gap.json").read_text())
    assert {"mir", "mir_ci", "layer0_gap", "per_layer", "provenance"} <= set(record)
    assert len(record["per_layer"]) == 3  # layer 0 + 2 decoder blocks
    assert all({"layer", "frechet", "centroid_gap"} <= set(row) for row in record["per_layer"])
    low, high = record["mir_ci"]
    assert low <= record["mir"] <= high
    assert record["provenance"]["model"] == model and record["provenance"]["versions"]["torch"]
    assert len(record["provenance"]["pair_ids"]) == 8
    assert (out / "gap_layers.png").stat().st_size > 1000
    assert not list(out.glob(".hidden-*"))  # spilled states removed


def test_compare_and_layer_mismatch(saved_random, tmp_path, capsys):
    a, b = saved_random("a"), saved_random("b")
    out = tmp_path / "cmp"
    assert main(["gap", "--model", a, "--compare", b, "--out", str(out), "--pairs", "4", "--n-boot", "0"]) == 0
    record = json.loads((out / "gap.json").read_text())
    assert record["compare"]["model"] == b and record["mir_ci"] is None
    c = saved_random("c", layers=3)
    assert main(["gap", "--model", a, "--compare", c, "--out", str(tmp_path / "bad"), "--pairs", "4", "--n-boot", "0"]) == 2
    assert "layers" in capsys.readouterr().err


def test_bad_options_fail_before_work(tmp_path, capsys):
    assert main(["gap", "--model", "tiny", "--out", str(tmp_path), "--protocol", "nope"]) == 2
    assert "--protocol" in capsys.readouterr().err
    assert main(["gap", "--model", "tiny", "--out", str(tmp_path), "--projector", str(tmp_path / "x.safetensors")]) == 2
    assert "projector checkpoint not found" in capsys.readouterr().err
    assert main(["gap", "--model", "tiny", "--out", str(tmp_path), "--ci", "bca"]) == 2
    assert "--ci" in capsys.readouterr().err


def test_exact_interval_from_the_cli(saved_random, tmp_path):
    out = tmp_path / "exact"
    assert main(["gap", "--model", saved_random("a"), "--out", str(out), "--pairs", "6", "--n-boot", "20",
                 "--ci", "exact", "--images", "noise", "--batch-size", "6"]) == 0
    record = json.loads((out / "gap.json").read_text())
    assert "exact" in record["ci_method"] and record["provenance"]["ci"] == "exact"
    low, high = record["mir_ci"]
    assert low < high


def test_stability_rows(saved_random, tmp_path):
    from regap.gap.collect import collect_hidden_states
    from regap.gap.measure import stability
    from regap.safety.pairs import make_pairs
    from regap.models import load_model

    model = load_model(saved_random("s"))
    store = collect_hidden_states(model, make_pairs(12, images="blank"), tmp_path / "h", batch_size=6, progress=False)
    rows = stability(store, sizes=(5, 10), n_boot=30)
    assert [r["pairs"] for r in rows] == [5, 10, 12]
    assert all(r["mir_ci"][0] <= r["mir"] <= r["mir_ci"][1] for r in rows)


def test_no_text_tokens_is_a_clear_error(tiny_model, tmp_path):
    from regap.gap.collect import collect_hidden_states
    from regap.models.gap_pair import GapPair
    from PIL import Image

    pairs = [GapPair(str(i), Image.new("RGB", (56, 56)), "", "blank") for i in range(2)]
    # plain template: nothing follows the image when the text is empty
    tiny_model.config.template = "plain"
    with pytest.raises(RegapError, match="no text tokens"):
        collect_hidden_states(tiny_model, pairs, tmp_path / "h", protocol="prompt", progress=False)


def test_too_many_pairs_fail_at_once_naming_the_limit(tmp_path, capsys, monkeypatch):
    import regap.models

    monkeypatch.setattr(regap.models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main(["gap", "--model", "tiny", "--out", str(tmp_path / "out"), "--pairs", "100000000"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: 100,000,000 pairs is over the limit of 10,000 (the reference protocol uses 100; every "
                   "pair's hidden states of every layer are kept on disk while they are measured)")
    assert not (tmp_path / "out").exists()


def test_the_spill_is_checked_against_the_free_disk_space_before_any_forward_pass(tiny_model, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from regap.gap.collect import collect_hidden_states
    from regap.safety.pairs import make_pairs

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    monkeypatch.setattr(type(tiny_model), "forward", lambda *a, **k: pytest.fail("a forward pass ran"))
    with pytest.raises(RegapError, match=r"hidden states of 4 pairs need \d+\.\d MB in .*, which has 0\.0 MB free"):
        collect_hidden_states(tiny_model, make_pairs(4, images="blank"), tmp_path / "h", progress=False)


def test_pairs_hold_no_pixels_until_a_batch_reads_them(monkeypatch):
    from regap.safety import pairs as pair_module

    made = []
    real = pair_module.make_images

    def counting(*args, **kwargs):
        items = real(*args, **kwargs)
        return [(name, lambda name=name, make=make: made.append(name) or make()) for name, make in items]

    monkeypatch.setattr(pair_module, "make_images", counting)
    pairs = pair_module.make_pairs(6, images="scenes")
    assert made == []
    assert pairs[2].image.size == (336, 336) and made == ["scene-2"]


def test_gap_run_from_python_writes_what_the_command_writes(saved_random, tmp_path):
    from regap.gap.run import GapRun, run_gap

    model = saved_random("a")
    results = run_gap(GapRun(model=model, out=tmp_path / "py", pairs=4, n_boot=0, images="blank"), progress=False)
    assert main(["gap", "--model", model, "--out", str(tmp_path / "cli"), "--pairs", "4", "--n-boot", "0",
                 "--images", "blank"]) == 0
    py, cli = (json.loads((tmp_path / name / "gap.json").read_text()) for name in ("py", "cli"))
    assert list(results) == [model] and py["per_layer"] == cli["per_layer"] == results[model]["per_layer"]
    assert not list((tmp_path / "py").glob("gap.json.*"))  # written atomically: no temporary file left


def test_a_missing_interval_is_printed_with_its_reason(saved_random, tmp_path, capsys):
    assert main(["gap", "--model", saved_random("a"), "--out", str(tmp_path / "o"), "--pairs", "2", "--n-boot", "20",
                 "--images", "blank"]) == 0
    out = capsys.readouterr().out
    assert "no 95% interval:" in out and "tokens of one modality <= width 48" in out


@pytest.mark.integration
def test_gap_on_the_real_tiny_preset(real_tiny, tmp_path):
    out = tmp_path / "tiny"
    assert main(["gap", "--model", "tiny", "--out", str(out), "--pairs", "6", "--n-boot", "50", "--batch-size", "6"]) == 0
    record = json.loads((out / "gap.json").read_text())
    assert len(record["per_layer"]) == 25 and record["mir"] > 0
    assert (out / "gap_layers.png").exists()
