"""Study 2: dynamic sparse training (SET, SNFS, RigL) improves gradient flow during training.

Each method trains the same sparse network (ERK densities, sparsity-aware init) from the same init and
data order per seed; Static keeps its random mask. A dense run is the reference. Measured: gradient
norm over the active weights on a held-out batch during training, final test accuracy, how much of
the mask changed; mean ± std over seeds.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from tqdm.auto import tqdm

from .. import dst as dst_algorithms
from ..analysis import masks_of
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
    small_data,
    study_model,
    tally,
    write_json,
)
from .gradient_flow import loss_curve

PAPER = ("**The paper, beside ours:** in its MNIST experiments (LeNet-5 and LeNet-300-100 at high sparsity, "
         "among other settings) the paper reports that DST methods (SET, RigL) improve the gradient flow during "
         "training over static sparse training, which goes with their better final accuracy. It states this "
         "through the shape of the gradient-norm curves, not as numbers to copy: ours are "
         "`grad_norm_training.png` and the ratios above.")
STUDY = "dst"
METHODS = ("static", "set", "snfs", "rigl")
SUBSET_STEPS = 300


@dataclass
class DSTConfig(TrainingConfig):
    model: str = "mlp"
    densities: Tuple[float, ...] = (0.1, 0.02)
    methods: Tuple[str, ...] = METHODS
    seeds: Tuple[int, ...] = DEFAULT_SEEDS
    distribution: str = "erk"
    delta_t: Optional[int] = None  # None: 100 (rigl) at the paper's steps, 20 on the subset and digits
    drop_fraction: float = 0.3
    end_fraction: float = 0.75
    reinit_when_same: bool = False  # the paper's code: a weight dropped and grown back keeps its value
    dense_baseline: bool = True

    QUICK = dict(data="digits", model="mlp", densities=(0.1,), seeds=(0,), steps=40, delta_t=10, grad_flow_every=10)


def run(config: DSTConfig) -> dict:
    started = time.perf_counter()
    unknown = [m for m in config.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"dst study: methods must be among {METHODS}, got {unknown}")
    # The step count in the config before it is hashed: a new default is a new run directory.
    steps = scaled_steps(config, SUBSET_STEPS)
    config = dataclasses.replace(config, steps=steps)
    out = run_dir(STUDY, config)
    splits = load_splits(config.data, config.data_dir)
    delta_t = config.delta_t or (100 if steps >= 5000 else 20)
    held_out = grad_flow_batch(splits, config.grad_flow_data)
    _, _, test_loader = splits.loaders(config.batch_size)
    jobs = [(d, m, s) for d in config.densities for m in config.methods for s in config.seeds]
    if config.dense_baseline:
        jobs = [(1.0, "dense", s) for s in config.seeds] + jobs
    runs, done = [], Jobs(out, config.fresh, config.deterministic)
    for density, method, seed in tqdm(jobs, desc=STUDY, disable=not config.progress):
        def job(density=density, method=method, seed=seed) -> dict:
            trainer = Trainer(splits.train, steps, config.batch_size, config.lr, config.momentum, config.weight_decay,
                              config.lr_schedule, seed, held_out, config.grad_flow_every, test_loader,
                              progress=config.progress, warmup_steps=int(config.warmup * steps))
            model = study_model(config.model, splits, seed, density, config.distribution, "sparse")
            before = masks_of(model)
            factory = None
            if method != "dense":
                # SNFS as the paper's code runs it (rigl's SparseMomentumOptimizer: no redistribution of sparsity),
                # so that every method keeps the ERK densities that static training keeps
                extra = {"redistribute": False} if method == "snfs" else {}
                def make_dst(m, opt, total, method=method, seed=seed, extra=extra):
                    return dst_algorithms.create(method, m, opt, total, delta_t=delta_t,
                                                 drop_fraction=config.drop_fraction,
                                                 end_fraction=config.end_fraction,
                                                 reinit_when_same=config.reinit_when_same,
                                                 generator=torch.Generator().manual_seed(seed + 7), **extra)
                factory = make_dst
            result = trainer(model, desc=f"{method} d={density} s={seed}", dst_factory=factory)
            after = masks_of(model)
            kept = sum(int((before[n] & after[n]).sum()) for n in after)
            nnz = sum(int(after[n].sum()) for n in after)
            history = trainer.last_dst.history if trainer.last_dst is not None else []
            return {"method": method, "density": density, "seed": seed,
                    "grad_norm_init": result.grad_flow[0]["active"],
                    "grad_norm_mean": sum(g["active"] for g in result.grad_flow) / len(result.grad_flow),
                    "dense_grad_norm_mean": sum(g["dense"] for g in result.grad_flow) / len(result.grad_flow),
                    "test_accuracy": result.accuracy, "test_loss": result.loss,
                    "mask_changed_fraction": 1.0 - kept / max(nnz, 1), "pattern_updates": len(history),
                    "seconds_per_step": result.seconds_per_step, "grad_flow": result.grad_flow}

        runs.append(done.run(f"{method}-d{density}-s{seed}", job))
    report_reuse(done, len(jobs))
    table = []
    for density in ((1.0,) if config.dense_baseline else ()) + tuple(config.densities):
        for method in (("dense",) if density >= 1.0 else config.methods):
            sel = [r for r in runs if r["method"] == method and r["density"] == density]
            table.append({"method": method, "density": density,
                          **{k: mean_std([r[k] for r in sel]) for k in
                             ("grad_norm_init", "grad_norm_mean", "dense_grad_norm_mean", "test_accuracy",
                              "mask_changed_fraction", "seconds_per_step")}})
    verdict = _verdict(config, runs)
    results = {"study": STUDY, "steps": steps, "delta_t": delta_t, "data": splits.name, "n_train": len(splits.train),
               "runs": runs, "table": table, "verdict": verdict}
    results["paper"] = PAPER
    results["seconds"] = time.perf_counter() - started  # wall time, plots and summary not counted
    results["threads"] = torch.get_num_threads()
    results["jobs_reused"] = done.reused
    write_json(out / "results.json", results)
    _plot(config, runs, out)
    (out / "summary.md").write_text(_summary(config, splits, steps, delta_t, table, verdict))
    results["dir"] = str(out)
    return results


def _cell(table, method, density):
    return next(r for r in table if r["method"] == method and r["density"] == density)


def _paired(runs, method, density, key):
    by_seed = {r["seed"]: r[key] for r in runs if r["method"] == method and r["density"] == density}
    return [by_seed[k] for k in sorted(by_seed)]


def _verdict(config, runs) -> dict:
    """Per density and DST method, paired with Static over seeds (same init, mask seed and data order):
    is the mean gradient norm during training higher (as a ratio), and the test accuracy?"""
    claims = []
    if "static" not in config.methods or len(config.seeds) < 2:
        return {"claims": claims}
    for density in config.densities:
        static_norm = _paired(runs, "static", density, "grad_norm_mean")
        static_acc = _paired(runs, "static", density, "test_accuracy")
        for method in config.methods:
            if method == "static":
                continue
            claims.append(compare(f"{method} @ density {density}: mean gradient norm in training, {method} / static",
                                  _paired(runs, method, density, "grad_norm_mean"), static_norm, "greater", log=True,
                                  method=method, density=density, quantity="grad_norm_mean"))
            claims.append(compare(f"{method} @ density {density}: test accuracy, {method} minus static",
                                  _paired(runs, method, density, "test_accuracy"), static_acc, "greater",
                                  method=method, density=density, quantity="test_accuracy", unit=" pt", scale=100.0))
    return {"claims": claims}


def _plot(config, runs, out):
    pyplot = plt()
    densities = ((1.0,) if config.dense_baseline else ()) + tuple(config.densities)
    fig, axes = pyplot.subplots(1, len(config.densities), figsize=(6 * len(config.densities), 4), squeeze=False)
    for ax, density in zip(axes[0], config.densities):
        for method in (("dense",) if config.dense_baseline else ()) + tuple(config.methods):
            sel = [r for r in runs if r["method"] == method and r["density"] == (1.0 if method == "dense" else density)]
            steps = [g["step"] for g in sel[0]["grad_flow"]]
            series = torch.tensor([[g["active"] for g in r["grad_flow"]] for r in sel])
            line, = ax.plot(steps, series.mean(0).tolist(), "--" if method == "dense" else "-", label=method)
            # the range over seeds (mean - std would cross zero on the log axis)
            ax.fill_between(steps, series.min(0).values.tolist(), series.max(0).values.tolist(),
                            color=line.get_color(), alpha=0.15)
        ax.set(yscale="log", xlabel="step", ylabel=f"gradient norm ({grad_flow_label(config)})",
               title=f"{config.model}, density {density}")
        ax.legend()
    del densities
    fig.tight_layout()
    fig.savefig(out / "grad_norm_training.png", dpi=110)
    pyplot.close(fig)
    loss_curve([config.model], runs, out / "loss_curve.png",
               lambda r: "dense" if r["method"] == "dense" else f"{r['method']} d={r['density']}",
               grad_flow_label(config))


def _summary(config, splits, steps, delta_t, table, verdict) -> str:
    regrown = "restarted at zero" if config.reinit_when_same else "kept as it was (as in the paper's code)"
    lines = ["# Dynamic sparse training and gradient flow",
             "",
             "**Claim (Evci et al. 2022, sec. 4):** DST methods (SET, SNFS, RigL) raise the gradient norm during "
             "training compared with a static sparse mask, and this goes with better final accuracy.",
             "",
             f"Setting: {config.model} (LeNet-300-100 if mlp), densities {list(config.densities)} (ERK per layer, "
             f"sparsity-aware init); {steps} SGD steps at batch {config.batch_size} (momentum {config.momentum}, "
             f"lr {config.lr}, {config.lr_schedule} decay, weight decay {config.weight_decay}); mask updates every "
             f"{delta_t} steps until {int(100 * config.end_fraction)} % of training, drop fraction "
             f"{config.drop_fraction} (cosine decay), a weight dropped and grown back in one update "
             f"{regrown}; "
             f"seeds {list(config.seeds)} (every method of a seed starts from "
             "the same init and mask and sees the same batches). Gradient norm over the active weights on "
             f"{grad_flow_note(config, splits)}, every {config.grad_flow_every} steps; 'mean' averages it over "
             "training.",
             "", data_note(config, splits, steps), ""]
    if not small_data(config) and steps < 5000:
        lines += [f"*Scaled down:* the paper updates masks every 100 of 11,719 steps; here every {delta_t} of "
                  f"{steps}.", ""]
    if config.quick:
        lines += ["*Quick run (`--quick`): a smoke-test setting, too short for conclusions.*", ""]
    lines += ["| density | method | mean grad norm (active) | mean grad norm (dense) | test accuracy | "
              "mask changed | s/step |", "|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['density']} | {r['method']} | {fmt(r['grad_norm_mean'])} | "
                     f"{fmt(r['dense_grad_norm_mean'])} | {fmt(r['test_accuracy'], 3)} | "
                     f"{fmt(r['mask_changed_fraction'], 2)} | {fmt(r['seconds_per_step'], 2)} |")
    lines += ["", "Mean ± std over seeds.", "", "## Verdict", ""]
    claims = verdict["claims"]
    if claims:
        lines += claim_lines(claims) + ["", tally(claims)]
    else:
        lines += ["No paired comparison (it needs Static among the methods and two or more seeds): no verdict."]
    lines += ["", PAPER, "",
              "Plots: `grad_norm_training.png` (gradient norm vs step, mean over seeds, shaded: min to max, per "
              f"density), `loss_curve.png` (loss on the {grad_flow_label(config)} vs step).",
              "Every number: `results.json`; the setting: `config.json`.", ""]
    return "\n".join(lines)
