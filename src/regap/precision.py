"""Which floating-point type to compute in: `dtype: auto` and its CPU probe.

Why a probe: a CPU without native bfloat16 (AVX2 only, common on laptops and cloud VMs)
computes a bf16 matmul ~50x slower than float32, while one with AVX512-BF16 or AMX computes
it several times faster. No CPU flag check is reliable across torch builds, so `auto`
times one small matmul in both types, once per machine, and caches the answer in the regap
cache. On CUDA `auto` is bfloat16 where the GPU supports it.

`REGAP_AUTO_DTYPE=float32|bfloat16` fixes what `auto` means (the test suite pins float32, so
its numbers do not depend on the CPU it runs on).

Every resolution is remembered for the process (`resolutions()`), printed once to stderr,
and written into every provenance record (`regap.provenance.provenance`).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from regap.errors import RegapError
from regap.files import write_json_atomic

#: Names accepted wherever a dtype is chosen (aliases map to these).
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}
_TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: bf16 counts as fast when its matmul takes at most this multiple of float32's time.
FAST_RATIO = 1.0
_PROBE_SHAPE = (256, 512, 1024)  # m, k, n: 0.27 GFLOP, ~0.7 s in bf16 on a CPU without native bf16
_PROBE_FILE = "cpu-bf16-probe.json"


@dataclass(frozen=True)
class CpuProbe:
    """Best-of-N wall times of one float32 and one bfloat16 matmul on this CPU."""

    key: str
    float32_s: float
    bfloat16_s: float
    capability: str
    threads: int

    @property
    def ratio(self) -> float:
        """bf16 time / float32 time: < 1 means bf16 is faster."""
        return self.bfloat16_s / max(self.float32_s, 1e-12)

    @property
    def bf16_fast(self) -> bool:
        return self.ratio <= FAST_RATIO


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype a request resolved to on a device, and why (goes into provenance)."""

    requested: str
    device: str
    dtype: str
    reason: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return _TORCH[self.dtype]

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


_lock = threading.Lock()
_resolutions: dict[tuple[str, str], DtypeChoice] = {}
_probe_memo: dict[str, CpuProbe] = {}


def normalise_dtype_name(value: str) -> str:
    """`bf16` -> `bfloat16` etc.; an unknown name is a one-line error listing the choices."""
    name = str(value).strip().lower().removeprefix("torch.")
    name = _ALIASES.get(name, name)
    if name not in DTYPE_CHOICES:
        raise RegapError(f"unknown dtype {value!r}; valid: {', '.join(DTYPE_CHOICES)}")
    return name


def cpu_capability() -> str:
    """torch's name for the vector ISA it dispatches to (AVX2, AVX512, ...)."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # older torch or an exotic build
        return "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cpu_count() -> int:
    """CPUs this process may run on (affinity / cgroup-limited where the OS says so)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def use_usable_cpus() -> int:
    """Give torch as many intra-op threads as CPUs this process may use, unless the user set
    OMP_NUM_THREADS (torch's own default can count CPUs outside the affinity mask)."""
    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(usable_cpu_count())
        warn_if_cpus_busy(torch.get_num_threads())
    return torch.get_num_threads()


#: Other work counts as present when the 1-minute load average reaches this many busy CPUs and,
#: where the OS says, another task is runnable right now (the load alone decays for a minute after a
#: previous command ends, so a script of regap commands would warn at every step).
BUSY_LOAD = 0.9
_busy_warned = False


