"""The main job (``sparsekern demo``): a 90 %-sparse MLP trained with RigL next to the same MLP dense,
on offline data; a table of accuracy, step time and gradient norm, and a plot."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import dst as dst_algorithms
from ..models import build_model
from ..sparsity import sparsify
from ..train import Trainer
from .common import grad_flow_batch, load_splits, plt, write_json


@dataclass
class DemoConfig:
    density: float = 0.1
    # Wide enough that the kernels, not per-op overhead, decide the step time (LeNet-300-100 on 8x8
    # digits is so small that Python and dispatch dominate: sparse steps are no faster there).
    hidden: tuple = (1024, 1024)
    steps: int = 400
    batch_size: int = 128
    lr: float = 0.05
    delta_t: int = 25
    seed: int = 0
    quick: bool = False
    out: str = "results"
    progress: bool = True


def run(config: DemoConfig) -> dict:
    splits = load_splits("digits", None)
    held_out = grad_flow_batch(splits)
    _, _, test_loader = splits.loaders(config.batch_size)
    steps = 60 if config.quick else config.steps
    dense = build_model("mlp", splits.num_classes, splits.in_channels, splits.image_size, config.seed,
                        hidden=config.hidden)
    sparse = sparsify(copy.deepcopy(dense), config.density, "erk", init="sparse",
                      generator=torch.Generator().manual_seed(config.seed + 1))
    trainer = Trainer(splits.train, steps, config.batch_size, config.lr, seed=config.seed, held_out=held_out,
                      grad_flow_every=max(steps // 20, 1), eval_loader=test_loader, progress=config.progress)
    rows, flows = [], {}
    for label, model, factory in (
            ("dense", dense, None),
            (f"RigL {100 * (1 - config.density):.0f}% sparse", sparse,
             lambda m, opt, total: dst_algorithms.RigL(m, opt, total, delta_t=config.delta_t,
                                                       generator=torch.Generator().manual_seed(config.seed)))):
        result = trainer(model, desc=label, dst_factory=factory)
        weights = sum(p.numel() for n, p in model.named_parameters() if n.endswith(("weight", "values")))
        rows.append({"model": label, "weights": weights, "test_accuracy": result.accuracy,
                     "ms_per_step": 1000 * result.seconds_per_step, "grad_norm_init": result.grad_flow[0]["active"],
                     "grad_norm_final": result.grad_flow[-1]["active"]})
        flows[label] = result.grad_flow
    out = Path(config.out) / "demo"
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "demo.json", {"config": config.__dict__, "steps": steps, "rows": rows, "grad_flow": flows})
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(6.5, 4))
    for label, flow in flows.items():
        ax.plot([g["step"] for g in flow], [g["active"] for g in flow], label=label)
    ax.set(yscale="log", xlabel="step", ylabel="gradient norm (held-out batch)",
           title=f"MLP {'-'.join(map(str, config.hidden))} on digits: dense vs RigL")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "demo.png", dpi=110)
    pyplot.close(fig)
    return {"rows": rows, "steps": steps, "dir": str(out), "plot": str(out / "demo.png")}


def print_table(result: dict) -> None:
    headers = ("model", "weights", "test accuracy", "ms / step", "grad norm at init", "grad norm at end")
    cells = [(r["model"], f"{r['weights']:,}", f"{r['test_accuracy']:.3f}", f"{r['ms_per_step']:.2f}",
              f"{r['grad_norm_init']:.3f}", f"{r['grad_norm_final']:.3f}") for r in result["rows"]]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
        for line in (headers, *cells):
            print("  ".join(v.ljust(w) for v, w in zip(line, widths)))
        return
    table = Table(title=f"digits, {result['steps']} steps, batch 128, SGD + momentum")
    for h in headers:
        table.add_column(h, justify="left" if h == "model" else "right", no_wrap=h == "model")
    for c in cells:
        table.add_row(*c)
    Console().print(table)
