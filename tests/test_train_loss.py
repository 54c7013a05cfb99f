"""ReGap loss values on hand-made tensors, alpha warm-up, hooks, MoCa, stage-1 gradients."""

from __future__ import annotations

import math

import pytest
import torch

from regap.errors import RegapError
from regap.gap import frechet_distance, gaussian_stats
from regap.train.regap_loss import ReGapLoss, corpus_token_counts, text_stats_from_counts


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs with one torch thread (conftest.one_thread)."""


def _batch(image: torch.Tensor, text: torch.Tensor, pad: int = 0):
    """One sample: image tokens, then text tokens, then `pad` padding positions."""
    d = image.shape[-1]
    feats = torch.cat([image, text, torch.full((pad, d), 123.0)]).unsqueeze(0)
    n_img, n_txt = image.shape[0], text.shape[0]
    image_mask = torch.tensor([True] * n_img + [False] * (n_txt + pad)).unsqueeze(0)
    attention = torch.tensor([1] * (n_img + n_txt) + [0] * pad).unsqueeze(0)
    return feats, image_mask, attention


def test_centroid_gap_known_value():
    image = torch.tensor([[4.0, 0.0], [2.0, 0.0]])  # mean (3, 0)
    text = torch.tensor([[0.0, 1.0], [0.0, 3.0]])  # mean (0, 2), norms 1 and 3 -> alpha = 1/2
    feats, image_mask, attention = _batch(image, text, pad=2)  # padding must be ignored
    loss = ReGapLoss(lam=0.5, warmup_steps=1)
    out = loss(feats, image_mask, attention)
    expected = 0.25 * (3.0**2 + 2.0**2)
    assert out.gap.item() == pytest.approx(expected)
    assert out.loss.item() == pytest.approx(0.5 * expected)
    assert out.alpha == pytest.approx(0.5)
    assert (out.n_image_tokens, out.n_text_tokens) == (2, 2)


def test_batch_pooling_pools_tokens_over_samples():
    # Two samples with different token counts: batch pooling weighs tokens, not samples.
    feats = torch.zeros(2, 3, 1)
    feats[0, :, 0] = torch.tensor([6.0, 1.0, 1.0])  # image 6 | text 1, 1
    feats[1, :, 0] = torch.tensor([0.0, 0.0, 1.0])  # image 0, 0 | text 1
    image_mask = torch.tensor([[True, False, False], [True, True, False]])
    out = ReGapLoss(lam=1.0)(feats, image_mask, torch.ones(2, 3))
    assert out.gap.item() == pytest.approx((2.0 - 1.0) ** 2)  # image mean 6/3 = 2, text mean 1, alpha 1
    per_sample = ReGapLoss(lam=1.0, pooling="sample")(feats, image_mask, torch.ones(2, 3))
    assert per_sample.gap.item() == pytest.approx(((6 - 1) ** 2 + (0 - 1) ** 2) / 2)


def test_alpha_is_averaged_during_warmup_then_frozen():
    loss = ReGapLoss(lam=1.0, warmup_steps=2)
    image = torch.tensor([[1.0, 1.0]])
    f1 = _batch(image, torch.tensor([[2.0, 0.0], [2.0, 0.0]]))  # 2 tokens of norm 2
    f2 = _batch(image, torch.tensor([[4.0, 0.0], [4.0, 0.0], [0.0, 4.0], [4.0, 0.0]]))  # 4 tokens of norm 4
    assert loss(*f1).alpha == pytest.approx(1 / 2)
    loss.step()
    assert not loss.frozen
    # token-weighted running mean: (2*2 + 4*4) / 6 tokens
    assert loss(*f2).alpha == pytest.approx(6 / 20)
    loss.step()
    assert loss.frozen
    frozen = loss.alpha
    huge = _batch(image, torch.tensor([[100.0, 0.0]]))
    out = loss(*huge)
    assert out.alpha == pytest.approx(frozen) == pytest.approx(0.3)
    assert out.gap.item() == pytest.approx(0.3**2 * ((1 - 100) ** 2 + 1))  # uses the frozen alpha
    # The frozen alpha survives a state-dict round trip (it is saved in checkpoints).
    restored = ReGapLoss(lam=1.0, warmup_steps=2)
    restored.load_state_dict(loss.state_dict())
    assert restored.frozen and restored.alpha == pytest.approx(0.3)
    assert restored(*f1).alpha == pytest.approx(0.3)


def test_eval_mode_does_not_update_alpha():
    loss = ReGapLoss(lam=1.0, warmup_steps=5).eval()
    loss(*_batch(torch.ones(1, 2), torch.tensor([[3.0, 4.0]])))
    assert loss.alpha is None and float(loss.alpha_token_count) == 0


@pytest.mark.parametrize("distance", ["centroid", "centroid+norm", "frechet", "cosine"])
@pytest.mark.parametrize("pooling", ["batch", "sample"])
def test_batches_without_image_or_text_tokens_give_zero_not_nan(distance, pooling):
    loss = ReGapLoss(lam=1.0, distance=distance, pooling=pooling)
    feats = torch.randn(2, 5, 3, requires_grad=True)
    cases = {
        "no image": (torch.zeros(2, 5, dtype=torch.bool), torch.ones(2, 5)),
        "no text": (torch.ones(2, 5, dtype=torch.bool), torch.ones(2, 5)),
        "all padding": (torch.zeros(2, 5, dtype=torch.bool), torch.zeros(2, 5)),
    }
    for name, (image_mask, attention) in cases.items():
        out = loss(feats, image_mask, attention)
        assert out.loss.item() == 0.0 and torch.isfinite(out.loss), name
        out.loss.backward()
        assert torch.isfinite(feats.grad).all() and float(feats.grad.abs().sum()) == 0.0, name
        feats.grad = None


def test_centroid_plus_norm_adds_the_mean_norm_difference():
    image = torch.tensor([[3.0, 0.0], [-3.0, 0.0]])  # centroid 0, norm 3
    text = torch.tensor([[0.0, 1.0], [0.0, -1.0]])  # centroid 0, norm 1 -> alpha 1
    feats = _batch(image, text)
    assert ReGapLoss(distance="centroid")(*feats).gap.item() == pytest.approx(0.0)
    out = ReGapLoss(distance="centroid+norm", norm_weight=2.0)(*feats)
    assert out.gap.item() == pytest.approx(2.0 * (3.0 - 1.0) ** 2)


def test_cosine_distance():
    feats = _batch(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 5.0]]))
    assert ReGapLoss(distance="cosine")(*feats).gap.item() == pytest.approx(1.0)


def test_frechet_matches_the_gap_module_and_cached_text_stats():
    torch.manual_seed(0)
    image = torch.randn(40, 4, dtype=torch.float64) * 2 + 1
    text = torch.randn(30, 4, dtype=torch.float64)
    alpha = 1 / text.norm(dim=-1).mean()
    expected = alpha**2 * frechet_distance(text, image)
    feats = _batch(image, text)
    out = ReGapLoss(distance="frechet")(*feats)
    assert out.gap.item() == pytest.approx(expected.item(), rel=1e-8)
    cached = ReGapLoss(distance="frechet")
    mean, cov = gaussian_stats(text)
    cached.set_text_stats(mean, cov)
    assert cached(*feats).gap.item() == pytest.approx(expected.item(), rel=1e-8)
    # Differentiable on the image side.
    image_param = image.clone().requires_grad_(True)
    feats2 = _batch(image_param, text)
    cached(*feats2).loss.backward()
    assert torch.isfinite(image_param.grad).all() and image_param.grad.abs().sum() > 0


def test_gradient_pulls_image_centroid_toward_text():
    image = torch.tensor([[2.0, 0.0]], requires_grad=True)
    feats, image_mask, attention = _batch(image, torch.tensor([[0.0, 1.0]]))
    ReGapLoss()(feats, image_mask, attention).loss.backward()
    # d/dx |x - t|^2 = 2 (x - t): points from the text centroid to the image centroid
    assert torch.allclose(image.grad, torch.tensor([[4.0, -2.0]]))


def test_text_side_is_detached_by_default():
    text = torch.tensor([[0.0, 1.0]], requires_grad=True)
    feats, image_mask, attention = _batch(torch.tensor([[2.0, 0.0]]), text)
    ReGapLoss()(feats, image_mask, attention).loss.backward()
    assert text.grad is None or float(text.grad.abs().sum()) == 0.0


def test_invalid_options_are_rejected():
    with pytest.raises(RegapError, match="distance"):
        ReGapLoss(distance="l1")
    with pytest.raises(RegapError, match="pooling"):
        ReGapLoss(pooling="token")


def test_corpus_text_stats_equal_direct_token_statistics():
    from regap.models.random_tiny import tiny_random_lvlm
    from regap.models.templates import get_template

    model = tiny_random_lvlm(seed=1)
    conversations = [
        [{"role": "user", "content": "<image>\nDescribe."}, {"role": "assistant", "content": "A red circle."}],
        [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "one two three four"}],
    ]
    weight = model.llm.get_input_embeddings().weight.detach()
    counts = corpus_token_counts(conversations, model.tokenizer, get_template("plain", model.tokenizer),
                                 tokens_per_image=model.tokens_per_image, max_length=None, vocab_size=weight.shape[0])
    # Direct: embed every text token of the rendered inputs and take the Gaussian fit.
    from regap.models.inputs import tokenize_rendered

    template = get_template("plain", model.tokenizer)
    ids = []
    for messages in conversations:
        rendered = template.render(messages, add_generation_prompt=False)
        sample = tokenize_rendered(model.tokenizer, rendered.text, rendered.target_spans, model.tokens_per_image)
        ids += [t for t, is_image in zip(sample.ids, sample.image_positions) if not is_image]
    direct_mean, direct_cov = gaussian_stats(weight[torch.tensor(ids)])
    mean, cov = text_stats_from_counts(weight, counts)
    assert int(counts.sum()) == len(ids)
    assert torch.allclose(mean, direct_mean, atol=1e-10) and torch.allclose(cov, direct_cov, atol=1e-10)


# ---------------------------------------------------------------------- hooks and MoCa


def _tiny_inputs(model, n=2):
    from PIL import Image

    images = [[Image.new("RGB", (56, 56), (40 * i, 90, 200))] for i in range(n)]
    conversations = [[{"role": "user", "content": "<image>"}, {"role": "assistant", "content": f"A red circle {i}."}]
                     for i in range(n)]
    return model.build_inputs(conversations, images, template="plain")


def test_hidden_capture_matches_output_hidden_states():
    from regap.models.random_tiny import tiny_random_lvlm
    from regap.train.hooks import HiddenCapture

    model = tiny_random_lvlm(seed=0)
    inputs = _tiny_inputs(model)
    for layer in (0, 1, 2):
        capture = HiddenCapture(model.llm, layer)
        with torch.no_grad():
            out = model(inputs, output_hidden_states=True)
        captured = capture.pop()
        capture.remove()
        if layer < 2:  # the last hidden state is after the final norm in transformers
            assert torch.allclose(captured, out.hidden_states[layer]), layer
    with pytest.raises(RegapError, match="decoder layers"):
        HiddenCapture(model.llm, 3)


def test_moca_starts_as_identity_and_acts_only_on_image_positions(tmp_path):
    from regap.models.moca import MoCa, load_moca, save_moca
    from regap.models.random_tiny import tiny_random_lvlm

    model = tiny_random_lvlm(seed=0)
    inputs = _tiny_inputs(model)
    with torch.no_grad():
        reference = model(inputs, output_hidden_states=True).hidden_states
    model.set_moca(MoCa.for_llm(model.llm))
    moca = model.moca
    assert moca.is_identity() and moca.layers == [1, 2]
    with torch.no_grad():
        same = model(inputs, output_hidden_states=True).hidden_states
    assert torch.allclose(same[1], reference[1], atol=1e-6)
    with torch.no_grad():
        moca.shift[0].fill_(5.0)
        moved = model(inputs, output_hidden_states=True).hidden_states[1]
    image = inputs.image_mask
    assert torch.allclose(moved[image], reference[1][image] + 5.0, atol=1e-5)
    assert torch.allclose(moved[~image], reference[1][~image], atol=1e-6)
    path = save_moca(moca, tmp_path / "moca.safetensors")
    model.set_moca(None)  # removed: the model is untouched again
    with torch.no_grad():
        assert torch.allclose(model(inputs, output_hidden_states=True).hidden_states[1], reference[1], atol=1e-6)
    other = tiny_random_lvlm(seed=0)
    other.set_moca(load_moca(path, other.llm))
    assert other.moca.layers == [1, 2] and torch.equal(other.moca.shift, moca.shift.detach())
    with torch.no_grad():
        again = other(inputs, output_hidden_states=True).hidden_states[1]
    assert torch.allclose(again, moved, atol=1e-5)


# ---------------------------------------------------------------------- stage-1 gradients


def test_stage1_gradients_reach_only_the_projector_and_moca():
    from regap.models.random_tiny import tiny_random_lvlm
    from regap.train.config import TrainConfig
    from regap.train.hooks import HiddenCapture
    from regap.train.setup import setup_model
    from regap.train.step import compute_losses

    model = tiny_random_lvlm(seed=0)
    config = TrainConfig.from_dict({"model": "tiny-random", "data": {"json": "x.json"}, "moca": {"enabled": True}})
    module, moca = setup_model(model, config.resolved(), log=lambda m: None)
    regap = ReGapLoss(lam=1.0)
    capture = HiddenCapture(model.llm, 0)
    losses = compute_losses(module, _tiny_inputs(model), regap, capture)
    losses.total.backward()
    assert math.isfinite(losses.caption) and losses.gap is not None and losses.gap > 0
    for name, parameter in module.named_parameters():
        trains = name.startswith("lvlm.projector.") or name.startswith("lvlm.moca.")
        assert parameter.requires_grad == trains, name
        if trains:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None or float(parameter.grad.abs().sum()) == 0.0, name


def test_gradient_checkpointing_gives_the_same_gradients_with_moca_and_a_later_layer():
    """Checkpointing re-runs the decoder layers in backward (with or without their hooks,
    depending on the wrapper); the gradients must not change."""
    from regap.models.random_tiny import tiny_random_lvlm
    from regap.train.config import TrainConfig
    from regap.train.hooks import HiddenCapture
    from regap.train.setup import setup_model
    from regap.train.step import compute_losses

    grads = []
    for checkpointing in (False, True):
        model = tiny_random_lvlm(seed=0)
        config = TrainConfig.from_dict({"model": "tiny-random", "data": {"json": "x.json"}, "moca": {"enabled": True},
                                        "gradient_checkpointing": checkpointing})
        module, moca = setup_model(model, config.resolved(), log=lambda m: None)
        with torch.no_grad():
            moca.shift.normal_(0, 0.1)  # not the identity, so MoCa matters in the recomputation
        capture = HiddenCapture(model.llm, 1)
        from regap.train.hooks import decoder_layers

        assert bool(getattr(decoder_layers(model.llm)[0], "gradient_checkpointing", False)) == checkpointing
        losses = compute_losses(module, _tiny_inputs(model), ReGapLoss(lam=1.0), capture)
        losses.total.backward()
        grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad})
    for name, grad in grads[0].items():
        assert torch.allclose(grads[1][name], grad, atol=1e-6), name


# ---------------------------------------------------------------------- text tokens, layer-0 features


def test_after_image_text_tokens_leave_out_what_precedes_the_image():
    # prefix token (far away), image tokens, then text: only after-image ignores the prefix
    feats = torch.tensor([[[10.0, 0.0], [4.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]]])
    image_mask = torch.tensor([[False, True, True, False, False]])
    attention = torch.ones(1, 5)
    after = ReGapLoss(lam=1.0, warmup_steps=1, text_tokens="after-image")(feats, image_mask, attention)
    assert after.n_text_tokens == 2 and after.alpha == pytest.approx(0.5)
    assert after.gap.item() == pytest.approx(0.25 * (3.0**2 + 2.0**2))  # as test_centroid_gap_known_value
    every = ReGapLoss(lam=1.0, warmup_steps=1)(feats, image_mask, attention)  # the default: all-non-image
    assert every.n_text_tokens == 3 and every.gap.item() != pytest.approx(after.gap.item())
    with pytest.raises(RegapError, match="text-token mode"):
        ReGapLoss(text_tokens="before-image")


def _red():
    from PIL import Image

    return Image.new("RGB", (56, 56), "red")


def test_corpus_counts_follow_the_text_token_mode():
    from regap.models.random_tiny import tiny_random_lvlm
    from regap.models.templates import get_template

    model = tiny_random_lvlm(seed=1)
    conversations = [[{"role": "user", "content": "<image>\nDescribe."}, {"role": "assistant", "content": "A red circle."}]]
    template = get_template("chat", model.tokenizer)  # system prompt and user header come before the image
    vocab = model.llm.get_input_embeddings().weight.shape[0]
    counts = {mode: corpus_token_counts(conversations, model.tokenizer, template, tokens_per_image=model.tokens_per_image,
                                        max_length=None, vocab_size=vocab, text_tokens=mode)
              for mode in ("all-non-image", "after-image")}
    batch = model.build_inputs(conversations, [[_red()]], template="chat")
    for mode, count in counts.items():
        assert int(count.sum()) == int(batch.text_mask(mode).sum()), mode
    assert counts["after-image"].sum() < counts["all-non-image"].sum()


def test_layer0_features_come_from_the_forward_without_a_hook():
    from regap.models.random_tiny import tiny_random_lvlm
    from regap.train.config import TrainConfig
    from regap.train.hooks import HiddenCapture
    from regap.train.setup import make_regap, setup_model
    from regap.train.step import compute_losses

    model = tiny_random_lvlm(seed=0)
    config = TrainConfig.from_dict({"model": "tiny-random", "data": {"json": "x.json"}, "regap": {"lam": 1.0}}).resolved()
    module, _ = setup_model(model, config, log=lambda m: None)
    inputs = _tiny_inputs(model)
    regap, capture = make_regap(config, model, torch.device("cpu"))
    assert capture is None and not model.llm._forward_pre_hooks  # nothing hooked at layer 0
    out = module(inputs)
    assert torch.equal(out.inputs_embeds, model.embed(inputs)) and out.inputs_embeds.requires_grad
    without_hook = compute_losses(module, inputs, regap)
    hooked = HiddenCapture(model.llm, 0)
    with_hook = compute_losses(module, inputs, ReGapLoss(lam=1.0), hooked)
    hooked.remove()
    assert without_hook.gap == pytest.approx(with_hook.gap) and without_hook.gap > 0
    with pytest.raises(ValueError, match="HiddenCapture"):
        compute_losses(module, inputs, ReGapLoss(lam=1.0, layer=1))
