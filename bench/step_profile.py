"""One stage-1 training step, timed and profiled: where a CPU step's time goes.

`timed_step` sets a model up as `regap pretrain` does (`setup_model`, AdamW, the training
template's collated batch) and returns `TrainStep` (what the loop runs) as a callable that
reports wall and CPU seconds: CPU seconds stay meaningful when other jobs share the machine,
wall seconds do not. `profile_step` runs one step under `torch.profiler` and splits its time
into the vision tower, the projector, the LM head over the vocabulary, attention, the other
matmuls, the rest of the operators, and what no operator accounts for (Python and framework
overhead).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm")
ATTENTION = ("scaled_dot_product", "flash_attention", "aten::_softmax", "aten::softmax")


def timed_step(lvlm: Any, config: Any, json_file: Path, batch_size: int) -> tuple[Callable[[], dict[str, float]], Any]:
    """(a callable running one `TrainStep` and returning its wall and CPU seconds, the batch).

    No Accelerator: its state is per process, and bf16 autocast is what Accelerate's
    mixed_precision=bf16 does on a CPU."""
    import torch

    from regap.data import LlavaJsonDataset
    from regap.train.collate import Collator, TrainSamples
    from regap.train.regap_loss import ReGapLoss
    from regap.train.setup import make_optimizer, setup_model
    from regap.train.step import TrainStep

    module, _ = setup_model(lvlm, config, log=lambda message: None)
    optimizer = make_optimizer(module, config)
    dataset = TrainSamples(LlavaJsonDataset(json_file, config.data.image_root))
    batch = Collator(lvlm, config.template, config.max_length)([dataset[i] for i in range(batch_size)]).inputs
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if config.mixed_precision == "bf16" else None
    regap = ReGapLoss(config.regap.lam, warmup_steps=config.regap.warmup_steps) if config.regap.lam > 0 else None
    step = TrainStep(module, optimizer, autocast=autocast, regap=regap, max_grad_norm=config.max_grad_norm)

    def run() -> dict[str, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        step(batch)
        return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}

    return run, batch


def model_flops(lvlm: Any, batch: Any) -> int:
    """`gpu.py`'s convention: 4 N T (frozen LM: forward and backward to its inputs), N = the LM's
    parameters, T = the batch's attended tokens."""
    n = sum(p.numel() for name, p in lvlm.llm.named_parameters() if "lora_" not in name)
    return 4 * n * int(batch.attention_mask.sum())


def hardware_flops(lvlm: Any, batch: Any, checkpointing: bool) -> int:
    """The matmul work a frozen-LM stage-1 step does, counted part by part (unlike `model_flops`,
    which counts the input embedding as if it were a matmul and the LM head at every position):
    decoder layers' forward and backward to their inputs, 4 N_layers T (+ 2 N_layers T recomputed
    under checkpointing); the LM head at target positions only, 4 V h t (`TrainModule` projects only
    those); the vision tower's forward, 2 N_vision T_vision (its attention scores, and the
    projector's few, left out)."""
    llm = lvlm.llm.get_base_model() if hasattr(lvlm.llm, "get_base_model") else lvlm.llm
    head = llm.get_output_embeddings().weight
    embed = llm.get_input_embeddings().weight
    n_llm = sum(p.numel() for name, p in llm.named_parameters() if "lora_" not in name)
    n_layers = n_llm - embed.numel() - (0 if head is embed else head.numel())
    tokens = int(batch.attention_mask.sum())
    targets = int((batch.labels[:, 1:] != -100).sum())
    images = 0 if batch.pixel_values is None else int(batch.pixel_values.shape[0])
    vision = sum(p.numel() for p in lvlm.vision.parameters()) * (lvlm.vision.num_patches + 1) * images
    return (4 + (2 if checkpointing else 0)) * n_layers * tokens + 4 * head.numel() * targets + 2 * vision


def _ranges(lvlm: Any) -> list[Any]:
    """Forward hooks that open a profiler range around the vision tower, the projector and the LM head."""
    import torch

    handles = []
    head = lvlm.llm.get_output_embeddings()
    for name, module in (("vision tower", lvlm.vision), ("projector", lvlm.projector), ("LM head", head)):
        opened: list[Any] = []

        def pre(_module: Any, _args: Any, name: str = name, opened: list[Any] = opened) -> None:
            opened.append(torch.profiler.record_function(f"regap::{name}").__enter__())

        def post(_module: Any, _args: Any, _out: Any, opened: list[Any] = opened) -> None:
            if opened:
                opened.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return handles


def profile_step(run: Callable[[], dict[str, float]], lvlm: Any) -> dict[str, Any]:
    """One step under `torch.profiler` (CPU): seconds per part, from operators' self times.

    Operators inside a hooked range (vision tower, projector, LM head forward) count for that
    range; the LM head's backward is recognised by a matmul with a vocabulary-sized operand;
    attention by its kernels; 'python and framework' is the step's wall time that no operator
    accounts for."""
    from torch.profiler import ProfilerActivity, profile

    vocab = int(lvlm.llm.get_output_embeddings().weight.shape[0])
    handles = _ranges(lvlm)
    try:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            timing = run()
    finally:
        for handle in handles:
            handle.remove()
    parts: dict[str, float] = {}
    for event in prof.events():
        if event.name.startswith("regap::") or event.name.startswith("ProfilerStep"):
            continue
        parent, area = event.cpu_parent, None
        while parent is not None:
            if parent.name.startswith("regap::"):
                area = parent.name[len("regap::"):]
                break
            parent = parent.cpu_parent
        shapes = [s for s in (event.input_shapes or []) if s]
        if area is None:
            if any(n in event.name for n in ATTENTION):
                area = "attention"
            elif event.name in MATMULS and any(vocab in s for s in shapes):
                area = "LM head"
            elif event.name in MATMULS:
                area = "other matmuls"
            else:
                area = "other operators"
        parts[area] = parts.get(area, 0.0) + event.self_cpu_time_total / 1e6
    accounted = sum(parts.values())
    parts = dict(sorted(parts.items(), key=lambda kv: -kv[1]))
    parts["python and framework"] = max(timing["wall_s"] - accounted, 0.0)
    return {"step": timing, "seconds": parts,
            "share": {k: v / max(timing["wall_s"], 1e-9) for k, v in parts.items()},
            "note": "operators' self times (each op's duration on the thread that called it; intra-op threads "
                    "are inside it); the step's wall time under the profiler"}
