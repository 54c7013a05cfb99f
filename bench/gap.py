"""CPU benchmark: exact Fréchet distance, regap (eigh) vs the numpy/scipy accurate path.

Both sides get the same float32 token clouds in one process and compute in float64:

* regap:     gaussian_stats (torch, chunked, upper block triangle) + frechet_distance_from_stats
             (Cholesky of S1, L^T S2 L, eigvalsh)
* reference: np.cov + scipy.linalg.sqrtm(S1 @ S2), real part of the trace (the MIR
             reference code's "accurate" mode, and the usual FID recipe)

Usage:  python bench/gap.py [--d 4096 --tokens 57600]    (default: full size)
        python bench/gap.py --quick                      (d=512, 8000 tokens)
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

MAX_REL_DIFF = 1e-8


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d", type=int, default=4096, help="token width (hidden size)")
    p.add_argument("--tokens", type=int, default=57600, help="tokens per modality")
    p.add_argument("--quick", action="store_true", help="smoke run: d=512, 8000 tokens")
    p.add_argument("--threads", type=int, default=2, help="BLAS/torch threads for both sides")
    p.add_argument("--repeat", type=int, default=1, help="repeat each side, keep the fastest")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.quick:
        args.d, args.tokens = 512, 8000
    return args


ARGS = parse_args()
# Thread counts must be fixed before numpy/torch load their BLAS libraries.
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)

import numpy as np  # noqa: E402
import scipy  # noqa: E402
import scipy.linalg  # noqa: E402
import torch  # noqa: E402

from regap.gap import frechet_distance_from_stats, gaussian_stats, matrix_sqrt_psd  # noqa: E402


def make_tokens(n: int, d: int, seed: int, shift: float) -> torch.Tensor:
    """float32 tokens Z @ A + mu with hidden-state-like structure.

    A = G/sqrt(d) * power-law column scales + 0.2 I: full rank, anisotropic, and a
    different G per modality so the two covariances do not commute. mu has a few
    "massive" coordinates, as LLM residual streams do.
    """
    gen = torch.Generator().manual_seed(seed)
    scales = (torch.arange(1, d + 1, dtype=torch.float32) ** -0.5) * 4.0
    a = torch.randn(d, d, generator=gen) / d**0.5 * scales + 0.2 * torch.eye(d)
    mu = torch.randn(d, generator=gen) * 0.5 + shift
    mu[:3] += 20.0
    out = torch.empty(n, d)
    for start in range(0, n, 8192):
        z = torch.randn(min(8192, n - start), d, generator=gen)
        out[start : start + z.shape[0]] = z @ a + mu
    return out


def run_regap(x1: torch.Tensor, x2: torch.Tensor) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    mu1, s1 = gaussian_stats(x1)
    mu2, s2 = gaussian_stats(x2)
    t1 = time.perf_counter()
    fd = frechet_distance_from_stats(mu1, s1, mu2, s2).item()
    t2 = time.perf_counter()
    # Informational: the ReGap loss caches the fixed text side's square root.
    root1 = matrix_sqrt_psd(s1)
    t3 = time.perf_counter()
    frechet_distance_from_stats(mu1, s1, mu2, s2, sqrt_cov1=root1)
    print(f"  (FD step with cached sqrt_cov1: {time.perf_counter() - t3:.2f} s)", flush=True)
    return fd, t1 - t0, t2 - t1


def run_reference(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    mu1, s1 = a.mean(0, dtype=np.float64), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0, dtype=np.float64), np.cov(b, rowvar=False)
    t1 = time.perf_counter()
    tr_covmean = np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    t2 = time.perf_counter()
    return fd, t1 - t0, t2 - t1


def best(fn, *data, repeat: int) -> tuple[float, float, float]:
    runs = [fn(*data) for _ in range(repeat)]
    return runs[0][0], min(r[1] for r in runs), min(r[2] for r in runs)


def main() -> int:
    torch.set_num_threads(ARGS.threads)
    print(f"load average before: {open('/proc/loadavg').read().split()[:3]}", flush=True)
    d, n = ARGS.d, ARGS.tokens
    t0 = time.perf_counter()
    x1 = make_tokens(n, d, ARGS.seed, shift=0.0)
    x2 = make_tokens(n, d, ARGS.seed + 1, shift=0.3)
    print(f"generated 2 x [{n}, {d}] float32 tokens in {time.perf_counter() - t0:.1f} s",
          flush=True)

    fd_ours, stats_ours, fd_t_ours = best(run_regap, x1, x2, repeat=ARGS.repeat)
    print(f"regap:     stats {stats_ours:.2f} s + FD {fd_t_ours:.2f} s  FD={fd_ours!r}", flush=True)
    fd_ref, stats_ref, fd_t_ref = best(run_reference, x1.numpy(), x2.numpy(), repeat=ARGS.repeat)
    print(f"reference: stats {stats_ref:.2f} s + FD {fd_t_ref:.2f} s  FD={fd_ref!r}", flush=True)

    total_ours, total_ref = stats_ours + fd_t_ours, stats_ref + fd_t_ref
    rel = abs(fd_ours - fd_ref) / abs(fd_ref)
    ok = rel < MAX_REL_DIFF
    print(f"speed-up (total): {total_ref / total_ours:.2f}x   speed-up (FD step only):"
          f" {fd_t_ref / fd_t_ours:.2f}x")
    verdict = "OK" if ok else "FAIL"
    print(f"relative difference of FD values: {rel:.3e} ({verdict}: limit {MAX_REL_DIFF:g})")
    cpu = platform.processor() or platform.machine()
    machine = f"{cpu}, {os.cpu_count()} CPUs, {ARGS.threads} threads"
    print(f"machine: {machine}; python {platform.python_version()}, torch {torch.__version__},"
          f" numpy {np.__version__}, scipy {scipy.__version__}; {datetime.date.today()}")
    print("command: python bench/gap.py " + " ".join(sys.argv[1:]))
    print(f"load average after: {open('/proc/loadavg').read().split()[:3]}")
    print()
    print("| d | tokens | regap stats s | regap FD s | regap total s | scipy cov s |"
          " scipy sqrtm s | scipy total s | speed-up total | speed-up FD step | rel. diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {d} | {n} | {stats_ours:.2f} | {fd_t_ours:.2f} | {total_ours:.2f} | {stats_ref:.2f} |"
          f" {fd_t_ref:.2f} | {total_ref:.2f} | {total_ref / total_ours:.2f}x |"
          f" {fd_t_ref / fd_t_ours:.2f}x | {rel:.1e} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
