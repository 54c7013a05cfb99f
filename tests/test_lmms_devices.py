"""The lmms-eval plugin under `accelerate launch`: each process takes its local rank's GPU and
reports its rank, as lmms-eval's own llava_hf does (not every process on cuda:0)."""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch


@pytest.mark.parametrize("env, asked, expected", [
    ({"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, None, "cuda:1"),
    ({"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "cuda", "cuda:1"),  # lmms-eval's --device default
    ({"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "cuda:0", "cuda:0"),  # an explicit index is kept
    ({"WORLD_SIZE": "1", "LOCAL_RANK": "0"}, None, "cuda"),
    ({}, None, "cuda"),
])
def test_process_device_follows_the_local_rank(monkeypatch, env, asked, expected):
    from regap.utility.lmms_eval_plugin import process_device

    for name in ("WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert process_device(asked) == expected


def test_process_device_without_cuda(monkeypatch):
    from regap.utility.lmms_eval_plugin import process_device

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert process_device(None) == "cpu" and process_device("cpu") == "cpu"


def test_lmms_class_reports_rank_and_world_size(monkeypatch, tmp_path):
    """Against stand-ins for lmms-eval's base class and accelerate's Accelerator (two processes)."""
    import accelerate

    from regap.models import save_model
    from regap.models.random_tiny import tiny_random_lvlm

    class lmms:  # noqa: N801  (lmms-eval's name)
        is_simple = True

        def __init__(self):
            self._rank, self._world_size, self.task_dict = 0, 1, {}

    class FakeAccelerator:
        process_index, num_processes, local_process_index = 1, 2, 1

    fakes = {name: types.ModuleType(name) for name in ("lmms_eval", "lmms_eval.api", "lmms_eval.api.model")}
    fakes["lmms_eval.api.model"].lmms = lmms
    for name, module in fakes.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(accelerate, "Accelerator", FakeAccelerator)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")

    import regap.utility.lmms_eval_plugin as real

    spec = importlib.util.spec_from_file_location("regap_plugin_two_processes", real.__file__)
    plugin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plugin)
    saved = save_model(tiny_random_lvlm(), tmp_path / "m", include_backbones=True)
    lm = plugin.RegapLMMS(pretrained=str(saved), device="cpu")
    assert (lm._rank, lm._world_size) == (1, 2) and isinstance(lm.accelerator, FakeAccelerator)
    assert lm.device == torch.device("cpu")
