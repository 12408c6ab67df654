"""The one training loop of sparsekern: ``train_steps``. Two drivers run it:

- ``Trainer``: a number of SGD steps on a seeded batch order that depends only on (seed, step), so a run
  rewound to step k sees the same batches as the run it came from (the studies, the demo, IMP);
- ``fit``: epochs over a ``DataLoader`` with a scheduler, per-epoch validation and a JSON log (the CLI).

Every step: forward, loss, backward, optimizer step, then the DST algorithm's ``step()`` if any. Hooks:
gradient flow recorded at chosen steps (``GradFlowProbe``), a callback per step, checkpoints every N steps.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .analysis import Evaluation, evaluate, grad_norm
from .distributed import (
    all_reduce_totals,
    average_float_buffers,
    gather_objects,
    is_main_process,
    own_examples,
    set_epoch,
    unwrap,
)
from .lottery import to_dense_model
from .nn import SparseWeightMixin

__all__ = ["LR_SCHEDULES", "lr_factor", "lr_scheduler", "GradFlowProbe", "StepInfo", "train_steps", "Trainer",
           "TrainResult", "fit", "evaluate", "Evaluation", "save_checkpoint", "load_checkpoint",
           "read_fit_checkpoint", "ResumeError", "dense_state"]

LR_SCHEDULES = ("constant", "cosine", "step")


def _check_int(where: str, name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where}: {name} must be an int >= {minimum}, got {value!r}")
    return value


def lr_factor(step: int, total: int, schedule: str = "cosine", warmup_steps: int = 0) -> float:
    """The learning rate of ``step`` (from 0) of ``total`` as a fraction of the peak: ``cosine`` (to 0),
    ``step`` (x0.1 at 50 % and 75 %) or ``constant``, ramped up linearly over the first ``warmup_steps``."""
    ramp = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    if schedule == "cosine":
        return ramp * 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1)))
    if schedule == "step":
        return ramp * (0.01 if step >= 0.75 * total else 0.1 if step >= 0.5 * total else 1.0)
    if schedule == "constant":
        return ramp
    raise ValueError(f"lr_factor: schedule must be one of {LR_SCHEDULES}, got {schedule!r}")


def lr_scheduler(optimizer: torch.optim.Optimizer, total: int, schedule: str = "cosine",
                 warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step scheduler of ``optimizer`` following ``lr_factor`` (what ``Trainer`` runs, for ``fit``)."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_scheduler: schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    _check_int("lr_scheduler", "warmup_steps", warmup_steps, 0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, schedule, warmup_steps))


# -- hooks ---------------------------------------------------------------------------------------
@dataclass
class GradFlowProbe:
    """Records the gradient flow (``sparsekern.analysis.grad_norm``, no weight decay) at chosen steps:
    every ``every`` steps from step 0 (0: never) and at the steps in ``at``; on ``batch``, or on the current
    training batch when ``batch`` is None. A record holds step, loss, active and dense norms, and with
    ``per_param`` the norms of every parameter too. While it measures, the DST algorithm is paused (the
    probe's backward must not enter RigL's dense gradient)."""
    batch: Optional[tuple] = None
    every: int = 0
    at: Sequence[int] = ()
    per_param: bool = False
    loss_fn: Callable = field(default=F.cross_entropy)
    records: List[dict] = field(default_factory=list)

    def __post_init__(self):
        _check_int("GradFlowProbe", "every", self.every, 0)

    def wants(self, step: int) -> bool:
        return bool(self.every and step % self.every == 0) or step in self.at

    def record(self, model: nn.Module, step: int, batch: Optional[tuple] = None, dst=None) -> dict:
        with dst.paused() if dst is not None else contextlib.nullcontext():
            g = grad_norm(model, self.batch if self.batch is not None else batch, self.loss_fn)
        rec = {"step": step, **g.to_dict()} if self.per_param else \
            {"step": step, "loss": g.loss, "active": g.active, "dense": g.dense}
        self.records.append(rec)
        return rec


@dataclass
class StepInfo:
    """What ``train_steps`` passes to ``on_step`` after each step (``step`` counts steps done)."""
    step: int
    loss: float
    output: torch.Tensor
    target: torch.Tensor
    pattern_changed: bool
    lr: float


# -- checkpoints ---------------------------------------------------------------------------------
def save_checkpoint(path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None, dst=None,
                    step: int = 0, **extra) -> Path:
    """Write model, optimizer and DST state (a sparse layer's pattern is in its state_dict) at ``step``.
    A DistributedDataParallel model is saved as the module it wraps (loads into a single-process model)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"step": step, "model": unwrap(model).state_dict(), **extra,
             "optimizer": optimizer.state_dict() if optimizer is not None else None,
             "dst": dst.state_dict() if dst is not None else None}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # never a half-written checkpoint
    return path


