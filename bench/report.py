"""The results table: printed with ``rich`` when installed (markdown otherwise), written as markdown."""
from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Union

from sparsekern import isa
from sparsekern.isa import cpu_model  # noqa: F401  (re-exported: the bench modules take it from here)

from .peers import COLUMNS, DENSE, SPARSEKERN, SPARSEPROP
from .timing import Timing


def isa_flags() -> str:
    """The vector ISA of the host (from /proc/cpuinfo): ratios do not carry between AVX2 and AVX-512 hosts."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    return ", ".join(f"{name} {'yes' if any(fl.startswith(name) for fl in flags) else 'no'}"
                     for name in ("avx2", "avx512f", "amx"))


def host() -> str:
    """The CPU line of a report: model, cores, vector ISA, and the width the CSR and conv tile loops run at."""
    try:
        width = f"{isa.get()}, {isa.build()} build"
    except RuntimeError:
        width = "n/a (extension not built)"
    return (f"{cpu_model()}; {os.cpu_count()} logical cores; {isa_flags()}; "
            f"sparsekern loops: {width} (SPARSEKERN_ISA)")


# Markers for a cell without a time.
NOT_APPLICABLE = "—"  # the implementation has no such op (torch.sparse conv, SparseProp topk)
UNAVAILABLE = "n/a"  # SparseProp is not installed
NO_BACKWARD = "fwd only"  # its backward is not supported
FAILED = "error"  # it raised; the notes say why
WRONG = "wrong"  # its result differs from dense; not timed

HEADERS = ("case", "pass", *(f"{c} ms" for c in COLUMNS), "speedup vs dense", "speedup vs SparseProp", "notes")
LEGEND = ("Cells: median ms [IQR] per call. Speedups: time of dense (or SparseProp) / time of sparsekern. "
          "fwd = forward with grad mode on (as in training); fwd+bwd = forward + backward with a fixed upstream "
          "gradient into x, weight and bias. For topk_select the dense column is torch.topk(sorted=False). "
          f"'{NOT_APPLICABLE}': does not apply; '{UNAVAILABLE}': not installed; '{NO_BACKWARD}': no backward; "
          f"'{WRONG}': result differs from dense, not timed.")


@dataclass
class Row:
    case: str
    pass_name: str  # "fwd" or "fwd+bwd"
    times: Dict[str, Union[Timing, str]] = field(default_factory=dict)  # column -> Timing or a marker
    notes: List[str] = field(default_factory=list)

    def cells(self) -> List[str]:
        times = [_time_cell(self.times.get(c, NOT_APPLICABLE)) for c in COLUMNS]
        return [self.case, self.pass_name, *times, self._ratio(DENSE), self._ratio(SPARSEPROP), "; ".join(self.notes)]

    def _ratio(self, baseline: str) -> str:
        base, ours = self.times.get(baseline), self.times.get(SPARSEKERN)
        if isinstance(base, Timing) and isinstance(ours, Timing):
            return f"{base.median / ours.median:.3g}x"
        return NOT_APPLICABLE


def _time_cell(t: Union[Timing, str]) -> str:
    return f"{t.median * 1e3:.3f} [{t.iqr * 1e3:.3f}]" if isinstance(t, Timing) else t


def markdown_table(rows: Sequence[Row]) -> str:
    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
    return "\n".join([line(HEADERS), line(["---"] * len(HEADERS)), *(line(r.cells()) for r in rows)])


def markdown(rows: Sequence[Row], meta: Dict[str, str]) -> str:
    lines = ["# sparsekern bench", ""] + [f"- {k}: {v}" for k, v in meta.items()]
    return "\n".join(lines + ["", markdown_table(rows), "", LEGEND, ""])


def print_table(rows: Sequence[Row], meta: Dict[str, str]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(markdown(rows, meta))
        return
    console = Console()
    if not console.is_terminal:  # a log file: do not squeeze the table into 80 columns
        console = Console(width=200)
    table = Table(title="sparsekern bench", caption=LEGEND)
    for i, h in enumerate(HEADERS[:-1]):
        table.add_column(h, justify="left" if i < 2 else "right")
    for row in rows:
        table.add_row(*row.cells()[:-1])
    for k, v in meta.items():
        console.print(f"{k}: {v}", markup=False, highlight=False)
    console.print(table)
    for row in rows:
        for note in row.notes:
            console.print(f"note: {row.case} ({row.pass_name}): {note}", markup=False, highlight=False)


def command_line(module: str) -> str:
    """The command that produced a report, as the user typed it (console script or ``python -m``)."""
    args = " ".join(shlex.quote(a) for a in sys.argv[1:])
    program = f"python -m {module}" if sys.argv[0].endswith(".py") else os.path.basename(sys.argv[0])
    env = os.environ.get("SPARSEKERN_BACKEND")
    return f"{'SPARSEKERN_BACKEND=' + env + ' ' if env else ''}{program} {args}".strip()
