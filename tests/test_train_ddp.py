"""Data parallelism on 2 CPU processes (gloo): 2 x batch b == 1 x batch 2b.

Two spawned processes each take half of a batch. Their ReGap loss, caption loss and the
(DDP-averaged) projector gradients must equal those of one process holding the whole
batch (within 1e-6, in float64), for batch pooling, Fréchet and per-sample pooling; a
short float32 run of the full loop must give the same losses and projector weights, and
an interrupted-and-resumed 2-process run the same weights as an uninterrupted one.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

VARIANTS = [
    {"distance": "centroid", "pooling": "batch"},
    {"distance": "frechet", "pooling": "batch", "ridge": 1e-3},  # ridge: the covariances are rank-deficient
    {"distance": "centroid+norm", "pooling": "sample"},
]
HALF = 2  # samples per process


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs with one torch thread (conftest.one_thread)."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _config(data: Path, **extra):
    from regap.train import TrainConfig

    base = {"model": "tiny-random", "seed": 0, "data": {"json": str(data / "captions.json")}, "global_batch_size": 4,
            "max_steps": 3, "save_every": 3, "max_length": 128, "lr": 1e-3,
            "regap": {"lam": 1.0, "warmup_steps": 1}, "observe": {"progress": False, "gap_every": 0, "mir_every": 0}}
    base.update(extra)
    return TrainConfig.from_dict(base)


def _losses_and_grads(data: Path, indices: list[int], accelerator=None) -> list[dict]:
    """Per variant: caption loss, gap, total loss and the projector gradients (after DDP)."""
    from regap.data import LlavaJsonDataset
    from regap.models.random_tiny import tiny_random_lvlm
    from regap.train.hooks import HiddenCapture
    from regap.train.setup import setup_model
    from regap.train.step import compute_losses
    from regap.train.regap_loss import ReGapLoss

    model = tiny_random_lvlm(seed=0).double()  # float64: the comparison is not blurred by float32 rounding
    module, _ = setup_model(model, _config(data).resolved(), log=lambda m: None)
    if accelerator is not None:
        module = accelerator.prepare(module)
    dataset = LlavaJsonDataset(data / "captions.json")
    rows = [dataset[i] for i in indices]
    inputs = model.build_inputs([r.messages for r in rows], [[r.image] for r in rows], template="plain")
    capture = HiddenCapture(model.llm, 0)
    results = []
    for variant in VARIANTS:
        regap = ReGapLoss(lam=1.0, warmup_steps=1, **variant)
        losses = compute_losses(module, inputs, regap, capture)
        if accelerator is not None:
            accelerator.backward(losses.total)
        else:
            losses.total.backward()
        grads = {k: p.grad.detach().clone() for k, p in model.projector.named_parameters()}
        results.append({"caption": losses.caption, "gap": losses.gap, "total": float(losses.total.detach()),
                        "alpha": losses.alpha, "grads": grads})
        module.zero_grad(set_to_none=True)
    capture.remove()
    return results


def _worker(rank: int, world: int, port: int, data: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), ACCELERATE_USE_CPU="yes", GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    from accelerate import Accelerator

    from regap.train import train

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == world
    indices = list(range(rank * HALF, (rank + 1) * HALF))
    results = _losses_and_grads(Path(data), indices, accelerator)
    torch.save(results, Path(out) / f"grads_rank{rank}.pt")
    result = train(_config(Path(data)), Path(out) / "ddp")
    assert result.step == 3
    # Interrupted after step 1 and resumed, still on 2 processes.
    assert train(_config(Path(data), stop_after_steps=1), Path(out) / "ddp_resumed").status == "stopped"
    assert train(_config(Path(data)), Path(out) / "ddp_resumed", resume=True).step == 3
    accelerator.wait_for_everyone()


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    from regap.data import generate_synthetic

    folder = tmp_path_factory.mktemp("synth_ddp")
    generate_synthetic(folder, 16, seed=0, image_size=56)
    return folder


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_whole_batch(synth, tmp_path):
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from regap.train import read_metrics, train

    torch.set_num_threads(1)
    mp.start_processes(_worker, args=(2, _free_port(), str(synth), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")

    reference = _losses_and_grads(synth, list(range(2 * HALF)))
    for rank in range(2):
        results = torch.load(tmp_path / f"grads_rank{rank}.pt", weights_only=False)
        for variant, ref, got in zip(VARIANTS, reference, results):
            assert got["gap"] == pytest.approx(ref["gap"], rel=0, abs=1e-6), variant
            assert got["caption"] == pytest.approx(ref["caption"], rel=0, abs=1e-6), variant
            assert got["total"] == pytest.approx(ref["total"], rel=0, abs=1e-6), variant
            assert got["alpha"] == pytest.approx(ref["alpha"], rel=0, abs=1e-6), variant
            for name, grad in ref["grads"].items():
                assert torch.allclose(got["grads"][name], grad, atol=1e-6, rtol=0), (variant, name)

    # The whole loop: 2 processes x 2 samples == 1 process x 4 samples, step by step.
    single = train(_config(synth), tmp_path / "single")
    assert single.step == 3
    rows_ddp = read_metrics(tmp_path / "ddp" / "metrics.jsonl")
    rows_single = read_metrics(tmp_path / "single" / "metrics.jsonl")
    for a, b in zip(rows_ddp, rows_single):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a, b)
        assert a["gap"] == pytest.approx(b["gap"], rel=1e-5), (a, b)
    a = load_file(str(tmp_path / "ddp" / "projector.safetensors"))
    b = load_file(str(tmp_path / "single" / "projector.safetensors"))
    resumed = load_file(str(tmp_path / "ddp_resumed" / "projector.safetensors"))
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key
        assert torch.allclose(a[key], resumed[key], atol=1e-7, rtol=0), key