def load_checkpoint(path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None, dst=None) -> int:
    """Restore what ``save_checkpoint`` wrote into ``model`` (and ``optimizer``, ``dst``); returns the step."""
    state = torch.load(path, map_location=next(model.parameters()).device, weights_only=False)
    unwrap(model).load_state_dict(state["model"])
    for name, obj in (("optimizer", optimizer), ("dst", dst)):
        if obj is not None:
            if state[name] is None:
                raise ValueError(f"load_checkpoint: {path} holds no {name} state, but a {name} was given")
            obj.load_state_dict(state[name])
    return int(state["step"])


# -- the loop ------------------------------------------------------------------------------------
def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable, *, start_step: int = 0,
                lr_at: Optional[Callable[[int], float]] = None, scheduler=None, dst=None,
                grad_flow: Optional[GradFlowProbe] = None, on_step: Optional[Callable[[StepInfo], None]] = None,
                checkpoint_every: int = 0, checkpoint_path=None, loss_fn: Callable = F.cross_entropy,
                progress: bool = True, desc: str = "train", total: Optional[int] = None, log_every: int = 50,
                device=None, checkpoint_extra: Optional[Callable[[int], dict]] = None) -> float:
    """Train ``model`` in place on ``batches`` (each an (x, y) pair), numbering steps from ``start_step``;
    return the seconds spent in training steps (measurements and checkpoints not counted).

    Per step: gradient flow first if ``grad_flow`` wants this step (it sees the weights the step starts
    from); the learning rate ``lr_at(step)`` if given; forward, ``loss_fn``, backward, ``optimizer.step()``,
    ``dst.step()``, ``scheduler.step()`` (per step) if given; ``on_step(StepInfo)``; a checkpoint every
    ``checkpoint_every`` steps to ``checkpoint_path``, with the entries ``checkpoint_extra(step)`` returns
    (called on every rank, so it may gather from all of them).

    Under DDP (``model`` a DistributedDataParallel, every rank running this on its own batches) only rank 0
    shows progress and writes checkpoints; the gradient flow is measured on the wrapped module, each rank
    on its own batch, outside DDP's gradient synchronization.
    """
    _check_int("train_steps", "checkpoint_every", checkpoint_every, 0)
    if checkpoint_every and checkpoint_path is None:
        raise ValueError("train_steps: checkpoint_every needs a checkpoint_path, got None")
    device = device or next(model.parameters()).device
    main = is_main_process()
    progress = progress and main
    model.train()
    step, elapsed = start_step, 0.0
    # One iterator over the batches: tqdm.auto's bar calls iter() on what it is given when it is made and again
    # when iterated, and a second DataLoader iterator draws another seed from the loader's generator (and would
    # start its workers twice), so the order would depend on the wrapping
    bar = tqdm(iter(batches), desc=desc, total=total if total is not None else _length(batches),
               disable=not progress, leave=False)
    for batch in bar:
        if grad_flow is not None and grad_flow.wants(step):
            grad_flow.record(unwrap(model), step, batch, dst)
            model.train()
        start = time.perf_counter()
        if lr_at is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        out = model(x)
        loss = loss_fn(out, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        changed = bool(dst.step()) if dst is not None else False
        if scheduler is not None:
            scheduler.step()
        elapsed += time.perf_counter() - start
        step += 1
        if on_step is not None or (progress and log_every and step % log_every == 0):
            loss_value = loss.item()
            if on_step is not None:
                on_step(StepInfo(step, loss_value, out.detach(), y, changed, lr))
            if progress and log_every and step % log_every == 0:
                bar.set_postfix(loss=f"{loss_value:.4f}")
        if checkpoint_every and step % checkpoint_every == 0:
            extra = checkpoint_extra(step) if checkpoint_extra is not None else {}
            if main:
                save_checkpoint(checkpoint_path, model, optimizer, dst, step, **extra)
    return elapsed


def dense_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The model's state_dict as a dense model would hold it (a sparse layer's weight dense, zeros outside
    its pattern): what IMP rewinds to."""
    if not any(isinstance(m, SparseWeightMixin) for m in model.modules()):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {k: v.detach().clone() for k, v in to_dense_model(model).state_dict().items()}


# -- driver 1: steps on a seeded order (studies, demo, IMP) ---------------------------------------------
@dataclass
class TrainResult:
    """What one ``Trainer`` call did: gradient flow every ``grad_flow_every`` steps (step, loss, active and
    dense norms), the final held-out accuracy and loss, seconds per step, and the dense state_dict at
    ``snapshot_step`` (None if that step was not crossed)."""
    grad_flow: List[dict]
    accuracy: Optional[float]
    loss: Optional[float]
    seconds_per_step: float
    snapshot: Optional[Dict[str, torch.Tensor]] = None


@dataclass
class Trainer:
    """Trains a model for steps ``[start_step, steps)`` with SGD (momentum, weight decay) on a seeded data
    order that depends only on ``seed`` and the step, so a run rewound to step k sees the same batches
    k..steps-1 as the run it was rewound from.

    ``dataset`` yields a whole batch for a list of indices (``sparsekern.data.ArrayDataset``). Gradient flow
    is measured on ``held_out`` every ``grad_flow_every`` steps and after the last step; ``eval_loader``
    gives the final accuracy. The learning rate follows ``lr_schedule`` over the whole run of ``steps``:
    ``constant``, ``cosine`` (to 0) or ``step`` (x0.1 at 50 % and 75 %), ramped up linearly over the first
    ``warmup_steps`` (a full-rate first step can diverge: dense LeNet-5 at lr 0.05 did on one seed of ten).
    With ``checkpoint_every`` the
    model, optimizer and DST state go to ``checkpoint_path`` every that many steps.
    """
    dataset: object
    steps: int
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"
    seed: int = 0
    held_out: Optional[tuple] = None
    grad_flow_every: int = 0
    eval_loader: Optional[Iterable] = None
    progress: bool = True
    loss_fn: Callable = field(default=F.cross_entropy)
    checkpoint_every: int = 0
    checkpoint_path: Optional[str] = None
    warmup_steps: int = 0

    def __post_init__(self):
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"Trainer: lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        _check_int("Trainer", "steps", self.steps, 0)
        _check_int("Trainer", "batch_size", self.batch_size, 1)
        _check_int("Trainer", "grad_flow_every", self.grad_flow_every, 0)
        _check_int("Trainer", "warmup_steps", self.warmup_steps, 0)
        self.last_dst = None

    def lr_at(self, step: int) -> float:
        return self.lr * lr_factor(step, self.steps, self.lr_schedule, self.warmup_steps)

    def batch_indices(self, step: int) -> List[int]:
        """The indices of the batch of ``step``: epoch e's order is a permutation seeded by (seed, e)."""
        n = len(self.dataset)
        per_epoch = max(n // self.batch_size, 1)  # drop the last partial batch
        epoch, i = divmod(step, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
        return perm[i * self.batch_size:(i + 1) * self.batch_size].tolist()

    def __call__(self, model: nn.Module, start_step: int = 0, snapshot_step: Optional[int] = None,
                 desc: str = "train", dst_factory: Optional[Callable] = None) -> TrainResult:
        """Train ``model`` in place; ``dst_factory(model, optimizer, total_steps)`` may return a
        ``sparsekern.dst`` algorithm stepped after every optimizer step (kept as ``self.last_dst``)."""
        optimizer = torch.optim.SGD(model.parameters(), lr=self.lr_at(start_step), momentum=self.momentum,
                                    weight_decay=self.weight_decay)
        dst = dst_factory(model, optimizer, max(self.steps - start_step, 1)) if dst_factory else None
        probe = None
        if self.held_out is not None and self.grad_flow_every:
            probe = GradFlowProbe(self.held_out, self.grad_flow_every, loss_fn=self.loss_fn)
        snapshot = dense_state(model) if snapshot_step == start_step else None

        def on_step(info: StepInfo) -> None:
            nonlocal snapshot
            if info.step == snapshot_step:
                snapshot = dense_state(model)

        batches = (self.dataset[self.batch_indices(step)] for step in range(start_step, self.steps))
        elapsed = train_steps(model, optimizer, batches, start_step=start_step, lr_at=self.lr_at, dst=dst,
                              grad_flow=probe, on_step=on_step if snapshot_step is not None else None,
                              checkpoint_every=self.checkpoint_every, checkpoint_path=self.checkpoint_path,
                              loss_fn=self.loss_fn, progress=self.progress, desc=desc,
                              total=max(self.steps - start_step, 0), log_every=0)
        if dst is not None:
            dst.remove_hooks()
        if probe is not None:
            probe.record(model, self.steps)
        self.last_dst = dst
        loss, accuracy = (evaluate(model, self.eval_loader, self.loss_fn) if self.eval_loader is not None
                          else (None, None))
        return TrainResult(probe.records if probe else [], accuracy, loss,
                           elapsed / max(self.steps - start_step, 1), snapshot)


# -- driver 2: epochs over a DataLoader (the CLI) -------------------------------------------------------
def _correct(output: torch.Tensor, target: torch.Tensor) -> Optional[int]:
    """Number of correct top-1 predictions, or None where the task is not classification."""
    if output.dim() != 2 or target.dim() != 1 or target.dtype not in (torch.int64, torch.int32):
        return None
    return int((output.argmax(1) == target).sum())


def _write(log: dict, log_path) -> None:
    if log_path is not None:
        path = Path(log_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(log, indent=1))


def fit(model: nn.Module, train_loader: Iterable, val_loader: Optional[Iterable], epochs: int,
        optimizer: torch.optim.Optimizer, scheduler=None, dst=None, loss_fn: Callable = F.cross_entropy,
        log_every: int = 50, grad_flow_every: int = 0, log_path=None, scheduler_interval: str = "epoch",
        progress: bool = True, device=None, checkpoint_every: int = 0, checkpoint_path=None, resume=None,
        checkpoint_meta: Optional[dict] = None) -> dict:
    """Train ``model`` for ``epochs`` epochs with ``train_steps``; return the log (also written as JSON to
    ``log_path``).

    ``scheduler`` steps once per epoch (or per step with ``scheduler_interval="step"``). The log holds the
    loss every ``log_every`` steps; every ``grad_flow_every`` steps (0: never, else from step 0) the gradient
    flow (``sparsekern.analysis.grad_norm``, per parameter too) on the first validation batch (the current
    training batch without a validation loader); and per epoch the train and validation loss and accuracy
    and the number of pattern updates that changed a pattern. ``checkpoint_every`` steps (and after each
    epoch, when set) model, optimizer and DST state go to ``checkpoint_path``, with what resuming needs: the
    scheduler, the log so far, the position in the data (the epoch, its steps done, the training loader's
    generator at the epoch's start), the epoch's running totals, the RNG state and, under
    DDP, each rank's own of these and its BatchNorm statistics; and ``checkpoint_meta`` (the CLI's arguments).

    ``resume``: such a checkpoint (a path, or the dict ``torch.load`` gave). Everything it holds is restored
    and training goes on from its step, skipping the batches of its epoch already trained on: given the
    same model, data, optimizer, scheduler and DST algorithm as built for the run that wrote it, the rest of
    the run is the run that was interrupted (bit for bit where the kernels are deterministic). The log
    returned is the whole run's.

    Under DDP (``model`` a DistributedDataParallel; every rank calls ``fit`` with its shard of the data, see
    ``sparsekern.data.make_loaders``): each epoch starts with ``set_epoch`` on the training sampler; the
    epoch's train loss and accuracy and the validation numbers are those of all ranks together (the same on
    every rank, and without the examples DistributedSampler repeats to pad the shards to equal length);
    BatchNorm's running statistics are averaged over ranks before validation; only rank 0
    writes the log and checkpoints and prints. The per-step losses in the log are rank 0's. A checkpoint's
    model is rank 0's (mid-epoch, its BatchNorm statistics are rank 0's own until the epoch's average).
    """
    _check_int("fit", "epochs", epochs, 0)
    _check_int("fit", "log_every", log_every, 0)
    _check_int("fit", "grad_flow_every", grad_flow_every, 0)
    if scheduler_interval not in ("epoch", "step"):
        raise ValueError(f"fit: scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}")
    device = device or next(model.parameters()).device
    distributed = isinstance(model, nn.parallel.DistributedDataParallel)
    main = is_main_process()
    generator = getattr(train_loader, "generator", None)
    log = {"steps": [], "grad_flow": [], "epochs": []}
    step, first_epoch, resumed = 0, 0, None
    if resume is not None:
        resumed = _resume_fit(resume, model, optimizer, scheduler, dst, epochs, device, generator,
                              _length(train_loader))
        log, step, first_epoch = resumed["log"], resumed["step"], resumed["epochs_done"]
    held_out = next(iter(val_loader)) if val_loader is not None and grad_flow_every else None
    # DistributedSampler repeats examples to give every rank as many: the epoch's train numbers leave them out
    own = own_examples(train_loader)
    length = _length(train_loader)
    probe = GradFlowProbe(held_out, grad_flow_every, per_param=True, loss_fn=loss_fn, records=log["grad_flow"])
    for epoch in range(first_epoch, epochs):
        midway = resumed if resumed is not None and epoch == first_epoch and resumed["epoch_steps"] else None
        loader_state = generator.get_state() if generator is not None else None  # this epoch's order
        start = time.perf_counter() - (midway["epoch_seconds"] if midway else 0.0)
        set_epoch(train_loader, epoch)
        totals = dict(midway["totals"]) if midway else {"loss": 0.0, "correct": 0, "count": 0, "seen": 0,
                                                         "updates": 0, "step": step}
        epoch_start_step = step - (midway["epoch_steps"] if midway else 0)

        def on_step(info: StepInfo, totals=totals) -> None:
            output, target, loss = info.output, info.target, info.loss
            n = target.shape[0]
            if own is not None and totals["seen"] + n > own:  # the epoch's last batch: the sampler's padding
                keep = max(own - totals["seen"], 0)
                output, target = output[:keep], target[:keep]
                with torch.no_grad():
                    loss = float(loss_fn(output, target)) if keep else 0.0
            totals["seen"] += n
            k = target.shape[0]
            totals["loss"] += loss * k
            c = _correct(output, target)
            totals["correct"] = None if c is None or totals["correct"] is None else totals["correct"] + c
            totals["count"] += k
            totals["updates"] += info.pattern_changed
            totals["step"] = info.step
            if log_every and info.step % log_every == 0:
                log["steps"].append({"step": info.step, "loss": info.loss, "lr": info.lr})  # the step's own

        def midway_state(at: int, totals=totals, loader_state=loader_state, epoch=epoch, start=start,
                         epoch_start_step=epoch_start_step) -> dict:
            return _fit_state(model, log, scheduler, device, checkpoint_meta, epochs_done=epoch,
                              epoch_steps=at - epoch_start_step, totals=totals, loader_state=loader_state,
                              epoch_seconds=time.perf_counter() - start)

        batches = itertools.islice(train_loader, midway["epoch_steps"], None) if midway else train_loader
        train_steps(model, optimizer, batches, start_step=step,
                    scheduler=scheduler if scheduler_interval == "step" else None, dst=dst, grad_flow=probe,
                    on_step=on_step, checkpoint_every=checkpoint_every, checkpoint_path=checkpoint_path,
                    loss_fn=loss_fn, progress=progress, desc=f"epoch {epoch + 1}/{epochs}", log_every=log_every,
                    device=device, checkpoint_extra=midway_state,
                    total=None if length is None else length - (midway["epoch_steps"] if midway else 0))
        step = totals["step"]
        if scheduler is not None and scheduler_interval == "epoch":
            scheduler.step()
        if distributed:
            loss_sum, correct, count = all_reduce_totals(totals["loss"], totals["correct"], totals["count"], device)
            totals.update(loss=loss_sum, correct=correct, count=count)
            average_float_buffers(unwrap(model))
        record = {"epoch": epoch + 1, "step": step, "train_loss": totals["loss"] / max(totals["count"], 1),
                  "train_accuracy": None if totals["correct"] is None else totals["correct"] / max(totals["count"], 1),
                  "pattern_updates": totals["updates"], "seconds": time.perf_counter() - start}
        if val_loader is not None:
            val = evaluate(unwrap(model), val_loader, loss_fn, device, across_ranks=distributed)
            record.update(val_loss=val.loss, val_accuracy=val.accuracy)
        log["epochs"].append(record)
        if checkpoint_path is not None and checkpoint_every:
            state = _fit_state(model, log, scheduler, device, checkpoint_meta, epochs_done=epoch + 1, epoch_steps=0,
                               totals=None, loader_state=generator.get_state() if generator is not None else None,
                               epoch_seconds=0.0)
            if main:
                save_checkpoint(checkpoint_path, model, optimizer, dst, step, epoch=epoch + 1, **state)
        if progress and main:
            tqdm.write(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        if main:
            _write(log, log_path)
    return log


def _length(loader) -> Optional[int]:
    try:
        return len(loader)
    except TypeError:
        return None


def _rng_state(device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _fit_state(model, log, scheduler, device, meta, *, epochs_done, epoch_steps, totals, loader_state,
               epoch_seconds) -> dict:
    """What ``fit`` adds to a checkpoint to resume from it. Each rank's totals, RNG state and (under DDP, where
    they differ until the epoch's average) floating-point buffers are gathered from all ranks: called on every
    rank."""
    own = {"totals": dict(totals) if totals is not None else None, "rng": _rng_state(device)}
    if isinstance(model, nn.parallel.DistributedDataParallel):
        own["buffers"] = {name: b.detach().cpu().clone() for name, b in unwrap(model).named_buffers()
                          if b.is_floating_point()}
    return {"fit": {"epochs_done": epochs_done, "epoch_steps": epoch_steps, "epoch_seconds": epoch_seconds,
                    "log": copy.deepcopy(log), "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "loader_generator": loader_state, "ranks": gather_objects(own)},
            **({"meta": meta} if meta is not None else {})}


class ResumeError(ValueError):
    """A checkpoint ``fit`` cannot resume from, or not with what it was given."""


def read_fit_checkpoint(path) -> dict:
    """A checkpoint ``fit`` wrote (on the CPU), checked to hold what resuming needs."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or not isinstance(state.get("fit"), dict):
        raise ResumeError(f"{path} was not written by fit (it holds no position in the data to resume from); "
                          "load_checkpoint restores its model, optimizer and DST state")
    return state


def _resume_fit(resume, model, optimizer, scheduler, dst, epochs, device, generator, length) -> dict:
    """Restore a ``fit`` checkpoint: every check before anything changes, then model, optimizer, DST state,
    scheduler, this rank's RNG state and buffers, and the loader's generator."""
    state = read_fit_checkpoint(resume) if isinstance(resume, (str, Path)) else resume
    where = "fit: resume"
    if not isinstance(state, dict) or not isinstance(state.get("fit"), dict):
        raise ResumeError(f"{where}: not a checkpoint written by fit (no position in the data to resume from)")
    fs = state["fit"]
    ranks = fs["ranks"]
    world, rank = len(ranks), (torch.distributed.get_rank() if isinstance(model, nn.parallel.DistributedDataParallel)
                               else 0)
    running = torch.distributed.get_world_size() if isinstance(model, nn.parallel.DistributedDataParallel) else 1
    if world != running:
        raise ResumeError(f"{where}: the checkpoint was written by a run of {world} process(es), this one has "
                          f"{running}")
    if fs["epochs_done"] > epochs:
        raise ResumeError(f"{where}: the checkpoint has {fs['epochs_done']} epochs done, more than epochs={epochs}")
    for name, obj in (("optimizer", optimizer), ("dst", dst)):
        if (obj is None) != (state.get(name) is None):
            raise ResumeError(f"{where}: the checkpoint {'holds no' if obj is not None else 'holds a'} {name} state, "
                              f"but {'a' if obj is not None else 'no'} {name} was given")
    if (scheduler is None) != (fs["scheduler"] is None):
        raise ResumeError(f"{where}: the checkpoint {'holds no' if scheduler is not None else 'holds a'} scheduler "
                          f"state, but {'a' if scheduler is not None else 'no'} scheduler was given")
    if (generator is None) != (fs["loader_generator"] is None):
        raise ResumeError(f"{where}: the training loader {'has a' if generator is not None else 'has no'} generator, "
                          "unlike the run that wrote the checkpoint: its batches would not be that run's")
    if length is not None and fs["epoch_steps"] > length:
        raise ResumeError(f"{where}: the checkpoint is {fs['epoch_steps']} steps into an epoch, but an epoch of this "
                          f"training loader has {length} (another batch size or data than the run's)")
    mine = ranks[rank]
    unwrap(model).load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if dst is not None:
        dst.load_state_dict(state["dst"])
    if scheduler is not None:
        scheduler.load_state_dict(fs["scheduler"])
    if mine.get("buffers"):
        with torch.no_grad():
            for name, buffer in unwrap(model).named_buffers():
                if name in mine["buffers"]:
                    buffer.copy_(mine["buffers"][name])
    torch.set_rng_state(mine["rng"]["cpu"])
    if "cuda" in mine["rng"] and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(mine["rng"]["cuda"], device)
    if generator is not None:
        generator.set_state(fs["loader_generator"])
    return {"log": fs["log"], "step": int(state["step"]), "epochs_done": fs["epochs_done"],
            "epoch_steps": fs["epoch_steps"], "epoch_seconds": fs["epoch_seconds"], "totals": mine["totals"]}
