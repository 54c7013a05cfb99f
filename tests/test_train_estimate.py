"""`regap pretrain/finetune --dry-run`: parameter counts and the per-device memory estimate."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from regap.cli import app, main
from regap.train import load_config
from regap.train.estimate import (
    ACTIVATION_BYTES,
    data_sequence_length,
    dry_run,
    meta_model,
    stored_bytes_in_other_dtype,
)

runner = CliRunner()


def _config_file(tmp_path: Path, stage: int = 1, **extra) -> Path:
    data = {"stage": stage, "model": "tiny-random", "data": {"json": str(tmp_path / "absent.json")},
            "global_batch_size": 4, "per_device_batch_size": 2, "max_length": 64, **extra}
    path = tmp_path / f"stage{stage}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_terms_follow_the_documented_formula(tmp_path):
    cfg = load_config(_config_file(tmp_path)).resolved()
    estimate = dry_run(cfg)
    lvlm, _ = meta_model("tiny-random", torch.float32)
    params = sum(p.numel() for p in lvlm.parameters())
    projector = sum(p.numel() for p in lvlm.projector.parameters())
    assert estimate.parameters == params and estimate.trainable == projector
    buffers = sum(b.numel() * b.element_size() for b in lvlm.buffers())  # e.g. rotary frequencies
    assert estimate.weights == params * 4 + buffers  # float32 everywhere (the tests pin dtype auto to float32)
    assert estimate.gradients == projector * 4 and estimate.optimizer == 2 * projector * 4
    # batch 2 x max_length 64 (no data file yet); tiny-random's LM: width 48, MLP 96, 2 layers, vocabulary len(tokenizer)
    assert (estimate.batch, estimate.sequence) == (2, 64) and "does not exist" in estimate.sequence_source
    h, i, layers, vocab, b, s, image = 48, 96, 2, lvlm.llm.config.vocab_size, 2, 64, lvlm.tokens_per_image
    per_h, per_i = ACTIVATION_BYTES[(4, False)]
    base = 2 * b * s * h * 4 + b * (s - image) * vocab * (4 + 8)
    assert estimate.activations_no_checkpointing == base + layers * b * s * (per_h * h + per_i * i)
    assert estimate.activations_checkpointing == base + layers * b * s * h * 4 + b * s * (per_h * h + per_i * i)
    assert estimate.probe == 10 * h * h * 8  # the MIR probe is on by default (observe.mir_every)
    assert estimate.total(False) == (estimate.runtime + estimate.weights + estimate.gradients + estimate.optimizer
                                     + estimate.activations_no_checkpointing + estimate.probe)
    off = dry_run(load_config(_config_file(tmp_path, observe={"mir_every": 0})))
    assert off.probe == 0 and off.total(True) - off.runtime == estimate.total(True) - estimate.runtime - estimate.probe


def test_lora_and_full_tuning_count_their_trainable_parameters(tmp_path):
    full = dry_run(load_config(_config_file(tmp_path, stage=2, tune="full")))
    lora = dry_run(load_config(_config_file(tmp_path, stage=2, tune="lora", lora={"r": 4, "alpha": 8})))
    projector = sum(p.numel() for p in meta_model("tiny-random", torch.float32)[0].projector.parameters())
    assert full.trainable > lora.trainable > projector
    assert lora.parameters == full.parameters + (lora.trainable - projector)  # the adapters are new parameters
    # weights that train get gradients and AdamW state; a frozen LM's activations are fewer
    assert full.optimizer == 2 * full.gradients and full.gradients > lora.gradients
    assert full.activations_no_checkpointing > dry_run(load_config(_config_file(tmp_path))).activations_no_checkpointing


def test_sequence_length_comes_from_the_data_when_it_exists(tmp_path):
    from PIL import Image

    Image.new("RGB", (56, 56)).save(tmp_path / "a.png")
    rows = [{"id": str(k), "image": "a.png", "conversations": [{"from": "human", "value": "<image>"},
                                                               {"from": "gpt", "value": "a red circle " * (k + 1)}]}
            for k in range(3)]
    (tmp_path / "captions.json").write_text(json.dumps(rows))
    cfg = load_config(_config_file(tmp_path, data={"json": str(tmp_path / "captions.json")})).resolved()
    lvlm, _ = meta_model("tiny-random", torch.float32)
    length, source = data_sequence_length(cfg, lvlm)
    longest = len(lvlm.build_inputs([[{"role": "user", "content": "<image>"},
                                      {"role": "assistant", "content": "a red circle " * 3}]],
                                    [[Image.new("RGB", (56, 56))]], template="plain").input_ids[0])
    assert length == longest < 64 and "3 samples" in source


def test_stored_bytes_count_only_tensors_in_another_dtype(tmp_path):
    save_file({"a": torch.zeros(10, 3), "b": torch.zeros(7, dtype=torch.bfloat16)}, str(tmp_path / "model.safetensors"))
    assert stored_bytes_in_other_dtype(str(tmp_path), torch.bfloat16) == 10 * 3 * 4
    assert stored_bytes_in_other_dtype(str(tmp_path), torch.float32) == 7 * 2
    assert stored_bytes_in_other_dtype("some/hub-id", torch.float32) is None


def test_dry_run_prints_the_estimate_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = _config_file(tmp_path)
    for command in ("pretrain", "finetune"):
        path = config if command == "pretrain" else _config_file(tmp_path, stage=2, tune="lora")
        result = runner.invoke(app, [command, str(path), "--dry-run", "max_length=32"])
        assert result.exit_code == 0, result.output
        assert "parameters:" in result.output and "trainable" in result.output
        for term in ("weights", "gradients", "optimizer", "activations", "estimated peak"):
            assert term in result.output
        assert "with gradient checkpointing" in result.output and "x 32 tokens" in result.output
    assert not (tmp_path / "runs").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["stage1.yaml", "stage2.yaml"]


def test_dry_run_of_a_model_it_cannot_build_empty_is_one_line(tmp_path, capsys):
    assert main(["pretrain", str(_config_file(tmp_path, model=str(tmp_path))), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--dry-run estimates presets" in err and "\n" not in err


@pytest.mark.integration
def test_dry_run_of_tiny_stage1_estimates_the_real_preset(tmp_path, monkeypatch):
    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("onnx") is None:
        pytest.skip("offline extra not installed (pip install 'regap[offline]')")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["pretrain", "tiny-stage1", "--dry-run", "dtype=bfloat16"])
    assert result.exit_code == 0, result.output
    assert "parameters: 653,372,672 (1,148,672 trainable)" in result.output
    assert "weights        1.22 GiB" in result.output
    # the converted Qwen checkpoint is stored in float32: loading it in bf16 reads it whole
    assert "loading peak" in result.output and "read whole" in result.output
    assert not (tmp_path / "runs").exists()
    estimate = dry_run(load_config("tiny-stage1", ["dtype=bfloat16"], stage=1))
    assert estimate.load_extra and estimate.loading_peak() > estimate.weights + estimate.load_extra
