"""The ReGap loss, the loss bookkeeping and the step logging never read a device value back to
the host (on a GPU such a read makes the CPU wait for every queued kernel).

On the CPU the reads are caught by making every tensor-to-Python conversion raise
(`torch.cuda.set_sync_debug_mode` is the GPU counterpart; `bench/gpu.py` uses it).
"""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from regap.models.inputs import IGNORE_INDEX
from regap.train.regap_loss import ReGapLoss

_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__")


@contextlib.contextmanager
def no_host_reads():
    """Any Tensor -> Python number/bool/list conversion inside raises AssertionError."""
    saved = {name: getattr(torch.Tensor, name) for name in _READS}

    def forbidden(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"host read: Tensor.{name}")
        return read

    try:
        for name in _READS:
            setattr(torch.Tensor, name, forbidden(name))
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def test_the_guard_catches_reads():
    with no_host_reads(), pytest.raises(AssertionError, match="__float__"):
        float(torch.ones(()))
    assert float(torch.ones(())) == 1.0  # restored


def _features(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    feats = torch.randn(3, 6, 4, generator=generator, requires_grad=True)
    image_mask = torch.zeros(3, 6, dtype=torch.bool)
    image_mask[:, :3] = True
    attention = torch.ones(3, 6)
    attention[2, 5] = 0
    return feats, image_mask, attention


@pytest.mark.parametrize("distance", ["centroid", "centroid+norm", "cosine"])
@pytest.mark.parametrize("pooling", ["batch", "sample"])
def test_regap_forward_backward_and_step_read_nothing_back(distance, pooling):
    loss = ReGapLoss(lam=0.5, distance=distance, pooling=pooling, warmup_steps=2)
    feats, image_mask, attention = _features()
    empty = torch.zeros_like(image_mask)  # no image token: the masked (zero) branch
    with no_host_reads():
        outputs = []
        for mask in (image_mask, empty, image_mask, image_mask):  # warm-up, frozen, then frozen alpha
            out = loss(feats, mask, attention)
            out.loss.backward()
            loss.step()
            outputs.append(out)
    assert loss.frozen and loss.alpha is not None
    assert outputs[1].loss.item() == 0.0 and math.isfinite(feats.grad.abs().sum().item())
    assert outputs[0].n_image_tokens == 9 and outputs[0].n_text_tokens == 8
    assert outputs[-1].gap.item() > 0 and (outputs[-1].alpha is not None or distance == "cosine")


def test_step_by_step_values_match_the_formula():
    """The branch-free alpha and masks give the documented values (batch pooling, centroid)."""
    loss = ReGapLoss(lam=1.0, warmup_steps=1)
    feats, image_mask, attention = _features(1)
    out = loss(feats, image_mask, attention)
    x = feats.detach()
    img = x[image_mask & attention.bool()]
    txt = x[~image_mask & attention.bool()]
    alpha = 1 / txt.norm(dim=-1).mean()
    assert out.alpha == pytest.approx(float(alpha))
    assert out.gap.item() == pytest.approx(float(alpha**2 * (img.mean(0) - txt.mean(0)).square().sum()), rel=1e-6)
    assert ReGapLoss(lam=1.0).eval()(feats, torch.zeros_like(image_mask), torch.zeros_like(attention)).alpha is None


class _Replay(nn.Module):
    """Stands in for `TrainModule`: returns logits computed beforehand and hands the ReGap
    features to the capture, as the real forward's hook does (the LLM's own forward is
    transformers' business and is not what these tests are about)."""

    def __init__(self, logits: torch.Tensor, features: torch.Tensor, capture) -> None:
        super().__init__()
        self.logits, self.features, self.capture = logits, features, capture
        self.seen_positions = None

    def forward(self, inputs, logits_positions=None):
        self.seen_positions = logits_positions
        if self.capture is not None:
            self.capture.features = self.features
        return SimpleNamespace(logits=self.logits[:, logits_positions] if logits_positions is not None else self.logits)


def _batch():
    labels = torch.full((2, 7), IGNORE_INDEX)
    labels[0, 4:6] = torch.tensor([3, 1])
    labels[1, 5:7] = torch.tensor([2, 4])
    image_mask = torch.zeros(2, 7, dtype=torch.bool)
    image_mask[:, 1:4] = True
    attention = torch.ones(2, 7, dtype=torch.long)
    return SimpleNamespace(labels=labels, image_mask=image_mask, attention_mask=attention, pixel_values=torch.ones(1))


def test_compute_losses_reads_nothing_back_and_keeps_the_values():
    from regap.train.hooks import HiddenCapture
    from regap.train.step import compute_losses, target_positions

    torch.manual_seed(0)
    inputs = _batch()
    logits = torch.randn(2, 7, 5, requires_grad=True)
    features = torch.randn(2, 7, 4, requires_grad=True)
    capture = HiddenCapture.__new__(HiddenCapture)  # no hook needed: the replay module fills it
    capture.layer, capture.features = 0, None
    module = _Replay(logits, features, capture)
    regap = ReGapLoss(lam=0.25)
    positions = target_positions(inputs.labels)  # on the host, as the loop does
    with no_host_reads():
        losses = compute_losses(module, inputs, regap, capture, positions=positions)
        losses.total.backward()
    assert torch.equal(module.seen_positions, positions)
    targets = inputs.labels[:, 1:]
    caption = F.cross_entropy(logits.detach()[:, :-1].reshape(-1, 5), targets.reshape(-1), ignore_index=IGNORE_INDEX)
    gap = ReGapLoss(lam=0.25)(features.detach(), inputs.image_mask, inputs.attention_mask)
    assert losses.caption == pytest.approx(float(caption), rel=1e-6)
    assert losses.caption_tokens == 4
    assert losses.gap == pytest.approx(gap.gap.item(), rel=1e-6) and losses.gap_loss == pytest.approx(0.25 * losses.gap)
    assert losses.total.item() == pytest.approx(float(caption) + gap.loss.item(), rel=1e-6)
    assert logits.grad is not None and features.grad is not None


def test_a_batch_without_targets_gives_a_zero_caption_loss():
    from regap.train.step import compute_losses

    inputs = _batch()
    inputs.labels[:] = IGNORE_INDEX
    logits = torch.randn(2, 7, 5, requires_grad=True)
    losses = compute_losses(_Replay(logits, None, None), inputs)
    losses.total.backward()
    assert losses.caption == 0.0 and losses.caption_tokens == 0 and losses.gap is None
    assert logits.grad is None or float(logits.grad.abs().sum()) == 0.0


def test_the_step_window_reads_back_once_when_summarised():
    from regap.train.step import LossWindow, StepLosses

    window = LossWindow()
    totals = []
    with no_host_reads():
        for k in range(3):
            total = torch.tensor(1.0 + k, requires_grad=True) * 1.0
            gap = SimpleNamespace(gap=torch.tensor(0.1 * k), loss=torch.tensor(0.05 * k))
            window.add(StepLosses(total, torch.tensor(0.5 + k), torch.tensor(4.0), gap), SimpleNamespace(n_samples=2))
            totals.append(1.0 + k)
    summary = window.summary()
    assert summary["loss"] == pytest.approx(sum(totals) / 3)
    assert summary["caption_loss"] == pytest.approx(1.5)
    assert summary["gap"] == pytest.approx(0.1) and summary["gap_loss"] == pytest.approx(0.05)
    assert LossWindow().summary() == {"loss": 0.0, "caption_loss": 0.0, "gap": None, "gap_loss": None}


def test_only_logged_steps_read_the_losses_back(tmp_path, monkeypatch):
    """With log_every=2 the step window is summarised on steps 2, 4 and the last one only."""
    from regap.data import generate_synthetic
    from regap.train import TrainConfig, read_metrics, train
    from regap.train.step import LossWindow

    generate_synthetic(tmp_path / "data", 12, seed=0, image_size=56)
    calls = []
    original = LossWindow.summary
    monkeypatch.setattr(LossWindow, "summary", lambda self: calls.append(1) or original(self))
    config = TrainConfig.from_dict({
        "model": "tiny-random", "seed": 0, "data": {"json": str(tmp_path / "data" / "captions.json")},
        "global_batch_size": 2, "per_device_batch_size": 2, "lr": 1e-3, "max_steps": 5, "save_every": 5,
        "max_length": 128, "regap": {"lam": 1.0}, "cpu": True,
        "observe": {"progress": False, "gap_every": 0, "mir_every": 0, "log_every": 2},
    })
    result = train(config, tmp_path / "run")
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 4, 5] and len(calls) == 3
    assert all(isinstance(r["loss"], float) and isinstance(r["gap"], float) and r["alpha"] > 0 for r in rows)
    assert result.last_metrics["step"] == 5 and result.last_metrics["loss"] == rows[-1]["loss"]
