"""Host memory of `regap gap` at the LLaVA-1.5-7B, 100-pair size (goal: stay under 8 GB).

A 7B model cannot run on this CPU, so the model is replaced by a stand-in with the same
interface and output shapes (33 hidden states of width 4096, 576 image tokens and
`--text-tokens` text tokens per pair, bfloat16 like a bf16 checkpoint). The two stages are
measured in separate child processes so each peak is its own:

* collect: `collect_hidden_states` over 100 pairs (batches of 8), spilling every layer;
* analyse: `regap.gap.measure.analyse` (exact FD, 1000 linearised bootstrap replicates) on a
  store with the full token count and width but `--analyse-layers` layers. The analysis holds
  one layer at a time, so its peak does not depend on the layer count; running all 33 layers
  here would take ~30 minutes of covariances on 2 cores for the same peak.

Memory is sampled every 20 ms from /proc/self/status. `RssAnon` is the memory the process
needs; `VmHWM` (peak RSS) also counts file-backed pages of the spill memory maps, which the
kernel writes back and evicts under pressure.

Usage:  python bench/gap_memory.py [--pairs 100 --width 4096 --layers 33]
        python bench/gap_memory.py --quick          (d=512, 8 layers, 20 pairs)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from regap.models.inputs import ModelInputs


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=100)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--layers", type=int, default=33, help="hidden states (embeddings + 32 blocks)")
    p.add_argument("--image-tokens", type=int, default=576)
    p.add_argument("--text-tokens", type=int, default=96, help="text tokens per pair after the image")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--analyse-layers", type=int, default=2)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--spill", default=None, help="spill folder (default: a temporary folder)")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.pairs, args.width, args.layers = 20, 512, 8
    return args


class _Sampler:
    """Peak RssAnon and VmHWM of this process, sampled in a thread."""

    def __init__(self) -> None:
        self.peak_anon_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _status() -> dict[str, int]:
        out = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "VmHWM"):
                out[key] = int(value.split()[0])
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_anon_kb = max(self.peak_anon_kb, self._status()["RssAnon"])
            time.sleep(0.02)

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_anon_kb = max(self.peak_anon_kb, self._status()["RssAnon"])
        self.hwm_kb = self._status()["VmHWM"]


class SevenBShapedModel:
    """What `collect_hidden_states` needs from a model, with LLaVA-1.5-7B's shapes."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.args = args
        self.hidden_size = args.width
        self.llm = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=args.layers - 1))
        self._generator = torch.Generator().manual_seed(0)

    def build_inputs(self, conversations, images, **_: object) -> ModelInputs:
        import torch

        from regap.models.inputs import IGNORE_INDEX, ModelInputs

        n, a = len(conversations), self.args
        prefix, suffix = 5, a.text_tokens
        length = prefix + a.image_tokens + suffix
        image_mask = torch.zeros(n, length, dtype=torch.bool)
        image_mask[:, prefix : prefix + a.image_tokens] = True
        return ModelInputs(torch.zeros(n, length, dtype=torch.long), torch.ones(n, length, dtype=torch.long),
                           torch.full((n, length), IGNORE_INDEX), image_mask, None, [])

    def __call__(self, batch: ModelInputs, **_: object) -> SimpleNamespace:
        import torch

        shape = (*batch.attention_mask.shape, self.hidden_size)
        base = torch.randn(shape, generator=self._generator).to(torch.bfloat16)
        # One fresh tensor per layer, as a real forward pass returns.
        return SimpleNamespace(hidden_states=tuple(base * (1 + 0.01 * k) for k in range(self.args.layers)))


def _collect(args: argparse.Namespace, folder: str, queue: mp.Queue) -> None:
    from PIL import Image

    from regap.gap.collect import collect_hidden_states
    from regap.models.gap_pair import GapPair

    pairs = [GapPair(str(i), Image.new("RGB", (8, 8)), "text", "blank") for i in range(args.pairs)]
    start = time.perf_counter()
    with _Sampler() as sampler:
        store = collect_hidden_states(SevenBShapedModel(args), pairs, folder, batch_size=args.batch_size, progress=False)
    queue.put({"stage": "collect", "seconds": time.perf_counter() - start, "peak_rss_anon_gib": sampler.peak_anon_kb / 2**20,
               "vm_hwm_gib": sampler.hwm_kb / 2**20, "spill_dtype": store.dtype,
               "spill_gib": sum(f.stat().st_size for f in Path(folder).iterdir()) / 2**30})


