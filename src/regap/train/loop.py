"""Stage-1 (projector pretraining, optionally with ReGap) and stage-2 (instruction tuning)
loops on Hugging Face Accelerate.

One function, :func:`train`, runs both stages from a :class:`TrainConfig`:

* stage 1: vision encoder and LLM frozen, the projector (and MoCa, when enabled) trains
  on captions with the ``plain`` template; ReGap adds ``lam * gap``;
* stage 2: projector + LLM (``tune: full``) or projector + LoRA adapters (``tune: lora``)
  on conversations with the model's chat template; ReGap is off by default.

The same code runs on one CPU, one GPU, or many GPUs under ``accelerate launch``
(DDP, FSDP, DeepSpeed ZeRO-2/3; configs in ``configs/``). The pieces live next door:
``setup`` (model, optimizer, Accelerator, ReGap, data file, probe set), ``step`` (one
micro-batch: `TrainStep`), ``checkpoint`` (save and resume), ``outputs`` (the trained
parts and provenance), ``text_stats`` (the Fréchet ReGap's corpus
statistics) and ``observe`` (metrics, progress, probe). This module runs them in order.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

from regap.errors import RegapError, RunInterrupted
from regap.files import file_sha256, write_text_atomic
from regap.train.checkpoint import projector_sha256
from regap.train import checkpoint as ckpt
from regap.train.collate import Collator, StepSampler, TrainBatch, TrainSamples
from regap.train.config import TrainConfig, config_differences
from regap.train.distributed import all_reduce_sum
from regap.train.module import trainable_parameters
from regap.train.observe import MetricsLog, Progress, probe_gaps
from regap.train.outputs import save_outputs, write_data_report, write_provenance
from regap.train.setup import (
    StepPlan,
    build_model,
    check_projector_early,
    feature_cache,
    make_regap,
    new_accelerator,
    prepare_step,
    probe_batches,
    resolve_data,
    setup_model,
    warn_unusual_regap,
)
from regap.train.step import LossWindow, NonFiniteLossError, StepLosses, StepOutcome, TrainStep, target_positions
from regap.train.text_stats import prepare_text_stats, uses_corpus_stats

if TYPE_CHECKING:
    from regap.models.lvlm import LVLM

__all__ = ["NonFiniteLossError", "TrainResult", "train"]


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    total_steps: int
    status: str  # "completed" | "stopped"
    checkpoint: Path | None
    last_metrics: dict[str, Any] = field(default_factory=dict)


def resume_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest checkpoint a resume of the run in `out_dir` would continue from (None: none yet)."""
    return ckpt.latest_checkpoint(Path(out_dir) / "checkpoints")


