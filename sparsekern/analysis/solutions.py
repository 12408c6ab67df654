"""Comparing two solutions: weight distance, linear interpolation (loss barrier), prediction
disagreement, Jensen-Shannon divergence and ensemble accuracy.

Interpolating sparse modules: where both models hold the same pattern, ``values`` are
interpolated directly (the result stays sparse with that pattern); otherwise the dense
weights (``dense_weight()``) are interpolated and stored on the union of the two patterns
(zeros outside both); a sparse module facing a dense one interpolates dense weights too.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_reduce_totals
from ..nn import SparseWeightMixin
from .layers import layer_weights, masks_of

__all__ = ["WeightDistance", "InterpolationCurve", "PredictionComparison", "Evaluation", "weight_distance",
           "interpolate", "recompute_bn_stats", "evaluate", "interpolation_curve", "predict_log_proba",
           "disagreement", "js_divergence", "ensemble_accuracy", "compare_predictions"]

Batch = Tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _dense_of(module: nn.Module) -> torch.Tensor:
    return module.dense_weight() if isinstance(module, SparseWeightMixin) else module.weight


def _mask_of(module: nn.Module) -> torch.Tensor:
    # A dense layer: every weight is active.
    if isinstance(module, SparseWeightMixin):
        return module.mask()
    return torch.ones_like(module.weight, dtype=torch.bool)


def _paired_layers(model_a: nn.Module, model_b: nn.Module):
    # (dense weight, mask) per layer
    wa = {n: (w, m) for (n, w), m in zip(layer_weights(model_a).items(), masks_of(model_a).values())}
    wb = {n: (w, m) for (n, w), m in zip(layer_weights(model_b).items(), masks_of(model_b).values())}
    if wa.keys() != wb.keys():
        raise ValueError(f"models must have the same layers; only in a: {sorted(wa.keys() - wb.keys())}, "
                         f"only in b: {sorted(wb.keys() - wa.keys())}")
    for name in wa:
        if wa[name][0].shape != wb[name][0].shape:
            raise ValueError(f"layer {name}: weight shapes differ, {tuple(wa[name][0].shape)} vs "
                             f"{tuple(wb[name][0].shape)}")
        yield name, wa[name], wb[name]


@dataclass
class WeightDistance:
    """L2 distances between the Linear/Conv weights of two models (biases and BatchNorm excluded).

    ``common``: over the entries active in both models; ``overall``: over all entries of the
    dense weights (zeros outside each pattern); ``common_fraction``: |common mask| / |mask of a|.
    """
    common: float
    overall: float
    per_layer_common: Dict[str, float]
    common_fraction: float

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def weight_distance(model_a: nn.Module, model_b: nn.Module) -> WeightDistance:
    common_sq, overall_sq, per_layer, n_common, n_a = 0.0, 0.0, {}, 0, 0
    for name, (wa, ma), (wb, mb) in _paired_layers(model_a, model_b):
        diff = (wa - wb.to(wa.device)).double()
        common = ma & mb.to(ma.device)
        sq = float(diff[common].pow(2).sum())
        per_layer[name] = math.sqrt(sq)
        common_sq += sq
        overall_sq += float(diff.pow(2).sum())
        n_common += int(common.sum())
        n_a += int(ma.sum())
    return WeightDistance(math.sqrt(common_sq), math.sqrt(overall_sq), per_layer, n_common / max(n_a, 1))


@torch.no_grad()
def interpolate(model_a: nn.Module, model_b: nn.Module, alpha: float) -> nn.Module:
    """A new model with weights (1 - alpha) * a + alpha * b (a deep copy of ``model_a``).

    Floating buffers (BatchNorm running statistics) are interpolated too; recompute them with
    ``recompute_bn_stats`` before evaluating. ``alpha = 0`` and ``1`` give exactly a and b
    (``torch.lerp``).
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"interpolate: alpha must be a finite number, got {alpha!r}")
    out = copy.deepcopy(model_a)
    modules_b = dict(model_b.named_modules())
    # what lies inside a sparse layer (its pattern) is its own business: _interpolate_weight replaces it whole
    inside_sparse = tuple(f"{n}." for n, m in list(out.named_modules()) + list(modules_b.items())
                          if isinstance(m, SparseWeightMixin))
    for name, m in out.named_modules():
        if inside_sparse and name.startswith(inside_sparse):
            continue
        if name not in modules_b:
            raise ValueError(f"interpolate: module {name!r} of model_a is missing from model_b")
        mb = modules_b[name]
        if isinstance(m, SparseWeightMixin) or isinstance(mb, SparseWeightMixin):
            _interpolate_weight(m, mb, alpha)
        own_b = dict(mb.named_parameters(recurse=False))
        own_b.update(mb.named_buffers(recurse=False))
        for pname, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            if pname == "values" or not t.is_floating_point():
                continue  # sparse values handled above; integer buffers (patterns, counters) kept from a
            if pname == "weight" and isinstance(mb, SparseWeightMixin):
                continue  # dense layer of a facing a sparse layer of b: done in _interpolate_weight
            if pname not in own_b or own_b[pname].shape != t.shape:
                raise ValueError(f"interpolate: {name}.{pname} has no counterpart of shape {tuple(t.shape)} in b")
            t.copy_(torch.lerp(t, own_b[pname].to(t.device, t.dtype), alpha))
    return out


