"""The frozen-vision-feature cache: training from cached features equals training from pixels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from regap.train import TrainConfig, train


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    from regap.data import generate_synthetic

    folder = tmp_path_factory.mktemp("synth-fc")
    generate_synthetic(folder, 16, seed=0, image_size=56)
    return folder


def _config(synth: Path, cache: str, **extra) -> TrainConfig:
    return TrainConfig.from_dict({
        "model": "tiny-random", "seed": 0, "data": {"json": str(synth / "captions.json"), "feature_cache": cache},
        "global_batch_size": 4, "per_device_batch_size": 2, "lr": 1e-2, "max_steps": 8, "save_every": 100,
        "max_length": 128, "dtype": "float32", "observe": {"progress": False, "gap_every": 0, "mir_every": 0},
        **extra,
    })


def _losses(folder: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_training_from_cached_features_gives_the_losses_of_training_from_pixels(synth, tmp_path, monkeypatch):
    monkeypatch.setenv("REGAP_CACHE", str(tmp_path / "cache"))
    regap = {"lam": 1.0, "warmup_steps": 2}
    train(_config(synth, "off", regap=regap), tmp_path / "pixels")
    train(_config(synth, "on", regap=regap), tmp_path / "cold")  # encodes and stores every image
    stored = list((tmp_path / "cache" / "features").glob("*/*.safetensors"))
    assert len(stored) == 16  # 8 steps x 4 samples = 2 epochs of 16 images: each encoded once
    train(_config(synth, "on", regap=regap), tmp_path / "warm")  # every image from the cache
    pixels, cold, warm = _losses(tmp_path / "pixels"), _losses(tmp_path / "cold"), _losses(tmp_path / "warm")
    assert len(pixels) == 8
    assert cold == pytest.approx(pixels, rel=1e-5, abs=1e-6)
    assert warm == cold  # the same stored features, the same batches: bit-identical


def test_the_cache_encodes_only_misses_and_keys_on_pixels(tmp_path):
    from PIL import Image

    from regap.models.feature_cache import VisionFeatureCache, image_key
    from regap.models.random_tiny import tiny_random_lvlm

    model = tiny_random_lvlm(seed=0)
    cache = VisionFeatureCache(model.vision, root=tmp_path)
    red, blue = Image.new("RGB", (56, 56), "red"), Image.new("RGB", (56, 56), "blue")
    assert image_key(red) != image_key(blue) and image_key(red) == image_key(Image.new("RGB", (56, 56), "red"))
    pixels = model.vision.preprocess([red, blue])
    first = cache.features([image_key(red), image_key(blue)], pixels)
    assert (cache.hits, cache.misses) == (0, 2)
    again = cache.features([image_key(blue), image_key(red)], pixels.flip(0))
    assert (cache.hits, cache.misses) == (2, 2)
    assert torch.equal(again, first.flip(0))
    with torch.no_grad():
        assert torch.allclose(first, model.vision(pixels), atol=1e-6)


def test_another_tower_or_preprocessing_gets_another_folder(tmp_path):
    from regap.models.feature_cache import VisionFeatureCache
    from regap.models.random_tiny import tiny_random_lvlm

    a = VisionFeatureCache(tiny_random_lvlm(seed=0).vision, root=tmp_path)
    b = VisionFeatureCache(tiny_random_lvlm(seed=1).vision, root=tmp_path)
    model = tiny_random_lvlm(seed=0)
    model.vision.image_processor.image_mean = [0.1, 0.2, 0.3]
    c = VisionFeatureCache(model.vision, root=tmp_path)
    assert len({a.folder, b.folder, c.folder}) == 3


def test_bad_feature_cache_value_names_the_key():
    from regap.errors import RegapError

    with pytest.raises(RegapError, match="data.feature_cache"):
        TrainConfig.from_dict({"model": "tiny-random", "data": {"json": "x.json", "feature_cache": "yes"}})


# ---------------------------------------------------------------------- faults in the cache


def _red_blue():
    from PIL import Image

    return Image.new("RGB", (56, 56), "red"), Image.new("RGB", (56, 56), "blue")


@pytest.mark.parametrize("entry", ["shape", "dtype", "nan", "garbage"])
def test_a_bad_entry_is_a_miss_encoded_again_and_replaced(tmp_path, entry):
    from safetensors.torch import load_file, save_file

    from regap.models.feature_cache import VisionFeatureCache, image_key
    from regap.models.random_tiny import tiny_random_lvlm

    model = tiny_random_lvlm(seed=0)
    cache = VisionFeatureCache(model.vision, root=tmp_path)
    red, blue = _red_blue()
    pixels = model.vision.preprocess([red, blue])
    with torch.no_grad():
        expected = model.vision(pixels)
    path = cache.folder / f"{image_key(red)}.safetensors"
    tokens, hidden = expected.shape[1:]
    if entry == "garbage":
        path.write_bytes(b"\x00not a safetensors file")
    else:
        bad = {"shape": torch.zeros(tokens, hidden + 1), "dtype": expected[0].double(),
               "nan": torch.full((tokens, hidden), float("nan"))}[entry]
        save_file({"features": bad}, str(path))
    features = cache.features([image_key(red), image_key(blue)], pixels)
    assert torch.allclose(features, expected, atol=1e-6) and (cache.hits, cache.misses, cache.rejected) == (0, 2, 1)
    assert torch.equal(load_file(path)["features"], features[0])  # the bad entry was overwritten


def test_training_with_bad_entries_in_the_cache_runs_as_from_pixels(synth, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.setenv("REGAP_CACHE", str(tmp_path / "cache"))
    train(_config(synth, "on", max_steps=4), tmp_path / "cold")
    entries = sorted((tmp_path / "cache" / "features").glob("*/*.safetensors"))
    for index, path in enumerate(entries):  # every entry replaced by a wrong-shape or non-finite one
        good = torch.zeros(1, 1) if index % 2 else torch.full((64, 8), float("nan"))
        save_file({"features": good}, str(path))
    train(_config(synth, "off", max_steps=4), tmp_path / "pixels")
    train(_config(synth, "on", max_steps=4), tmp_path / "warm")
    assert _losses(tmp_path / "warm") == pytest.approx(_losses(tmp_path / "pixels"), rel=1e-5, abs=1e-6)


def test_a_cache_that_cannot_be_created_trains_without_it_with_one_warning(synth, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("")
    monkeypatch.setenv("REGAP_CACHE", str(blocker))
    # the Fréchet loss's corpus statistics are cached there too: kept in the run folder instead
    frechet = {"lam": 1.0, "distance": "frechet", "ridge": 1e-4}
    result = train(_config(synth, "on", max_steps=2, regap=frechet), tmp_path / "out")
    assert result.status == "completed" and (tmp_path / "out" / "text_stats.safetensors").is_file()
    err = capsys.readouterr().err
    assert err.count("vision-feature cache not used") == 1 and "Traceback" not in err
    assert err.count("text statistics not cached") == 1


@pytest.mark.parametrize("fault", ["enospc", "safetensors"])
def test_a_write_that_fails_stops_storing_with_one_warning(synth, tmp_path, monkeypatch, capsys, fault):
    import errno

    import safetensors.torch
    from safetensors import SafetensorError

    def failing_save(*args, **kwargs):
        if fault == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise SafetensorError("Error while serializing: IoError(Os { code: 13, kind: PermissionDenied })")

    monkeypatch.setenv("REGAP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    result = train(_config(synth, "on", max_steps=4), tmp_path / "out")
    assert result.status == "completed"
    err = capsys.readouterr().err
    assert err.count("cannot be written") == 1 and "training goes on without storing features" in err
    assert not list((tmp_path / "cache" / "features").glob("*/*.safetensors"))
