"""regap.files: atomic writes, file hashes and stable random streams (and that the streams and
bytes of the copies it replaced did not change)."""

from __future__ import annotations

import hashlib
import json
import random

import pytest

from regap.files import (
    atomic_path,
    file_sha256,
    stable_random,
    stable_seed,
    write_json_atomic,
    write_jsonl_atomic,
    write_text_atomic,
)


def test_json_and_jsonl_are_written_as_before(tmp_path):
    data = {"b": 1, "a": [1.5, None], "path": tmp_path}
    path = write_json_atomic(tmp_path / "x.json", data)
    # the bytes the copies in safety/store and models/io wrote: indent 2, str() for the rest, no newline
    assert path.read_text(encoding="utf-8") == json.dumps(data, indent=2, default=str)
    write_json_atomic(tmp_path / "y.json", {"b": 1, "a": 2}, indent=1, sort_keys=True)
    assert (tmp_path / "y.json").read_text() == '{\n "a": 2,\n "b": 1\n}'
    rows = [{"key": "1", "p": tmp_path}, {"key": "2", "text": "ünïcode"}]
    write_jsonl_atomic(tmp_path / "r.jsonl", iter(rows))
    assert (tmp_path / "r.jsonl").read_text(encoding="utf-8") == "".join(json.dumps(r, default=str) + "\n" for r in rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.jsonl", "x.json", "y.json"]  # no temporary left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "summary.json"
    write_text_atomic(target, "old")

    def rows():
        yield {"key": "1"}
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="mid-write"):
        write_jsonl_atomic(target, rows())
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_atomic_path_suits_any_writer(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    target = tmp_path / "w.safetensors"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        save_file({"w": torch.ones(2)}, str(tmp))
        assert not target.exists()  # appears only once complete
    assert torch.equal(load_file(target)["w"], torch.ones(2))


def test_file_sha256_is_the_sha256_of_the_bytes(tmp_path):
    path = tmp_path / "blob"
    payload = bytes(range(256)) * 9000  # over one read block
    path.write_bytes(payload)
    assert file_sha256(path) == hashlib.sha256(payload).hexdigest()


def test_stable_streams_are_those_of_the_copies_they_replaced():
    # safety/conditions.stable_seed: "\x1f"-joined parts
    joined = "\x1f".join(["regap-noise", "noise-gaussian", "0", "req-1"]).encode("utf-8")
    assert stable_seed("regap-noise", "noise-gaussian", 0, "req-1") == \
        int.from_bytes(hashlib.sha256(joined).digest()[:8], "big")
    # data/synth.item_rng and data/mixing._stream_rng: "|"-joined keys
    key = b"regap-synth|v1|7|train|3"
    old = random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))
    assert stable_random("regap-synth", "v1", 7, "train", 3, sep="|").random() == old.random()
    assert stable_seed("a", "b") != stable_seed("b", "a")


def test_synthetic_data_and_mixing_streams_did_not_change():
    """Values drawn before these streams moved into regap.files (the same seeds give the same data)."""
    from regap.data.mixing import _stream_rng
    from regap.data.synth import item_rng

    assert item_rng(7, 3, "train").random() == 0.9341794429153804
    assert item_rng(0, 0).random() == 0.48609558403486186
    assert item_rng(123, 45, "heldout").random() == 0.6282730608764279
    assert _stream_rng(5, "a", 2).random() == 0.5283269431515851
    assert _stream_rng(0).random() == 0.5443436761916338


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_written_files_follow_the_umask_whatever_the_writer(tmp_path, umask):
    """safetensors creates its files 0600: a group-shared cache or run folder needs the umask's mode."""
    import os

    import torch
    from safetensors.torch import save_file

    from regap.files import atomic_path, write_json_atomic

    before = os.umask(umask)
    try:
        with atomic_path(tmp_path / "w.safetensors") as tmp:
            save_file({"x": torch.zeros(2)}, str(tmp))
        write_json_atomic(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(before)
    expected = 0o666 & ~umask
    assert oct((tmp_path / "w.safetensors").stat().st_mode & 0o777) == oct(expected)
    assert oct((tmp_path / "r.json").stat().st_mode & 0o777) == oct(expected)


def test_a_training_output_and_an_export_hold_no_private_file(tmp_path):
    import os

    from regap.data import generate_synthetic
    from regap.models.export import export_model
    from regap.train import TrainConfig, train

    generate_synthetic(tmp_path / "data", 4, seed=0, image_size=56)
    config = TrainConfig.from_dict({
        "stage": 2, "tune": "lora", "template": "chat", "model": "tiny-random",
        "data": {"json": str(tmp_path / "data" / "instructions.json"), "feature_cache": "off"},
        "global_batch_size": 2, "per_device_batch_size": 2, "lr": 1e-2, "max_steps": 1, "save_every": 1,
        "max_length": 128, "dtype": "float32", "observe": {"progress": False, "gap_every": 0, "mir_every": 0},
    })
    before = os.umask(0o022)
    try:
        train(config, tmp_path / "run")
        export_model(str(tmp_path / "run"), tmp_path / "hf")
    finally:
        os.umask(before)
    written = [p for folder in ("run", "hf") for p in (tmp_path / folder).rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in written)
    private = [str(p.relative_to(tmp_path)) for p in written if p.stat().st_mode & 0o777 != 0o644
               and p.name != ".regap.lock"]
    assert private == []
