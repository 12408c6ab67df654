"""Study 3: lottery tickets do not improve gradient flow; they re-learn the pruning solution.

Per seed: train the dense network, find the IMP ticket (``sparsekern.lottery.lottery_ticket``), then
train from the ticket's mask three ways: the ticket (rewound weights), scratch (same mask, new random
weights of the same distribution), and random mask (same per-layer density, rewound weights). Each
final solution is compared with the pruning solution the mask came from: L2 distance between the
weight vectors (zeros outside each mask; at the start and the end of training), the loss barrier on the
linear path to it, prediction disagreement and Jensen-Shannon divergence, and the accuracy gain of
ensembling with it. The verdicts are paired comparisons of ticket and scratch over seeds.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Tuple

import torch
from tqdm.auto import tqdm

from ..analysis import compare_predictions, evaluate, interpolation_curve, weight_distance
from ..init import he_normal_
from ..lottery import lottery_ticket, prune_schedule
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

PAPER = ("**The paper, beside ours:** the paper reports (MNIST among other settings) that lottery tickets do "
         "not improve gradient flow over the same mask from a random init, and that they re-learn the pruning "
         "solution they came from: they end much closer to it in weight space than scratch does, in the same "
         "basin (no loss barrier on the linear path), with more similar predictions and a smaller gain from "
         "ensembling with it. It states these as comparisons, not as numbers to copy: ours are the comparisons "
         "above and `interpolation.png`.")
STUDY = "lottery"
SOLUTIONS = ("ticket", "scratch", "random_mask")
SUBSET_STEPS = 400


def finetune_from(steps: int) -> int:
    """The step the pruning solution's fine-tuning at the final mask starts from: the schedule's second half."""
    return steps // 2


@dataclass
class LotteryConfig(TrainingConfig):
    model: str = "lenet5"
    seeds: Tuple[int, ...] = DEFAULT_SEEDS
    rounds: int = 3  # 0.46 ** 3 = 9.7 % of the weights left
    prune_fraction: float = 0.54
    scope: str = "global"
    rewind_step: int = 0

    QUICK = dict(data="digits", model="mlp", seeds=(0,), rounds=2, prune_fraction=0.5, steps=60, grad_flow_every=20)


def run(config: LotteryConfig) -> dict:
    started = time.perf_counter()
    # The step count in the config before it is hashed: a new default is a new run directory.
    steps = scaled_steps(config, SUBSET_STEPS)
    config = dataclasses.replace(config, steps=steps)
    out = run_dir(STUDY, config)
    splits = load_splits(config.data, config.data_dir)
    held_out = grad_flow_batch(splits, config.grad_flow_data)
    train_loader, _, test_loader = splits.loaders(config.batch_size)
    per_seed, done = [], Jobs(out, config.fresh, config.deterministic)
    for seed in tqdm(config.seeds, desc=STUDY, disable=not config.progress):
        def job(seed=seed) -> dict:
            trainer = Trainer(splits.train, steps, config.batch_size, config.lr, config.momentum, config.weight_decay,
                              config.lr_schedule, seed, held_out, config.grad_flow_every, test_loader,
                              progress=config.progress, warmup_steps=int(config.warmup * steps))
            model = study_model(config.model, splits, seed)  # the same dense init as the other studies
            found = lottery_ticket(model, trainer, rounds=config.rounds, prune_fraction=config.prune_fraction,
                                   scope=config.scope, rewind_step=config.rewind_step)
            # The pruning solution, as the paper's: a network trained at the final mask (its gradual pruning reaches
            # the final sparsity and trains on at it to the end of the schedule). IMP's last round trained at the
            # density before the last pruning step, so that network, masked, is fine-tuned at the final mask over
            # the second half of the schedule; unmasked-then-masked alone it is a damaged network.
            pruned = found.pruned
            masked_loss, masked_acc = evaluate(pruned, test_loader)
            finetuned = trainer(pruned, start_step=finetune_from(steps), desc=f"pruned s={seed}")
            record = {"seed": seed, "density": found.density,
                      "rounds": [{k: v for k, v in r.items()} for r in found.rounds],
                      "dense": {"test_accuracy": found.rounds[0]["accuracy"], "test_loss": found.rounds[0]["loss"],
                                "grad_flow": found.rounds[0]["grad_flow"]},
                      "pruned": {"test_accuracy": finetuned.accuracy, "test_loss": finetuned.loss,
                                 "masked_test_accuracy": masked_acc, "masked_test_loss": masked_loss,
                                 "trained_at_density": found.rounds[-1]["density"],
                                 "grad_flow": found.rounds[-1]["grad_flow"]},
                      "solutions": {}}
            starts = {"ticket": found.ticket(), "scratch": found.scratch(seed + 1000, init_fn=he_normal_),
                      "random_mask": found.random_mask(seed + 2000)}
            for name, start in starts.items():
                start_distance = weight_distance(start, pruned).overall
                trained = copy.deepcopy(start)
                result = trainer(trained, start_step=config.rewind_step, desc=f"{name} s={seed}")
                curve = interpolation_curve(trained, pruned, test_loader, bn_loader=train_loader)
                comparison = compare_predictions(trained, pruned, test_loader)
                record["solutions"][name] = {
                    "test_accuracy": result.accuracy, "test_loss": result.loss, "grad_flow": result.grad_flow,
                    "distance_to_pruned_start": start_distance,
                    "distance_to_pruned": weight_distance(trained, pruned).to_dict(),
                    "interpolation": curve.to_dict(), "barrier": curve.barrier,
                    "comparison": comparison.to_dict(),
                    "ensemble_gain": comparison.ensemble_accuracy - max(comparison.accuracy_a, comparison.accuracy_b)}
            dense_cmp = compare_predictions(found.dense, pruned, test_loader)
            record["dense"].update(distance_to_pruned=weight_distance(found.dense, pruned).to_dict(),
                                   comparison=dense_cmp.to_dict(),
                                   barrier=interpolation_curve(found.dense, pruned, test_loader,
                                                               bn_loader=train_loader).barrier)
            return record

        per_seed.append(done.run(f"s{seed}", job))
    report_reuse(done, len(config.seeds))
    table = _table(per_seed)
    verdict = _verdict(per_seed)
    results = {"study": STUDY, "steps": steps, "data": splits.name, "n_train": len(splits.train),
               "schedule": prune_schedule(config.prune_fraction, config.rounds),
               "per_seed": per_seed, "table": table, "verdict": verdict}
    results["paper"] = PAPER
    results["seconds"] = time.perf_counter() - started  # wall time, plots and summary not counted
    results["threads"] = torch.get_num_threads()
    results["jobs_reused"] = done.reused
    write_json(out / "results.json", results)
    _plot(config, per_seed, out)
    (out / "summary.md").write_text(_summary(config, splits, steps, per_seed, table, verdict))
    results["dir"] = str(out)
    return results


def _mean_flow(grad_flow):
    return sum(g["active"] for g in grad_flow) / max(len(grad_flow), 1)


def _table(per_seed):
    table = {"density": mean_std([r["density"] for r in per_seed]),
             "dense_accuracy": mean_std([r["dense"]["test_accuracy"] for r in per_seed]),
             "dense_grad_norm_mean": mean_std([_mean_flow(r["dense"]["grad_flow"]) for r in per_seed]),
             "pruned_accuracy": mean_std([r["pruned"]["test_accuracy"] for r in per_seed]),
             "pruned_masked_accuracy": mean_std([r["pruned"].get("masked_test_accuracy") for r in per_seed]),
             "pruned_run_grad_norm_mean": mean_std([_mean_flow(r["pruned"]["grad_flow"]) for r in per_seed])}
    for name in SOLUTIONS:
        sol = [r["solutions"][name] for r in per_seed]
        table[name] = {
            "test_accuracy": mean_std([s["test_accuracy"] for s in sol]),
            "grad_norm_init": mean_std([s["grad_flow"][0]["active"] for s in sol]),
            "grad_norm_mean": mean_std([_mean_flow(s["grad_flow"]) for s in sol]),
            "distance_start": mean_std([s["distance_to_pruned_start"] for s in sol]),
            "distance_end": mean_std([s["distance_to_pruned"]["overall"] for s in sol]),
            "barrier": mean_std([s["barrier"] for s in sol]),
            "disagreement": mean_std([s["comparison"]["disagreement"] for s in sol]),
            "js_divergence": mean_std([s["comparison"]["js_divergence"] for s in sol]),
            "ensemble_accuracy": mean_std([s["comparison"]["ensemble_accuracy"] for s in sol]),
            "ensemble_gain": mean_std([s["ensemble_gain"] for s in sol])}
    return table


# (label, quantity read from a solution's record, the claim for ticket vs scratch, on the log scale?)
_CLAIMS = (
    ("ends closer to the pruning solution (L2 distance), ticket / scratch",
     lambda s: s["distance_to_pruned"]["overall"], "less", True, {}),
    ("loss barrier on the linear path to the pruning solution, ticket minus scratch",
     lambda s: s["barrier"], "less", False, {}),
    ("prediction disagreement with the pruning solution, ticket minus scratch",
     lambda s: s["comparison"]["disagreement"], "less", False, {"unit": " pt", "scale": 100.0}),
    ("ensemble gain with the pruning solution, ticket minus scratch",
     lambda s: s["ensemble_gain"], "less", False, {"unit": " pt", "scale": 100.0}),
    ("mean gradient norm in training, ticket / scratch (claim: at most 10 % larger)",
     lambda s: _mean_flow(s["grad_flow"]), "not_greater", True, {"margin": math.log(1.1)}),
    ("test accuracy, ticket minus scratch (the lottery-ticket effect)",
     lambda s: s["test_accuracy"], "greater", False, {"unit": " pt", "scale": 100.0}),
)


def _verdict(per_seed) -> dict:
    """Ticket vs scratch, paired over seeds (the same mask): the claim's predictions, each a paired test."""
    if len(per_seed) < 2:
        return {"claims": []}
    claims = []
    for label, get, claim, log, extra in _CLAIMS:
        ticket = [get(r["solutions"]["ticket"]) for r in per_seed]
        scratch = [get(r["solutions"]["scratch"]) for r in per_seed]
        claims.append(compare(label, ticket, scratch, claim, log=log, **extra))
    return {"claims": claims}


