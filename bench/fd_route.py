"""The exact Fréchet distance's trace term when MIR's text side has fewer tokens than dimensions.

Tr (S1 S2)^1/2 by the eigh route (S1^1/2 from an eigendecomposition: what `auto` did when S1, the text
covariance, has no Cholesky factor) against `auto` (which now factors the image covariance S2 instead),
in CPU seconds (robust to other jobs on the machine), best of `--repeat`, and how far apart the values are.

    python bench/fd_route.py [--d 4096] [--text 3000] [--image 20000] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from regap.gap.distances import gaussian_stats, trace_sqrt_product


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--text", type=int, default=3000, help="text tokens (100 pairs x ~30)")
    p.add_argument("--image", type=int, default=20000, help="image tokens (more than --d)")
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    torch.manual_seed(0)
    _, s1 = gaussian_stats(torch.randn(args.text, args.d, dtype=torch.float64))
    _, s2 = gaussian_stats(torch.randn(args.image, args.d, dtype=torch.float64) * 0.5)
    out = {}
    for method in ("eigh", "auto"):
        best, value = float("inf"), 0.0
        for _ in range(args.repeat):
            start = time.process_time()
            value = float(trace_sqrt_product(s1, s2, method=method))
            best = min(best, time.process_time() - start)
        out[method] = {"cpu_s": best, "value": value}
    out["speed_up"] = out["eigh"]["cpu_s"] / out["auto"]["cpu_s"]
    out["relative_difference"] = abs(out["eigh"]["value"] - out["auto"]["value"]) / abs(out["eigh"]["value"])
    out.update(vars(args), threads=torch.get_num_threads())
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
