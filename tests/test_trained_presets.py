"""Trained presets: packaging a stage-2 LoRA output, sha256 pins checked before loading, the
same model as the training output, `regap models` showing what it was trained on."""

from __future__ import annotations

import ast
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from regap.errors import RegapError
from regap.files import file_sha256
from regap.models.loading import trained as trained_presets
from regap.models.loading.presets import PRESETS, Preset

NAME = "test-llava"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs with one torch thread (conftest.one_thread)."""


@pytest.fixture(scope="module")
def stage2_out(tmp_path_factory) -> Path:
    """A finished stage-2 LoRA run on tiny-random (2 steps on synthetic instructions)."""
    from regap.data import generate_synthetic
    from regap.train import TrainConfig, train

    root = tmp_path_factory.mktemp("s2")
    generate_synthetic(root / "synth", 8, seed=0, image_size=56)
    config = TrainConfig.from_dict({
        "model": "tiny-random", "seed": 3, "stage": 2, "tune": "lora", "template": "chat",
        "data": {"json": str(root / "synth" / "instructions.json")}, "global_batch_size": 2,
        "per_device_batch_size": 2, "lr": 1e-2, "max_steps": 2, "save_every": 2, "max_length": 128,
        "lora": {"r": 4, "alpha": 8}, "observe": {"progress": False, "gap_every": 0, "mir_every": 0},
    })
    train(config, root / "out")
    return root / "out"


@pytest.fixture
def register(monkeypatch, tmp_path):
    """Package `stage2_out` under a temporary assets root and register it as preset `test-llava`."""
    from regap.train.package import package_preset

    root = tmp_path / "assets"
    monkeypatch.setattr(trained_presets, "ASSETS_ROOT", root)

    def make(train_out: Path, **options) -> Preset:
        result = package_preset(train_out, NAME, root / NAME, info={"study": "unit-test", "lambda": 0.0}, **options)
        preset = Preset(name=NAME, summary="test", needs_hub=False, projector_note="trained", base="tiny-random",
                        assets=NAME, pins=result.pins)
        monkeypatch.setitem(PRESETS, NAME, preset)
        return preset

    return make


def _logits(model) -> torch.Tensor:
    from regap.data.synth import render_scene, synth_item

    image = render_scene(synth_item(0, 0, "t").spec, 56)
    conversation = [{"role": "user", "content": "<image>\nWhat shape is at the top left?"},
                    {"role": "assistant", "content": "a circle"}]
    batch = model.build_inputs([conversation], [[image]], template="chat")
    with torch.no_grad():
        return model(batch).logits


# ----------------------------------------------------------------------------- loading


def test_trained_preset_gives_the_logits_of_its_training_output(stage2_out, register):
    from regap.models import load_model

    register(stage2_out)
    preset_model = load_model(NAME, dtype="float32")
    trained = load_model(str(stage2_out), dtype="float32")
    assert torch.equal(_logits(preset_model), _logits(trained))
    assert preset_model.config.name == NAME  # what provenance records as the model's name
    assert preset_model.config.extra["trained_preset"]["base"] == "tiny-random"
    # the adapter is really there: without it the logits differ
    with preset_model.llm.disable_adapter():
        assert not torch.allclose(_logits(preset_model), _logits(trained))


def test_a_changed_byte_in_a_pinned_file_is_refused_before_anything_loads(stage2_out, register, monkeypatch):
    from regap.models import load_model
    from regap.models.loading import load as factory

    preset = register(stage2_out)
    weights = trained_presets.ASSETS_ROOT / NAME / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(factory, "build_base_model", lambda *a, **k: pytest.fail("the base was built"))
    with pytest.raises(RegapError) as caught:
        load_model(NAME)
    message = str(caught.value)
    assert "adapter_model.safetensors" in message and preset.pins["adapter/adapter_model.safetensors"] in message
    assert file_sha256(weights) in message and "\n" not in message


def test_missing_assets_and_empty_pins_are_one_line_errors(stage2_out, register):
    from regap.cli import main
    from regap.models import load_model

    unpinned = Preset(name=NAME, summary="test", needs_hub=False, projector_note="trained", base="tiny-random",
                      assets=NAME, pins={})  # registered, not packaged yet
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(PRESETS, NAME, unpinned)
        with pytest.raises(RegapError, match=rf"preset {NAME}: assets not packaged yet"):
            load_model(NAME)
    register(stage2_out)
    (trained_presets.ASSETS_ROOT / NAME / "projector.safetensors").unlink()
    with pytest.raises(RegapError, match=rf"preset {NAME}: asset .*projector.safetensors is missing"):
        load_model(NAME)
    shutil.rmtree(trained_presets.ASSETS_ROOT / NAME)
    assert main(["chat", "--model", NAME, "hi"]) == 2


def test_pins_must_cover_the_required_files_and_stay_inside_the_folder(stage2_out, register, monkeypatch):
    from regap.models import load_model

    preset = register(stage2_out)
    partial = {k: v for k, v in preset.pins.items() if k != "projector.safetensors"}
    monkeypatch.setitem(PRESETS, NAME, dataclasses.replace(preset, pins=partial))
    with pytest.raises(RegapError, match="no sha256 pin for projector.safetensors"):
        load_model(NAME)
    escaping = {**preset.pins, "../outside.json": "0" * 64}
    monkeypatch.setitem(PRESETS, NAME, dataclasses.replace(preset, pins=escaping))
    with pytest.raises(RegapError, match="must be a relative path inside its asset folder"):
        load_model(NAME)


def test_assets_packaged_for_another_preset_are_refused(stage2_out, register, monkeypatch):
    from regap.models import load_model

    preset = register(stage2_out)
    monkeypatch.setitem(PRESETS, "other-llava", dataclasses.replace(preset, name="other-llava"))
    with pytest.raises(RegapError, match="packaged for another preset"):
        load_model("other-llava")


def test_adapter_weights_must_be_safetensors(tiny_model, tmp_path):
    from regap.models.loading.saved import load_adapter

    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"pickled")
    with pytest.raises(RegapError, match="no adapter_model.safetensors"):
        load_adapter(tiny_model, tmp_path)


# ----------------------------------------------------------------------------- packaging


def test_package_cli_writes_the_manifest_and_prints_the_pins(stage2_out, tmp_path):
    from regap.cli import app

    dest = tmp_path / "pkg"
    result = CliRunner().invoke(app, ["models", "package", str(stage2_out), "--name", NAME, "--dest", str(dest),
                                      "--info", '{"study": "unit-test", "seed": 0}'])
    assert result.exit_code == 0, result.output
    literal = result.output[result.output.index("{"):]
    pins = ast.literal_eval(literal.strip())
    assert set(pins) == {"manifest.json", "projector.safetensors", "adapter/adapter_config.json",
                         "adapter/adapter_model.safetensors"}
    assert all(file_sha256(dest / relative) == sha for relative, sha in pins.items())
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["base"] == {"model": "tiny-random", "projector_type": None, "projector_options": {}, "seed": 3}
    training = manifest["training"]
    assert (training["stage"], training["tune"], training["lora"]["r"], training["steps"]) == (2, "lora", 4, 2)
    assert training["data"]["json"] == "instructions.json" and training["data"]["loaded"] > 0
    assert manifest["info"] == {"study": "unit-test", "seed": 0}
    assert manifest["files"] == {k: v for k, v in pins.items() if k != "manifest.json"}
    # the adapter config names the base, not the packager's cache folder; the rest is peft's as saved
    packaged = json.loads((dest / "adapter" / "adapter_config.json").read_text())
    saved = json.loads((stage2_out / "adapter" / "adapter_config.json").read_text())
    assert packaged.pop("base_model_name_or_path") == "tiny-random"
    saved.pop("base_model_name_or_path")
    assert packaged == saved
    again = CliRunner().invoke(app, ["models", "package", str(stage2_out), "--name", NAME, "--dest", str(dest)])
    assert isinstance(again.exception, RegapError) and "not empty" in str(again.exception)


def test_packaging_refuses_other_folders(stage2_out, tmp_path):
    from regap.train.package import package_preset

    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    config = yaml.safe_load((stage2_out / "config.yaml").read_text())
    (stage1 / "config.yaml").write_text(yaml.safe_dump({**config, "stage": 1, "tune": "projector"}))
    shutil.copyfile(stage2_out / "projector.safetensors", stage1 / "projector.safetensors")
    with pytest.raises(RegapError, match="a stage-1 output .*packages a stage-2 LoRA output"):
        package_preset(stage1, NAME, tmp_path / "a")
    with pytest.raises(RegapError, match="not a training output folder"):
        package_preset(tmp_path / "nothing", NAME, tmp_path / "b")
    on_folder = tmp_path / "on-folder"
    shutil.copytree(stage2_out, on_folder, ignore=shutil.ignore_patterns("checkpoints"))
    (on_folder / "config.yaml").write_text(yaml.safe_dump({**config, "model": str(tmp_path / "some-model")}))
    with pytest.raises(RegapError, match="base model .* is not a preset built from parts"):
        package_preset(on_folder, NAME, tmp_path / "c")
    with pytest.raises(RegapError, match="preset built from parts; give the trained preset's own name"):
        package_preset(stage2_out, "tiny", tmp_path / "d")
    assert not any((tmp_path / x).exists() for x in "abcd")


def test_bfloat16_assets_load_close_to_the_float32_model(stage2_out, register):
    from safetensors.torch import load_file

    from regap.models import load_model

    register(stage2_out, dtype="bfloat16")
    folder = trained_presets.ASSETS_ROOT / NAME
    assert {t.dtype for t in load_file(str(folder / "adapter" / "adapter_model.safetensors")).values()} == {torch.bfloat16}
    assert (folder / "projector.safetensors").stat().st_size < (stage2_out / "projector.safetensors").stat().st_size
    model = load_model(NAME, dtype="float32")
    assert model.dtype == torch.float32
    reference = _logits(load_model(str(stage2_out), dtype="float32"))
    assert torch.allclose(_logits(model), reference, atol=0.05)


# ----------------------------------------------------------------------------- listing


def test_models_json_lists_the_trained_preset_with_its_training(stage2_out, register):
    from regap.cli import app

    register(stage2_out)
    result = CliRunner().invoke(app, ["models", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.output)}
    row = rows[NAME]
    assert row["base"] == "tiny-random" and row["assets"]["verified"] is True
    assert row["training"]["training"]["lora"]["r"] == 4 and row["training"]["info"]["study"] == "unit-test"
    assert "stage 2: lora r=4, 2 steps" in row["training"]["summary"]
    assert rows["tiny"]["base"] is None and rows["tiny"]["assets"] is None
    shipped = rows["tiny-llava"]
    # (the assets root points at this test's folder here, so a packaged shipped preset reads as missing)
    expected = trained_presets.MISSING if PRESETS["tiny-llava"].pins else trained_presets.NOT_PACKAGED
    assert shipped["base"] == "tiny" and shipped["assets"]["state"] == expected
    # a changed file shows as such, without an error
    weights = trained_presets.ASSETS_ROOT / NAME / "projector.safetensors"
    weights.write_bytes(weights.read_bytes() + b" ")
    table = CliRunner().invoke(app, ["models"])
    assert table.exit_code == 0 and "modified" in table.output


# ----------------------------------------------------------------------------- what ships


def test_shipped_trained_presets_are_small_and_verified():
    """The package's trained presets stay under 20 MB of assets, and once pinned, verify."""
    for name in ("tiny-llava", "tiny-llava-regap"):
        preset = PRESETS[name]
        assert preset.base == "tiny" and preset.assets == name
        if preset.pins:
            assert trained_presets.verify_assets(preset).verified
    root = trained_presets.ASSETS_ROOT
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0
    assert total < 20 * 1024 * 1024


def test_package_data_includes_the_preset_assets(tmp_path):
    """pyproject's package-data globs (setuptools expands them with `glob(recursive=True)`) take
    every file of a trained preset's folder, the adapter's subfolder included, into the wheel."""
    from glob import glob

    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["regap"]
    files = [f"assets/presets/x/{name}" for name in trained_presets.REQUIRED_FILES]
    for relative in files:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text("x")
    found = {str(Path(p).relative_to(tmp_path)) for pattern in patterns
             for p in glob(str(tmp_path / pattern), recursive=True) if Path(p).is_file()}
    assert set(files) <= found
