"""Stage-1 training benchmark on the real `tiny` preset (CPU).

(a) ReGap overhead: time of one training step (`regap.train.TrainStep`, what the training
    loop runs: forward, caption loss, ReGap, backward, AdamW step) with lambda > 0 over the
    same step with lambda = 0: same model, same batch, one process, alternating A/B/B/A so
    drifting machine load hits both sides alike. Target <= 1.03. The ReGap computation alone
    (loss + its backward on the layer-0 features) is timed separately.
(b) Stage-1 throughput and memory: `regap pretrain tiny-stage1` for a few steps in a
    child process; samples/s from its metrics.jsonl and the child's peak RSS
    (target <= 8 GB).
(c) float32 against bfloat16 on this CPU: the same training step (`TrainStep`, plain stage 1)
    with the frozen parts in float32 and in bfloat16 (+ bf16 autocast), alternating, and what
    `dtype: auto` picked here (regap.precision's probe) with its reason.
(d) the stage-1 step as a fraction of this CPU's own peak, in bfloat16 and in float32: the
    dense matmul peak for the dtype and thread count in use (a 4096^3 `torch.mm`, best of 4,
    measured before and after the steps in this process: `cpu_peak.py`) against the step's
    model FLOP/s (`gpu.py`'s convention, 4 N T: N = the LM's parameters, T = attended tokens),
    by wall time and by CPU time (CPU time stays meaningful when other jobs share the cores);
    under 0.75 (either count) one more step runs under torch.profiler and its time is split into the vision
    tower, projector, LM head, attention, other matmuls, other operators and Python/framework
    overhead (`step_profile.py`).

Usage:  python bench/train.py [--batch 4] [--pairs 5] [--steps 6] [--dtype auto]
        python bench/train.py --skip-a --skip-b --skip-c          # (d) only
Default runtime: a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4, help="samples per step in part (a)")
    p.add_argument("--pairs", type=int, default=5, help="timed lambda=0 / lambda>0 step pairs in part (a)")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps of tiny-stage1 in part (b)")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                   help="weights of the frozen parts in (a) and (b); auto = the shipped tiny-stage1 config")
    p.add_argument("--lam", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch/OpenMP threads; 1 by default: on a CPU shared with other jobs, 2 OpenMP threads "
                        "on 2 busy cores spin-wait and run 10-30x slower")
    p.add_argument("--skip-a", action="store_true")
    p.add_argument("--skip-b", action="store_true")
    p.add_argument("--skip-c", action="store_true")
    p.add_argument("--skip-d", action="store_true")
    p.add_argument("--efficiency-steps", type=int, default=3, help="timed steps per dtype in part (d)")
    p.add_argument("--dtype-pairs", type=int, default=3, help="timed float32 / bfloat16 step pairs in part (c)")
    return p.parse_args()


def training_step_setup(dtype: str, data: Path, batch_size: int) -> tuple:
    """The real tiny model set up for stage 1 as `regap pretrain` does (frozen parts in `dtype`)."""
    from accelerate import Accelerator

    from regap.data import LlavaJsonDataset
    from regap.models import load_model
    from regap.train import TrainConfig
    from regap.train.collate import Collator, TrainSamples
    from regap.train.setup import make_optimizer, setup_model

    config = TrainConfig.from_dict({"model": "tiny", "dtype": dtype,
                                    "data": {"json": str(data / "captions.json")}}).resolved()
    lvlm = load_model("tiny", dtype=config.dtype)
    module, _ = setup_model(lvlm, config, log=lambda m: None)
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=True)
    optimizer = make_optimizer(module, config)
    module, optimizer = accelerator.prepare(module, optimizer)
    dataset = LlavaJsonDataset(data / "captions.json")
    batch = Collator(lvlm, "plain", 256)([TrainSamples(dataset)[i] for i in range(batch_size)]).inputs
    return config, lvlm, module, accelerator, optimizer, batch


def part_a(args: argparse.Namespace, data: Path) -> dict:
    import torch

    from regap.train.regap_loss import ReGapLoss
    from regap.train.step import TrainStep

    config, lvlm, module, accelerator, optimizer, batch = training_step_setup(args.dtype, data, args.batch)
    regap = ReGapLoss(args.lam, warmup_steps=1)
    steps = {False: TrainStep(module, optimizer, accelerator=accelerator),
             True: TrainStep(module, optimizer, accelerator=accelerator, regap=regap)}

    def step(with_regap: bool) -> float:
        start = time.perf_counter()
        steps[with_regap](batch)
        return time.perf_counter() - start

    step(False), step(True)  # warm-up (allocations, oneDNN kernels)
    plain, regap_times = [], []
    for k in range(args.pairs):
        order = (False, True) if k % 2 == 0 else (True, False)
        for with_regap in order:
            (regap_times if with_regap else plain).append(step(with_regap))
        print(f"  pair {k + 1}: lam=0 {plain[-1]:.3f} s, lam={args.lam} {regap_times[-1]:.3f} s", flush=True)

    # The ReGap computation alone on captured layer-0 features (forward + backward).
    with torch.no_grad(), accelerator.autocast():
        embeds = lvlm.embed(batch.to(accelerator.device))
    features = embeds.detach().float().requires_grad_(True)
    op_times = []
    for _ in range(20):
        start = time.perf_counter()
        out = regap(features, batch.image_mask, batch.attention_mask)
        out.loss.backward()
        op_times.append(time.perf_counter() - start)
    med_plain, med_regap = statistics.median(plain), statistics.median(regap_times)
    return {
        "batch": args.batch, "tokens": list(batch.input_ids.shape), "dtype": config.dtype,
        "dtype_requested": args.dtype, "lam": args.lam,
        "plain_s": plain, "regap_s": regap_times,
        "median_plain_s": med_plain, "median_regap_s": med_regap, "ratio_median": med_regap / med_plain,
        "ratio_min": min(regap_times) / min(plain), "ratio_mean": statistics.mean(regap_times) / statistics.mean(plain),
        "regap_op_ms": 1000 * statistics.median(op_times),
    }


def part_c(args: argparse.Namespace, data: Path) -> dict:
    """float32 vs bfloat16 step times, alternating, and the `auto` choice on this machine."""
    from regap.precision import cpu_capability, cpu_probe, resolve_dtype
    from unit_time import training_step  # bench/unit_time.py: one stage-1 step of the shipped tiny config

    steps = {dtype: training_step(1, dtype, data, args.batch) for dtype in ("float32", "bfloat16")}
    times: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    for k in range(args.dtype_pairs):
        for dtype in (("float32", "bfloat16") if k % 2 == 0 else ("bfloat16", "float32")):
            times[dtype].append(steps[dtype]())
        print(f"  pair {k + 1}: float32 {times['float32'][-1]:.3f} s, bfloat16 {times['bfloat16'][-1]:.3f} s", flush=True)
    probe = cpu_probe()
    auto = resolve_dtype("auto", "cpu")
    fp32, bf16 = statistics.median(times["float32"]), statistics.median(times["bfloat16"])
    return {"batch": args.batch, "cpu_capability": cpu_capability(), "float32_s": times["float32"],
            "bfloat16_s": times["bfloat16"], "median_float32_s": fp32, "median_bfloat16_s": bf16,
            "bf16_over_fp32": bf16 / fp32, "probe": {"float32_s": probe.float32_s, "bfloat16_s": probe.bfloat16_s,
                                                     "ratio": probe.ratio},
            "auto": auto.to_dict()}


def part_d(args: argparse.Namespace, data: Path) -> dict:
    """The stage-1 step's model FLOP/s as a fraction of this CPU's matmul peak, bf16 and float32."""
    import gc

    import torch

    from cpu_peak import matmul_peak_flops
    from regap.models import load_model
    from regap.train import load_config
    from step_profile import hardware_flops, model_flops, profile_step, timed_step

    out = {}
    for dtype in ("bfloat16", "float32"):
        config = load_config("tiny-stage1", [f"dtype={dtype}", "mixed_precision=auto",
                                             f"data.json={data / 'captions.json'}"]).resolved()
        lvlm = load_model("tiny", dtype=dtype)
        run, batch = timed_step(lvlm, config, data / "captions.json", args.batch)
        run()  # warm-up (allocations, oneDNN kernels)
        peaks = [matmul_peak_flops(getattr(torch, dtype), args.threads)]
        steps = [run() for _ in range(args.efficiency_steps)]
        peaks.append(matmul_peak_flops(getattr(torch, dtype), args.threads))
        flops = model_flops(lvlm, batch)
        work = hardware_flops(lvlm, batch, config.gradient_checkpointing)
        wall, cpu = min(s["wall_s"] for s in steps), min(s["cpu_s"] for s in steps)
        peak_wall, peak_cpu = max(p["flops"] for p in peaks), max(p["flops_per_cpu_s"] for p in peaks)
        row = {"dtype": dtype, "batch": args.batch, "tokens": int(batch.attention_mask.sum()),
               "llm_parameters": flops // (4 * int(batch.attention_mask.sum())), "model_flops": flops, "steps": steps,
               "peaks": peaks, "model_tflops_per_s_wall": flops / wall / 1e12,
               "fraction_of_peak_wall": flops / wall / peak_wall, "fraction_of_peak_cpu": flops / cpu / peak_cpu,
               "hardware_flops": work, "hardware_fraction_of_peak_cpu": work / cpu / peak_cpu}
        if min(row["fraction_of_peak_cpu"], row["hardware_fraction_of_peak_cpu"]) < 0.75:
            row["profile"] = profile_step(run, lvlm)
        out[dtype] = row
        print(f"  {dtype}: best step {wall:.3f} s wall / {cpu:.3f} s CPU, {row['model_tflops_per_s_wall']:.3f} model "
              f"TFLOP/s; matmul peak {peak_wall / 1e12:.3f} TFLOP/s ({args.threads} thread(s)); fraction of peak "
              f"{row['fraction_of_peak_wall']:.2f} (wall), {row['fraction_of_peak_cpu']:.2f} (CPU time); the matmul "
              f"work done, counted part by part: {row['hardware_fraction_of_peak_cpu']:.2f} (CPU time)", flush=True)
        if "profile" in row:
            parts = ", ".join(f"{k} {v:.0%}" for k, v in row["profile"]["share"].items())
            print(f"    profile of one step ({row['profile']['step']['wall_s']:.2f} s): {parts}", flush=True)
        del lvlm, run
        gc.collect()
    return out


def part_b(args: argparse.Namespace, workdir: Path) -> dict:
    out = workdir / "tiny-s1"
    code = (
        "import sys; from regap.train import load_config, train; "
        "cfg = load_config('tiny-stage1', sys.argv[2:], stage=1); train(cfg, sys.argv[1])"
    )
    overrides = [f"max_steps={args.steps}", f"save_every={args.steps}", f"data.json={workdir / 'absent' / 'captions.json'}",
                 "data.synth.n=64", "observe.gap_every=0", "observe.mir_every=0", "observe.progress=false",
                 f"dtype={args.dtype}", "mixed_precision=auto"]
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    subprocess.run([sys.executable, "-c", code, str(out), *overrides], check=True, env=env)
    wall = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = rows[1:] or rows  # the first step pays one-off costs
    seconds = sum(8 / r["samples_per_s"] for r in steady)
    return {"steps": len(rows), "global_batch": 8, "samples_per_s": 8 * len(steady) / seconds,
            "samples_per_s_first_step": rows[0]["samples_per_s"], "peak_rss_gib": peak_kib / 2**20,
            "wall_s_including_model_load_and_data": wall}


def main() -> int:
    args = parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from regap.data import generate_synthetic

    from cpu_peak import machine

    report: dict = {"command": "python bench/train.py " + " ".join(sys.argv[1:]), "cpu": machine(),
                    "date": str(datetime.date.today()),
                    "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                               f"{args.threads} threads",
                    "load_average_start": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if not args.skip_a:
            generate_synthetic(workdir / "data", max(args.batch, 8), seed=0, image_size=224)
            print("(a) ReGap overhead, one process, same batch:", flush=True)
            report["a"] = part_a(args, workdir / "data")
            a = report["a"]
            print(f"  median step: lam=0 {a['median_plain_s']:.3f} s, lam={args.lam} {a['median_regap_s']:.3f} s; "
                  f"ratio {a['ratio_median']:.3f} (min-based {a['ratio_min']:.3f}, mean-based {a['ratio_mean']:.3f});"
                  f" ReGap op alone {a['regap_op_ms']:.2f} ms", flush=True)
        if not args.skip_b:
            print("(b) stage-1 throughput and peak RSS (child process):", flush=True)
            report["b"] = part_b(args, workdir)
            b = report["b"]
            print(f"  {b['samples_per_s']:.2f} samples/s over steps 2..{b['steps']} (global batch 8); "
                  f"peak RSS {b['peak_rss_gib']:.2f} GiB", flush=True)
        if not args.skip_c:
            if not (workdir / "data").exists():
                generate_synthetic(workdir / "data", max(args.batch, 8), seed=0, image_size=224)
            print("(c) float32 vs bfloat16 training step on this CPU:", flush=True)
            report["c"] = c = part_c(args, workdir / "data")
            print(f"  median step: float32 {c['median_float32_s']:.3f} s, bfloat16 {c['median_bfloat16_s']:.3f} s "
                  f"(bf16/fp32 {c['bf16_over_fp32']:.2f}x; CPU {c['cpu_capability']}); dtype auto -> "
                  f"{c['auto']['dtype']} ({c['auto']['reason']})", flush=True)
        if not args.skip_d:
            if not (workdir / "data").exists():
                generate_synthetic(workdir / "data", max(args.batch, 8), seed=0, image_size=224)
            print("(d) the stage-1 step as a fraction of this CPU's matmul peak:", flush=True)
            report["d"] = part_d(args, workdir / "data")
    report["load_average_end"] = os.getloadavg()
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
