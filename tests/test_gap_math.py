"""Correctness of regap.gap: Fréchet distance, MIR protocol, bootstrap statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from hidden_states import synthetic_store

from regap.errors import RegapError
from regap.gap import (
    centroid_gap,
    cosine_centroid_distance,
    frechet_distance,
    frechet_distance_from_stats,
    gaussian_stats,
    layer_zero_report,
    matrix_sqrt_psd,
    mir,
    mir_per_layer,
    norm_outlier_mask,
    reference_fast_frechet,
    reference_fast_frechet_from_stats,
    replace_norm_outliers,
    text_centric_scale,
)

torch.set_num_threads(min(2, torch.get_num_threads()))
F64 = torch.float64


def _cloud(gen: torch.Generator, n: int, d: int, shift: float = 0.0) -> torch.Tensor:
    """Correlated tokens Z @ A + shift with a random A (full rank, non-commuting)."""
    a = torch.randn(d, d, generator=gen, dtype=F64) / math.sqrt(d) + 0.3 * torch.eye(d, dtype=F64)
    return torch.randn(n, d, generator=gen, dtype=F64) @ a + shift


def _spd(gen: torch.Generator, eigenvalues: list[float]) -> torch.Tensor:
    d = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=F64)) @ q.T


def _scipy_fd(x1: np.ndarray, x2: np.ndarray) -> float:
    """Independent reference: np.cov + scipy.linalg.sqrtm of S1 @ S2."""
    mu1, mu2 = x1.mean(0), x2.mean(0)
    s1, s2 = np.cov(x1, rowvar=False), np.cov(x2, rowvar=False)
    tr_covmean = np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


# --------------------------------------------------------------------------- Fréchet


def test_frechet_matches_closed_form_for_diagonal_gaussians() -> None:
    gen = torch.Generator().manual_seed(0)
    d = 6
    mu1, mu2 = torch.randn(d, generator=gen, dtype=F64), torch.randn(d, generator=gen, dtype=F64)
    a, b = torch.rand(d, generator=gen, dtype=F64) + 0.1, torch.rand(d, generator=gen, dtype=F64)
    fd = frechet_distance_from_stats(mu1, torch.diag(a), mu2, torch.diag(b))
    expected = (mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum()
    assert fd.item() == pytest.approx(expected.item(), rel=1e-12)


def test_frechet_matches_scipy_sqrtm_in_float64() -> None:
    gen = torch.Generator().manual_seed(1)
    x1, x2 = _cloud(gen, 300, 24), _cloud(gen, 250, 24, shift=0.5)
    ours = frechet_distance(x1, x2).item()
    ref = _scipy_fd(x1.numpy(), x2.numpy())
    assert abs(ours - ref) / abs(ref) < 1e-8


def test_frechet_zero_translation_invariant_and_symmetric() -> None:
    gen = torch.Generator().manual_seed(2)
    x1, x2 = _cloud(gen, 200, 10), _cloud(gen, 150, 10, shift=1.0)
    scale = (x1.var(0).sum() + x2.var(0).sum()).item()
    assert abs(frechet_distance(x1, x1).item()) < 1e-10 * scale
    base = frechet_distance(x1, x2)
    shifted = frechet_distance(x1 + 3.7, x2 + 3.7)
    torch.testing.assert_close(shifted, base, rtol=1e-10, atol=0)
    torch.testing.assert_close(frechet_distance(x2, x1), base, rtol=1e-10, atol=0)


def test_gradcheck_from_stats_wrt_means_and_covariances() -> None:
    gen = torch.Generator().manual_seed(3)
    mu1 = torch.randn(3, generator=gen, dtype=F64, requires_grad=True)
    mu2 = torch.randn(3, generator=gen, dtype=F64, requires_grad=True)
    cov1 = _spd(gen, [0.5, 1.5, 4.0]).requires_grad_()
    cov2 = _spd(gen, [0.3, 1.0, 2.5]).requires_grad_()
    assert torch.autograd.gradcheck(frechet_distance_from_stats, (mu1, cov1, mu2, cov2))


def test_gradcheck_raw_tokens_and_cached_sqrt() -> None:
    gen = torch.Generator().manual_seed(4)
    x1 = _cloud(gen, 12, 4).requires_grad_()
    x2 = _cloud(gen, 9, 4, shift=0.3).requires_grad_()
    assert torch.autograd.gradcheck(frechet_distance, (x1, x2))

    mu1, cov1 = (t.detach() for t in gaussian_stats(x1))
    root = matrix_sqrt_psd(cov1)

    def cached(x: torch.Tensor) -> torch.Tensor:
        mu2, cov2 = gaussian_stats(x)
        return frechet_distance_from_stats(mu1, cov1, mu2, cov2, sqrt_cov1=root)

    assert torch.autograd.gradcheck(cached, (x2,))
    torch.testing.assert_close(cached(x2), frechet_distance(x1, x2), rtol=1e-12, atol=0)


def test_gradient_is_finite_for_singular_covariances() -> None:
    gen = torch.Generator().manual_seed(5)
    mu1, cov1 = gaussian_stats(_cloud(gen, 6, 16))
    x2 = _cloud(gen, 5, 16, shift=0.2).requires_grad_()
    mu2, cov2 = gaussian_stats(x2)
    fd = frechet_distance_from_stats(mu1, cov1, mu2, cov2, sqrt_cov1=matrix_sqrt_psd(cov1))
    fd.backward()
    assert torch.isfinite(fd) and torch.isfinite(x2.grad).all()


def test_batched_over_layers_equals_loop_and_chunking_is_exact() -> None:
    gen = torch.Generator().manual_seed(6)
    x1 = torch.stack([_cloud(gen, 40, 5) for _ in range(3)])
    x2 = torch.stack([_cloud(gen, 40, 5, shift=0.4) for _ in range(3)])
    batched = frechet_distance(x1, x2)
    loop = torch.stack([frechet_distance(a, b) for a, b in zip(x1, x2)])
    assert batched.shape == (3,)
    torch.testing.assert_close(batched, loop, rtol=1e-12, atol=1e-14)
    mu, cov = gaussian_stats(x1, chunk_tokens=7)
    mu_ref, cov_ref = gaussian_stats(x1)
    torch.testing.assert_close(cov, cov_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(cov_ref[0], torch.cov(x1[0].T), rtol=1e-12, atol=1e-14)


def test_blocked_covariance_matches_full_product_for_uneven_blocks() -> None:
    gen = torch.Generator().manual_seed(61)
    # width 770 -> 3 column blocks of 257, 257, 256; two leading batch entries; 3 chunks.
    x = torch.randn(2, 90, 770, generator=gen, dtype=F64) + 1.5
    mu, cov = gaussian_stats(x, chunk_tokens=40)
    for k in range(2):
        torch.testing.assert_close(cov[k], torch.cov(x[k].T), rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(mu[k], x[k].mean(0), rtol=1e-12, atol=1e-14)
    assert torch.equal(cov, cov.mT)


def test_cholesky_and_eigh_trace_methods_agree_with_scipy() -> None:
    gen = torch.Generator().manual_seed(62)
    x1, x2 = _cloud(gen, 400, 30), _cloud(gen, 350, 30, shift=0.3)
    mu1, s1 = gaussian_stats(x1)
    mu2, s2 = gaussian_stats(x2)
    ref = _scipy_fd(x1.numpy(), x2.numpy())
    for method in ("auto", "cholesky", "eigh"):
        fd = frechet_distance_from_stats(mu1, s1, mu2, s2, method=method).item()
        assert abs(fd - ref) / abs(ref) < 1e-8, method
    with pytest.raises(RegapError, match="unknown trace method"):
        frechet_distance_from_stats(mu1, s1, mu2, s2, method="newton")


def test_singular_first_covariance_factors_the_second_without_eigh(monkeypatch) -> None:
    """MIR at d = 4,096: fewer text tokens than dimensions, more image tokens. `auto` must then take
    the Cholesky route on the image side, not an eigendecomposition (several times slower)."""
    from regap.gap import distances

    gen = torch.Generator().manual_seed(63)
    mu1, s1 = gaussian_stats(_cloud(gen, 5, 12))  # rank 4 < 12: no Cholesky factor
    mu2, s2 = gaussian_stats(_cloud(gen, 40, 12, shift=0.2))
    assert int(torch.linalg.cholesky_ex(s1).info) != 0
    eigh = frechet_distance_from_stats(mu1, s1, mu2, s2, method="eigh").item()

    def no_eigh(a):
        raise AssertionError("auto took the eigh route although the second covariance has a Cholesky factor")

    with monkeypatch.context() as patch:
        patch.setattr(distances, "_eigh", no_eigh)
        auto = frechet_distance_from_stats(mu1, s1, mu2, s2).item()
    # both routes take square roots of a singular matrix's rounding-level eigenvalues: ~1e-8 apart
    assert math.isfinite(auto) and auto == pytest.approx(eigh, rel=1e-7)
    with pytest.raises(RegapError, match="not positive definite"):
        frechet_distance_from_stats(mu1, s1, mu2, s2, method="cholesky")


def test_both_covariances_singular_or_a_gradient_fall_back_to_eigh(monkeypatch) -> None:
    from regap.gap import distances

    gen = torch.Generator().manual_seed(64)
    mu1, s1 = gaussian_stats(_cloud(gen, 5, 12))
    mu2, s2 = gaussian_stats(_cloud(gen, 6, 12, shift=0.2))  # both singular
    auto = frechet_distance_from_stats(mu1, s1, mu2, s2).item()
    assert auto == pytest.approx(frechet_distance_from_stats(mu1, s1, mu2, s2, method="eigh").item(), rel=1e-12)
    # a gradient to the second covariance keeps the eigh route (its backward goes through eigvalsh only)
    _, s3 = gaussian_stats(_cloud(gen, 40, 12, shift=0.2))
    s3 = s3.clone().requires_grad_(True)

    def no_swap(factor, cov):
        raise AssertionError("the Cholesky route of the second covariance was taken under a gradient")

    monkeypatch.setattr(distances, "_congruence_lower", no_swap)
    fd = frechet_distance_from_stats(mu1, s1, mu2, s3)
    fd.backward()
    assert s3.grad is not None and torch.isfinite(s3.grad).all()
    assert fd.item() == pytest.approx(frechet_distance_from_stats(mu1, s1, mu2, s3.detach(), method="eigh").item(),
                                      rel=1e-7)


def test_float32_option_is_close_to_float64() -> None:
    gen = torch.Generator().manual_seed(7)
    x1, x2 = _cloud(gen, 200, 8), _cloud(gen, 200, 8, shift=0.5)
    fd32 = frechet_distance(x1.float(), x2.float(), dtype=torch.float32)
    assert fd32.dtype == torch.float32
    assert fd32.item() == pytest.approx(frechet_distance(x1, x2).item(), rel=1e-4)


def test_reference_fast_formula_and_difference_from_exact() -> None:
    gen = torch.Generator().manual_seed(8)
    mu1, mu2 = torch.randn(4, generator=gen, dtype=F64), torch.randn(4, generator=gen, dtype=F64)
    s1, s2 = _spd(gen, [0.2, 0.7, 1.3, 3.0]), _spd(gen, [0.4, 0.9, 1.1, 2.0])
    assert not torch.allclose(s1 @ s2, s2 @ s1)  # non-commuting
    fast = reference_fast_frechet_from_stats(mu1, s1, mu2, s2)
    expected = (mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * (s1 @ s2).trace()
    torch.testing.assert_close(fast, expected, rtol=1e-12, atol=1e-12)
    exact = frechet_distance_from_stats(mu1, s1, mu2, s2)
    assert abs(fast.item() - exact.item()) > 1e-3
    # Not a distance: negative for S1 = S2 = 2I.
    two = 2 * torch.eye(3, dtype=F64)
    assert reference_fast_frechet_from_stats(torch.zeros(3), two, torch.zeros(3), two).item() < 0


def test_reference_newton_schulz_start_returns_its_input() -> None:
    """Why reference-fast is what it is: Y0=A, Z0=I makes the coupled iteration a no-op."""
    gen = torch.Generator().manual_seed(9)
    a = _spd(gen, [0.5, 1.0, 2.0]) @ _spd(gen, [0.3, 1.2, 2.2])
    y, z = a.clone(), torch.eye(3, dtype=F64)
    for _ in range(5):
        y = 0.5 * (y + torch.linalg.inv(z) @ a)
        z = 0.5 * (z + torch.linalg.inv(y) @ a)
    torch.testing.assert_close(y, a)
    x1, x2 = _cloud(gen, 30, 3), _cloud(gen, 30, 3, shift=1.0)
    mu1, s1 = gaussian_stats(x1)
    mu2, s2 = gaussian_stats(x2)
    via_iteration = (mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * (s1 @ s2).trace()
    torch.testing.assert_close(reference_fast_frechet(x1, x2), via_iteration)


# --------------------------------------------------------------------------- centroid


def test_centroid_gap_and_scale() -> None:
    text = torch.tensor([[3.0, 4.0], [0.0, 5.0], [6.0, 8.0]])  # norms 5, 5, 10
    image = torch.tensor([[1.0, 1.0], [3.0, 3.0]])
    alpha = text_centric_scale(text)
    assert alpha.item() == pytest.approx(1 / (20 / 3))
    assert (text * alpha).norm(dim=-1).mean().item() == pytest.approx(1.0)
    diff = image.mean(0) - text.mean(0)
    expected = (alpha**2 * diff.square().sum()).item()
    assert centroid_gap(image, text).item() == pytest.approx(expected)
    assert centroid_gap(image, text, alpha=1.0).item() == pytest.approx(diff.square().sum().item())
    batched = centroid_gap(torch.stack([image, 2 * image]), torch.stack([text, text]))
    assert batched.shape == (2,)
    assert batched[0].item() == pytest.approx(centroid_gap(image, text).item())


def test_cosine_centroid_distance() -> None:
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    assert cosine_centroid_distance(x, 5 * x).item() == pytest.approx(0.0, abs=1e-7)
    assert cosine_centroid_distance(x, x.flip(-1)).item() == pytest.approx(1.0)


# --------------------------------------------------------------------------- MIR


def test_outlier_with_huge_norm_is_replaced_by_lower_coordinate_median() -> None:
    rows = [(1 + 0.01 * i) * torch.tensor([1.0, 2.0, 2.0]) for i in range(9)]
    tokens = torch.stack(rows + [torch.tensor([1000.0, 0.0, 0.0])])
    mask = norm_outlier_mask(tokens)
    assert mask.tolist() == [False] * 9 + [True]
    cleaned = replace_norm_outliers(tokens)
    # torch.median (as the reference) takes the LOWER middle of 10 values: the 5th.
    torch.testing.assert_close(cleaned[9], torch.tensor([1.04, 2.06, 2.06]))
    torch.testing.assert_close(cleaned[:9], tokens[:9])
    assert tokens[9, 0].item() == 1000.0  # input untouched


def test_outlier_rule_uses_unbiased_std() -> None:
    # 7 equal norms + 1 far one: |x - median| / std is n/sqrt(n-1) = 3.02 with the
    # biased std but sqrt(n) = 2.83 with the unbiased one the reference uses.
    tokens = torch.tensor([[1.0, 0.0]] * 7 + [[100.0, 0.0]])
    assert not norm_outlier_mask(tokens).any()
    assert norm_outlier_mask(tokens, n_sigma=2.8).tolist() == [False] * 7 + [True]


def _numpy_layer_fd(img: np.ndarray, txt: np.ndarray) -> float:
    alpha = 1.0 / np.linalg.norm(txt, axis=1).mean()
    img, txt = img * alpha, txt * alpha

    def clean(x: np.ndarray) -> np.ndarray:
        norms = np.linalg.norm(x, axis=1)
        lower_median = np.sort(norms)[(len(norms) - 1) // 2]
        out = np.abs(norms - lower_median) > 3 * norms.std(ddof=1)
        x = x.copy()
        x[out] = np.sort(x, axis=0)[(len(x) - 1) // 2]
        return x

    return _scipy_fd(clean(img), clean(txt))


def test_mir_matches_independent_numpy_scipy_pipeline() -> None:
    rng = np.random.default_rng(10)
    d, layers = 6, 2
    img = [rng.normal(size=(80, d)) @ rng.normal(size=(d, d)) + 2.0 for _ in range(layers)]
    txt = [rng.normal(size=(64, d)) * 3.0 for _ in range(layers)]
    img[0][5] *= 40.0  # one clear outlier in each modality
    txt[1][7] *= 40.0
    expected_fd = [_numpy_layer_fd(i, t) for i, t in zip(img, txt)]
    result = mir([torch.from_numpy(i) for i in img], torch.from_numpy(np.stack(txt)))
    assert result.mode == "exact" and result.ridge == 0.0
    np.testing.assert_allclose(result.per_layer_fd, expected_fd, rtol=1e-9)
    assert result.mir == pytest.approx(math.log10(sum(expected_fd)), rel=1e-10)
    assert [g.layer for g in result.layers] == [1, 2]
    assert result.layers[0].n_image_outliers == 1 and result.layers[1].n_text_outliers == 1
    for g in result.layers:  # centroid gap is the mean term of FD
        assert 0 < g.centroid_gap < g.fd
    assert set(result.to_dict()) >= {"mir", "per_layer_fd", "per_layer_centroid_gap", "mode"}


def test_layer_zero_is_reported_separately_and_modes() -> None:
    gen = torch.Generator().manual_seed(11)
    img = torch.stack([_cloud(gen, 50, 4, shift=1.0) for _ in range(3)])
    txt = torch.stack([_cloud(gen, 40, 4) for _ in range(3)])
    per_layer = mir_per_layer(img[1:], txt[1:])
    zero = layer_zero_report(img[0], txt[0])
    assert zero.layer == 0 and [g.layer for g in per_layer] == [1, 2]
    assert zero.fd == pytest.approx(mir_per_layer(img[:1], txt[:1])[0].fd)
    fast = mir(img[1:], txt[1:], mode="reference-fast")
    assert fast.mode == "reference-fast"
    assert fast.mir != pytest.approx(mir(img[1:], txt[1:]).mir)


# --------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_regap_error() -> None:
    good = torch.randn(20, 4)
    with pytest.raises(RegapError, match="no image tokens"):
        mir([torch.empty(0, 4)], [good])
    with pytest.raises(RegapError, match="no text tokens"):
        centroid_gap(good, torch.empty(0, 4))
    bad = torch.randn(2, 20, 4)
    bad[1, 3, 2] = float("nan")
    with pytest.raises(RegapError, match="text tokens at layer 2 contain NaN"):
        mir(torch.randn(2, 20, 4), bad)
    with pytest.raises(RegapError, match="inf"):
        frechet_distance(good, good.clone().index_fill_(0, torch.tensor([0]), float("inf")))
    with pytest.raises(RegapError, match="at least 2 tokens"):
        frechet_distance(good, good[:1])
    with pytest.raises(RegapError, match="2 image layers but 1 text"):
        mir(torch.randn(2, 20, 4), torch.randn(1, 20, 4))
    with pytest.raises(RegapError, match="unknown MIR mode"):
        mir(torch.randn(1, 20, 4), torch.randn(1, 20, 4), mode="fast")
    with pytest.raises(RegapError, match="ridge"):
        frechet_distance(good, good, ridge=-1.0)


def test_reference_fast_negative_sum_raises_instead_of_nan() -> None:
    text = torch.tensor([[1.0], [-1.0]] * 10)  # 1-d: value = var_t + var_i - 2 var_t var_i
    with pytest.raises(RegapError, match="not distances"):
        mir([3 * text], [text], mode="reference-fast")


def test_singular_covariance_is_finite_and_ridge_is_recorded() -> None:
    gen = torch.Generator().manual_seed(12)
    img, txt = torch.randn(1, 5, 20, generator=gen), torch.randn(1, 7, 20, generator=gen) + 0.5
    plain = mir(img, txt)
    ridged = mir(img, txt, ridge=1e-3)
    assert math.isfinite(plain.mir) and math.isfinite(ridged.mir)
    assert ridged.ridge == 1e-3 and ridged.per_layer_fd[0] != plain.per_layer_fd[0]
    assert math.isfinite(frechet_distance(img[0], txt[0]).item())


# --------------------------------------------------------------------------- bootstrap




def test_exact_and_linear_intervals_agree_and_are_deterministic(tmp_path) -> None:
    from regap.gap.measure import analyse

    store = synthetic_store(tmp_path)
    exact = analyse(store, n_boot=200, seed=1, ci="exact", n_sigma=100.0)
    linear = analyse(store, n_boot=200, seed=1, ci="linear", n_sigma=100.0)
    assert exact["mir"] == pytest.approx(linear["mir"], rel=1e-12)  # same point estimate
    assert "exact" in exact["ci_method"] and "linear" in linear["ci_method"]
    for key in ("mir_ci", "layer0_frechet_ci", "layer0_gap_ci"):
        (lo_e, hi_e), (lo_l, hi_l) = exact[key], linear[key]
        assert lo_e < hi_e and lo_l < hi_l
        width = hi_e - lo_e
        assert abs(lo_e - lo_l) < 0.15 * width and abs(hi_e - hi_l) < 0.15 * width, key
    # the centroid gap is exact in both methods, so its replicates are identical
    assert exact["layer0_gap_ci"] == pytest.approx(linear["layer0_gap_ci"], rel=1e-9)
    again = analyse(store, n_boot=200, seed=1, ci="exact", n_sigma=100.0)
    assert again["mir_ci"] == exact["mir_ci"]
    other = analyse(store, n_boot=200, seed=2, ci="exact", n_sigma=100.0)
    assert other["mir_ci"] != exact["mir_ci"]
    with pytest.raises(RegapError, match="unknown interval method"):
        analyse(store, n_boot=10, ci="bca")


def test_intervals_narrow_with_more_pairs_and_stability_rows(tmp_path) -> None:
    from regap.gap.measure import analyse, stability

    store = synthetic_store(tmp_path, pairs=80)
    few = analyse(store, n_pairs=10, n_boot=200, ci="exact", n_sigma=100.0)
    many = analyse(store, n_boot=200, ci="exact", n_sigma=100.0)
    def width(r):
        return r["mir_ci"][1] - r["mir_ci"][0]

    assert width(many) < 0.6 * width(few)
    rows = stability(store, sizes=(5, 10, 20, 50), n_boot=30, ci="exact", n_sigma=100.0)
    assert [r["pairs"] for r in rows] == [5, 10, 20, 50, 80]
    assert rows[-1]["mir"] == pytest.approx(many["mir"], rel=1e-12)


def test_hidden_states_from_tensors_rejects_mismatched_shapes(tmp_path) -> None:
    from regap.gap.collect import HiddenStates

    with pytest.raises(RegapError, match="same L and d"):
        HiddenStates.from_tensors(tmp_path / "h", torch.zeros(2, 4, 3), torch.zeros(3, 4, 3), [0] * 4, [0] * 4)
    with pytest.raises(RegapError, match="one pair index per token"):
        HiddenStates.from_tensors(tmp_path / "h", torch.zeros(2, 4, 3), torch.zeros(2, 4, 3), [0] * 3, [0] * 4)


def test_triangular_congruence_equals_the_plain_product() -> None:
    from regap.gap.distances import _congruence_lower

    gen = torch.Generator().manual_seed(64)
    for d in (5, 600, 770):  # one block; uneven blocks
        a = torch.randn(2, d, d, generator=gen, dtype=F64)
        lower = torch.linalg.cholesky(a @ a.mT / d + torch.eye(d, dtype=F64))
        s = torch.randn(2, d, d, generator=gen, dtype=F64)
        s = s + s.mT
        expected = lower.mT @ s @ lower
        torch.testing.assert_close(_congruence_lower(lower, s), 0.5 * (expected + expected.mT), rtol=1e-11, atol=1e-10)
