"""The training loop on tiny random models: config checks, learning, ReGap, resume, NaN, data, CLI."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from regap.errors import RegapError
from regap.train import TrainConfig, load_config, read_metrics, shipped_configs, train, training_seconds
from regap.train.config import derive_batch_layout
from regap.train.loop import NonFiniteLossError


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs with one torch thread (conftest.one_thread)."""


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    from regap.data import generate_synthetic

    folder = tmp_path_factory.mktemp("synth")
    generate_synthetic(folder, 24, seed=0, image_size=56)
    return folder


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def make_config(synth: Path, **extra) -> TrainConfig:
    base = {
        "model": "tiny-random", "seed": 0, "data": {"json": str(synth / "captions.json")},
        "global_batch_size": 4, "per_device_batch_size": 2, "lr": 1e-3, "max_steps": 6, "save_every": 3,
        "max_length": 128, "observe": {"progress": False, "gap_every": 0, "mir_every": 0},
    }
    return TrainConfig.from_dict(_merge(base, extra))


# ---------------------------------------------------------------------- configuration


def test_unknown_yaml_key_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stage: 1\ndata: {json: x.json}\nregap:\n  lamda: 0.5\n")
    with pytest.raises(RegapError, match=r"unknown config key 'regap\.lamda'.*'lam'"):
        load_config(path)
    path.write_text("stage: 1\ndata: {json: x.json}\nlrr: 0.1\n")
    with pytest.raises(RegapError, match=r"unknown config key 'lrr' in .*c\.yaml; did you mean 'lr'"):
        load_config(path)


def test_overrides_are_typed_and_checked():
    config = load_config("tiny-stage1", ["regap.lam=0.25", "lr=1e-4", "observe.trackers=[tensorboard]", "data.synth.n=10"])
    assert config.regap.lam == 0.25 and config.lr == 1e-4 and config.observe.trackers == ["tensorboard"]
    assert config.data.synth.n == 10
    with pytest.raises(RegapError, match=r"unknown config key 'regap\.lamda' in override"):
        load_config("tiny-stage1", ["regap.lamda=1"])
    with pytest.raises(RegapError, match=r"'regap\.distance' is 'l1'; valid: centroid"):
        load_config("tiny-stage1", ["regap.distance=l1"])
    with pytest.raises(RegapError, match=r"'lr' in override 'lr=fast' must be a number"):
        load_config("tiny-stage1", ["lr=fast"])
    with pytest.raises(RegapError, match="key=value"):
        load_config("tiny-stage1", ["lr"])
    with pytest.raises(RegapError, match="stage-2 config; run it with `regap finetune`"):
        load_config("tiny-stage2", stage=1)


def test_shipped_configs_resolve_to_llava_defaults():
    names = set(shipped_configs())
    assert {"tiny-stage1", "tiny-stage2", "llava-1.5-7b-stage1", "llava-1.5-7b-stage1-1gpu24gb",
            "llava-1.5-7b-stage2"} <= names
    s1 = load_config("llava-1.5-7b-stage1").resolved()
    assert (s1.global_batch_size, s1.lr, s1.weight_decay, s1.warmup_ratio, s1.max_length, s1.template) == \
        (256, 1e-3, 0.0, 0.03, 2048, "plain")
    assert derive_batch_layout(256, s1.per_device_batch_size, None, 8) == (32, 1)
    one = load_config("llava-1.5-7b-stage1-1gpu24gb").resolved()
    assert derive_batch_layout(256, one.per_device_batch_size, None, 1) == (8, 32)
    s2 = load_config("llava-1.5-7b-stage2").resolved()
    assert (s2.global_batch_size, s2.lr, s2.regap.lam) == (128, 2e-5, 0.0)
    lora = load_config("llava-1.5-7b-stage2", ["tune=lora"]).resolved()
    assert (lora.lr, lora.projector_lr, lora.lora.r, lora.lora.alpha) == (2e-4, 2e-5, 128, 256)


def test_batch_layout_is_derived_and_validated():
    assert derive_batch_layout(256, None, None, 8) == (32, 1)
    assert derive_batch_layout(256, None, 4, 8) == (8, 4)
    with pytest.raises(RegapError, match="global_batch_size=256 is not divisible by per_device_batch_size=12 x 8"):
        derive_batch_layout(256, 12, None, 8)
    with pytest.raises(RegapError, match="= 64, not global_batch_size=256"):
        derive_batch_layout(256, 8, 8, 1)


