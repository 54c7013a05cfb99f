"""`TrainStep` (one micro-batch: losses, backward, optimizer step) and the probe's text-token mode."""

from __future__ import annotations

import json

import pytest
import torch

from regap.train.regap_loss import ReGapLoss


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs with one torch thread (conftest.one_thread)."""


def _setup(**config):
    from regap.models.random_tiny import tiny_random_lvlm
    from regap.train.config import TrainConfig
    from regap.train.setup import make_optimizer, setup_model

    model = tiny_random_lvlm(seed=0)
    cfg = TrainConfig.from_dict({"model": "tiny-random", "data": {"json": "x.json"}, "lr": 1e-2, **config}).resolved()
    module, _ = setup_model(model, cfg, log=lambda m: None)
    return model, module, make_optimizer(module, cfg)


def _inputs(model, n=2):
    from PIL import Image

    images = [[Image.new("RGB", (56, 56), (40 * i, 90, 200))] for i in range(n)]
    conversations = [[{"role": "user", "content": "<image>"}, {"role": "assistant", "content": f"A red circle {i}."}]
                     for i in range(n)]
    return model.build_inputs(conversations, images, template="plain")


def test_a_train_step_steps_the_optimizer_and_the_regap_warmup():
    from regap.train.step import TrainStep

    model, module, optimizer = _setup()
    before = {k: p.detach().clone() for k, p in model.projector.named_parameters()}
    regap = ReGapLoss(lam=1.0, warmup_steps=1)
    outcome = TrainStep(module, optimizer, regap=regap, max_grad_norm=1.0)(_inputs(model))
    assert outcome.stepped and outcome.lr_factor == pytest.approx(1.0)
    assert outcome.losses.gap is not None and outcome.losses.gap > 0 and float(outcome.grad_norm) > 0
    assert int(regap.optimizer_steps) == 1 and regap.frozen
    assert any(not torch.equal(before[k], p) for k, p in model.projector.named_parameters())
    assert all(p.grad is None for p in model.projector.parameters())  # zeroed for the next step


def test_a_non_finite_loss_stops_before_backward_with_the_callers_explanation():
    from regap.train.step import NonFiniteLossError, TrainStep

    model, module, optimizer = _setup()
    before = {k: p.detach().clone() for k, p in model.projector.named_parameters()}
    with torch.no_grad():
        model.llm.get_input_embeddings().weight.fill_(float("nan"))  # frozen: the text embeddings poison the loss
    with pytest.raises(NonFiniteLossError, match="step 7 loss"):
        TrainStep(module, optimizer)(_inputs(model), explain=lambda losses, what: f"step 7 {what}")
    assert all(torch.equal(before[k], p) for k, p in model.projector.named_parameters())


def test_probe_text_tokens_name_their_mode_and_change_the_numbers():
    from regap.train.observe import probe_gaps

    model, module, _ = _setup()
    conversations = [[{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A circle."}]]
    batch = model.build_inputs(conversations * 2, [[_image()], [_image()]], template="chat")  # text before the image
    every = probe_gaps(module, [batch], torch.device("cpu"), with_mir=False)
    after = probe_gaps(module, [batch], torch.device("cpu"), with_mir=False, text_tokens="after-image")
    assert every["probe_text_tokens"] == "all-non-image" and after["probe_text_tokens"] == "after-image"
    assert every["probe_gap0"] != pytest.approx(after["probe_gap0"])


def _image():
    from PIL import Image

    return Image.new("RGB", (56, 56), "blue")


def test_training_rows_and_provenance_record_the_text_token_modes(tmp_path):
    from regap.data import generate_synthetic
    from regap.train import TrainConfig, read_metrics, train

    generate_synthetic(tmp_path / "data", 8, seed=0, image_size=56)
    config = TrainConfig.from_dict({
        "model": "tiny-random", "seed": 0, "data": {"json": str(tmp_path / "data" / "captions.json")},
        "global_batch_size": 4, "max_steps": 2, "save_every": 2, "max_length": 128, "regap": {"lam": 1.0},
        "cpu": True, "observe": {"progress": False, "gap_every": 1, "mir_every": 2, "probe_size": 4,
                                 "text_tokens": "after-image"},
    })
    train(config, tmp_path / "run")
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["probe_text_tokens"] for r in rows] == ["after-image", "after-image"] and "probe_mir" in rows[-1]
    provenance = json.loads((tmp_path / "run" / "provenance.json").read_text())
    assert provenance["text_tokens"] == {"regap": "all-non-image", "probe": "after-image"}


def test_logits_only_at_target_positions_leave_the_loss_and_gradients_unchanged():
    """The stage-1 step projects onto the vocabulary only where a caption token is predicted
    (`logits_to_keep`): the same loss and projector gradients as the full projection, fewer rows."""
    from regap.train.step import caption_loss_terms, compute_losses, target_positions

    model, module, _ = _setup()
    inputs = _inputs(model, n=3)
    positions = target_positions(inputs.labels)
    kept = compute_losses(module, inputs, positions=positions)
    kept.total.backward()
    kept_grads = [p.grad.clone() for p in model.projector.parameters()]
    model.zero_grad(set_to_none=True)
    out = module(inputs)  # every position
    loss_sum, count = caption_loss_terms(out.logits, inputs.labels)
    (loss_sum / count).backward()
    assert out.logits.shape[1] == inputs.input_ids.shape[1] > len(positions)
    assert module(inputs, logits_positions=positions).logits.shape[1] == len(positions)
    assert kept.caption == pytest.approx(float(loss_sum / count), rel=1e-5)
    for kept_grad, parameter in zip(kept_grads, model.projector.parameters()):
        torch.testing.assert_close(kept_grad, parameter.grad, rtol=1e-4, atol=1e-7)
