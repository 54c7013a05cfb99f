"""The ReGap regulariser: pull image-token features toward the text-token distribution.

total loss = captioning loss + lam * gap, where by default (the plainest reading of the
paper, whose exact formula is not public; docs/training.md) the gap is measured at layer 0, the LLM's input:

* image tokens: the projector outputs at the batch's ``image_mask`` positions;
* text tokens: the token embeddings at the text positions of ``text_tokens`` mode
  (`regap.models.inputs.text_positions`, the rule `regap gap` and the training probe use):
  ``all-non-image`` (default: every other attended position) or ``after-image``;
* gap = || alpha * mean(image) - alpha * mean(text) ||^2 with both means pooled over the
  (global) batch, and alpha = 1 / mean L2 norm of the text tokens.

alpha is averaged (token-weighted) over the first ``warmup_steps`` optimizer steps and
then frozen; its running sums live in buffers, so they are saved in checkpoints.

Options (``distance``):

* ``centroid`` (default) - squared L2 between the scaled centroids.
* ``centroid+norm`` - the above plus ``norm_weight * (alpha*mean|img| - alpha*mean|txt|)^2``.
  A centroid can match while image tokens keep norms far larger than any text token
  (a first experiment saw blank and noise images keep large norms under plain
  ``centroid``); this term closes the norm gap too.
* ``frechet`` - the exact, differentiable Fréchet distance between Gaussian fits,
  scaled by alpha^2 (``FD(aX, aY) = a^2 FD(X, Y)``; ``ridge`` is in unscaled units). At
  layer 0 with a frozen LLM the text side is the frozen embedding table, so its mean,
  covariance and covariance square root can be computed once over the caption corpus
  (:func:`corpus_token_counts`, :func:`text_stats_from_counts`, :meth:`ReGapLoss.set_text_stats`;
  `regap.train.text_stats` does it for a run); only the image side
  changes per step.
* ``cosine`` - 1 - cos(mean image, mean text); scale-free (alpha is not used).

``pooling="sample"`` computes the gap per sample (image tokens vs text tokens of the
same sample) and averages over the samples that have both. ``layer=k`` regularises the
output of decoder block k instead (captured with a forward hook, see
``regap.train.hooks``). The text side is the target: with ``detach_text`` (default) no
gradient flows through it, so the loss cannot shrink the gap by moving text toward image.

Under data parallelism the pooled sums and counts are all-reduced with gradients, so
the value and the gradients do not depend on the number of processes.

No host synchronisation: the forward pass, its backward and :meth:`ReGapLoss.step` keep
every count, alpha and "is there anything to compare" decision on the device (masks and
``torch.where`` instead of Python ``if``), so a GPU step never waits for the CPU to read a
value back. The numbers in :class:`GapOutput` (``alpha``, token counts) and the ``alpha``
/ ``frozen`` properties are read from the device only when asked for (logging steps).
The Fréchet distance keeps its host checks (its eigen-solvers synchronise anyway).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from regap.errors import RegapError
from regap.gap.distances import frechet_distance_from_stats, matrix_sqrt_psd
from regap.models.inputs import TEXT_TOKEN_MODES, text_positions, tokenize_rendered
from regap.train.config import DISTANCES, POOLINGS
from regap.train.distributed import all_reduce_sum


@dataclass
class GapOutput:
    """``loss = lam * gap`` (differentiable); ``gap`` is the differentiable gap itself.

    The other fields stay on the device (0-d tensors); the properties read them back, so
    only code that asks for them (logging) waits for the device.
    """

    loss: Tensor
    gap: Tensor
    alpha_tensor: Tensor  # float64; NaN while no text token was seen (alpha undefined)
    image_token_count: Tensor
    text_token_count: Tensor

    @property
    def alpha(self) -> float | None:
        value = float(self.alpha_tensor)
        return None if math.isnan(value) else value

    @property
    def n_image_tokens(self) -> int:
        return int(self.image_token_count)

    @property
    def n_text_tokens(self) -> int:
        return int(self.text_token_count)


def _zero_like(x: Tensor) -> Tensor:
    """A zero that stays connected to the graph (no NaN: x is finite where it is used)."""
    return x.sum() * 0.0


class ReGapLoss(nn.Module):
    """``lam * gap`` between image-token and text-token features; see the module docstring."""

    def __init__(
        self,
        lam: float = 1.0,
        *,
        layer: int = 0,
        distance: str = "centroid",
        pooling: str = "batch",
        warmup_steps: int = 10,
        norm_weight: float = 1.0,
        ridge: float = 0.0,
        detach_text: bool = True,
        text_tokens: str = "all-non-image",
    ) -> None:
        super().__init__()
        if text_tokens not in TEXT_TOKEN_MODES:
            raise RegapError(f"unknown ReGap text-token mode {text_tokens!r}; valid: {', '.join(TEXT_TOKEN_MODES)}")
        if distance not in DISTANCES:
            raise RegapError(f"unknown ReGap distance {distance!r}; valid: {', '.join(DISTANCES)}")
        if pooling not in POOLINGS:
            raise RegapError(f"unknown ReGap pooling {pooling!r}; valid: {', '.join(POOLINGS)}")
        if warmup_steps < 0 or layer < 0:
            raise RegapError("ReGap warmup_steps and layer must be >= 0")
        self.lam = float(lam)
        self.layer = layer
        self.distance = distance
        self.pooling = pooling
        self.warmup_steps = warmup_steps
        self.norm_weight = float(norm_weight)
        self.ridge = float(ridge)
        self.detach_text = detach_text
        self.text_tokens = text_tokens
        # alpha state: token-weighted running mean of text-token norms during warm-up.
        self.register_buffer("alpha_norm_sum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("alpha_token_count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("alpha_value", torch.zeros((), dtype=torch.float64))
        self.register_buffer("optimizer_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("alpha_frozen", torch.zeros((), dtype=torch.bool))
        # Cached text statistics (frechet); large, so not part of the state dict.
        self.register_buffer("text_mean", None, persistent=False)
        self.register_buffer("text_cov", None, persistent=False)
        self.register_buffer("text_sqrt_cov", None, persistent=False)

    # ------------------------------------------------------------------ alpha
    @property
    def frozen(self) -> bool:
        return bool(self.alpha_frozen)

    @property
    def alpha(self) -> float | None:
        """The current (or frozen) alpha; None before any text token was seen."""
        value = float(self.alpha_value)
        return value if value > 0 else None

    def step(self) -> None:
        """Call once after every optimizer step: advances the alpha warm-up (on the device)."""
        self.optimizer_steps += 1
        warm = (self.optimizer_steps >= self.warmup_steps) & (self.alpha_token_count > 0)
        self.alpha_frozen.logical_or_(warm)

    def _alpha_for(self, norm_sum: Tensor, count: Tensor) -> Tensor:
        """The alpha to use (float64, 0-d; NaN while undefined), updating the warm-up sums in
        training. Branch-free, so it never reads a value back to the host."""
        frozen = self.alpha_frozen.clone()
        total_sum, total_count = self.alpha_norm_sum + norm_sum, self.alpha_token_count + count
        known = total_sum > 0
        fresh = torch.where(known, total_count / total_sum, torch.full_like(total_sum, math.nan))
        alpha = torch.where(frozen, self.alpha_value, fresh)
        if self.training:
            self.alpha_norm_sum.copy_(torch.where(frozen, self.alpha_norm_sum, total_sum))
            self.alpha_token_count.copy_(torch.where(frozen, self.alpha_token_count, total_count))
            self.alpha_value.copy_(torch.where(~frozen & known, fresh, self.alpha_value))
            if self.warmup_steps == 0:
                self.alpha_frozen.logical_or_(known)
        return alpha

    # ------------------------------------------------------------------ text statistics
    def set_text_stats(self, mean: Tensor, cov: Tensor, sqrt_cov: Tensor | None = None) -> None:
        """Fix the text side of the Fréchet distance (unscaled mean and covariance).

        ``sqrt_cov`` (the square root of ``cov + ridge*I``) is computed here once when not given.
        """
        mean, cov = mean.detach().to(torch.float64), cov.detach().to(torch.float64)
        if sqrt_cov is None:
            eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
            with torch.no_grad():
                sqrt_cov = matrix_sqrt_psd(cov + self.ridge * eye if self.ridge else cov)
        self.text_mean, self.text_cov, self.text_sqrt_cov = mean, cov, sqrt_cov.detach().to(torch.float64)

    @property
    def has_text_stats(self) -> bool:
        return self.text_mean is not None

    # ------------------------------------------------------------------ forward
    def forward(self, features: Tensor, image_mask: Tensor, attention_mask: Tensor | None = None) -> GapOutput:
        """Gap between image and text tokens of ``features [B, L, d]``.

        Image tokens: ``image_mask & attention_mask``; text tokens: `text_positions` of the
        masks under this loss's ``text_tokens`` mode.
        """
        if features.ndim != 3:
            raise RegapError(f"ReGap features must be [batch, tokens, dim], got {tuple(features.shape)}")
        image_mask = image_mask.to(features.device).bool()
        attended = (attention_mask.to(features.device).bool() if attention_mask is not None
                    else torch.ones_like(image_mask))
        if image_mask.shape != features.shape[:2] or attended.shape != features.shape[:2]:
            raise RegapError(
                f"masks {tuple(image_mask.shape)} / {tuple(attended.shape)} do not match features {tuple(features.shape)}"
            )
        img_sel = (image_mask & attended).to(torch.float32)
        txt_sel = text_positions(attended, image_mask, self.text_tokens).to(torch.float32)
        x = features.float() if features.dtype in (torch.float16, torch.bfloat16) else features
        x_text = x.detach() if self.detach_text else x

        with torch.no_grad():
            norms = x.detach().norm(dim=-1)
            stats = torch.stack([(norms * txt_sel).sum().double(), txt_sel.sum().double()])
            stats = all_reduce_sum(stats, grad=False)
        alpha = self._alpha_for(stats[0], stats[1])

        if self.pooling == "batch":
            gap, n_img, n_txt = self._batch_gap(x, x_text, img_sel, txt_sel, alpha)
        else:
            gap, n_img, n_txt = self._sample_gap(x, x_text, img_sel, txt_sel, alpha)
        return GapOutput(self.lam * gap, gap, alpha, n_img, n_txt)

    # ------------------------------------------------------------------ batch pooling
    def _batch_gap(self, x: Tensor, x_text: Tensor, img_sel: Tensor, txt_sel: Tensor,
                   alpha: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        d = x.shape[-1]
        s_img = torch.einsum("bl,bld->d", img_sel.to(x.dtype), x)
        s_txt = torch.einsum("bl,bld->d", txt_sel.to(x.dtype), x_text)
        norm_img = (x.norm(dim=-1) * img_sel).sum()
        norm_txt = (x_text.norm(dim=-1) * txt_sel).sum()
        counts = torch.stack([img_sel.sum(), txt_sel.sum()]).to(x.dtype)
        packed = all_reduce_sum(torch.cat([s_img, s_txt, counts, torch.stack([norm_img, norm_txt]).to(x.dtype)]))
        s_img, s_txt = packed[:d], packed[d: 2 * d]
        n_img, n_txt = packed[2 * d].detach(), packed[2 * d + 1].detach()
        norm_img, norm_txt = packed[2 * d + 2], packed[2 * d + 3]
        zero = _zero_like(x)
        if self.distance == "frechet":
            return self._frechet_batch_gap(x, x_text, img_sel, txt_sel, s_img, s_txt, n_img, n_txt, alpha, zero)
        # Empty sides and an undefined alpha are masked out on the device (denominators
        # clamped so the masked branch stays finite and its gradient is exactly zero).
        usable = (n_img >= 1) & (n_txt >= 1)
        n_img_c, n_txt_c = n_img.clamp_min(1), n_txt.clamp_min(1)
        mu_img, mu_txt = s_img / n_img_c, s_txt / n_txt_c
        if self.distance == "cosine":
            gap = 1.0 - torch.nn.functional.cosine_similarity(mu_img, mu_txt, dim=0)
        else:
            usable = usable & ~alpha.isnan()
            a = alpha.nan_to_num(0.0).to(x.dtype)
            gap = a.square() * (mu_img - mu_txt).square().sum()
            if self.distance == "centroid+norm":
                gap = gap + self.norm_weight * (a * norm_img / n_img_c - a * norm_txt / n_txt_c).square()
        return torch.where(usable, gap, torch.zeros_like(gap)) + zero, n_img, n_txt

    def _frechet_batch_gap(self, x: Tensor, x_text: Tensor, img_sel: Tensor, txt_sel: Tensor, s_img: Tensor,
                           s_txt: Tensor, n_img_t: Tensor, n_txt_t: Tensor, alpha: Tensor,
                           zero: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        n_img, n_txt = float(n_img_t), float(n_txt_t)
        if n_img < 2 or (n_txt < 2 and not self._use_cached_text()) or n_txt < 1 or bool(alpha.isnan()):
            return zero, n_img_t, n_txt_t
        mu_img, mu_txt = s_img / n_img, s_txt / n_txt
        gap = self._frechet_batch(x, x_text, img_sel, txt_sel, mu_img, mu_txt, n_img, n_txt, alpha)
        return gap + zero, n_img_t, n_txt_t

    def _use_cached_text(self) -> bool:
        return self.distance == "frechet" and self.has_text_stats

    @staticmethod
    def _second_moment(x: Tensor, sel: Tensor, center: Tensor) -> Tensor:
        xc = (x.double() - center) * sel.unsqueeze(-1).double()
        flat = xc.reshape(-1, xc.shape[-1])
        return flat.mT @ flat

    def _global_cov(self, x: Tensor, sel: Tensor, mu: Tensor, n: float) -> Tensor:
        """Unbiased covariance over all processes, shifted by the (detached) mean for accuracy."""
        center = mu.detach().double()
        moment = all_reduce_sum(self._second_moment(x, sel, center))
        delta = mu.double() - center  # zero in value, carries the gradient of the mean
        return (moment - n * torch.outer(delta, delta)) / (n - 1)

    def _frechet_batch(self, x: Tensor, x_text: Tensor, img_sel: Tensor, txt_sel: Tensor, mu_img: Tensor,
                       mu_txt: Tensor, n_img: float, n_txt: float, alpha: Tensor) -> Tensor:
        cov_img = self._global_cov(x, img_sel, mu_img, n_img)
        if self._use_cached_text():
            mu_t, cov_t, sqrt_t = self.text_mean, self.text_cov, self.text_sqrt_cov
        else:
            cov_t, mu_t, sqrt_t = self._global_cov(x_text, txt_sel, mu_txt, n_txt), mu_txt.double(), None
        fd = frechet_distance_from_stats(mu_t, cov_t, mu_img.double(), cov_img, sqrt_cov1=sqrt_t, ridge=self.ridge)
        return (alpha.double().square() * fd).to(x.dtype)

    # ------------------------------------------------------------------ per-sample pooling
    def _sample_gap(self, x: Tensor, x_text: Tensor, img_sel: Tensor, txt_sel: Tensor,
                    alpha: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        n_img = img_sel.sum(1)
        n_txt = txt_sel.sum(1)
        totals = all_reduce_sum(torch.stack([n_img.sum(), n_txt.sum()]).double(), grad=False)
        zero = _zero_like(x)
        known = ~alpha.isnan() if self.distance != "cosine" else torch.ones_like(alpha, dtype=torch.bool)
        if self.distance == "frechet" and not bool(known):
            return zero, totals[0], totals[1]
        s_img = torch.einsum("bl,bld->bd", img_sel.to(x.dtype), x)
        s_txt = torch.einsum("bl,bld->bd", txt_sel.to(x.dtype), x_text)
        mu_img = s_img / n_img.clamp_min(1).unsqueeze(-1).to(x.dtype)
        mu_txt = s_txt / n_txt.clamp_min(1).unsqueeze(-1).to(x.dtype)
        if self.distance == "frechet":
            per_sample, valid = self._frechet_samples(x, x_text, img_sel, txt_sel, mu_img, mu_txt, n_img, n_txt, alpha)
        else:
            valid = (n_img > 0) & (n_txt > 0) & known
            if self.distance == "cosine":
                per_sample = 1.0 - torch.nn.functional.cosine_similarity(mu_img, mu_txt, dim=-1)
            else:
                a = alpha.nan_to_num(0.0).to(x.dtype)
                per_sample = a.square() * (mu_img - mu_txt).square().sum(-1)
                if self.distance == "centroid+norm":
                    norm_img = (x.norm(dim=-1) * img_sel).sum(1) / n_img.clamp_min(1)
                    norm_txt = (x_text.norm(dim=-1) * txt_sel).sum(1) / n_txt.clamp_min(1)
                    per_sample = per_sample + self.norm_weight * (a * norm_img - a * norm_txt).square()
        total = torch.where(valid, per_sample, torch.zeros_like(per_sample)).sum()
        packed = all_reduce_sum(torch.stack([total, valid.sum().to(total.dtype)]))
        # No valid sample: the total is 0 and so is 0 / 1 (no read-back to test for it).
        return packed[0] / packed[1].clamp_min(1) + zero, totals[0], totals[1]

    def _frechet_samples(self, x: Tensor, x_text: Tensor, img_sel: Tensor, txt_sel: Tensor, mu_img: Tensor,
                         mu_txt: Tensor, n_img: Tensor, n_txt: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
        cached = self.has_text_stats
        valid = (n_img >= 2) & ((n_txt >= 1) if cached else (n_txt >= 2))
        values = []
        for b in range(x.shape[0]):
            if not bool(valid[b]):
                values.append(_zero_like(x))
                continue
            xi = x[b][img_sel[b].bool()].double()
            ci = xi - mu_img[b].detach().double()
            cov_i = (ci.mT @ ci) / (xi.shape[0] - 1)
            if cached:
                mu_t, cov_t, sqrt_t = self.text_mean, self.text_cov, self.text_sqrt_cov
            else:
                xt = x_text[b][txt_sel[b].bool()].double()
                ct = xt - mu_txt[b].detach().double()
                mu_t, cov_t, sqrt_t = mu_txt[b].double(), (ct.mT @ ct) / (xt.shape[0] - 1), None
            fd = frechet_distance_from_stats(mu_t, cov_t, mu_img[b].double(), cov_i, sqrt_cov1=sqrt_t, ridge=self.ridge)
            values.append((alpha.double().square() * fd).to(x.dtype))
        return torch.stack(values), valid

    def extra_repr(self) -> str:
        return (f"lam={self.lam}, layer={self.layer}, distance={self.distance!r}, pooling={self.pooling!r}, "
                f"warmup_steps={self.warmup_steps}, text_tokens={self.text_tokens!r}, alpha={self.alpha}, "
                f"frozen={self.frozen}")


# ---------------------------------------------------------------------- corpus text statistics


def corpus_token_counts(
    conversations: Iterable[list[dict[str, str]]], tokenizer: Any, template: Any, *,
    tokens_per_image: int, max_length: int | None, vocab_size: int, text_tokens: str = "all-non-image",
) -> Tensor:
    """How often each token id sits at a text position (`text_positions` under ``text_tokens``)
    of the rendered training inputs."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for messages in conversations:
        rendered = template.render(messages, add_generation_prompt=False)
        sample = tokenize_rendered(tokenizer, rendered.text, rendered.target_spans, tokens_per_image)
        if not sample.ids:
            continue
        image = torch.tensor(sample.image_positions[:max_length], dtype=torch.bool).unsqueeze(0)
        text = text_positions(torch.ones_like(image), image, text_tokens)[0]
        ids = torch.tensor(sample.ids[:max_length], dtype=torch.long)[text]
        if ids.numel():
            counts += torch.bincount(ids, minlength=vocab_size)[:vocab_size].double()
    return counts


@torch.no_grad()
def text_stats_from_counts(embedding_weight: Tensor, counts: Tensor, *, chunk: int = 8192) -> tuple[Tensor, Tensor]:
    """Mean and unbiased covariance (float64) of the embeddings of a token multiset.

    Exactly the statistics of the corpus's text tokens at layer 0, computed from the
    embedding table and token counts instead of materialising every token.
    """
    used = counts.nonzero().flatten()
    if used.numel() == 0:
        raise RegapError("the caption corpus has no text tokens")
    weights = counts[used].to(embedding_weight.device)
    n = float(weights.sum())
    if n < 2:
        raise RegapError("the caption corpus needs at least 2 text tokens for a covariance")
    table = embedding_weight[used.to(embedding_weight.device)].double()
    mean = (weights.unsqueeze(-1) * table).sum(0) / n
    d = table.shape[-1]
    cov = torch.zeros(d, d, dtype=torch.float64, device=table.device)
    for start in range(0, table.shape[0], chunk):
        centred = table[start: start + chunk] - mean
        cov += centred.mT @ (weights[start: start + chunk].unsqueeze(-1) * centred)
    return mean, 0.5 * (cov + cov.mT) / (n - 1)