def _plot(config, per_seed, out):
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(7, 4.5))
    series = [("dense", lambda r: r["dense"]["grad_flow"], "--"),
              ("IMP last round (pruned solution's run)", lambda r: r["pruned"]["grad_flow"], ":")]
    series += [(name, lambda r, name=name: r["solutions"][name]["grad_flow"], "-") for name in SOLUTIONS]
    for label, get, style in series:
        flows = [get(r) for r in per_seed]
        steps = [g["step"] for g in flows[0]]
        mean = [sum(f[j]["active"] for f in flows) / len(flows) for j in range(len(steps))]
        ax.plot(steps, mean, style, label=label)
    ax.set(yscale="log", xlabel="step", ylabel=f"gradient norm ({grad_flow_label(config)})",
           title=f"{config.model}: gradient flow, ticket vs controls (density {per_seed[0]['density']:.3f})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "grad_norm_training.png", dpi=110)
    pyplot.close(fig)
    fig, axes = pyplot.subplots(1, 2, figsize=(11, 4))
    for name in SOLUTIONS:
        curves = [r["solutions"][name]["interpolation"] for r in per_seed]
        alphas = curves[0]["alphas"]
        for ax, key in zip(axes, ("losses", "accuracies")):
            ax.plot(alphas, [sum(c[key][j] for c in curves) / len(curves) for j in range(len(alphas))], "o-",
                    label=name)
    axes[0].set(xlabel="alpha (0: solution, 1: pruning solution)", ylabel="test loss", title="linear interpolation")
    axes[1].set(xlabel="alpha (0: solution, 1: pruning solution)", ylabel="test accuracy")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "interpolation.png", dpi=110)
    pyplot.close(fig)