def _interpolate_weight(m: nn.Module, mb: nn.Module, alpha: float) -> None:
    """Interpolate the weight of a layer where at least one side is sparse (see the module docstring)."""
    if isinstance(m, SparseWeightMixin):
        if (isinstance(mb, SparseWeightMixin) and torch.equal(m.row_ptr, mb.row_ptr.to(m.row_ptr.device))
                and torch.equal(m.col_idx, mb.col_idx.to(m.col_idx.device))):
            m.values.copy_(torch.lerp(m.values, mb.values.to(m.values.device), alpha))  # same pattern
            return
        dense = torch.lerp(m.dense_weight(), _dense_of(mb).to(m.values.device), alpha)
        m.set_pattern(m.mask() | _mask_of(mb).to(m.values.device), dense)
    else:
        m.weight.copy_(torch.lerp(m.weight, mb.dense_weight().to(m.weight.device), alpha))


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, batches: Iterable[Batch]) -> nn.Module:
    """Reset every BatchNorm's running statistics and re-estimate them as the plain average over
    ``batches`` (momentum None); interpolated weights make the stored statistics meaningless."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model
    was_training, momenta = model.training, [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    device = _device(model)
    for x, _ in batches:
        model(x.to(device))
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    model.train(was_training)
    return model


@torch.no_grad()
def predict_log_proba(model: nn.Module, loader: Iterable[Batch]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(log-softmax outputs (N, C) as float64 on the CPU, labels (N,)) over ``loader``, in eval mode."""
    was_training, device = model.training, _device(model)
    model.eval()
    try:
        outs, labels = [], []
        for x, y in loader:
            outs.append(F.log_softmax(model(x.to(device)).double(), dim=1).cpu())
            labels.append(y.cpu())
    finally:
        model.train(was_training)
    return torch.cat(outs), torch.cat(labels)


class Evaluation(NamedTuple):
    """Mean loss per example and top-1 accuracy (None when the task is not classification)."""
    loss: float
    accuracy: Optional[float]


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[Batch], loss_fn: LossFn = F.cross_entropy,
             device=None, across_ranks: bool = False) -> Evaluation:
    """``Evaluation(loss, accuracy)`` of ``model`` over ``loader`` in eval mode (loss averaged per
    example); the accuracy is None when the outputs are not class scores for integer labels.

    ``across_ranks``: under torch.distributed, where every rank calls this on its own shard of a split,
    the sums are all-reduced so every rank returns the numbers of the whole split."""
    was_training, device = model.training, device or _device(model)
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    try:
        with torch.no_grad():
            for batch in loader:
                x, y = batch[0].to(device), batch[1].to(device)
                logits = model(x)
                total_loss += float(loss_fn(logits, y)) * y.shape[0]  # loss_fn returns the batch mean
                classes = logits.dim() == 2 and y.dim() == 1 and y.dtype in (torch.int64, torch.int32)
                correct = correct + int((logits.argmax(1) == y).sum()) if classes and correct is not None else None
                count += y.shape[0]
    finally:
        model.train(was_training)
    if across_ranks:
        total_loss, correct, count = all_reduce_totals(total_loss, correct, count, device)
    return Evaluation(total_loss / max(count, 1), None if correct is None else correct / max(count, 1))


@dataclass
class InterpolationCurve:
    """Loss and accuracy of (1 - alpha) * a + alpha * b along ``alphas`` (which include 0 and 1).

    ``barrier`` = max over alpha of loss(alpha) - ((1 - alpha) * loss(0) + alpha * loss(1)):
    0 when the path is no worse than the straight line between the endpoint losses.
    """
    alphas: List[float]
    losses: List[float]
    accuracies: List[float]
    barrier: float

    def to_dict(self) -> dict:
        return asdict(self)