def other_runnable_tasks(loadavg: str = "/proc/loadavg") -> int | None:
    """Tasks runnable right now besides this process (Linux `/proc/loadavg`), None elsewhere."""
    try:
        with open(loadavg, encoding="ascii") as handle:
            runnable = int(handle.read().split()[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return None
    return max(0, runnable - 1)


def warn_if_cpus_busy(threads: int) -> bool:
    """Say so, once per process, when this process takes every CPU while other jobs already run.

    Why: OpenMP threads spin-wait on one another, so a thread that shares its core with another
    job stalls all of them. On a 2-core machine a bf16 training step took 12-23 s with 2 threads
    beside another job, against 1.2 s with 1 (bench/RESULTS.md). Threads are not cut
    automatically: a default that depends on a moment's load would make runs irreproducible."""
    global _busy_warned
    if _busy_warned or threads < 2 or not hasattr(os, "getloadavg"):
        return False
    try:
        load = os.getloadavg()[0]
    except OSError:
        return False
    others = other_runnable_tasks()
    if load < BUSY_LOAD or others == 0:
        return False
    _busy_warned = True
    now = ", and other tasks are runnable now" if others is not None else ""
    _warn(f"regap: other jobs are using the CPUs (1-minute load {load:.1f}{now}) and this process takes "
          f"{threads} threads. OpenMP threads that share cores with other jobs can run many times slower; "
          "for jobs side by side, set OMP_NUM_THREADS to the CPUs each may have (e.g. 1).")
    return True


def _probe_key() -> str:
    """What decides the answer: the CPU, the ISA torch dispatches to and the torch build (the
    probe runs on one thread, so the thread count is not part of it)."""
    return "|".join((_cpu_model(), cpu_capability(), f"torch {torch.__version__}", "1 thread"))


def _operands(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    m, k, n = _PROBE_SHAPE
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(m, k, generator=generator).to(dtype), torch.randn(k, n, generator=generator).to(dtype))


def _timed_mm(a: torch.Tensor, b: torch.Tensor) -> float:
    start = time.perf_counter()
    torch.mm(a, b)
    return time.perf_counter() - start


def run_cpu_probe(rounds: int = 5, budget_s: float = 4.0) -> CpuProbe:
    """Time the probe matmul in float32 and bfloat16 now (no cache).

    One thread, and the two types alternate round by round with the best time of each kept:
    a busy machine (other jobs, or two OpenMP threads spin-waiting on two busy cores) then slows
    both sides alike instead of one, which once made a 2-thread probe on a native-bf16 CPU read
    bf16 as 8x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        operands = {dtype: _operands(dtype) for dtype in (torch.float32, torch.bfloat16)}
        for dtype, (a, b) in operands.items():  # warm-up: kernel selection, first-touch allocation
            _timed_mm(a, b)
        best = {dtype: float("inf") for dtype in operands}
        spent = 0.0
        for _ in range(rounds):
            for dtype, (a, b) in operands.items():
                elapsed = _timed_mm(a, b)
                best[dtype] = min(best[dtype], elapsed)
                spent += elapsed
            if spent > budget_s:  # a CPU without native bf16: a few slow rounds decide it
                break
    finally:
        torch.set_num_threads(before)
    return CpuProbe(_probe_key(), best[torch.float32], best[torch.bfloat16], cpu_capability(), 1)


def cpu_probe() -> CpuProbe:
    """This machine's probe, measured once and cached in the regap cache (keyed by CPU and torch)."""
    key = _probe_key()
    if key in _probe_memo:
        return _probe_memo[key]
    from regap.cache import cache_root

    path = cache_root() / "precision" / _PROBE_FILE
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(stored, dict):
            stored = {}
    except (OSError, ValueError):
        stored = {}
    entry = stored.get(key)
    try:
        probe = CpuProbe(key, float(entry["float32_s"]), float(entry["bfloat16_s"]), str(entry["capability"]),
                         int(entry["threads"]))
    except (TypeError, KeyError, ValueError):
        probe = run_cpu_probe()
        stored[key] = {k: v for k, v in asdict(probe).items() if k != "key"}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, stored, indent=1, sort_keys=True)
        except OSError:  # a read-only cache only costs a re-probe next time
            pass
    _probe_memo[key] = probe
    return probe


def _device_type(device: str | torch.device) -> str:
    return torch.device(device).type if str(device) != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


#: Environment variable that fixes what `auto` means (float32 or bfloat16), e.g. so that a test suite
#: or a comparison across machines computes in one type everywhere.
AUTO_ENV = "REGAP_AUTO_DTYPE"


def _choose(requested: str, device_type: str) -> DtypeChoice:
    forced = os.environ.get(AUTO_ENV, "").strip()
    if requested == "auto" and forced:
        try:
            name = normalise_dtype_name(forced)
        except RegapError:
            raise RegapError(f"unknown dtype {forced!r} in the environment variable {AUTO_ENV} (what --dtype auto "
                             f"means); valid: {', '.join(c for c in DTYPE_CHOICES if c != 'auto')}, or unset it") from None
        if name == "auto":
            pass
        elif name == "float16" and device_type == "cpu":
            raise RegapError(f"{AUTO_ENV}=float16 is not supported on the CPU; use float32 or bfloat16")
        else:
            return DtypeChoice(requested, device_type, name, f"{AUTO_ENV}={forced}")
    if device_type == "cuda":
        if requested == "auto":
            fast = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            return DtypeChoice(requested, device_type, "bfloat16" if fast else "float32",
                               "CUDA device with bfloat16 support" if fast else "CUDA device without bfloat16 support")
        return DtypeChoice(requested, device_type, requested, "asked for")
    if device_type != "cpu":
        if requested == "auto":
            return DtypeChoice(requested, device_type, "float32", f"{device_type} device: bf16 speed not probed")
        return DtypeChoice(requested, device_type, requested, "asked for")
    if requested == "float16":
        raise RegapError("dtype float16 is not supported on the CPU (no fast half-precision matmuls there); "
                         f"valid on the CPU: {', '.join(c for c in DTYPE_CHOICES if c != 'float16')}")
    if requested == "float32":
        return DtypeChoice(requested, "cpu", "float32", "asked for")
    probe = cpu_probe()
    measured = (f"bf16/fp32 matmul time {probe.ratio:.2f}x on this CPU "
                f"({probe.capability}, one thread)")
    if requested == "bfloat16":
        if not probe.bf16_fast:
            _warn(f"regap: dtype bfloat16 asked for, but this CPU computes bf16 matmuls {probe.ratio:.1f}x slower "
                  f"than float32 ({probe.capability}); dtype auto would pick float32")
        return DtypeChoice(requested, "cpu", "bfloat16", f"asked for; {measured}")
    if probe.bf16_fast:
        return DtypeChoice(requested, "cpu", "bfloat16", f"native bf16: {measured}")
    return DtypeChoice(requested, "cpu", "float32", f"bf16 slow here: {measured}")


def _warn(message: str) -> None:
    print(message, file=sys.stderr)


def resolve_dtype(requested: str | torch.dtype = "auto", device: str | torch.device = "cpu") -> DtypeChoice:
    """Resolve a dtype request for a device; `auto` follows the rules in the module docstring.

    The first resolution of each (request, device) in a process is printed once to stderr."""
    if isinstance(requested, torch.dtype):
        requested = str(requested).removeprefix("torch.")
    name = normalise_dtype_name(requested)
    device_type = _device_type(device)
    with _lock:
        known = _resolutions.get((name, device_type))
    if known is not None:
        return known
    choice = _choose(name, device_type)
    with _lock:
        first = (name, device_type) not in _resolutions
        _resolutions.setdefault((name, device_type), choice)
    if first and name == "auto" and not choice.reason.startswith(AUTO_ENV):  # a fixed `auto` is no news
        _warn(f"regap: dtype auto -> {choice.dtype} on {device_type} ({choice.reason})")
    return choice


def resolve_torch_dtype(requested: str | torch.dtype = "auto", device: str | torch.device = "cpu") -> torch.dtype:
    return resolve_dtype(requested, device).torch_dtype


def mixed_precision_for(dtype: str) -> str:
    """The autocast mode that matches the frozen parts' dtype (trainable weights stay float32)."""
    return {"bfloat16": "bf16", "float16": "fp16"}.get(dtype, "no")


def resolutions() -> list[dict[str, Any]]:
    """Every dtype resolution made in this process (for provenance records)."""
    with _lock:
        return [choice.to_dict() for choice in _resolutions.values()]


def reset_for_tests() -> None:
    """Forget resolutions and the in-memory probe (tests mock the probe both ways)."""
    with _lock:
        _resolutions.clear()
        _probe_memo.clear()
