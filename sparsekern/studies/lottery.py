"""Study 3: lottery tickets do not improve gradient flow; they re-learn the pruning solution.

Per seed: train the dense network, find the IMP ticket (``sparsekern.lottery.lottery_ticket``), then
train from the ticket's mask three ways: the ticket (rewound weights), scratch (same mask, new random
weights of the same distribution), and random mask (same per-layer density, rewound weights). Each
final solution is compared with the pruning solution the mask came from: L2 distance between the
weight vectors (zeros outside each mask; at the start and the end of training), the loss barrier on the linear path to it, prediction
disagreement and Jensen-Shannon divergence, and the accuracy gain of ensembling with it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Tuple

import torch
from tqdm.auto import tqdm

from ..analysis import compare_predictions, interpolation_curve, weight_distance
from ..lottery import SGDTrainer, lottery_ticket, prune_schedule
from ..train import evaluate
from .common import TrainingConfig, build_model, fmt, held_out_batch, load_splits, mean_std, plt, run_dir, scaled_steps, write_json
from .gradient_flow import he_normal_

STUDY = "lottery"
SOLUTIONS = ("ticket", "scratch", "random_mask")


@dataclass
class LotteryConfig(TrainingConfig):
    model: str = "lenet5"
    seeds: Tuple[int, ...] = (0, 1)
    rounds: int = 8  # 0.8 ** 8 = 16.8 % of the weights left
    prune_fraction: float = 0.2
    scope: str = "global"
    rewind_step: int = 0

    QUICK = dict(model="mlp", seeds=(0,), rounds=2, prune_fraction=0.5, steps=60, grad_flow_every=20)


def run(config: LotteryConfig) -> dict:
    out = run_dir(STUDY, config)
    splits = load_splits(config.data, config.data_dir, config.model)
    steps = scaled_steps(config.steps, config.data, 300)
    held_out = held_out_batch(splits)
    train_loader, _, test_loader = splits.loaders(config.batch_size)
    per_seed = []
    for seed in tqdm(config.seeds, desc=STUDY, disable=not config.progress):
        trainer = SGDTrainer(splits.train, steps, config.batch_size, config.lr, config.momentum, config.weight_decay,
                             config.lr_schedule, seed, held_out, config.grad_flow_every, test_loader,
                             progress=config.progress)
        model = build_model(config.model, splits, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            he_normal_(model)  # the same dense init as the other studies
        found = lottery_ticket(model, trainer, rounds=config.rounds, prune_fraction=config.prune_fraction,
                               scope=config.scope, rewind_step=config.rewind_step)
        pruned = found.pruned
        pruned_eval = evaluate(pruned, test_loader)
        pruned_loss, pruned_acc = pruned_eval["loss"], pruned_eval["accuracy"]
        record = {"seed": seed, "density": found.density,
                  "rounds": [{k: v for k, v in r.items()} for r in found.rounds],
                  "dense": {"test_accuracy": found.rounds[0]["accuracy"], "test_loss": found.rounds[0]["loss"],
                            "grad_flow": found.rounds[0]["grad_flow"]},
                  "pruned": {"test_accuracy": pruned_acc, "test_loss": pruned_loss,
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
        per_seed.append(record)
    table = _table(per_seed)
    verdict = _verdict(table)
    results = {"study": STUDY, "steps": steps, "schedule": prune_schedule(config.prune_fraction, config.rounds),
               "per_seed": per_seed, "table": table, "verdict": verdict}
    write_json(out / "results.json", results)
    _plot(config, per_seed, out)
    (out / "summary.md").write_text(_summary(config, steps, per_seed, table, verdict))
    results["dir"] = str(out)
    return results


def _mean_flow(grad_flow):
    return sum(g["active"] for g in grad_flow) / max(len(grad_flow), 1)


def _table(per_seed):
    table = {"density": mean_std([r["density"] for r in per_seed]),
             "dense_accuracy": mean_std([r["dense"]["test_accuracy"] for r in per_seed]),
             "dense_grad_norm_mean": mean_std([_mean_flow(r["dense"]["grad_flow"]) for r in per_seed]),
             "pruned_accuracy": mean_std([r["pruned"]["test_accuracy"] for r in per_seed]),
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


def _verdict(table) -> dict:
    t, s = table["ticket"], table["scratch"]
    m = lambda row, key: row[key]["mean"]  # noqa: E731
    return {
        "ticket_closer_than_scratch": m(t, "distance_end") < m(s, "distance_end"),
        "ticket_lower_barrier": m(t, "barrier") < m(s, "barrier"),
        "ticket_lower_disagreement": m(t, "disagreement") < m(s, "disagreement"),
        "ticket_smaller_ensemble_gain": m(t, "ensemble_gain") < m(s, "ensemble_gain"),
        "ticket_grad_norm_not_larger": m(t, "grad_norm_mean") <= 1.1 * m(s, "grad_norm_mean"),
        "ticket_grad_norm_ratio_vs_scratch": m(t, "grad_norm_mean") / m(s, "grad_norm_mean"),
        "ticket_accuracy_gain_vs_scratch": m(t, "test_accuracy") - m(s, "test_accuracy")}


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
    ax.set(yscale="log", xlabel="step", ylabel="gradient norm (held-out batch)",
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


def _summary(config, steps, per_seed, table, verdict) -> str:
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
             f"(density {per_seed[0]['pruned']['trained_at_density']:.3f}) with the ticket's mask applied, not "
             "fine-tuned. Scratch: the ticket's mask with a new draw of the same init (He normal, masked). Random "
             "mask: the ticket's per-layer densities at random positions, with the rewound weights.",
             ""]
    if config.data in ("digits", "synthetic"):
        lines += [f"*Scaled down:* the paper trains LeNet-5 11,719 steps per run on MNIST; offline `{config.data}` "
                  f"data gets {steps} steps per run.", ""]
    if config.quick:
        lines += ["*Quick run (`--quick`): a smoke-test setting, too short for conclusions.*", ""]
    lines += [f"Dense: test accuracy {fmt(table['dense_accuracy'], 3)}, mean gradient norm "
              f"{fmt(table['dense_grad_norm_mean'])}. Pruning solution: test accuracy "
              f"{fmt(table['pruned_accuracy'], 3)}.", "",
              "| solution | test acc | grad norm at start | mean grad norm | dist. to pruned, start | dist. to pruned, "
              "end | loss barrier | disagreement | JS div. | ensemble acc | ensemble gain |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in SOLUTIONS:
        r = table[name]
        lines.append(f"| {name} | {fmt(r['test_accuracy'], 3)} | {fmt(r['grad_norm_init'])} | "
                     f"{fmt(r['grad_norm_mean'])} | {fmt(r['distance_start'])} | {fmt(r['distance_end'])} | "
                     f"{fmt(r['barrier'], 3)} | {fmt(r['disagreement'], 3)} | {fmt(r['js_divergence'], 3)} | "
                     f"{fmt(r['ensemble_accuracy'], 3)} | {fmt(r['ensemble_gain'], 3)} |")
    yes = lambda b: "yes" if b else "**no**"  # noqa: E731

    def spread(key):  # a difference inside the seeds' spread is no evidence either way
        t, c = table["ticket"][key], table["scratch"][key]
        if len(config.seeds) < 2 or abs(t["mean"] - c["mean"]) > t["std"] + c["std"]:
            return ""
        return " (but within the spread over seeds: weak evidence)"

    lines += ["", "## Verdict", "",
              f"- Ticket ends closer to the pruning solution than scratch: "
              f"{yes(verdict['ticket_closer_than_scratch'])}{spread('distance_end')}.",
              f"- Lower loss barrier to it than scratch: {yes(verdict['ticket_lower_barrier'])}{spread('barrier')}.",
              f"- Lower prediction disagreement with it: "
              f"{yes(verdict['ticket_lower_disagreement'])}{spread('disagreement')}.",
              f"- Smaller ensemble gain with it (a more similar function): "
              f"{yes(verdict['ticket_smaller_ensemble_gain'])}{spread('ensemble_gain')}.",
              f"- Gradient norm during training, ticket / scratch: x{verdict['ticket_grad_norm_ratio_vs_scratch']:.2f} "
              f"(the claim expects no clear increase: {yes(verdict['ticket_grad_norm_not_larger'])}, taking 10 % as "
              "the margin).",
              f"- Test accuracy, ticket minus scratch: {100 * verdict['ticket_accuracy_gain_vs_scratch']:+.1f} pt.",
              ""]
    if table["pruned_accuracy"]["mean"] < table["ticket"]["test_accuracy"]["mean"] - 0.02:
        lines += ["Caveat: the pruning solution (not fine-tuned after its last pruning step) is less accurate than the "
                  "ticket, so ensembling with it can lose accuracy (negative gains), and the disagreement partly "
                  "measures its errors rather than a different function.", ""]
    supported = sum(bool(verdict[k]) for k in ("ticket_closer_than_scratch", "ticket_lower_barrier",
                                                 "ticket_lower_disagreement", "ticket_smaller_ensemble_gain",
                                                 "ticket_grad_norm_not_larger"))
    weak = sum(bool(spread(k)) for k in ("distance_end", "barrier", "disagreement", "ensemble_gain"))
    lines += [f"{supported} of 5 predictions of the claim hold in these numbers"
              f"{f' ({weak} of them within the spread over seeds)' if weak else ''}: the claim is "
              f"{'supported' if supported == 5 and not weak else 'partly supported' if supported >= 3 else 'NOT supported'} here"
              + ("; with a single seed, without error bars." if len(config.seeds) == 1 else "."), "",
              "Plots: `grad_norm_training.png` (gradient norm vs step), `interpolation.png` (loss and accuracy on the "
              "linear path from each solution to the pruning solution). Every number: `results.json`; the setting: "
              "`config.json`.", ""]
    return "\n".join(lines)