def interpolation_curve(model_a: nn.Module, model_b: nn.Module, loader: Iterable[Batch],
                        alphas: Sequence[float] = tuple(i / 10 for i in range(11)),
                        bn_loader: Optional[Iterable[Batch]] = None, bn_batches: int = 8,
                        loss_fn: LossFn = F.cross_entropy) -> InterpolationCurve:
    """Evaluate the linear path between two models on ``loader``.

    With BatchNorm, every point (endpoints included, so all are treated alike) gets running
    statistics recomputed on the same first ``bn_batches`` batches of ``bn_loader`` (default
    ``loader``; pass the training loader to keep the evaluation data out of the statistics).
    """
    grid = sorted({float(a) for a in alphas} | {0.0, 1.0})
    bn_data: List[Batch] = []
    if _has_batchnorm(model_a):
        for i, batch in enumerate(bn_loader if bn_loader is not None else loader):
            if i >= bn_batches:
                break
            bn_data.append(batch)  # kept, so every alpha sees the same batches
    losses, accuracies = [], []
    for alpha in grid:
        model = interpolate(model_a, model_b, alpha)
        if bn_data:
            recompute_bn_stats(model, bn_data)
        loss, acc = evaluate(model, loader, loss_fn)
        losses.append(loss)
        accuracies.append(acc)
    barrier = max(loss - ((1 - a) * losses[0] + a * losses[-1]) for a, loss in zip(grid, losses))
    return InterpolationCurve(grid, losses, accuracies, barrier)


def _check_log_probs(where: str, log_probs_a, log_probs_b) -> None:
    """Both (N, classes) with N > 0 and the same shape: row i of each is the same input."""
    for name, t in (("log_probs_a", log_probs_a), ("log_probs_b", log_probs_b)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] == 0:
            got = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{where}: {name} must be a 2-D (N, classes) tensor with N > 0, got {got}")
    if log_probs_a.shape != log_probs_b.shape:
        raise ValueError(f"{where}: log_probs_a and log_probs_b must have the same shape, got "
                         f"{tuple(log_probs_a.shape)} and {tuple(log_probs_b.shape)}")


def disagreement(log_probs_a: torch.Tensor, log_probs_b: torch.Tensor) -> float:
    """Fraction of inputs on which the two models' argmax predictions differ."""
    _check_log_probs("disagreement", log_probs_a, log_probs_b)
    return float((log_probs_a.argmax(1) != log_probs_b.argmax(1)).double().mean())


def js_divergence(log_probs_a: torch.Tensor, log_probs_b: torch.Tensor) -> float:
    """Mean over inputs of the Jensen-Shannon divergence (nats, in [0, ln 2]) of two softmax outputs."""
    _check_log_probs("js_divergence", log_probs_a, log_probs_b)
    lp, lq = log_probs_a.double(), log_probs_b.double()
    log_m = torch.logsumexp(torch.stack([lp, lq]), dim=0) - math.log(2.0)
    p, q = lp.exp(), lq.exp()
    # 0 * log 0 = 0: entries of zero probability contribute nothing.
    kl_pm = torch.where(p > 0, p * (lp - log_m), torch.zeros_like(p)).sum(1)
    kl_qm = torch.where(q > 0, q * (lq - log_m), torch.zeros_like(q)).sum(1)
    return float((0.5 * (kl_pm + kl_qm)).clamp(0.0, math.log(2.0)).mean())


def _ensemble_accuracy(log_probs: Sequence[torch.Tensor], labels: torch.Tensor) -> float:
    mean_probs = torch.stack([lp.exp() for lp in log_probs]).mean(0)  # average probabilities, not logits
    return float((mean_probs.argmax(1) == labels).double().mean())


def ensemble_accuracy(models: Sequence[nn.Module], loader: Iterable[Batch]) -> float:
    """Accuracy of the ensemble that averages the models' softmax probabilities."""
    outputs = [predict_log_proba(m, loader) for m in models]
    return _ensemble_accuracy([lp for lp, _ in outputs], outputs[0][1])


@dataclass
class PredictionComparison:
    """How similar two models' functions are on one data set."""
    disagreement: float
    js_divergence: float
    accuracy_a: float
    accuracy_b: float
    ensemble_accuracy: float

    def to_dict(self) -> dict:
        return asdict(self)


def compare_predictions(model_a: nn.Module, model_b: nn.Module, loader: Iterable[Batch]) -> PredictionComparison:
    """Disagreement, JS divergence, each model's accuracy and their ensemble's, from one pass each.

    ``loader`` must yield the same examples in the same order on every pass (no shuffling).
    """
    lp_a, labels = predict_log_proba(model_a, loader)
    lp_b, labels_b = predict_log_proba(model_b, loader)
    if not torch.equal(labels, labels_b):
        raise ValueError("compare_predictions: loader yielded different labels on the two passes; "
                         "use a loader without shuffling")
    acc = lambda lp: float((lp.argmax(1) == labels).double().mean())  # noqa: E731
    return PredictionComparison(disagreement(lp_a, lp_b), js_divergence(lp_a, lp_b), acc(lp_a), acc(lp_b),
                                _ensemble_accuracy([lp_a, lp_b], labels))