def train(config: TrainConfig, out_dir: str | Path, *, resume: bool = False, model: LVLM | None = None,
          command: str | None = None) -> TrainResult:
    """Run stage 1 or 2 as configured; write everything under ``out_dir``.

    ``model`` (optional) is an already built `LVLM` to train instead of ``config.model``.
    ``resume`` continues from the newest checkpoint in ``out_dir`` (a fresh start when
    there is none). Raises `NonFiniteLossError` when the loss becomes NaN/inf.
    """
    from accelerate.utils import set_seed

    from regap.checks import prepare_out_dir

    cfg = config.resolved()
    if model is None:
        check_projector_early(cfg)
    run = _Run(cfg, prepare_out_dir(out_dir), command)
    resume_from = run.resume_point(resume)
    saved = run.write_config(resume_from)
    set_seed(cfg.seed)
    warn_unusual_regap(cfg)
    run.load_data(resume_from)  # before the model: a bad path fails before minutes of loading

    lvlm = model if model is not None else build_model(cfg)
    module, _ = setup_model(lvlm, cfg, run.log)
    run.log_layout(module)
    samples = TrainSamples(run.dataset)
    features = feature_cache(cfg, lvlm, run.accelerator, run.log)
    collator = Collator(lvlm, cfg.template, cfg.max_length, image_keys=features is not None)
    plan = run.plan()
    regap, capture = make_regap(cfg, lvlm, run.accelerator.device)
    if regap is not None and uses_corpus_stats(cfg, lvlm):
        prepare_text_stats(regap, lvlm, run.dataset, cfg, run.data_sha, run.out_dir, run.accelerator, run.log)
    train_step = prepare_step(module, cfg, run.accelerator, plan.total_steps, regap, capture)
    module = train_step.module  # as prepared by the Accelerator
    probes = probe_batches(cfg, collator, samples, run.per_device)

    issues = _DataIssues()
    saver = _Saver(run, plan, issues, train_step, resume_from)
    step = start_step = saver.resume() if resume_from is not None else 0
    run.provenance(lvlm, status="running", step=step)
    if run.trackers:
        run.accelerator.init_trackers(cfg.observe.project, config=_flat(saved))
    watch = _Watch(run, plan, issues, start_step, probes, module, regap, capture)
    status = "completed"
    try:
        for batch in _micro_batches(samples, collator, run, plan, start_step):
            inputs = batch.inputs.to(run.accelerator.device)
            if features is not None and inputs.pixel_values is not None:
                inputs.image_features = features.features(batch.image_keys, inputs.pixel_values)
            outcome = train_step(inputs, target_positions(batch.inputs.labels),  # host labels: no device read
                                 explain=lambda losses, what: _non_finite_message(losses, step + 1, batch.ids,
                                                                                   saver.last, what))
            watch.add(outcome, batch)
            if not outcome.stepped:
                continue
            step += 1  # ---- one optimizer step done
            watch.step_done(step, outcome)
            if step % cfg.save_every == 0 or step == plan.total_steps:
                saver.save(step)
            if cfg.stop_after_steps is not None and cfg.stop_after_steps <= step < plan.total_steps:
                saver.save_once(step)
                status = "stopped"
                break
            if step >= plan.total_steps:
                break
    except KeyboardInterrupt:
        raise saver.interrupted(lvlm, step, start_step) from None
    except NonFiniteLossError as exc:
        watch.metrics.write({"event": "non_finite_loss", "step": step + 1, "message": str(exc)})
        run.provenance(lvlm, status="failed: non-finite loss", step=step)
        raise
    finally:
        watch.close()
        if capture is not None:
            capture.remove()
        if run.trackers:
            run.accelerator.end_training()

    save_outputs(run.accelerator, run.out_dir, module, cfg, regap, step)
    if run.main:
        write_data_report(run.out_dir, run.dataset, issues.skipped, issues.truncated)
    run.provenance(lvlm, status=status, step=step, alpha=regap.alpha if regap is not None else None)
    run.log(f"{status} at step {step}/{plan.total_steps}; outputs in {run.out_dir}")
    run.accelerator.wait_for_everyone()
    return TrainResult(run.out_dir, step, plan.total_steps, status, saver.last, watch.last_row)


# ---------------------------------------------------------------------- the run's context