# ---------------------------------------------------------------------- learning


def test_a_few_steps_reduce_the_caption_loss(synth, tmp_path):
    from regap.data import LlavaJsonDataset
    from regap.models.random_tiny import tiny_random_lvlm

    model = tiny_random_lvlm(seed=0)
    dataset = LlavaJsonDataset(synth / "captions.json")
    rows = [dataset[i] for i in range(8)]
    batch = model.build_inputs([r.messages for r in rows], [[r.image] for r in rows], template="plain")
    with torch.no_grad():
        before = float(model(batch).loss)
    config = make_config(synth, lr=1e-2, max_steps=12, save_every=100, warmup_ratio=0.0)
    train(config, tmp_path / "out", model=model)
    with torch.no_grad():
        after = float(model(batch).loss)
    # A frozen random LLM leaves the projector little to learn; the drop is small but systematic.
    assert after < before - 0.03, (before, after)
    rows = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert {"loss", "caption_loss", "gap", "lr", "samples_per_s", "alpha"} <= set(rows[0])


def test_regap_closes_the_layer0_gap(synth, tmp_path):
    gaps = {}
    for lam in (0.0, 1.0):
        config = make_config(synth, max_steps=10, save_every=100, regap={"lam": lam, "warmup_steps": 2},
                             observe={"gap_every": 10, "probe_size": 8})
        result = train(config, tmp_path / f"lam{lam}")
        gaps[lam] = result.last_metrics["probe_gap0"]
        if lam:
            assert result.last_metrics["alpha_frozen"] is True
    assert gaps[1.0] < 0.5 * gaps[0.0], gaps


def test_frechet_regap_uses_cached_corpus_text_statistics(synth, tmp_path, monkeypatch):
    monkeypatch.setenv("REGAP_CACHE", str(tmp_path / "cache"))
    config = make_config(synth, max_steps=3, regap={"lam": 1.0, "distance": "frechet", "ridge": 1e-4})
    result = train(config, tmp_path / "out")
    assert result.status == "completed"
    assert (tmp_path / "out" / "text_stats.safetensors").is_file()
    assert len([p for p in (tmp_path / "cache").rglob("*.safetensors") if "features" not in p.parts]) == 1
    stats = load_file(str(tmp_path / "out" / "text_stats.safetensors"))
    assert stats["cov"].shape == (48, 48) and torch.isfinite(stats["sqrt_cov"]).all()
    rows = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert all(r["gap"] > 0 for r in rows)


# ---------------------------------------------------------------------- checkpoints


def test_resume_continues_exactly(synth, tmp_path):
    extra = dict(max_steps=8, save_every=3, regap={"lam": 0.5, "warmup_steps": 4}, moca={"enabled": True},
                 observe={"gap_every": 4, "probe_size": 4})
    straight = train(make_config(synth, **extra), tmp_path / "straight")
    assert straight.status == "completed" and straight.step == 8

    first = train(make_config(synth, stop_after_steps=3, **extra), tmp_path / "resumed")
    assert first.status == "stopped" and first.step == 3
    first_sitting_s = read_metrics(tmp_path / "resumed" / "metrics.jsonl")[-1]["elapsed_s"]
    with pytest.raises(RegapError, match="already holds checkpoints"):
        train(make_config(synth, **extra), tmp_path / "resumed")
    second = train(make_config(synth, **extra), tmp_path / "resumed", resume=True)
    assert second.status == "completed" and second.step == 8

    for name in ("projector.safetensors", "moca.safetensors", "regap_state.safetensors"):
        a, b = load_file(str(tmp_path / "straight" / name)), load_file(str(tmp_path / "resumed" / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.allclose(a[key].double(), b[key].double(), atol=1e-7, rtol=0), (name, key)
    rows_a = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    rows_b = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in rows_b] == list(range(1, 9))
    # The run's time counts both sittings, each step once (elapsed_s restarts at the resume).
    assert [r["step"] for r in rows_b if r.get("sitting_start")] == [1, 4]
    assert training_seconds(rows_b) == pytest.approx(first_sitting_s + rows_b[-1]["elapsed_s"], abs=0.06)
    for ra, rb in zip(rows_a, rows_b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6, abs=1e-7)
        assert ra["alpha"] == pytest.approx(rb["alpha"], rel=1e-12)
    # Only the newest checkpoints are kept.
    kept = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["step-0000006", "step-0000008"]


def test_resume_restores_rng_states_for_dropout(synth, tmp_path):
    extra = dict(stage=2, tune="lora", template="chat", max_steps=4, save_every=2, lr=1e-2,
                 data={"json": str(synth / "instructions.json")}, lora={"r": 4, "alpha": 8, "dropout": 0.3})
    train(make_config(synth, **extra), tmp_path / "straight")
    train(make_config(synth, stop_after_steps=2, **extra), tmp_path / "resumed")
    train(make_config(synth, **extra), tmp_path / "resumed", resume=True)
    a = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors"))
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-7, rtol=0), key