def _summary(config, splits, steps, per_seed, table, verdict) -> str:
    density = table["density"]["mean"]
    lines = ["# Lottery tickets: gradient flow and the pruning solution",
             "",
             "**Claim (Evci et al. 2022, sec. 5):** lottery tickets do not train better because of better gradient "
             "flow (their gradient norm is no larger than that of the same mask from a random init, 'scratch'); they "
             "work because they re-learn the pruning solution they came from: they end close to it, in its basin "
             "(no loss barrier on the linear path), with nearly the same predictions, so ensembling with it gains "
             "little.",
             "",
             f"Setting: {config.model} on `{config.data}`; {steps} SGD steps per training run at batch "
             f"{config.batch_size} (momentum {config.momentum}, lr {config.lr}, {config.lr_schedule} decay, weight "
             f"decay {config.weight_decay}); IMP ({config.scope} magnitude) {config.rounds} rounds of "
             f"{100 * config.prune_fraction:.0f} % of the remaining weights: density {density:.3f}; rewind to step "
             f"{config.rewind_step}{' (the original ticket)' if config.rewind_step == 0 else ''}; seeds "
             f"{list(config.seeds)} (mean ± std). The pruning solution is the last IMP round's trained network "
             f"(density {per_seed[0]['pruned']['trained_at_density']:.3f}) with the ticket's mask applied and "
             f"fine-tuned at that mask from step {finetune_from(steps)} to the end of the schedule (the paper's is "
             "a network gradually pruned to its final mask and trained on at it). Scratch: the ticket's mask with a "
             "new draw of the same init (He normal, masked). Random mask: the ticket's per-layer densities at random "
             f"positions, with the rewound weights. Gradient norms on {grad_flow_note(config, splits)}, every "
             f"{config.grad_flow_every} steps.",
             ""]
    lines += [data_note(config, splits, steps), ""]
    if config.quick:
        lines += ["*Quick run (`--quick`): a smoke-test setting, too short for conclusions.*", ""]
    lines += [f"Dense: test accuracy {fmt(table['dense_accuracy'], 3)}, mean gradient norm "
              f"{fmt(table['dense_grad_norm_mean'])}. Pruning solution: test accuracy "
              f"{fmt(table['pruned_accuracy'], 3)} ({fmt(table['pruned_masked_accuracy'], 3)} before its "
              "fine-tuning).", "",
              "| solution | test acc | grad norm at start | mean grad norm | dist. to pruned, start | dist. to pruned, "
              "end | loss barrier | disagreement | JS div. | ensemble acc | ensemble gain |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in SOLUTIONS:
        r = table[name]
        lines.append(f"| {name} | {fmt(r['test_accuracy'], 3)} | {fmt(r['grad_norm_init'])} | "
                     f"{fmt(r['grad_norm_mean'])} | {fmt(r['distance_start'])} | {fmt(r['distance_end'])} | "
                     f"{fmt(r['barrier'], 3)} | {fmt(r['disagreement'], 3)} | {fmt(r['js_divergence'], 3)} | "
                     f"{fmt(r['ensemble_accuracy'], 3)} | {fmt(r['ensemble_gain'], 3)} |")
    lines += ["", "Mean ± std over seeds.", "", "## Verdict", ""]
    claims = verdict["claims"]
    if claims:
        lines += claim_lines(claims) + ["", tally(claims)]
    else:
        lines += ["One seed: no paired comparison, so no verdict (run with two or more seeds)."]
    if table["pruned_accuracy"]["mean"] < table["ticket"]["test_accuracy"]["mean"] - 0.02:
        lines += ["", "Caveat: the pruning solution is less accurate than the ticket, so ensembling with it can lose "
                  "accuracy (negative gains), and the disagreement partly measures its errors rather than a different "
                  "function."]
    lines += ["", PAPER, "",
              "Plots: `grad_norm_training.png` (gradient norm vs step), `interpolation.png` (loss and accuracy on the "
              "linear path from each solution to the pruning solution). Every number: `results.json`; the setting: "
              "`config.json`.", ""]
    return "\n".join(lines)
