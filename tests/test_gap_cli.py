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


@pytest.mark.integration
def test_gap_on_the_real_tiny_preset(real_tiny, tmp_path):
    out = tmp_path / "tiny"
    assert main(["gap", "--model", "tiny", "--out", str(out), "--pairs", "6", "--n-boot", "50", "--batch-size", "6"]) == 0
    record = json.loads((out / "gap.json").read_text())
    assert len(record["per_layer"]) == 25 and record["mir"] > 0
    assert (out / "gap_layers.png").exists()