def test_attn_implementation_switches_the_llm_kernel_and_may_change_on_resume(synth, tmp_path):
    from regap.models.attention import llm_attention
    from regap.models.random_tiny import tiny_random_lvlm

    model = tiny_random_lvlm(seed=0)
    assert llm_attention(model) == "sdpa"  # the library's default
    train(make_config(synth, attn_implementation="eager", stop_after_steps=1, max_steps=2), tmp_path / "run",
          model=model)
    assert llm_attention(model) == "eager"
    assert "LLM attention: eager" in (tmp_path / "run" / "train.log").read_text()
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["attn_implementation"] == "eager"
    # the kernel is how attention is computed, not what: a run may resume with another one
    train(make_config(synth, max_steps=2), tmp_path / "run", resume=True)
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2]
    with pytest.raises(RegapError, match="'attn_implementation' is 'flash'; valid: null"):
        make_config(synth, attn_implementation="flash")


def test_changed_config_cannot_resume(synth, tmp_path):
    train(make_config(synth, stop_after_steps=1, max_steps=2), tmp_path / "run")
    with pytest.raises(RegapError, match="config differs in lr"):
        train(make_config(synth, max_steps=2, lr=5e-3), tmp_path / "run", resume=True)


def test_a_moved_run_and_data_resume_when_the_content_is_the_same(synth, tmp_path):
    """The run folder and its data moved together (`mv`): the paths differ, the content does not."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synth, data)
    train(make_config(data, stop_after_steps=1, max_steps=2), tmp_path / "run")
    shutil.move(tmp_path / "run", tmp_path / "run2")
    shutil.move(data, tmp_path / "data2")
    result = train(make_config(tmp_path / "data2", max_steps=2), tmp_path / "run2", resume=True)
    assert result.status == "completed" and result.step == 2


def test_a_stage2_resume_refuses_another_initial_projector(synth, tmp_path):
    from regap.train.checkpoint import check_resume_projector, latest_checkpoint, projector_sha256

    train(make_config(synth, max_steps=1), tmp_path / "s1")
    (tmp_path / "s1b").mkdir()
    weights = (tmp_path / "s1" / "projector.safetensors").read_bytes()
    (tmp_path / "s1b" / "projector.safetensors").write_bytes(weights)
    assert projector_sha256(str(tmp_path / "s1")) == projector_sha256(str(tmp_path / "s1b"))
    stage2 = dict(stage=2, template="plain", projector=str(tmp_path / "s1"), stop_after_steps=1, max_steps=2)
    train(make_config(synth, **stage2), tmp_path / "s2")
    checkpoint = latest_checkpoint(tmp_path / "s2" / "checkpoints")
    check_resume_projector(checkpoint, projector_sha256(str(tmp_path / "s1b")))  # same content, other path
    with pytest.raises(RegapError, match="initial projector changed"):
        check_resume_projector(checkpoint, "0" * 64)


class _Payload:
    """Pickles to a call of Path.touch: loading it with a full unpickler would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_resume_never_unpickles_objects_planted_in_a_checkpoint(synth, tmp_path):
    train(make_config(synth, stop_after_steps=1, max_steps=2, save_every=1), tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoints" / "step-0000001"
    marker = tmp_path / "payload-ran"
    state = torch.load(checkpoint / "scheduler.pt", weights_only=True)
    torch.save({**state, "extra": _Payload(marker)}, checkpoint / "scheduler.pt")
    with pytest.raises(RegapError, match=r"refusing to load .*scheduler\.pt: .*Python object getattr"):
        train(make_config(synth, max_steps=2, save_every=1), tmp_path / "run", resume=True)
    assert not marker.exists()


def test_rng_state_round_trips_through_a_plain_file(tmp_path):
    import random

    import numpy as np

    from regap.train import checkpoint as ckpt

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    ckpt.torch_save_atomic(ckpt.rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    # A file written before the numpy state became a tensor still loads (numpy arrays are allow-listed).
    torch.save({**ckpt.rng_state(), "numpy": np.random.get_state()}, tmp_path / "legacy.pt")
    legacy_next = np.random.standard_normal(2).tolist()
    ckpt.set_rng_state(ckpt.load_plain(tmp_path / "rng.pt"))
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == expected
    ckpt.set_rng_state(ckpt.load_plain(tmp_path / "legacy.pt"))
    assert np.random.standard_normal(2).tolist() == legacy_next
def test_changed_training_data_cannot_resume(synth, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth, data)
    config = make_config(synth, max_steps=2, data={"json": str(data / "captions.json")})
    train(dataclasses.replace(config, stop_after_steps=1), tmp_path / "run")
    assert "data_sha256" in json.loads((tmp_path / "run" / "checkpoints" / "step-0000001" / "state.json").read_text())
    original = (data / "captions.json").read_text()
    (data / "captions.json").write_text(json.dumps(json.loads(original)[::-1]))  # same path, other order of rows
    with pytest.raises(RegapError, match=r"training data .*captions\.json changed since the checkpoint"):
        train(config, tmp_path / "run", resume=True)
    (data / "captions.json").write_text(original)
    assert train(config, tmp_path / "run", resume=True).status == "completed"


def test_nan_loss_stops_and_leaves_the_last_checkpoint_intact(synth, tmp_path):
    from regap.models.random_tiny import tiny_random_lvlm

    model = tiny_random_lvlm(seed=0)
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] > 4 else None  # 2 steps x 2 micro-batches are fine

    handle = model.projector.register_forward_hook(poison)
    config = make_config(synth, max_steps=6, save_every=2)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss.*step 3.*step-0000002"):
        train(config, tmp_path / "out", model=model)
    handle.remove()
    folder = tmp_path / "out" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["latest.json", "step-0000002"]
    saved = load_file(str(folder / "step-0000002" / "projector.safetensors"))
    for key, value in model.projector.state_dict().items():
        assert torch.equal(saved[key], value), key  # no optimizer step was taken on the bad loss
    assert torch.isfinite(torch.cat([v.flatten() for v in saved.values()])).all()
    events = [r for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if r.get("event")]
    assert events and events[0]["event"] == "non_finite_loss"
    resumed = train(config, tmp_path / "out", resume=True)
    assert resumed.status == "completed" and resumed.step == 6


def test_non_finite_gradient_also_stops_before_the_step(synth, tmp_path):
    from regap.models.random_tiny import tiny_random_lvlm

    model = tiny_random_lvlm(seed=0)
    weight = model.projector[0].weight
    before = weight.detach().clone()
    weight.register_hook(lambda grad: grad * float("inf"))
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradient norm.*step 1.*no checkpoint was written yet"):
        train(make_config(synth, max_steps=2), tmp_path / "out", model=model)
    assert torch.equal(weight.detach(), before)


# ---------------------------------------------------------------------- data problems


def test_missing_and_corrupt_images_are_skipped_and_listed(synth, tmp_path):
    rows = json.loads((synth / "captions.json").read_text())[:6]
    data = tmp_path / "data"
    shutil.copytree(synth / "images", data / "images")
    (data / rows[0]["image"]).unlink()  # missing: skipped when the data is read
    (data / rows[1]["image"]).write_bytes(b"not a png")  # corrupt: found when the image is decoded
    rows[4]["conversations"][1]["value"] = "long " * 200  # over max_length: truncated
    (data / "captions.json").write_text(json.dumps(rows))
    config = make_config(tmp_path / "data", global_batch_size=5, per_device_batch_size=5, max_steps=1)
    with pytest.warns(UserWarning, match="truncated"):
        train(config, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert report["n_missing_images"] == 1 and report["missing_images"] == [rows[0]["image"]]
    assert report["n_corrupt_images"] == 1 and report["corrupt_images"][0]["image"] == rows[1]["image"]
    assert report["n_truncated"] == 1
    assert read_metrics(tmp_path / "out" / "metrics.jsonl")[-1]["skipped_images"] == 1


def test_missing_tracker_warns_and_the_run_goes_on(synth, tmp_path):
    from accelerate.utils import is_tensorboard_available

    if is_tensorboard_available():
        pytest.skip("tensorboard is installed")
    with pytest.warns(UserWarning, match="tracker 'tensorboard' is not installed"):
        result = train(make_config(synth, max_steps=1, observe={"trackers": ["tensorboard"]}), tmp_path / "out")
    assert result.status == "completed"


# ---------------------------------------------------------------------- stage 2


def test_stage2_lora_trains_adapters_only_and_warns_about_regap(synth, tmp_path):
    from regap.models.random_tiny import tiny_random_lvlm

    reference = tiny_random_lvlm(seed=0)
    config = make_config(synth, stage=2, tune="lora", template="chat", max_steps=2, lr=1e-2,
                         data={"json": str(synth / "instructions.json")}, lora={"r": 4, "alpha": 8},
                         regap={"lam": 0.1})
    model = tiny_random_lvlm(seed=0)
    with pytest.warns(UserWarning, match="stage 2"):
        train(config, tmp_path / "s2", model=model)
    assert (tmp_path / "s2" / "adapter" / "adapter_config.json").is_file()
    base = model.llm.get_base_model()
    original = dict(reference.llm.named_parameters())
    for name, parameter in base.named_parameters():
        if "lora_" not in name:
            assert torch.equal(parameter, original[name.replace(".base_layer", "")]), name
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in base.named_parameters())
    # The output folder rebuilds the same model (tiny-random rebuilds from its seed).
    from regap.models import load_trained

    rebuilt = load_trained(tmp_path / "s2")
    assert rebuilt.moca is None
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "one two"}]
    batch = model.build_inputs([conversation], template="chat")
    with torch.no_grad():
        assert torch.allclose(model.eval()(batch).logits, rebuilt(batch).logits, atol=1e-5)


