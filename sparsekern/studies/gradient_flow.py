"""Study 1: sparse networks have poor gradient flow at initialization; a sparsity-aware init fixes it.

MLP and LeNet-5 at densities 1, 0.2, 0.1, 0.05, 0.02 (ERK), each trained from a dense init (He normal
on the dense fan-in, then masked) and from the sparsity-aware init (He normal on each unit's active
fan-in, ``sparsekern.init.sparse_init_``). At density 1 the two inits are the same scheme, so one run.
Measured: gradient norm over the active weights on a held-out batch at init and during training,
final test accuracy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from ..lottery import SGDTrainer
from ..sparsity import sparsify
from .common import (TrainingConfig, build_model, fmt, held_out_batch, load_splits, mean_std, plt, run_dir, scaled_steps,
                     write_json)

STUDY = "gradient-flow"
INITS = ("dense", "sparse")


@dataclass
class GradientFlowConfig(TrainingConfig):
    models: Tuple[str, ...] = ("mlp", "lenet5")
    densities: Tuple[float, ...] = (1.0, 0.2, 0.1, 0.05, 0.02)
    seeds: Tuple[int, ...] = (0, 1)
    distribution: str = "erk"

    QUICK = dict(densities=(1.0, 0.05), seeds=(0,), steps=30, grad_flow_every=10)


@torch.no_grad()
def he_normal_(model: nn.Module) -> nn.Module:
    """He normal (fan-in, ReLU gain) on every Linear / Conv2d weight, zero biases: the dense init both
    schemes share, so they differ only in which fan-in scales it."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                m.bias.zero_()
    return model


def make_model(config: GradientFlowConfig, splits, name: str, density: float, init: str, seed: int) -> nn.Module:
    model = build_model(name, splits, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        he_normal_(model)
    if density < 1.0:
        sparsify(model, density, config.distribution, init=init, generator=torch.Generator().manual_seed(seed + 1))
    return model


def run(config: GradientFlowConfig) -> dict:
    out = run_dir(STUDY, config)
    splits = load_splits(config.data, config.data_dir, config.models[0])
    steps = scaled_steps(config.steps, config.data, 300)
    held_out = held_out_batch(splits)
    _, _, test_loader = splits.loaders(config.batch_size)
    jobs = [(name, d, init, seed) for name in config.models for d in config.densities
            for init in (("dense",) if d >= 1.0 else INITS) for seed in config.seeds]
    runs = []
    for name, density, init, seed in tqdm(jobs, desc=STUDY, disable=not config.progress):
        trainer = SGDTrainer(splits.train, steps, config.batch_size, config.lr, config.momentum, config.weight_decay,
                             config.lr_schedule, seed, held_out, config.grad_flow_every, test_loader,
                             progress=config.progress)
        model = make_model(config, splits, name, density, init, seed)
        result = trainer(model, desc=f"{name} d={density} {init} init s={seed}")
        runs.append({"model": name, "density": density, "init": init, "seed": seed,
                     "grad_norm_init": result.grad_flow[0]["active"],
                     "grad_norm_mean": sum(g["active"] for g in result.grad_flow) / len(result.grad_flow),
                     "test_accuracy": result.accuracy, "test_loss": result.loss,
                     "seconds_per_step": result.seconds_per_step, "grad_flow": result.grad_flow})
    table = _aggregate(config, runs)
    verdict = _verdict(config, table)
    results = {"study": STUDY, "steps": steps, "data": config.data, "runs": runs, "table": table, "verdict": verdict}
    write_json(out / "results.json", results)
    _plot(config, runs, table, out)
    (out / "summary.md").write_text(_summary(config, steps, table, verdict, out))
    results["dir"] = str(out)
    return results


def _aggregate(config, runs):
    table = []
    for name in config.models:
        for density in config.densities:
            for init in (("dense",) if density >= 1.0 else INITS):
                sel = [r for r in runs if r["model"] == name and r["density"] == density and r["init"] == init]
                table.append({"model": name, "density": density, "init": init,
                              **{k: mean_std([r[k] for r in sel]) for k in
                                 ("grad_norm_init", "grad_norm_mean", "test_accuracy")}})
    return table


def _row(table, name, density, init):
    return next(r for r in table if r["model"] == name and r["density"] == density and r["init"] == init)


def _verdict(config, table) -> dict:
    """Per (model, density < 1): does the sparse init raise the gradient norm at init, and accuracy?"""
    pairs = []
    for name in config.models:
        for density in config.densities:
            if density >= 1.0:
                continue
            dense, sparse = _row(table, name, density, "dense"), _row(table, name, density, "sparse")
            pairs.append({"model": name, "density": density,
                          "init_ratio": sparse["grad_norm_init"]["mean"] / dense["grad_norm_init"]["mean"],
                          "accuracy_gain": sparse["test_accuracy"]["mean"] - dense["test_accuracy"]["mean"]})
    return {"pairs": pairs,
            "init_norm_larger_with_sparse_init": sum(p["init_ratio"] > 1 for p in pairs),
            "accuracy_not_worse_with_sparse_init": sum(p["accuracy_gain"] >= -0.005 for p in pairs),
            "n_pairs": len(pairs)}


def _plot(config, runs, table, out):
    pyplot = plt()
    fig, axes = pyplot.subplots(1, len(config.models), figsize=(5 * len(config.models), 4), squeeze=False)
    for ax, name in zip(axes[0], config.models):
        for init, style in (("dense", "o--"), ("sparse", "s-")):
            rows = [r for r in table if r["model"] == name and (r["init"] == init or r["density"] >= 1.0)]
            ax.errorbar([r["density"] for r in rows], [r["grad_norm_init"]["mean"] for r in rows],
                        yerr=[r["grad_norm_init"]["std"] for r in rows], fmt=style, label=f"{init} init")
        ax.set(xscale="log", yscale="log", xlabel="density", ylabel="gradient norm at init (held-out batch)",
               title=name)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "grad_norm_init.png", dpi=110)
    pyplot.close(fig)
    fig, axes = pyplot.subplots(1, len(config.models), figsize=(6 * len(config.models), 4), squeeze=False)
    colors = pyplot.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, name in zip(axes[0], config.models):
        for i, density in enumerate(config.densities):
            for init in (("dense",) if density >= 1.0 else INITS):
                sel = [r for r in runs if r["model"] == name and r["density"] == density and r["init"] == init]
                steps = [g["step"] for g in sel[0]["grad_flow"]]
                mean = [sum(r["grad_flow"][j]["active"] for r in sel) / len(sel) for j in range(len(steps))]
                ax.plot(steps, mean, "-" if init == "sparse" else "--", color=colors[i % len(colors)],
                        label=f"d={density} {init}")
        ax.set(yscale="log", xlabel="step", ylabel="gradient norm (held-out batch)",
               title=f"{name}: solid = sparse init, dashed = dense init")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "grad_norm_training.png", dpi=110)
    pyplot.close(fig)