class _Run:
    """One run's fixed context: config, output folder, Accelerator and batch layout, the log
    file, and (after `load_data`) the training data."""

    def __init__(self, cfg: TrainConfig, out_dir: Path, command: str | None) -> None:
        self.cfg, self.out_dir, self.command = cfg, out_dir, command
        self.accelerator, self.per_device, self.accumulation, self.trackers = new_accelerator(cfg, out_dir)
        self.main = self.accelerator.is_main_process
        self.world = self.accelerator.num_processes
        self.json_path: Path | None = None
        self.dataset: Any = None
        self.data_sha = ""
        #: the initial projector's content (stage 2), so a resume from a moved folder checks it by hash
        self.projector_sha = projector_sha256(cfg.projector)

    def log(self, message: str) -> None:
        if self.main:
            with (self.out_dir / "train.log").open("a", encoding="utf-8") as handle:
                handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
            if self.cfg.observe.progress:
                print(message, flush=True)

    def resume_point(self, resume: bool) -> Path | None:
        """The checkpoint to continue from; a folder with checkpoints needs ``resume``. Resuming a
        folder without one starts afresh, quietly: the study and the demo always ask to resume, and
        `regap pretrain --resume` says it itself."""
        existing = resume_checkpoint(self.out_dir)
        if existing is not None and not resume:
            raise RegapError(f"{self.out_dir} already holds checkpoints ({existing.name}); pass --resume to continue "
                             "it, or choose another --out")
        return existing if resume else None

    def write_config(self, resume_from: Path | None) -> dict[str, Any]:
        """``config.yaml`` as used (batch layout included); a resume may change run-control keys only."""
        cfg = self.cfg
        saved = cfg.to_dict()
        saved["per_device_batch_size"], saved["gradient_accumulation_steps"] = self.per_device, self.accumulation
        path = self.out_dir / "config.yaml"
        if resume_from is not None and path.is_file():
            from regap.train.config import read_yaml

            changed = config_differences(read_yaml(path), saved)
            if changed:
                raise RegapError(f"cannot resume {self.out_dir}: the config differs in {', '.join(changed)} "
                                 "(only run-control keys such as stop_after_steps, save_every, observe.* may change, "
                                 "and paths whose content is unchanged)")
        if self.main:
            import yaml

            header = (f"# regap training config as used (stage {cfg.stage}); batch layout derived for {self.world} "
                      f"process(es): {self.per_device} per device x {self.accumulation} accumulation x {self.world}\n")
            write_text_atomic(path, header + yaml.safe_dump(saved, sort_keys=False))
        return saved

    def load_data(self, resume_from: Path | None) -> None:
        """The training data (synthesised when configured so); a resume refuses changed data."""
        from regap.data.llava_json import LlavaJsonDataset

        cfg = self.cfg
        self.json_path, image_root = resolve_data(cfg, self.out_dir, self.accelerator, self.log)
        self.dataset = dataset = LlavaJsonDataset(self.json_path, image_root, max_items=cfg.data.max_items)
        self.data_sha = file_sha256(self.json_path)
        if resume_from is not None:
            ckpt.check_resume_data(resume_from, self.json_path, self.data_sha)
            ckpt.check_resume_projector(resume_from, self.projector_sha)
        report = dataset.report
        if self.main:
            dataset.write_report(self.out_dir / "data_report.json")
            if report.missing_images:
                self.log(f"{len(report.missing_images)} sample(s) skipped: image missing from {dataset.image_root} "
                         f"(listed in {self.out_dir / 'data_report.json'})")
            if report.malformed:
                self.log(f"{len(report.malformed)} malformed row(s) skipped (listed in {self.out_dir / 'data_report.json'})")
        if len(dataset) < cfg.global_batch_size:
            raise RegapError(f"{self.json_path}: {len(dataset)} usable samples, fewer than one global batch "
                             f"({cfg.global_batch_size}); lower global_batch_size")

    def log_layout(self, module: Any) -> None:
        n_trainable = sum(p.numel() for p in trainable_parameters(module).values())
        self.log(f"stage {self.cfg.stage} ({self.cfg.tune}): {n_trainable:,} trainable parameters; {self.world} "
                 f"process(es), {self.per_device} per device x {self.accumulation} accumulation = global batch "
                 f"{self.cfg.global_batch_size}")

    def plan(self) -> StepPlan:
        plan = StepPlan.of(len(self.dataset), self.cfg)
        if plan.left_out:
            self.log(f"{plan.left_out} sample(s) per epoch left out (incomplete last global batch)")
        return plan

    def provenance(self, lvlm: LVLM, **extra: Any) -> None:
        if self.main:
            write_provenance(self.out_dir, self.cfg, lvlm, self.json_path, self.data_sha, self.dataset, self.world,
                             self.per_device, self.accumulation, self.accelerator, self.command, **extra)