def test_a_checkpoint_loads_as_the_model_at_its_step(synth, tmp_path):
    """`OUT/checkpoints/step-N` works wherever a model is asked for (learning curves, runs still training)."""
    from regap.cli import main
    from regap.models import load_model
    from regap.models import load_trained

    config = make_config(synth, stage=2, tune="lora", template="chat", max_steps=4, save_every=2, keep_checkpoints=0,
                         lr=5e-2, data={"json": str(synth / "instructions.json")}, lora={"r": 4, "alpha": 8})
    out = tmp_path / "s2"
    train(config, out)
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "one two"}]
    final = load_trained(out)
    batch = final.build_inputs([conversation], template="chat")

    def logits(model):
        with torch.no_grad():
            return model(batch).logits

    at_4 = load_model(str(out / "checkpoints" / "step-0000004"), dtype="float32")
    at_2 = load_model(str(out / "checkpoints" / "step-0000002"), dtype="float32")
    assert torch.allclose(logits(at_4), logits(final), atol=1e-5)  # the last checkpoint is the final model
    assert not torch.allclose(logits(at_2), logits(final), atol=1e-3)  # step 2 is not
    projector_2 = load_file(str(out / "checkpoints" / "step-0000002" / "projector.safetensors"))
    for name, tensor in at_2.projector.state_dict().items():
        assert torch.equal(tensor, projector_2[name]), name
    # the command line takes it as --model
    assert main(["chat", "--model", str(out / "checkpoints" / "step-0000002"), "--max-new-tokens", "2",
                 "--dtype", "float32", "Hi"]) == 0
    # a run that has not finished says where its checkpoints are
    (out / "projector.safetensors").unlink()
    with pytest.raises(RegapError, match="a checkpoint loads as a model too"):
        load_trained(out)


