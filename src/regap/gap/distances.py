"""Distances between an image-token cloud and a text-token cloud.

Token clouds are tensors shaped ``[..., N, d]``: N tokens of width d, with optional
leading batch dims (for example one entry per LLM layer). Everything here is plain
torch and differentiable with autograd, so the ReGap loss can reuse it.

The Fréchet distance is computed *exactly* through a Cholesky factor and a symmetric
eigenvalue solve (``eigvalsh``; ``eigh`` for singular covariances), never with an
iterative matrix square root: iterative
schemes need a convergence check to be trusted, and the one in the MIR reference
code silently returns its input (see :func:`reference_fast_frechet_from_stats`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from regap.errors import RegapError

#: Default compute dtype for the Fréchet distance: float32 loses ~1e-7 relative
#: accuracy in covariances of 50k tokens, which is visible in MIR's 4th digit.
DEFAULT_DTYPE = torch.float64

#: Relative floor used only for the *gradient* of sqrt at (near-)zero eigenvalues.
#: d sqrt(x)/dx = 1/(2 sqrt x) is unbounded at x = 0, and singular covariances
#: (fewer tokens than dimensions) have many eigenvalues that are zero up to
#: rounding. The value is always the exact sqrt(clamp(x, 0)); the backward pass
#: uses 1/(2 sqrt(x + eps)) with eps = GRAD_EPS * max eigenvalue.
GRAD_EPS = 1e-12

#: Tokens per chunk when accumulating covariances, so a float32 cloud of 57,600 x
#: 4096 tokens is never copied to float64 in one piece (saves ~2 GB).
CHUNK_TOKENS = 16384


def check_tokens(
    x: Tensor, name: str = "tokens", *, layer: int | None = None, min_tokens: int = 1
) -> None:
    """Raise RegapError unless ``x`` is a finite, non-empty ``[..., N, d]`` float tensor.

    ``min_tokens=2`` is needed wherever an unbiased covariance (divide by N-1) is taken.
    """
    where = f"{name} at layer {layer}" if layer is not None else name
    if not isinstance(x, Tensor):
        raise RegapError(f"{where} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 2:
        raise RegapError(f"{where} must have shape [..., N, d], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise RegapError(f"{where} must be a floating-point tensor, got {x.dtype}")
    if x.shape[-2] == 0 or x.shape[-1] == 0 or x.numel() == 0:
        raise RegapError(f"no {where}: got an empty tensor of shape {tuple(x.shape)}")
    if x.shape[-2] < min_tokens:
        raise RegapError(
            f"{where}: need at least {min_tokens} tokens for a covariance, got {x.shape[-2]}"
        )
    if not bool(torch.isfinite(x).all()):
        raise RegapError(f"{where} contain NaN or inf values")


def _at_least_float32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _sym(a: Tensor) -> Tensor:
    return 0.5 * (a + a.mT)


def _trace(a: Tensor) -> Tensor:
    return torch.diagonal(a, dim1=-2, dim2=-1).sum(-1)


def _sqrt_nonneg(values: Tensor) -> Tensor:
    """sqrt(clamp(values, 0)) with a bounded gradient (see GRAD_EPS)."""
    clamped = values.clamp(min=0)
    root = clamped.sqrt()
    if not clamped.requires_grad:
        return root
    floor = clamped.detach().amax(-1, keepdim=True).clamp_min(torch.finfo(values.dtype).tiny)
    smooth = (clamped + GRAD_EPS * floor).sqrt()
    # Value of `root`, gradient of `smooth`.
    return smooth + (root - smooth).detach()


def _check_finite(value: Tensor, what: str) -> Tensor:
    if not bool(torch.isfinite(value).all()):
        raise RegapError(f"{what} is not finite ({value.detach().flatten()[:4].tolist()})")
    return value


def text_centric_scale(text_tokens: Tensor) -> Tensor:
    """alpha = 1 / mean L2 norm of the text tokens, shape ``[...]``.

    Scaling both modalities by alpha makes gaps comparable across layers and models
    whose hidden-state norms differ by orders of magnitude.
    """
    check_tokens(text_tokens, "text tokens")
    mean_norm = _at_least_float32(text_tokens).norm(dim=-1).mean(-1)
    if bool((mean_norm <= 0).any()):
        raise RegapError("text tokens all have zero norm: the text-centric scale is undefined")
    return 1.0 / mean_norm


def centroid_gap(
    image_tokens: Tensor, text_tokens: Tensor, alpha: Tensor | float | None = None
) -> Tensor:
    """||alpha*mean(image) - alpha*mean(text)||^2, shape ``[...]``.

    ``alpha=None`` uses :func:`text_centric_scale` of ``text_tokens``. Computed in at
    least float32 even for half-precision inputs.
    """
    check_tokens(image_tokens, "image tokens")
    check_tokens(text_tokens, "text tokens")
    img, txt = _at_least_float32(image_tokens), _at_least_float32(text_tokens)
    if alpha is None:
        alpha = text_centric_scale(txt)
    alpha = torch.as_tensor(alpha, dtype=txt.dtype, device=txt.device)
    diff = img.mean(-2) - txt.mean(-2)
    return _check_finite(alpha.square() * diff.square().sum(-1), "centroid gap")


def cosine_centroid_distance(image_tokens: Tensor, text_tokens: Tensor) -> Tensor:
    """1 - cos(mean(image), mean(text)), shape ``[...]``; scale-free, so no alpha.

    A zero centroid has no direction; torch's cosine_similarity then returns 0 (its
    eps guard), giving distance 1.
    """
    check_tokens(image_tokens, "image tokens")
    check_tokens(text_tokens, "text tokens")
    mi = _at_least_float32(image_tokens).mean(-2)
    mt = _at_least_float32(text_tokens).mean(-2)
    return 1.0 - torch.nn.functional.cosine_similarity(mi, mt, dim=-1)


#: Column blocks of the covariance product. Only blocks on or above the diagonal are
#: multiplied, (k+1)/2k of a full product: the symmetric rank-k update BLAS calls syrk,
#: which torch does not expose. 8 blocks keep each product wide enough for BLAS.
GRAM_BLOCKS = 8
_MIN_BLOCK_WIDTH = 256


def _blocks(d: int) -> list[tuple[int, int]]:
    """(start, stop) of the column blocks used by the symmetric products below."""
    width = -(-d // max(1, min(GRAM_BLOCKS, d // _MIN_BLOCK_WIDTH)))
    return [(start, min(start + width, d)) for start in range(0, d, width)]


def _add_gram(out: Tensor, xc: Tensor) -> None:
    """out += xc^T xc, multiplying only the upper block triangle and mirroring it."""
    d = xc.shape[-1]
    for start, stop in _blocks(d):
        row = xc[..., start:stop].mT @ xc[..., start:]
        out[..., start:stop, start:] += row
        if stop < d:
            out[..., stop:, start:stop] += row[..., stop - start :].mT


def gaussian_stats(
    x: Tensor, *, dtype: torch.dtype = DEFAULT_DTYPE, chunk_tokens: int = CHUNK_TOKENS
) -> tuple[Tensor, Tensor]:
    """Mean ``[..., d]`` and unbiased covariance ``[..., d, d]`` of tokens ``[..., N, d]``.

    Two passes (mean, then centred products) for accuracy; tokens are cast to
    ``dtype`` one chunk at a time to bound memory. Without autograd the centred
    product fills only the upper block triangle (about half the flops of a full one).
    """
    check_tokens(x, "tokens", min_tokens=2)
    n = x.shape[-2]
    chunks = x.split(chunk_tokens, dim=-2)
    mean = sum(c.to(dtype).sum(-2) for c in chunks) / n
    if x.requires_grad and torch.is_grad_enabled():
        cov: Tensor | None = None
        for c in chunks:
            xc = c.to(dtype) - mean.unsqueeze(-2)
            part = xc.mT @ xc
            cov = part if cov is None else cov + part
        assert cov is not None
        return mean, _sym(cov / (n - 1))
    d = x.shape[-1]
    cov = torch.zeros(*x.shape[:-2], d, d, dtype=dtype, device=x.device)
    for c in chunks:
        _add_gram(cov, c.to(dtype) - mean.unsqueeze(-2))
    return mean, _sym(cov / (n - 1))  # diagonal blocks from gemm are symmetric only to rounding


def _eigh(a: Tensor) -> tuple[Tensor, Tensor]:
    try:
        return torch.linalg.eigh(a)
    except torch.linalg.LinAlgError as err:  # pragma: no cover - LAPACK failure
        raise RegapError(f"eigendecomposition of a covariance failed: {err}") from err


def _eigvalsh(a: Tensor) -> Tensor:
    try:
        return torch.linalg.eigvalsh(a)
    except torch.linalg.LinAlgError as err:  # pragma: no cover - LAPACK failure
        raise RegapError(f"eigendecomposition of S1^1/2 S2 S1^1/2 failed: {err}") from err


def matrix_sqrt_psd(cov: Tensor) -> Tensor:
    """Symmetric PSD square root V sqrt(clamp(lambda, 0)) V^T, batched over ``[...]``.

    Clamping absorbs the tiny negative eigenvalues that rounding gives singular
    covariances. Gradients through ``eigh`` need distinct eigenvalues; callers that
    keep this side fixed (the ReGap text target) should compute it once under
    ``torch.no_grad()`` and pass it as ``sqrt_cov1``.
    """
    evals, evecs = _eigh(_sym(cov))
    return _sym((evecs * _sqrt_nonneg(evals).unsqueeze(-2)) @ evecs.mT)


def _congruence_lower(factor: Tensor, cov: Tensor) -> Tensor:
    """L^T S L for lower-triangular L and symmetric S, skipping L's zero blocks.

    Without autograd: S L column block j needs only rows >= j of L, and the symmetric
    result only its upper block triangle, about 1.7 n^3 flops instead of 4 n^3 for two
    full products (torch has no trmm).
    """
    if torch.is_grad_enabled() and (factor.requires_grad or cov.requires_grad):
        return _sym(factor.mT @ cov @ factor)
    blocks = _blocks(cov.shape[-1])
    right = torch.empty_like(cov)  # S L
    for start, stop in blocks:
        right[..., start:stop] = cov[..., :, start:] @ factor[..., start:, start:stop]
    out = torch.empty_like(cov)
    for start, stop in blocks:
        row = factor[..., start:, start:stop].mT @ right[..., start:, start:]
        out[..., start:stop, start:] = row
        out[..., stop:, start:stop] = row[..., stop - start :].mT
    return _sym(out)


#: How Tr (S1 S2)^{1/2} is computed; see :func:`trace_sqrt_product`.
TRACE_METHODS = ("auto", "cholesky", "eigh")


def trace_sqrt_product(
    cov1: Tensor, cov2: Tensor, *, sqrt_cov1: Tensor | None = None, method: str = "auto"
) -> Tensor:
    """Tr (S1 S2)^{1/2}: the sum of square roots of the eigenvalues of S1 S2.

    S1 S2 is similar to a symmetric PSD matrix, so those eigenvalues are real and
    non-negative and one ``eigvalsh`` of that matrix gives them exactly:

    * ``cholesky``: S1 = L L^T, matrix L^T S2 L (a Cholesky and two products; the
      fastest, needs S1 positive definite);
    * ``eigh``: S1^{1/2} S2 S1^{1/2} with S1^{1/2} from an eigendecomposition
      (works for singular S1; used when ``sqrt_cov1`` is given);
    * ``auto``: Cholesky of S1; when S1 is not positive definite (fewer tokens than
      dimensions) and no gradient is asked for, Cholesky of S2 instead (S2 S1 has the
      eigenvalues of S1 S2); eigh only when neither is positive definite. Why: in MIR's
      protocol at d = 4,096 the text side has fewer tokens than dimensions (100 pairs x
      ~30 tokens) while the image side has 57,600, and the eigh of a 4096 x 4096
      matrix costs several times the Cholesky route on a CPU.

    Backprop to ``cov2`` goes through ``eigvalsh`` only, which is stable even for
    repeated eigenvalues.
    """
    if method not in TRACE_METHODS:
        raise RegapError(f"unknown trace method {method!r}; choose one of {', '.join(TRACE_METHODS)}")
    if sqrt_cov1 is None and method != "eigh":
        factor, info = torch.linalg.cholesky_ex(cov1)
        if bool((info == 0).all()):
            inner = _congruence_lower(factor, cov2)
            return _sqrt_nonneg(_eigvalsh(inner)).sum(-1)
        if method == "cholesky":
            raise RegapError(
                "the first covariance is not positive definite (fewer tokens than dimensions?);"
                " add a ridge or use method='eigh'"
            )
        if not (torch.is_grad_enabled() and (cov1.requires_grad or cov2.requires_grad)):
            factor, info = torch.linalg.cholesky_ex(cov2)
            if bool((info == 0).all()):
                return _sqrt_nonneg(_eigvalsh(_congruence_lower(factor, cov1))).sum(-1)
    root1 = matrix_sqrt_psd(cov1) if sqrt_cov1 is None else sqrt_cov1
    inner = _sym(root1 @ cov2 @ root1)
    return _sqrt_nonneg(_eigvalsh(inner)).sum(-1)


def _prepare_stats(
    mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor, ridge: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if ridge < 0:
        raise RegapError(f"ridge must be >= 0, got {ridge}")
    d = mu1.shape[-1]
    for name, mu, cov in (("first", mu1, cov1), ("second", mu2, cov2)):
        if mu.shape[-1] != d or cov.shape[-2:] != (d, d):
            raise RegapError(
                f"{name} Gaussian has mean {tuple(mu.shape)} and covariance {tuple(cov.shape)};"
                f" expected [..., {d}] and [..., {d}, {d}]"
            )
    mu1, cov1, mu2, cov2 = (t.to(dtype) for t in (mu1, cov1, mu2, cov2))
    cov1, cov2 = _sym(cov1), _sym(cov2)
    if ridge:
        eye = torch.eye(d, dtype=dtype, device=cov1.device)
        cov1, cov2 = cov1 + ridge * eye, cov2 + ridge * eye
    return mu1, cov1, mu2, cov2


def frechet_distance_from_stats(
    mu1: Tensor,
    cov1: Tensor,
    mu2: Tensor,
    cov2: Tensor,
    *,
    sqrt_cov1: Tensor | None = None,
    ridge: float = 0.0,
    dtype: torch.dtype = DEFAULT_DTYPE,
    method: str = "auto",
) -> Tensor:
    """Exact FD = ||mu1-mu2||^2 + Tr S1 + Tr S2 - 2 Tr (S1 S2)^{1/2}, shape ``[...]``.

    ``ridge`` is added to both covariance diagonals (regularises singular
    covariances). ``sqrt_cov1``, if given, must be ``matrix_sqrt_psd(cov1 + ridge*I)``
    in ``dtype``; it lets a fixed target distribution skip its eigh on every call.
    ``method`` picks how the trace term is computed (:func:`trace_sqrt_product`).
    Rounding can make the result slightly negative (~1e-12 relative) for identical
    distributions; it is not clamped so gradients stay honest.
    """
    mu1, cov1, mu2, cov2 = _prepare_stats(mu1, cov1, mu2, cov2, ridge, dtype)
    if sqrt_cov1 is not None:
        if sqrt_cov1.shape[-2:] != cov1.shape[-2:]:
            raise RegapError(
                f"sqrt_cov1 has shape {tuple(sqrt_cov1.shape)}, cov1 {tuple(cov1.shape)}"
            )
        sqrt_cov1 = sqrt_cov1.to(dtype)
    diff = mu1 - mu2
    fd = (
        diff.square().sum(-1)
        + _trace(cov1)
        + _trace(cov2)
        - 2.0 * trace_sqrt_product(cov1, cov2, sqrt_cov1=sqrt_cov1, method=method)
    )
    return _check_finite(fd, "Fréchet distance")


def frechet_distance(
    x1: Tensor, x2: Tensor, *, ridge: float = 0.0, dtype: torch.dtype = DEFAULT_DTYPE
) -> Tensor:
    """Exact Fréchet distance between Gaussian fits of two token clouds ``[..., N, d]``."""
    mu1, cov1 = gaussian_stats(x1, dtype=dtype)
    mu2, cov2 = gaussian_stats(x2, dtype=dtype)
    return frechet_distance_from_stats(mu1, cov1, mu2, cov2, ridge=ridge, dtype=dtype)


def reference_fast_frechet_from_stats(
    mu1: Tensor,
    cov1: Tensor,
    mu2: Tensor,
    cov2: Tensor,
    *,
    ridge: float = 0.0,
    dtype: torch.dtype = DEFAULT_DTYPE,
) -> Tensor:
    """REFERENCE-COMPATIBILITY ONLY: ||mu1-mu2||^2 + Tr S1 + Tr S2 - 2 Tr(S1 S2).

    Reproduces the MIR reference code's default "fast" mode. Its coupled
    Newton-Schulz-style iteration starts at Y = A, Z = I, so every step gives
    Y = (A + I^{-1} A)/2 = A and Z = (I + A^{-1} A)/2 = I: it returns A = S1 S2
    itself, and the "square root" term is Tr(S1 S2).

    This is NOT a Fréchet distance: Tr(S1 S2) has the units of variance squared
    while Tr S1 + Tr S2 are variances, so the value depends on the token scale in a
    non-homogeneous way, it is not zero for identical distributions (it is
    2 Tr S - 2 Tr S^2), and it can be negative (e.g. S1 = S2 = 2I). Use it only to
    compare against numbers published with the reference code.
    """
    mu1, cov1, mu2, cov2 = _prepare_stats(mu1, cov1, mu2, cov2, ridge, dtype)
    diff = mu1 - mu2
    tr_product = (cov1 * cov2).sum((-2, -1))  # Tr(S1 S2) for symmetric S1, S2
    value = diff.square().sum(-1) + _trace(cov1) + _trace(cov2) - 2.0 * tr_product
    return _check_finite(value, "reference-fast Fréchet value")


def reference_fast_frechet(
    x1: Tensor, x2: Tensor, *, ridge: float = 0.0, dtype: torch.dtype = DEFAULT_DTYPE
) -> Tensor:
    """Token-cloud version of :func:`reference_fast_frechet_from_stats` (not a distance)."""
    mu1, cov1 = gaussian_stats(x1, dtype=dtype)
    mu2, cov2 = gaussian_stats(x2, dtype=dtype)
    return reference_fast_frechet_from_stats(mu1, cov1, mu2, cov2, ridge=ridge, dtype=dtype)
