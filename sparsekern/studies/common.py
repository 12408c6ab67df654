"""What the studies share: the run directory named by the config's hash (open_lth style), data and
model set-up, the held-out batch, JSON and plot writing, mean ± std."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..data import DataSplits, load_data
from ..models import get_model

__all__ = ["TrainingConfig", "config_hash", "run_dir", "write_json", "load_splits", "build_model", "held_out_batch", "mean_std",
           "fmt", "plt", "PAPER_STEPS"]

# rigl_tf2's LeNet-5 / MNIST run: 11,719 steps at batch 128 (25 epochs of 60,000 images).
PAPER_STEPS = 11719
# digits are 8x8: upsampled x2; LeNet-5 gets padding 2 so both convs have room (fc1 sees 16x2x2).
DIGITS_IMAGE_SIZE = 16


@dataclasses.dataclass
class TrainingConfig:
    """The training settings every study shares (rigl_tf2's LeNet-5 / MNIST defaults);
    a study's config subclasses it and adds its own fields, and ``QUICK`` its --quick overrides."""
    data: str = "digits"
    data_dir: Optional[str] = None
    steps: Optional[int] = None  # None: 11,719 (rigl_tf2) on MNIST-like data, 300 on digits
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"
    grad_flow_every: int = 20
    quick: bool = False
    out: str = "results"
    progress: bool = True

    QUICK = {}

    @classmethod
    def quick_config(cls, **overrides):
        base = dict(cls.QUICK, quick=True)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


def plt():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot
    return pyplot


def config_hash(config) -> str:
    """10 hex digits of the SHA-256 of the config's canonical JSON, leaving out ``out`` and ``progress``
    (where results go and how progress shows do not change them)."""
    return hashlib.sha256(json.dumps(_hashed_fields(config), sort_keys=True, default=str).encode()).hexdigest()[:10]


def _hashed_fields(config) -> dict:
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in ("out", "progress")}


def run_dir(study: str, config) -> Path:
    """``<config.out>/<study>/<config hash>/`` with ``config.json`` written in it."""
    digest = config_hash(config)
    path = Path(config.out) / study / digest
    path.mkdir(parents=True, exist_ok=True)
    write_json(path / "config.json", {"study": study, "hash": digest, **_hashed_fields(config)})
    return path


def write_json(path: os.PathLike, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=1, default=_jsonable))


def _jsonable(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def load_splits(data: str, data_dir: Optional[str], model: str) -> DataSplits:
    """The data set, sized for the model: digits upsampled to 16x16; MNIST-like sets as stored (28x28)."""
    if data == "digits":
        return load_data("digits", image_size=DIGITS_IMAGE_SIZE)
    return load_data(data, data_dir)


def build_model(name: str, splits: DataSplits, seed: int) -> nn.Module:
    """``get_model`` for the data's input, its weights drawn from ``seed``. LeNet-5 gets padding 2
    (28x28 MNIST then has the 32x32 layer shapes; 16x16 digits keep room for both convs)."""
    kwargs = {"padding": 2} if name == "lenet5" else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_model(name, num_classes=splits.num_classes, in_channels=splits.in_channels,
                         image_size=splits.image_size, **kwargs)


def held_out_batch(splits: DataSplits, size: int = 1000) -> Tuple[torch.Tensor, torch.Tensor]:
    """The first ``size`` validation examples: the fixed batch gradient norms are measured on."""
    n = min(size, len(splits.val))
    return splits.val[list(range(n))]


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(vals)}


def fmt(stat: Dict[str, float], digits: int = 4, scale: float = 1.0) -> str:
    if stat["n"] == 0:
        return "n/a"
    if stat["n"] == 1:
        return f"{stat['mean'] * scale:.{digits}g}"
    return f"{stat['mean'] * scale:.{digits}g} ± {stat['std'] * scale:.2g}"


def scaled_steps(steps: Optional[int], data: str, digits_steps: int) -> int:
    """The number of training steps: as given, else the paper's on real MNIST-like data and
    ``digits_steps`` on the small offline set."""
    if steps is not None:
        return steps
    return digits_steps if data in ("digits", "synthetic") else PAPER_STEPS


def grad_flow_series(records: Iterable[dict], key: str = "active") -> Tuple[List[int], List[float]]:
    records = list(records)
    return [r["step"] for r in records], [r[key] for r in records]