# ---------------------------------------------------------------------- command line


def test_cli_pretrain_writes_the_run_folder(tmp_path):
    import typer
    from typer.testing import CliRunner

    from regap.commands import train as train_commands

    app = typer.Typer()
    train_commands.register(app)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "stage": 1, "model": "tiny-random", "seed": 0, "global_batch_size": 4, "per_device_batch_size": 2,
        "max_steps": 2, "save_every": 1, "max_length": 128,
        "data": {"json": str(tmp_path / "absent" / "captions.json"), "synth": {"n": 8, "seed": 1, "image_size": 56}},
        "regap": {"lam": 1.0, "warmup_steps": 1}, "observe": {"progress": False, "gap_every": 2, "mir_every": 2,
                                                               "probe_size": 4},
    }))
    out = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(app, ["pretrain", str(config), "--out", str(out), "regap.distance=centroid+norm"])
    assert result.exit_code == 0, result.output
    for name in ("config.yaml", "metrics.jsonl", "provenance.json", "data_report.json", "projector.safetensors",
                 "regap_state.safetensors", "data/captions.json", "checkpoints/latest.json"):
        assert (out / name).exists(), name
    used = yaml.safe_load((out / "config.yaml").read_text())
    assert used["regap"]["distance"] == "centroid+norm" and used["gradient_accumulation_steps"] == 2
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["seed"] == 0 and len(provenance["data"]["sha256"]) == 64 and provenance["status"] == "completed"
    assert "torch" in provenance["versions"]
    assert "probe_mir" in read_metrics(out / "metrics.jsonl")[-1]

    shown = runner.invoke(app, ["pretrain", "tiny-stage1", "--show", "regap.lam=0.5"])
    assert shown.exit_code == 0 and "lam: 0.5" in shown.output
    with_qformer = runner.invoke(app, ["pretrain", "tiny-stage1", "--projector", "qformer", "--show"])
    assert with_qformer.exit_code == 0 and "projector_type: qformer" in with_qformer.output
    bad_kind = runner.invoke(app, ["finetune", "tiny-stage2", "--projector", "bogus", "--show"])
    assert isinstance(bad_kind.exception, RegapError) and "projector_type" in str(bad_kind.exception)
    listed = runner.invoke(app, ["finetune", "--list"])
    assert "tiny-stage2" in listed.output
    bad = runner.invoke(app, ["pretrain", str(config), "--out", str(tmp_path / "x"), "regap.lamda=1"])
    assert isinstance(bad.exception, RegapError) and "regap.lamda" in str(bad.exception)
    again = runner.invoke(app, ["pretrain", str(config), "--out", str(out)])
    assert isinstance(again.exception, RegapError) and "--resume" in str(again.exception)