def _micro_batches(samples: TrainSamples, collator: Collator, run: _Run, plan: StepPlan,
                   start_step: int) -> Iterator[TrainBatch]:
    """This process's micro-batches from optimizer step ``start_step`` on, epoch after epoch
    (each epoch in its own seeded order, so a resumed run starts mid-epoch exactly)."""
    cfg = run.cfg
    if start_step >= plan.total_steps:
        return
    for epoch in range(start_step // plan.steps_per_epoch, plan.n_epochs):
        sampler = StepSampler(len(samples), global_batch=cfg.global_batch_size, per_device=run.per_device,
                              accumulation=run.accumulation, num_processes=run.world,
                              process_index=run.accelerator.process_index, seed=cfg.seed, epoch=epoch,
                              start_step=max(start_step - epoch * plan.steps_per_epoch, 0))
        yield from torch.utils.data.DataLoader(samples, batch_sampler=sampler, collate_fn=collator,
                                               num_workers=cfg.data.num_workers,
                                               pin_memory=run.accelerator.device.type == "cuda",
                                               # worker seeds from their own generator: creating the
                                               # loader must not draw from the global RNG (exact resume)
                                               generator=torch.Generator().manual_seed(cfg.seed + epoch))


# ---------------------------------------------------------------------- checkpoints


class _Saver:
    """Writes the run's checkpoints (with ``data_report.json`` next to them) and resumes from one."""

    def __init__(self, run: _Run, plan: StepPlan, issues: "_DataIssues", train_step: TrainStep,
                 resume_from: Path | None) -> None:
        self.run, self.plan, self.issues = run, plan, issues
        self.module, self.optimizer, self.scheduler = train_step.module, train_step.optimizer, train_step.scheduler
        self.regap = train_step.regap
        self.resume_from = resume_from
        self.last: Path | None = resume_from

    def resume(self) -> int:
        """Load `resume_from`; the step it was saved at."""
        run = self.run
        state = ckpt.load_checkpoint(run.accelerator, self.resume_from, self.module, self.optimizer, self.scheduler,
                                     self.regap)
        if state["global_batch_size"] != run.cfg.global_batch_size:
            raise RegapError(f"cannot resume: the checkpoint used global batch {state['global_batch_size']}")
        step = int(state["step"])
        self.issues.skipped = list(state.get("skipped_images", []))
        self.issues.truncated = int(state.get("truncated", 0))
        run.log(f"resumed from {self.resume_from} at step {step}/{self.plan.total_steps}")
        return step

    def state(self, step: int) -> dict[str, Any]:
        cfg, run, plan = self.run.cfg, self.run, self.plan
        return {"step": step, "epoch": step // plan.steps_per_epoch, "step_in_epoch": step % plan.steps_per_epoch,
                "samples_seen": step * cfg.global_batch_size, "total_steps": plan.total_steps,
                "global_batch_size": cfg.global_batch_size, "world_size": run.world,
                "per_device_batch_size": run.per_device, "gradient_accumulation_steps": run.accumulation,
                "seed": cfg.seed, "skipped_images": self.issues.skipped, "truncated": self.issues.truncated,
                "data_sha256": run.data_sha, "projector_sha256": run.projector_sha,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def save(self, step: int) -> Path:
        run = self.run
        self.last = ckpt.save_checkpoint(run.accelerator, run.out_dir, step, self.state(step), self.module,
                                         self.optimizer, self.scheduler, self.regap, run.cfg.keep_checkpoints)
        if run.main:
            write_data_report(run.out_dir, run.dataset, self.issues.skipped, self.issues.truncated)
        return self.last

    def save_once(self, step: int) -> None:
        """A checkpoint at ``step`` unless the last one is that step's already."""
        if self.last is None or self.last.name != ckpt.checkpoint_name(step):
            self.save(step)

    def interrupted(self, lvlm: LVLM, step: int, start_step: int) -> RunInterrupted:
        """Ctrl-C: save where the run stands (one process only: the others may be mid-collective),
        record it, and say how to continue."""
        run = self.run
        if run.world == 1 and step > start_step:
            self.save_once(step)
        where = (f"training stopped at step {step}/{self.plan.total_steps}; "
                 + (f"last checkpoint {self.last}" if self.last is not None else "no checkpoint yet"))
        run.provenance(lvlm, status="interrupted", step=step, checkpoint=str(self.last) if self.last else None)
        run.log(f"interrupted: {where}; continue with --resume")
        return RunInterrupted(where, resume=f"continue with --resume --out {run.out_dir}")


# ---------------------------------------------------------------------- watching


class _Watch:
    """Per optimizer step: the ``metrics.jsonl`` row, the progress bar and, when due, the probe."""

    def __init__(self, run: _Run, plan: StepPlan, issues: "_DataIssues", start_step: int, probes: list[Any],
                 module: Any, regap: Any, capture: Any) -> None:
        self.run, self.plan, self.issues, self.probes = run, plan, issues, probes
        self.module, self.regap, self.capture = module, regap, capture
        self.metrics = MetricsLog(run.out_dir / "metrics.jsonl", run.accelerator, enabled=run.main)
        self.metrics.truncate_after(start_step)  # rows past the checkpoint (or of a failed first attempt) are redone
        self.progress = Progress(plan.total_steps, start_step, enabled=run.main and run.cfg.observe.progress,
                                 desc=f"stage {run.cfg.stage}")
        self.window = LossWindow()
        self.last_row: dict[str, Any] = {}
        self.t_step = self.t_start = time.perf_counter()
        self.first_row_of_sitting = True

    def add(self, outcome: StepOutcome, batch: TrainBatch) -> None:
        self.window.add(outcome.losses, batch)
        self.issues.add(batch)

    def step_done(self, step: int, outcome: StepOutcome) -> None:
        """Device values (losses, alpha, grad norm) are read back only for a row that is written
        (or returned): other steps queue their work without waiting for the device."""
        cfg, run, regap = self.run.cfg, self.run, self.regap
        if self.issues.sync(run.accelerator) and run.main:
            warnings.warn(f"conversation(s) longer than max_length={cfg.max_length} tokens are truncated "
                          "(counted in metrics.jsonl and data_report.json)", stacklevel=2)
        now = time.perf_counter()
        last = step == self.plan.total_steps
        gap_due = cfg.observe.gap_every and (step % cfg.observe.gap_every == 0 or last)
        mir_due = cfg.observe.mir_every and (step % cfg.observe.mir_every == 0 or last)
        probing = bool(self.probes and (gap_due or mir_due))
        logged = step % cfg.observe.log_every == 0 or last or probing
        read = logged or (cfg.stop_after_steps is not None and step >= cfg.stop_after_steps)
        row = {"step": step, "epoch": round(step / self.plan.steps_per_epoch, 4),
               **(self.window.summary() if read else {}),
               "lr": cfg.lr * outcome.lr_factor, "lr_projector": cfg.projector_lr * outcome.lr_factor,
               "samples_per_s": cfg.global_batch_size / max(now - self.t_step, 1e-9)}
        if read:
            row.update({"alpha": regap.alpha if regap is not None else None,
                        "alpha_frozen": regap.frozen if regap is not None else None,
                        "grad_norm": float(outcome.grad_norm) if outcome.grad_norm is not None else None})
        row.update({"truncated": self.issues.truncated, "skipped_images": len(self.issues.skipped),
                    "elapsed_s": round(now - self.t_start, 3)})
        self.t_step = now
        self.window = LossWindow()
        if probing:
            row.update(probe_gaps(run.accelerator.unwrap_model(self.module), self.probes, run.accelerator.device,
                                  with_mir=bool(mir_due), autocast=run.accelerator.autocast,
                                  text_tokens=cfg.observe.text_tokens))
            if self.capture is not None:
                self.capture.clear()
            self.t_step = time.perf_counter()  # probe time is not training throughput
        if logged:
            if self.first_row_of_sitting:  # elapsed_s restarts here (regap.train.observe.training_seconds)
                row["sitting_start"] = True
                self.first_row_of_sitting = False
            self.metrics.write(row)
        self.progress.update(row)
        self.last_row = row

    def close(self) -> None:
        self.progress.close()


class _DataIssues:
    """Truncated conversations and corrupt images, pooled over processes once per optimizer step."""

    def __init__(self) -> None:
        self.truncated = 0
        self.skipped: list[dict[str, Any]] = []
        self._pending_truncated = 0
        self._pending_skipped: list[dict[str, Any]] = []

    def add(self, batch: Any) -> None:
        self._pending_truncated += batch.truncated
        self._pending_skipped += batch.skipped

    def sync(self, accelerator: Any) -> bool:
        """Fold the pending counts in; True when the first truncation was just seen."""
        before = self.truncated
        if accelerator.num_processes == 1:
            truncated, skipped = self._pending_truncated, self._pending_skipped
        else:
            counts = torch.tensor([self._pending_truncated, len(self._pending_skipped)], dtype=torch.float64,
                                  device=accelerator.device)
            counts = all_reduce_sum(counts, grad=False)
            truncated, skipped = int(counts[0]), []
            if int(counts[1]):
                from accelerate.utils import gather_object

                skipped = [entry for part in gather_object([self._pending_skipped]) for entry in part]
        self.truncated += truncated
        self.skipped += skipped
        self._pending_truncated, self._pending_skipped = 0, []
        return before == 0 and self.truncated > 0


def _non_finite_message(losses: StepLosses, step: int, ids: list[str], last: Path | None, what: str = "loss") -> str:
    where = f"the last good checkpoint is {last}" if last is not None else "no checkpoint was written yet"
    gap = f", gap {losses.gap}" if losses.gap is not None else ""
    return (f"non-finite {what} (loss {float(losses.total.detach())}: caption {losses.caption}{gap}) at step {step} "
            f"(samples {', '.join(ids[:4])}{'...' if len(ids) > 4 else ''}); stopped before the optimizer step, "
            f"{where}. Lower lr, use bf16 rather than fp16, or check the data; then continue with --resume")


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as flat ``a.b`` keys with plain values (what trackers take as hyperparameters)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            out[name] = value if value is not None else "null"
        else:
            out[name] = str(value)
    return out