def config_batch_note(config) -> str:
    return "up to 1,000 validation"


def _summary(config, steps, table, verdict, out) -> str:
    lines = ["# Gradient flow at initialization: dense vs sparsity-aware init",
             "",
             "**Claim (Evci et al. 2022, sec. 3):** sparse networks initialized like dense ones (std from the dense "
             "fan-in) have a vanishing gradient norm at init, the sparser the worse; scaling each unit's init by "
             "its active fan-in restores it and helps training.",
             "",
             f"Setting: models {', '.join(config.models)}; data `{config.data}`; {steps} SGD steps at batch "
             f"{config.batch_size} (momentum {config.momentum}, lr {config.lr}, {config.lr_schedule} decay, weight "
             f"decay {config.weight_decay}); layer densities {config.distribution.upper()}; seeds "
             f"{list(config.seeds)}; gradient norm over the active weights on a fixed held-out batch of "
             f"{config_batch_note(config)} examples, without weight decay, every {config.grad_flow_every} steps.",
             ""]
    if config.data in ("digits", "synthetic"):
        lines += [f"*Scaled down:* the paper's run is LeNet-5 for 11,719 steps on MNIST; offline `{config.data}` "
                  f"data (1,797 8x8 images upsampled to 16x16, 1,258 for training) gets {steps} steps instead. "
                  "Accuracies are therefore not comparable with the paper's; the gradient norms at init are.", ""]
    if config.quick:
        lines += ["*Quick run (`--quick`): a smoke-test setting, too short for conclusions about accuracy.*", ""]
    lines += ["| model | density | init | grad norm at init | mean grad norm in training | test accuracy |",
              "|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['model']} | {r['density']} | {r['init']} | {fmt(r['grad_norm_init'])} | "
                     f"{fmt(r['grad_norm_mean'])} | {fmt(r['test_accuracy'], 3)} |")
    n = verdict["n_pairs"]
    larger, acc = verdict["init_norm_larger_with_sparse_init"], verdict["accuracy_not_worse_with_sparse_init"]
    ratios = ", ".join(f"{p['model']}@{p['density']}: x{p['init_ratio']:.2f}" for p in verdict["pairs"])
    gains = ", ".join(f"{p['model']}@{p['density']}: {100 * p['accuracy_gain']:+.1f} pt" for p in verdict["pairs"])
    lines += ["", "## Verdict", "",
              f"- Gradient norm at init, sparse init / dense init: {ratios}. Larger with the sparse init in "
              f"{larger} of {n} (model, density) settings: the first half of the claim is "
              f"{'supported' if larger == n else 'partly supported' if larger else 'NOT supported'} here.",
              f"- Test accuracy, sparse init minus dense init: {gains}. Not worse (within 0.5 pt) in {acc} of {n}: "
              f"{'supported' if acc == n else 'partly supported' if acc else 'NOT supported'}"
              f"{' (with few steps and seeds: weak evidence)' if len(config.seeds) < 3 else ''}.",
              "", "Plots: `grad_norm_init.png` (norm at init vs density), `grad_norm_training.png` (norm vs step).",
              "Every number: `results.json`; the setting: `config.json`.", ""]
    return "\n".join(lines)