@pytest.mark.slow
@pytest.mark.parametrize("signal_name, exit_code, said", [("SIGINT", 130, "interrupted"),
                                                          ("SIGTERM", 143, "terminated (SIGTERM)")])
def test_ctrl_c_or_sigterm_marks_the_run_interrupted_and_saves(tmp_path, signal_name, exit_code, said):
    """SIGTERM is how a scheduler stops a job: it must save like Ctrl-C, not die mid-step."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from signals import default_sigint

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "stage": 1, "model": "tiny-random", "seed": 0, "global_batch_size": 4, "per_device_batch_size": 2,
        "max_steps": 5000, "save_every": 5000, "max_length": 128, "regap": {"lam": 0.0},
        "data": {"json": str(tmp_path / "absent" / "captions.json"), "synth": {"n": 8, "seed": 1, "image_size": 56}},
        "observe": {"progress": False, "log_every": 1, "gap_every": 0, "mir_every": 0},
    }))
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "regap.cli", "pretrain", str(config), "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=default_sigint)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run should still be going"
    process.send_signal(getattr(signal, signal_name))
    _, err = process.communicate(timeout=120)
    assert process.returncode == exit_code, err
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["status"] == "interrupted" and 2 <= provenance["step"] < 5000
    step = provenance["step"]
    assert provenance["checkpoint"].endswith(f"step-{step:07d}")  # saved at the step it stopped
    message = err.strip().splitlines()[-1]
    assert message.startswith(f"{said}: training stopped at step {step}/5000; last checkpoint")
    assert message.endswith(f"continue with: regap pretrain {config} --out {out} --resume")
