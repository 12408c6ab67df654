"""One report over the three studies (``sparsekern study all``): each study's verdicts with their
statistics, its plots, and where every number sits in its results.json."""
from __future__ import annotations

import json
import os
import platform
import shutil
from pathlib import Path
from typing import Dict

import torch

__all__ = ["write_report", "load_run"]

_TITLES = {"gradient-flow": "1. Gradient flow at initialization (dense vs sparsity-aware init)",
           "dst": "2. Dynamic sparse training vs static sparse training",
           "lottery": "3. Lottery tickets vs the same mask from scratch"}
_COPIED = ("summary.md", "results.json", "config.json")


def _machine(results: Dict[str, dict]) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = sorted({r["threads"] for r in results.values() if "threads" in r})
    runs = f"; the runs used {' / '.join(map(str, threads))} torch thread(s)" if threads else ""
    return f"{cpu} ({os.cpu_count()} cores), torch {torch.__version__}{runs}"


def load_run(run_dir) -> dict:
    """What a study's ``run`` returned, read back from its directory (results.json), for ``write_report``."""
    run_dir = Path(run_dir)
    result = json.loads((run_dir / "results.json").read_text())
    result["dir"] = str(run_dir)
    return result


def write_report(results: Dict[str, dict], dest) -> Path:
    """Copy each study's summary, results.json, config.json and plots to ``dest/<study>/`` and write
    ``dest/README.md``: per study the setting, the verdicts (linked to the JSON record each number comes
    from), the plots, and the wall time. ``results`` maps a study's name to what its ``run`` returned
    (``load_run`` reads it back from a run directory); ``seconds`` is its wall time."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    lines = ["# The paper's three findings, reproduced", "",
             "Evci et al., *Gradient Flow in Sparse Neural Networks and How Lottery Tickets Win* (AAAI 2022), "
             "re-run with `sparsekern study all` (the setting of each study in the table below). Each verdict is "
             "a paired comparison over seeds: the mean difference (or "
             "ratio, for gradient norms and distances) with its 95 % confidence interval from the paired t-test, "
             "the exact sign-flip permutation p-value, and the effect size d_z; *supported* when the interval "
             "lies wholly on the side the paper predicts, *contradicted* when wholly on the other, else "
             "*inconclusive*. Each interval is at 95 % on its own (no correction for the number of comparisons). "
             "With n seeds the exact sign-flip test cannot go below p = 2 / 2^n (two-sided): 0.0625 for 5, "
             "0.002 for 10.", "",
             f"Machine: {_machine(results)}.", ""]
    overview = ["| study | setting | supported | contradicted | inconclusive | wall time (threads) |",
                "|---|---|---|---|---|---|"]
    sections = []
    for name, result in results.items():
        src = Path(result["dir"])
        out = dest / name
        if out.exists():
            shutil.rmtree(out)  # a refreshed report holds only this run's files
        out.mkdir(parents=True)
        for f in list(_COPIED) + sorted(p.name for p in src.glob("*.png")):
            shutil.copy2(src / f, out / f)
        config = json.loads((src / "config.json").read_text())
        claims = result.get("verdict", {}).get("claims", [])
        counts = [sum(c["verdict"] == v for c in claims) for v in ("supported", "contradicted", "inconclusive")]
        models = config.get("models") or [config.get("model")]
        setting = (f"{', '.join(models)} on {result.get('data', config['data'])}, {result['steps']} steps, "
                   f"{len(config['seeds'])} seeds")
        seconds = result.get("seconds")
        wall = "n/a" if seconds is None else f"{seconds / 60:.1f} min" + (
            f" ({result['threads']})" if "threads" in result else "")
        overview.append(f"| [{name}](#{name}) | {setting} | {counts[0]} | {counts[1]} | {counts[2]} | {wall} |")
        sections += [f"<a id=\"{name}\"></a>", "", f"## {_TITLES.get(name, name)}", "",
                     f"Setting: {setting} (config hash `{config['hash']}`; [config]({name}/config.json)). "
                     f"Full summary with the table of every cell: [{name}/summary.md]({name}/summary.md); every "
                     f"number: [{name}/results.json]({name}/results.json).", ""]
        for i, c in enumerate(claims):
            sections.append(f"- {c['label']}: {c['text']} "
                            f"([`verdict.claims[{i}]`]({name}/results.json))")
        if not claims:
            sections.append("- No paired comparison in this setting (one seed): no verdict.")
        sections.append("")
        if result.get("paper"):
            sections += [result["paper"], ""]
        for png in sorted(p.name for p in src.glob("*.png")):
            sections += [f"![{name}: {png}]({name}/{png})", ""]
    lines += overview + ["", "Wall time: the study's training and analysis (not its plots), as measured where it ran; "
                         "on a machine shared with other jobs it is an upper bound.", ""] + sections
    report = dest / "README.md"
    report.write_text("\n".join(lines))
    return report