def _analyse(args: argparse.Namespace, folder: str, queue: mp.Queue) -> None:
    import torch

    from regap.gap.collect import HiddenStates
    from regap.gap.measure import analyse

    torch.set_num_threads(args.threads)
    n_image, n_text = args.pairs * args.image_tokens, args.pairs * args.text_tokens
    generator = torch.Generator().manual_seed(1)
    # Full token count and width, fewer layers; float16 like the collect stage's spill.
    store_folder = Path(folder) / "analyse"
    store_folder.mkdir(parents=True, exist_ok=True)
    import numpy as np

    image_pairs = np.repeat(np.arange(args.pairs), args.image_tokens)
    text_pairs = np.repeat(np.arange(args.pairs), args.text_tokens)
    for name, count, shift in (("image", n_image, 1.0), ("text", n_text, 0.0)):
        target = np.memmap(store_folder / f"{name}.bin", dtype="float16", mode="w+",
                           shape=(args.analyse_layers, count, args.width))
        mix = torch.randn(args.width, args.width, generator=generator) / args.width**0.5 + 0.3 * torch.eye(args.width)
        for k in range(args.analyse_layers):
            for start in range(0, count, 8192):
                rows = min(8192, count - start)
                chunk = torch.randn(rows, args.width, generator=generator) @ mix + shift
                target[k, start : start + rows] = chunk.half().numpy()
        target.flush()
        del target
    store = HiddenStates(store_folder, args.analyse_layers, args.width, image_pairs, text_pairs, args.pairs, "float16")
    start = time.perf_counter()
    with _Sampler() as sampler:
        result = analyse(store, n_boot=args.n_boot)
    queue.put({"stage": "analyse", "seconds": time.perf_counter() - start, "layers": args.analyse_layers,
               "peak_rss_anon_gib": sampler.peak_anon_kb / 2**20, "vm_hwm_gib": sampler.hwm_kb / 2**20,
               "mir_ci": result["mir_ci"]})


def _run_stage(target, args: argparse.Namespace, folder: str) -> dict:
    queue: mp.Queue = mp.get_context("spawn").Queue()
    process = mp.get_context("spawn").Process(target=target, args=(args, folder, queue))
    process.start()
    process.join()
    if process.exitcode != 0:
        raise SystemExit(f"{target.__name__} failed with exit code {process.exitcode}")
    return queue.get()


def main() -> int:
    args = parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    with tempfile.TemporaryDirectory(dir=args.spill) as folder:
        print(f"load average before: {open('/proc/loadavg').read().split()[:3]}", flush=True)
        rows = [_run_stage(_collect, args, str(Path(folder) / "collect"))]
        print(json.dumps(rows[-1]), flush=True)
        import shutil

        shutil.rmtree(Path(folder) / "collect", ignore_errors=True)
        rows.append(_run_stage(_analyse, args, folder))
        print(json.dumps(rows[-1]), flush=True)
        print(f"load average after: {open('/proc/loadavg').read().split()[:3]}")
    print(f"command: python bench/gap_memory.py {' '.join(sys.argv[1:])}")
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, {args.threads} threads")
    print()
    print("| stage | layers | pairs | width | seconds | peak RssAnon GiB | peak RSS (VmHWM) GiB | spill |")
    print("|---|---|---|---|---|---|---|---|")
    c, a = rows
    print(f"| collect | {args.layers} | {args.pairs} | {args.width} | {c['seconds']:.1f} | {c['peak_rss_anon_gib']:.2f} |"
          f" {c['vm_hwm_gib']:.2f} | {c['spill_gib']:.1f} GiB {c['spill_dtype']} |")
    print(f"| analyse | {a['layers']} | {args.pairs} | {args.width} | {a['seconds']:.1f} | {a['peak_rss_anon_gib']:.2f} |"
          f" {a['vm_hwm_gib']:.2f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
