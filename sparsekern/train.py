"""A thin training loop the studies and the CLI share: not a framework."""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .analysis import evaluate as analysis_evaluate, grad_norm

__all__ = ["fit", "evaluate"]


def _to(batch, device):
    x, y = batch[0], batch[1]
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def _correct(output: torch.Tensor, target: torch.Tensor) -> Optional[int]:
    """Number of correct top-1 predictions, or None where the task is not classification."""
    if output.dim() != 2 or target.dim() != 1 or target.dtype not in (torch.int64, torch.int32):
        return None
    return int((output.argmax(1) == target).sum())


def evaluate(model: nn.Module, loader: Iterable, loss_fn: Callable = F.cross_entropy, device=None) -> Dict[str, float]:
    """Mean loss and top-1 accuracy (None if not classification) of ``model`` over ``loader``."""
    loss, accuracy = analysis_evaluate(model, loader, loss_fn, device)
    return {"loss": loss, "accuracy": accuracy}


def _write(log: dict, log_path: Optional[str]) -> None:
    if log_path is not None:
        path = Path(log_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(log, indent=1))


def fit(model: nn.Module, train_loader: Iterable, val_loader: Optional[Iterable], epochs: int,
        optimizer: torch.optim.Optimizer, scheduler=None, dst=None, loss_fn: Callable = F.cross_entropy,
        log_every: int = 50, grad_flow_every: int = 0, log_path: Optional[str] = None,
        scheduler_interval: str = "epoch", progress: bool = True, device=None) -> dict:
    """Train ``model`` for ``epochs`` epochs; return the log (also written as JSON to ``log_path``).

    Each step: forward, ``loss_fn``, backward, ``optimizer.step()``, then ``dst.step()`` if given.
    ``scheduler`` steps once per epoch (or per step with ``scheduler_interval="step"``). The log holds
    the loss every ``log_every`` steps; every ``grad_flow_every`` steps (0: never, else from step 0)
    the gradient flow (``sparsekern.analysis.grad_norm``) on the first validation batch (the current
    training batch without a validation loader); and per epoch the train and validation loss and
    accuracy and the number of pattern updates that changed a pattern.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"fit: epochs must be an int >= 0, got {epochs!r}")
    if scheduler_interval not in ("epoch", "step"):
        raise ValueError(f"fit: scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}")
    device = device or next(model.parameters()).device
    log = {"steps": [], "grad_flow": [], "epochs": []}
    step = 0
    for epoch in range(epochs):
        model.train()
        start = time.perf_counter()
        total_loss, correct, count, updates = 0.0, 0, 0, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
        for batch in bar:
            if grad_flow_every and step % grad_flow_every == 0:
                held_out = next(iter(val_loader)) if val_loader is not None else batch
                with dst.paused() if dst is not None else contextlib.nullcontext():  # not in RigL's gradient
                    log["grad_flow"].append({"step": step, **grad_norm(model, held_out, loss_fn).to_dict()})
            x, y = _to(batch, device)
            out = model(x)
            loss = loss_fn(out, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            step += 1
            optimizer.step()
            if dst is not None and dst.step():
                updates += 1
            if scheduler is not None and scheduler_interval == "step":
                scheduler.step()
            loss_value = loss.item()
            total_loss += loss_value * y.shape[0]
            c = _correct(out, y)
            correct = None if c is None or correct is None else correct + c
            count += y.shape[0]
            if log_every and step % log_every == 0:
                log["steps"].append({"step": step, "loss": loss_value, "lr": optimizer.param_groups[0]["lr"]})
                bar.set_postfix(loss=f"{loss_value:.4f}")
        if scheduler is not None and scheduler_interval == "epoch":
            scheduler.step()
        record = {"epoch": epoch + 1, "step": step, "train_loss": total_loss / max(count, 1),
                  "train_accuracy": None if correct is None else correct / max(count, 1),
                  "pattern_updates": updates, "seconds": time.perf_counter() - start}
        if val_loader is not None:
            val = evaluate(model, val_loader, loss_fn, device)
            record.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
        log["epochs"].append(record)
        if progress:
            tqdm.write(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        _write(log, log_path)
    return log
