"""Study 1: sparse networks have poor gradient flow at initialization; a sparsity-aware init fixes it.

LeNet-300-100 (``mlp``) and LeNet-5 at densities 1, 0.1, 0.02 (ERK), each trained from a dense init (He normal
on the dense fan-in, then masked) and from the sparsity-aware init (He normal on each unit's active
fan-in, ``sparsekern.init.sparse_init_``). At density 1 the two inits are the same scheme, so one run.
Measured: gradient norm over the active weights on a held-out batch at init and during training,
final test accuracy.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Tuple

import torch
from tqdm.auto import tqdm

from ..train import Trainer
from .common import (
    DEFAULT_SEEDS,
    Jobs,
    TrainingConfig,
    claim_lines,
    compare,
    data_note,
    fmt,
    grad_flow_batch,
    grad_flow_label,
    grad_flow_note,
    load_splits,
    mean_std,
    plt,
    report_reuse,
    run_dir,
    scaled_steps,
    study_model,
    tally,
    write_json,
)

PAPER = ("**The paper, beside ours:** in its MNIST experiments (LeNet-5 and LeNet-300-100, among other "
         "settings) the paper reports that with the dense init the gradient norm at init shrinks as sparsity grows, "
         "and that its sparsity-aware init, which scales each unit by that unit's own fan-in (not the layer's "
         "density as the scaled init of Liu et al. 2019 does), increases it. It states this as a "
         "qualitative shape, not as numbers to copy: ours are the ratios of norms at init above, per density.")
STUDY = "gradient-flow"
INITS = ("dense", "sparse")
SUBSET_STEPS = 400  # dense LeNet-5 and LeNet-300-100 converge on the 3,500-image subset (15 epochs): loss_curve.png


@dataclass
class GradientFlowConfig(TrainingConfig):
    models: Tuple[str, ...] = ("mlp", "lenet5")
    densities: Tuple[float, ...] = (1.0, 0.1, 0.02)
    seeds: Tuple[int, ...] = DEFAULT_SEEDS
    distribution: str = "erk"

    QUICK = dict(data="digits", densities=(1.0, 0.05), seeds=(0,), steps=30, grad_flow_every=10)


def run(config: GradientFlowConfig) -> dict:
    started = time.perf_counter()
    # The step count in the config before it is hashed: a new default is a new run directory.
    steps = scaled_steps(config, SUBSET_STEPS)
    config = dataclasses.replace(config, steps=steps)
    out = run_dir(STUDY, config)
    splits = load_splits(config.data, config.data_dir)
    held_out = grad_flow_batch(splits, config.grad_flow_data)
    _, _, test_loader = splits.loaders(config.batch_size)
    jobs = [(name, d, init, seed) for name in config.models for d in config.densities
            for init in (("dense",) if d >= 1.0 else INITS) for seed in config.seeds]
    runs, done = [], Jobs(out, config.fresh, config.deterministic)
    for name, density, init, seed in tqdm(jobs, desc=STUDY, disable=not config.progress):
        def job(name=name, density=density, init=init, seed=seed) -> dict:
            trainer = Trainer(splits.train, steps, config.batch_size, config.lr, config.momentum, config.weight_decay,
                              config.lr_schedule, seed, held_out, config.grad_flow_every, test_loader,
                              progress=config.progress, warmup_steps=int(config.warmup * steps))
            model = study_model(name, splits, seed, density, config.distribution, init)
            result = trainer(model, desc=f"{name} d={density} {init} init s={seed}")
            return {"model": name, "density": density, "init": init, "seed": seed,
                    "grad_norm_init": result.grad_flow[0]["active"],
                    "grad_norm_mean": sum(g["active"] for g in result.grad_flow) / len(result.grad_flow),
                    "test_accuracy": result.accuracy, "test_loss": result.loss,
                    "seconds_per_step": result.seconds_per_step, "grad_flow": result.grad_flow}

        runs.append(done.run(f"{name}-d{density}-{init}-s{seed}", job))
    report_reuse(done, len(jobs))
    table = _aggregate(config, runs)
    verdict = _verdict(config, runs)
    results = {"study": STUDY, "steps": steps, "data": splits.name, "n_train": len(splits.train), "runs": runs,
               "table": table, "verdict": verdict}
    results["paper"] = PAPER
    results["seconds"] = time.perf_counter() - started  # wall time, plots and summary not counted
    results["threads"] = torch.get_num_threads()
    results["jobs_reused"] = done.reused
    write_json(out / "results.json", results)
    _plot(config, runs, table, out)
    (out / "summary.md").write_text(_summary(config, splits, steps, table, verdict))
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


def _paired(runs, name, density, init, key):
    by_seed = {r["seed"]: r[key] for r in runs if r["model"] == name and r["density"] == density and r["init"] == init}
    return [by_seed[k] for k in sorted(by_seed)]


def _verdict(config, runs) -> dict:
    """Per (model, density < 1), paired over seeds (same mask, same data order): is the gradient norm at
    init larger with the sparse init (as a ratio), and is the test accuracy higher?"""
    claims = []
    for name in config.models:
        for density in config.densities:
            if density >= 1.0 or len(config.seeds) < 2:
                continue
            claims.append(compare(f"{name} @ density {density}: gradient norm at init, sparse / dense init",
                                  _paired(runs, name, density, "sparse", "grad_norm_init"),
                                  _paired(runs, name, density, "dense", "grad_norm_init"), "greater", log=True,
                                  model=name, density=density, quantity="grad_norm_init"))
            claims.append(compare(f"{name} @ density {density}: test accuracy, sparse minus dense init",
                                  _paired(runs, name, density, "sparse", "test_accuracy"),
                                  _paired(runs, name, density, "dense", "test_accuracy"), "greater",
                                  model=name, density=density, quantity="test_accuracy", unit=" pt", scale=100.0))
    return {"claims": claims}


def _plot(config, runs, table, out):
    pyplot = plt()
    fig, axes = pyplot.subplots(1, len(config.models), figsize=(5 * len(config.models), 4), squeeze=False)
    for ax, name in zip(axes[0], config.models):
        for init, style in (("dense", "o--"), ("sparse", "s-")):
            rows = [r for r in table if r["model"] == name and (r["init"] == init or r["density"] >= 1.0)]
            ax.errorbar([r["density"] for r in rows], [r["grad_norm_init"]["mean"] for r in rows],
                        yerr=[r["grad_norm_init"]["std"] for r in rows], fmt=style, label=f"{init} init")
        ax.set(xscale="log", yscale="log", xlabel="density",
               ylabel=f"gradient norm at init ({grad_flow_label(config)})",
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
        ax.set(yscale="log", xlabel="step", ylabel=f"gradient norm ({grad_flow_label(config)})",
               title=f"{name}: solid = sparse init, dashed = dense init")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "grad_norm_training.png", dpi=110)
    pyplot.close(fig)
    loss_curve(config.models, runs, out / "loss_curve.png",
               lambda r: "dense" if r["density"] >= 1.0 else f"d={r['density']} {r['init']} init",
               grad_flow_label(config))


def loss_curve(models, runs, path, label_of, batch: str = "held-out batch") -> None:
    """The loss on the gradient-flow ``batch`` (at its measurements) vs step, mean over seeds, one panel per model:
    shows whether training converged."""
    pyplot = plt()
    fig, axes = pyplot.subplots(1, len(models), figsize=(5 * len(models), 3.6), squeeze=False)
    for ax, name in zip(axes[0], models):
        groups = {}
        for r in runs:
            if r.get("model", name) == name:
                groups.setdefault(label_of(r), []).append(r["grad_flow"])
        for label, flows in groups.items():
            steps = [g["step"] for g in flows[0]]
            mean = [sum(f[j]["loss"] for f in flows) / len(flows) for j in range(len(steps))]
            ax.plot(steps, mean, "--" if label == "dense" else "-", label=label)
        ax.set(yscale="log", xlabel="step", ylabel=f"loss ({batch})",
               title=f"{name}: loss in training (mean over seeds)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot.close(fig)


def _summary(config, splits, steps, table, verdict) -> str:
    lines = ["# Gradient flow at initialization: dense vs sparsity-aware init",
             "",
             "**Claim (Evci et al. 2022, sec. 3):** sparse networks initialized like dense ones (std from the dense "
             "fan-in) have a vanishing gradient norm at init, the sparser the worse; scaling each unit's init by "
             "its active fan-in (the paper's sparse init; Liu et al. 2019 scale by the layer's density, "
             "`init='layer'`) increases the gradient norm at init and helps training.",
             "",
             f"Setting: models {', '.join(config.models)}; {steps} SGD steps at batch {config.batch_size} (momentum "
             f"{config.momentum}, lr {config.lr}, {config.lr_schedule} decay, weight decay {config.weight_decay}); "
             f"layer densities {config.distribution.upper()}; seeds {list(config.seeds)} (the two inits of a seed "
             f"share the mask and the data order); gradient norm over the active weights on "
             f"{grad_flow_note(config, splits)}, without weight decay, every {config.grad_flow_every} steps.",
             "", data_note(config, splits, steps), ""]
    if config.quick:
        lines += ["*Quick run (`--quick`): a smoke-test setting, too short for conclusions about accuracy.*", ""]
    lines += ["| model | density | init | grad norm at init | mean grad norm in training | test accuracy |",
              "|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['model']} | {r['density']} | {r['init']} | {fmt(r['grad_norm_init'])} | "
                     f"{fmt(r['grad_norm_mean'])} | {fmt(r['test_accuracy'], 3)} |")
    lines += ["", "Mean ± std over seeds.", "", "## Verdict", ""]
    claims = verdict["claims"]
    if claims:
        lines += claim_lines(claims) + ["", tally(claims)]
    else:
        lines += ["One seed: no paired comparison, so no verdict (run with two or more seeds)."]
    lines += ["", PAPER, "",
              "Plots: `grad_norm_init.png` (norm at init vs density), `grad_norm_training.png` (norm vs step), "
              f"`loss_curve.png` (loss on the {grad_flow_label(config)} vs step: dense training converges).",
              "Every number: `results.json`; the setting: `config.json`.", ""]
    return "\n".join(lines)
