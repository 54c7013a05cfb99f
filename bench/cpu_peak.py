"""This CPU's own yardsticks, measured in the process that uses them: the dense matmul peak for
a dtype and thread count, peak resident memory, and what the machine is.

Why in the same process: a CPU figure means little on its own (the same code runs 10x apart on
two 2-core machines, and the same machine runs 2x apart when other jobs share it); as a
fraction of a matmul peak measured just before, under the same load and threads, it says how
much of what this machine can do the code takes.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from typing import Any

#: m = k = n of the peak matmul: large enough that torch's CPU kernel runs at its best
#: (0.27 TFLOP per call), small enough for a few calls in a few seconds.
PEAK_SIZE = 4096


def matmul_peak_flops(dtype: Any, threads: int | None = None, size: int = PEAK_SIZE, repeats: int = 4) -> dict[str, Any]:
    """Best of `repeats` timed `torch.mm` of two `size` x `size` matrices in `dtype`, after one
    untimed call, by wall time and by CPU time (the process's, all threads); with `threads` set,
    torch runs that many threads during the measurement only."""
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(0)
        a = torch.randn(size, size, generator=generator).to(dtype)
        b = torch.randn(size, size, generator=generator).to(dtype)
        torch.mm(a, b)
        best = best_cpu = float("inf")
        for _ in range(repeats):
            start, cpu = time.perf_counter(), time.process_time()
            torch.mm(a, b)
            best, best_cpu = min(best, time.perf_counter() - start), min(best_cpu, time.process_time() - cpu)
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    flops = 2 * size**3 / best
    # per CPU second (all threads' time): robust to other jobs on the machine, which stretch wall time only
    return {"dtype": str(dtype).removeprefix("torch."), "threads": used, "size": size, "best_s": best,
            "best_cpu_s": best_cpu, "tflops": flops / 1e12, "flops": flops,
            "flops_per_cpu_s": 2 * size**3 / best_cpu}


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def rss_gib() -> dict[str, float | None]:
    """Resident memory now (VmRSS) and its peak since the last `reset_peak_rss` (VmHWM; Linux's
    `getrusage` ru_maxrss reads the same high-water mark, so the reset lowers it too)."""
    now, hwm = _status_kib("VmRSS"), _status_kib("VmHWM")
    return {"rss_gib": now / 2**20 if now is not None else None, "vm_hwm_gib": hwm / 2**20 if hwm is not None else None,
            "ru_maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: `5` into /proc/self/clear_refs), so the next
    `rss_gib()` gives the peak of what ran in between; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def machine() -> dict[str, Any]:
    """The CPU model (as lscpu names it), torch's vector ISA, usable CPUs, memory and load."""
    import torch

    from regap.precision import _cpu_model, cpu_capability, usable_cpu_count

    total = available = None
    try:
        with open("/proc/meminfo", encoding="utf-8") as handle:
            info = {line.split(":")[0]: int(line.split()[1]) for line in handle if line.split()[1:2]}
        total, available = info.get("MemTotal", 0) / 2**20, info.get("MemAvailable", 0) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    return {"cpu_model": _cpu_model(), "cpu_capability": cpu_capability(), "usable_cpus": usable_cpu_count(),
            "machine": platform.machine(), "memory_total_gib": total, "memory_available_gib": available,
            "torch_threads": torch.get_num_threads(), "load_average": list(os.getloadavg())}
