"""``sparsekern gpu-check``: everything a short loan of a GPU machine should measure, in one command.

Stages, each in its own subprocess with its own time budget, so that a hang loses one stage, not the run:

1. ``env``    the GPU, torch / Triton / CUDA / nvcc versions, which sparsekern backends are present;
2. ``build``  sparsekern._C imports, every op of the extension has a CUDA kernel, a kernel launches;
3. ``tests``  the GPU tests (tests/cuda, tests/triton, ``-m gpu``), fast groups first, within the budget;
4. ``bench``  bench/gpu.py, case by case (a case that hangs is stopped and the next one runs);
5. ``report`` ``report.md`` and ``report.json`` in ``--out``: each stage's status, duration and results,
   the project's GPU targets against the measured figures, and the backend that won each op
   (a suggested ``cuda_order`` for each op's declaration).

Default budgets sum to 7 minutes. Without a GPU the check runs what it can (the benchmark harness at
tiny sizes under TRITON_INTERPRET=1) and says what it skipped and why.

This module imports nothing of sparsekern or torch at the top: it also runs as a file
(``python sparsekern/gpu_check.py``) when the package does not import, e.g. after a failed build.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a file: import sparsekern from the checkout, and no module from this folder by its bare name.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Dict, List, Optional, Sequence, Tuple  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

STAGES = ("env", "build", "tests", "bench")
BUDGETS = {"env": 30, "build": 45, "tests": 120, "bench": 225}  # seconds: 7 minutes in all
CASE_TIMEOUT = 75  # seconds one benchmark case may take before it is stopped
# pytest runs in this order, each group with what is left of the stage's budget: fast groups first.
# tests/cuda's other tests (nvcc builds, host emulation, the linked arch list) are CPU work, left to CI,
# as are the Triton AOT compile checks (triton_build).
TEST_GROUPS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("cuda", ("tests/cuda", "-m", "gpu and not slow")),
    ("triton", ("tests/triton", "-m", "not slow and not gpu and not triton_build")),
    ("gpu-marked", ("tests", "-m", "gpu and not slow", "--ignore=tests/cuda")),
    ("slow", ("tests/cuda", "tests/triton", "-m", "slow and not cuda_build and not triton_build")),
)
NOT_A_MEASUREMENT = "no GPU: the CPU run times the Triton interpreter at tiny sizes, not a measurement"


# -- targets and backend ranking (pure functions of the benchmark rows) ----------------------
@dataclass(frozen=True)
class Target:
    """Our fastest row of ``group`` (impl starting with ``ours``, matching ``filters``) against the
    fastest ``peer`` row of the same case: peer/ours >= threshold, or, with ``per`` > 0, a cost
    ours/peer/per <= threshold."""
    name: str
    group: str
    ours: str
    peer: str
    threshold: float
    filters: Tuple[Tuple[str, object], ...] = ()
    per: int = 0


_BSR32 = (("density", 0.1), ("block", 32), ("dtype", "bfloat16"))
_CSR01 = (("density", 0.1), ("dtype", "float32"))
TARGETS = (
    Target("BSR-32 at density 0.1 vs dense bf16", "bsr", "sparsekern BSR", "cuBLAS dense", 5.0, _BSR32),
    Target("BSR-32 at density 0.1 vs torch BSR", "bsr", "sparsekern BSR", "torch BSR", 1.5, _BSR32),
    Target("CSR SpMM at density 0.1 vs cuBLAS fp32", "spmm", "sparsekern CSR", "cuBLAS dense", 1.5, _CSR01),
    Target("CSR SpMM at density 0.1 vs cuSPARSE", "spmm", "sparsekern CSR", "cuSPARSE", 3.0, _CSR01),
    Target("top-k of 1 % of 2.5e7 vs torch.topk", "topk", "sparsekern topk_select", "torch.topk", 3.0),
    Target("ResNet-50 step at 90 % sparsity (BSR-32) vs dense, bf16 autocast", "resnet-bsr", "sparsekern BSR-32",
           "dense", 1.3),
    Target("RigL update amortized at delta_t = 100, fraction of a step", "dst", "RigL update", "training step",
           0.05, per=100),
)


def _fastest(rows: Sequence[dict]) -> Optional[dict]:
    timed = [r for r in rows if r.get("ms")]
    return min(timed, key=lambda r: r["ms"]) if timed else None


def evaluate_target(target: Target, rows: Sequence[dict], measured: bool, why_not: str = "") -> dict:
    """One target against the rows: status met / missed / not measured, with the figures behind it."""
    result = {"name": target.name, "threshold": (f"<= {target.threshold:.0%}" if target.per else
                                                 f">= {target.threshold:g}x"),
              "measured": None, "status": "not measured", "detail": ""}
    if not measured:
        result["detail"] = why_not or NOT_A_MEASUREMENT
        return result
    candidates = [r for r in rows if r.get("group") == target.group and r["impl"].startswith(target.ours)
                  and all(r.get(k) == v for k, v in target.filters)]
    ours = _fastest(candidates)
    if ours is None:
        errors = "; ".join(f"{r['impl']}: {r['note']}" for r in candidates if r.get("note"))
        result["detail"] = errors or why_not or f"no row of case {target.group!r}"
        return result
    peer = _fastest([r for r in rows if r["case"] == ours["case"] and r["impl"].startswith(target.peer)])
    if peer is None:
        result["detail"] = f"no timed {target.peer!r} row in case {ours['case']!r}"
        return result
    if target.per:
        value = ours["ms"] / peer["ms"] / target.per
        result.update(measured=f"{value:.2%}", value=value, status="met" if value <= target.threshold else "missed")
    else:
        value = peer["ms"] / ours["ms"]
        result.update(measured=f"{value:.2f}x", value=value, status="met" if value >= target.threshold else "missed")
    result["detail"] = (f"{ours['impl']} {ours['ms']:.3f} ms vs {peer['impl']} {peer['ms']:.3f} ms "
                        f"({ours['case']}; {ours['dtype']})")
    return result


def backend_wins(rows: Sequence[dict]) -> Dict[str, Dict[str, dict]]:
    """Per op, per backend: in how many cases (same case and dtype, two backends or more) it was the
    fastest, out of how many, and its geometric-mean time relative to the fastest."""
    times: Dict[Tuple[str, str, str], Dict[str, float]] = {}
    for r in rows:
        if r.get("op") and r.get("backend") and r.get("ms"):
            times.setdefault((r["op"], r["case"], r["dtype"]), {})[r["backend"]] = r["ms"]
    logs: Dict[str, Dict[str, List[float]]] = {}
    wins: Dict[str, Dict[str, dict]] = {}
    for (op, _, _), by_backend in times.items():
        if len(by_backend) < 2:
            continue
        best = min(by_backend.values())
        for backend, ms in by_backend.items():
            w = wins.setdefault(op, {}).setdefault(backend, {"wins": 0, "cases": 0, "relative": 1.0})
            w["wins"] += ms == best
            w["cases"] += 1
            logs.setdefault(op, {}).setdefault(backend, []).append(math.log(ms / best))
    for op, by_backend in wins.items():
        for backend, w in by_backend.items():
            w["relative"] = math.exp(sum(logs[op][backend]) / len(logs[op][backend]))
    return wins


def suggest_cuda_order(rows: Sequence[dict], current: Dict[str, Sequence[str]]) -> Dict[str, List[str]]:
    """``current`` with every op measured on two backends or more reordered, fastest (geometric mean) first."""
    wins = backend_wins(rows)
    suggested = {}
    for op, order in current.items():
        measured = sorted(wins.get(op, {}), key=lambda b: wins[op][b]["relative"])
        suggested[op] = measured + [b for b in order if b not in measured]
    return suggested


def format_cuda_order(suggested: Dict[str, List[str]], current: Dict[str, Sequence[str]], rows: Sequence[dict]) -> str:
    wins = backend_wins(rows)
    lines = ["_CUDA_ORDER = {"]
    for op, order in suggested.items():
        if op in wins:
            why = "measured: " + ", ".join(f"{b} {w['relative']:.2f}x the fastest, fastest in {w['wins']}/{w['cases']}"
                                           for b, w in sorted(wins[op].items(), key=lambda kv: kv[1]["relative"]))
        else:
            why = "not measured on two backends: unchanged"
        change = "" if list(order) == list(current.get(op, ())) else "changed; "
        lines.append(f"    {op!r}: {tuple(order)!r},  # {change}{why}")
    lines.append("}")
    return "\n".join(lines)


# -- pytest results -----------------------------------------------------------------------
def parse_junit(path: Path) -> Optional[dict]:
    """Counts, failed test ids and the commonest skip reasons of a pytest junit xml (None if absent/broken)."""
    import xml.etree.ElementTree as ET
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed, reasons = [], {}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(name)
        skip = case.find("skipped")
        if skip is not None:
            reason = (skip.get("message") or "").strip()[:120]
            reasons[reason] = reasons.get(reason, 0) + 1
    return {"passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": counts["failures"], "errors": counts["errors"], "skipped": counts["skipped"],
            "failed_tests": failed[:20], "skip_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])[:5])}


_VERBOSE_LINE = re.compile(r"^(\S+::\S.*?) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b", re.M)


def parse_pytest_log(text: str) -> dict:
    """Counts from ``pytest -v`` output, also of a run that was stopped (no junit xml then)."""
    outcome = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "errors", "SKIPPED": "skipped",
               "XFAIL": "skipped"}
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failed = []
    for test, word in _VERBOSE_LINE.findall(text):
        counts[outcome[word]] += 1
        if word in ("FAILED", "ERROR"):
            failed.append(test.strip())
    return {**counts, "failed_tests": failed[:20], "skip_reasons": {}}


# -- subprocesses with a time limit ------------------------------------------------------
def _kill(proc: subprocess.Popen) -> None:
    """Stop ``proc`` and its children (its own process group: start_new_session)."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_limited(cmd: Sequence[str], timeout: float, log_path: Path, env: Optional[dict] = None,
                cwd: Optional[Path] = None, watch: Optional[Callable[[], Optional[str]]] = None
                ) -> Tuple[Optional[int], Optional[str], float]:
    """Run ``cmd`` with its output in ``log_path``; stop it after ``timeout`` s or when ``watch()`` gives a
    reason. Returns (exit status or None if stopped, why it was stopped, seconds)."""
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                start_new_session=True)
        try:
            while True:
                try:
                    return proc.wait(timeout=0.25), None, time.monotonic() - start
                except subprocess.TimeoutExpired:
                    pass
                why = f"stopped after its {timeout:.0f} s budget" if time.monotonic() - start > timeout else \
                    (watch() if watch else None)
                if why:
                    _kill(proc)
                    return None, why, time.monotonic() - start
        except BaseException:
            _kill(proc)  # Ctrl-C or an error here must not leave the child running
            raise


def _tail(path: Path, lines: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@dataclass
class Stage:
    name: str
    budget: float
    status: str = "skipped"  # ok, failed, timed out, skipped
    reason: str = ""
    duration: float = 0.0
    results: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"status": self.status, "reason": self.reason, "duration_s": round(self.duration, 2),
                "budget_s": self.budget, "results": self.results}


# -- stages 1 and 2: run in a child process (``--stage env|build``) -------------------------
def _command_output(cmd: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=15)
        return (out.stdout or out.stderr).strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"not available ({type(exc).__name__})"


def env_stage() -> dict:
    import platform
    import shutil
    info: dict = {"python": platform.python_version(), "host": platform.node(), "platform": platform.platform(),
                  "cpu_count": os.cpu_count(), "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST"),
                  "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET")}
    import torch
    cuda = torch.cuda.is_available()
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=cuda,
                torch_arch_list=torch.cuda.get_arch_list() if torch.version.cuda else [])
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability="{}.{}".format(*torch.cuda.get_device_capability(0)),
                    gpu_memory_gib=round(props.total_memory / 2 ** 30, 1), device_count=torch.cuda.device_count(),
                    driver=_command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]))
    nvcc = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                    if os.environ.get("CUDA_HOME") else None)
    info["nvcc"] = (_command_output([nvcc, "--version"]).splitlines() or ["no output"])[-1] if nvcc else "not found"
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError as exc:
        info["triton"] = f"not installed ({exc})"
    try:
        import sparsekern
        from sparsekern.ops import dispatch
    except Exception as exc:  # a broken build: the report says so, the other stages say more
        info["sparsekern"] = f"does not import: {type(exc).__name__}: {exc}"
        return {"status": "failed", "reason": info["sparsekern"], "results": info}
    info["sparsekern"] = str(Path(sparsekern.__file__).parent)
    triton_ok = dispatch.triton_loaded()
    info["backends"] = {"cpp (CPU kernels of sparsekern._C)": bool(sparsekern.ops.HAS_EXTENSION),
                        "cuda (CUDA kernels of sparsekern._C)": dispatch.cuda_kernels_built(),
                        "triton": triton_ok if triton_ok else f"False ({dispatch._triton_error})"}
    if cuda:
        info["cuda_default_order"] = {op: list(dispatch.available(op, "cuda")) for op in dispatch.OPS}
    return {"status": "ok", "reason": "", "results": info}


def _install_report(log: Optional[str], rc: Optional[int], seconds: Optional[float]) -> Optional[dict]:
    if not log:
        return None
    path = Path(log)
    text = path.read_text(errors="replace") if path.exists() else ""
    built = [line for line in text.splitlines() if line.startswith("sparsekern: building")]
    return {"log": str(path), "exit_status": rc, "seconds": seconds, "built": built[-1] if built else None,
            "tail": _tail(path, 15) if rc else ""}


def build_stage(install_log: Optional[str] = None, install_rc: Optional[int] = None,
                install_seconds: Optional[float] = None) -> dict:
    results: dict = {}
    install = _install_report(install_log, install_rc, install_seconds)
    if install:
        results["install"] = install
    problems = [f"pip install exited with {install_rc} (see {install_log})"] if install and install_rc else []
    import torch
    try:
        import sparsekern
        import sparsekern._C as ext
        from sparsekern import ops
        from sparsekern.ops import dispatch
        results["extension"] = ext.__file__
    except Exception as exc:
        results["extension"] = f"does not import: {type(exc).__name__}: {exc}"
        return {"status": "failed", "reason": "; ".join(problems + [results["extension"]]), "results": results}
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    names = _op_names(torch, "sparsekern", [*dispatch.OPS, *dispatch.PARTS])
    results["ops"] = {n: {"CPU": has(n, "CPU"), "CUDA": has(n, "CUDA")} for n in names}
    missing = [n for n in names if not has(n, "CUDA")]
    if dispatch.triton_loaded():
        results["triton_ops"] = _op_names(torch, "sparsekern_triton", [*dispatch.OPS, *dispatch.PARTS])
    else:
        results["triton_ops"] = f"Triton kernels not loaded: {dispatch._triton_error}"
    if torch.version.cuda is None:
        cpu = sum(v["CPU"] for v in results["ops"].values())
        why = (f"torch {torch.__version__} has no CUDA, so the CUDA kernels are not built (the extension imports; "
               f"{cpu} of {len(names)} ops have a CPU kernel)")
        return {"status": "failed" if problems else "skipped", "reason": "; ".join(problems + [why]),
                "results": results}
    if missing:
        problems.append(f"no CUDA kernel registered for {', '.join(missing)}")
    if torch.cuda.is_available():
        results["launch"] = "spmm on the CUDA kernels: " + _launch_check(torch, sparsekern, ops, dispatch)
        if "ok (" not in results["launch"]:
            problems.append(results["launch"])
    else:
        results["launch"] = "skipped: no CUDA device"
    return {"status": "failed" if problems else "ok", "reason": "; ".join(problems), "results": results}


def _op_names(torch, namespace: str, known: Sequence[str]) -> List[str]:
    """The ops registered in ``namespace`` (from the dispatcher; ``known`` where it cannot list them)."""
    try:
        return sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith(namespace + "::"))
    except AttributeError:
        return sorted(f"{namespace}::{op}" for op in known if hasattr(getattr(torch.ops, namespace), op))


def _launch_check(torch, sparsekern, ops, dispatch) -> str:
    """A tiny spmm through the CUDA C++ kernels: they load for this GPU's arch and compute. (Triton's
    first compile and autotuning take long: the tests and the benchmark exercise it.)"""
    if "cuda" not in dispatch.available("spmm", "cuda"):
        return "not built"
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(70, 45, generator=g) < 0.3
    dense = (torch.randn(70, 45, generator=g) * mask).cuda()
    B = torch.randn(45, 33, generator=g).cuda()
    A = sparsekern.SparseMatrix.from_dense(dense, mask.cuda())
    try:
        with dispatch.backend("cuda", op="spmm"):
            err = (ops.spmm(A, B) - dense @ B).abs().max().item()
            torch.cuda.synchronize()
        return f"ok (max abs err {err:.1e})" if err < 1e-3 else f"wrong (max abs err {err:.1e})"
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc)[:150]}"


def child_stage(name: str, args: argparse.Namespace) -> dict:
    try:
        if name == "env":
            return env_stage()
        return build_stage(args.install_log, args.install_rc, args.install_seconds)
    except Exception as exc:
        import traceback
        return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}", "results": {"traceback":
                                                                                           traceback.format_exc()}}


# -- the parent: runs the stages and writes the report --------------------------------------
class Check:
    def __init__(self, args: argparse.Namespace, argv: Sequence[str]):
        self.args, self.argv = args, list(argv)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.started = time.time()
        self.stages: Dict[str, Stage] = {s: Stage(s, getattr(args, f"budget_{s}")) for s in STAGES}
        self.gpu: Optional[bool] = None  # known after the env stage
        self.report: dict = {}

    def log(self, text: str) -> None:
        print(f"[gpu-check {time.time() - self.started:5.0f} s] {text}", flush=True)

    def env(self, gpu: bool) -> dict:
        env = dict(os.environ)
        if gpu:
            env.pop("TRITON_INTERPRET", None)  # real kernels on the device
        else:
            env["TRITON_INTERPRET"] = "1"  # the Triton kernels on CPU tensors
        return env

    def run(self) -> int:
        for name in STAGES:
            stage = self.stages[name]
            if name not in self.args.stages:
                stage.reason = "not selected (--stages)"
            else:
                if name != "env":
                    self.probe_gpu()
                self.log(f"{name}: running (budget {stage.budget:.0f} s)")
                start = time.monotonic()
                getattr(self, f"stage_{name}")(stage)
                stage.duration = time.monotonic() - start
            self.log(f"{name}: {stage.status} ({stage.duration:.1f} s){': ' + stage.reason if stage.reason else ''}")
            self.write()  # a run cut short keeps what it had
        self.write(final=True)
        print(self.summary())
        bad = [s for s in self.stages.values() if s.status in ("failed", "timed out")]
        return 1 if bad else 0

    # stages 1-2
    def _child(self, stage: Stage, extra: Sequence[str] = ()) -> None:
        result_path = self.out / f"stage-{stage.name}.json"
        result_path.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", stage.name, "--stage-out", str(result_path),
               *extra]
        env = self.env(self.gpu) if self.gpu is not None else dict(os.environ)
        log = self.out / f"stage-{stage.name}.log"
        rc, stopped, _ = run_limited(cmd, stage.budget, log, env=env, cwd=REPO)
        result = _read_json(result_path)
        if stopped:
            stage.status, stage.reason = "timed out", f"{stopped}; log: {log}"
        elif result is None:
            stage.status, stage.reason = "failed", f"exited with {rc} without a result; log tail:\n{_tail(log)}"
        else:
            stage.status, stage.reason, stage.results = result["status"], result.get("reason", ""), result["results"]

    def stage_env(self, stage: Stage) -> None:
        self._child(stage)
        if "cuda_available" in stage.results:
            self.gpu = bool(stage.results["cuda_available"])

    def probe_gpu(self) -> None:
        """Whether torch sees a GPU, when the env stage did not say (not selected, or it failed)."""
        if self.gpu is None:
            try:
                probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                                       capture_output=True, text=True, timeout=60)
                self.gpu = {"True": True, "False": False}.get(probe.stdout.strip())
            except subprocess.TimeoutExpired:
                pass

    def stage_build(self, stage: Stage) -> None:
        a = self.args
        extra = [f"--install-{k}={v}" for k, v in (("log", a.install_log), ("rc", a.install_rc),
                                                    ("seconds", a.install_seconds)) if v is not None]
        self._child(stage, extra)

    # stage 3
    def stage_tests(self, stage: Stage) -> None:
        if self.gpu is False:
            stage.reason = ("no CUDA device: the GPU tests would all skip (the Triton kernels' tests run on the CPU "
                            "under TRITON_INTERPRET=1 in the test suite)")
            return
        if not (REPO / "tests").is_dir():
            stage.reason = f"no tests/ folder next to the package ({REPO})"
            return
        try:
            missing = subprocess.run([sys.executable, "-c", "import pytest"], capture_output=True,
                                     timeout=60).returncode
        except subprocess.TimeoutExpired:
            missing = True
        if missing:
            stage.reason = "pytest is not installed"
            return
        groups = run_test_groups(self.args.test_groups, stage.budget, self.out, self.env(True), REPO, self.log)
        stage.results = {"groups": groups, "total": _sum_counts(groups.values())}
        statuses = [g["status"] for g in groups.values()]
        stage.status = "failed" if "failed" in statuses else "timed out" if "timed out" in statuses else "ok"
        stage.reason = "; ".join(f"{n}: {g['status']}" + (f" ({g['reason']})" if g.get("reason") else "")
                                 for n, g in groups.items() if g["status"] != "ok")

    # stage 4
    def stage_bench(self, stage: Stage) -> None:
        gpu = self.gpu is not False
        sizes = self.args.sizes or ("full" if gpu else "tiny")
        base = [sys.executable, "-m", "sparsekern.bench.gpu", "--sizes", sizes, "--quick"] + \
            ([] if gpu else ["--device", "cpu"])
        results = run_bench(base, self.args.bench_cases, stage.budget, self.args.case_timeout, self.out,
                            self.env(gpu), self.log)
        stage.results = results
        statuses = [c["status"] for c in results["cases"].values()]
        stage.status = ("failed" if "failed" in statuses or not results["rows"] else
                        "timed out" if {"timed out", "not run"} & set(statuses) else "ok")
        stage.reason = "; ".join(f"{n}: {c['status']}" + (f" ({c['reason']})" if c.get("reason") else "")
                                 for n, c in results["cases"].items() if c["status"] != "ok")
        if not gpu:
            stage.reason = (stage.reason + "; " if stage.reason else "") + "CPU smoke run: " + NOT_A_MEASUREMENT

    # stage 5
    def evaluate(self) -> dict:
        bench = self.stages["bench"].results
        rows, header = bench.get("rows", []), bench.get("header") or {}
        measured = header.get("device_type") == "cuda" and header.get("sizes_name") == "full"
        why_not = "" if measured else (
            NOT_A_MEASUREMENT if header.get("device_type") == "cpu" or self.gpu is False else
            f"the benchmark did not run at full sizes (bench: {self.stages['bench'].status}"
            f"{', ' + self.stages['bench'].reason if self.stages['bench'].reason else ''})")
        targets = [evaluate_target(t, rows, measured, why_not) for t in TARGETS]
        current = header.get("cuda_order") or {}
        suggested = suggest_cuda_order(rows, current) if measured else current
        return {"targets": targets, "backend_wins": backend_wins(rows) if measured else {},
                "current_cuda_order": current, "suggested_cuda_order": suggested,
                "suggested_cuda_order_text": format_cuda_order(suggested, current, rows if measured else []),
                "problems": [f"{r['case']} / {r['impl']}: {r['note']}" for r in rows
                             if r["impl"].startswith("sparsekern") and r.get("ms") is None]}

    def write(self, final: bool = False) -> None:
        report = {"command": " ".join(shlex.quote(a) for a in self.argv),
                  "started": datetime.datetime.fromtimestamp(self.started).isoformat(timespec="seconds"),
                  "duration_s": round(time.time() - self.started, 1), "out": str(self.out), "complete": final,
                  "budgets_s": {s.name: s.budget for s in self.stages.values()},
                  "stages": {s.name: s.as_dict() for s in self.stages.values()}}
        report["stages"]["report"] = {"status": "ok" if final else "skipped", "duration_s": 0.0,
                                      "reason": "" if final else "the run has not finished", "results": {}}
        report.update(self.evaluate())
        self.report = report
        (self.out / "report.json").write_text(json.dumps(report, indent=1, default=str))
        (self.out / "report.md").write_text(markdown(report))

    def summary(self) -> str:
        r = self.report
        lines = ["", "sparsekern gpu-check: " + ", ".join(f"{n} {s['status']}" for n, s in r["stages"].items())]
        lines += [f"  target {t['status']:>12}: {t['name']} ({t['threshold']}" +
                  (f"; measured {t['measured']})" if t["measured"] else ")") for t in r["targets"]]
        lines += ["Suggested per-op CUDA order (the cuda_order of each op's declaration; not applied):",
                  r["suggested_cuda_order_text"],
                  f"Report: {self.out / 'report.md'} and {self.out / 'report.json'}"]
        return "\n".join(lines)


def _sum_counts(groups) -> dict:
    keys = ("passed", "failed", "errors", "skipped")
    return {k: sum(g.get(k, 0) for g in groups) for k in keys}


def run_test_groups(groups: Sequence[str], budget: float, out: Path, env: dict, cwd: Path,
                    log: Callable[[str], None] = print, table=TEST_GROUPS) -> Dict[str, dict]:
    """Each pytest group in turn (``-x`` off), with what is left of ``budget``: counts from its junit xml,
    or from its ``-v`` output when it was stopped."""
    deadline = time.monotonic() + budget
    env = {**env, "PYTHONUNBUFFERED": "1"}  # a stopped run's log must hold every result line so far
    results = {}
    for name, pytest_args in table:
        if name not in groups:
            continue
        left = deadline - time.monotonic()
        if left < 5:
            results[name] = {"status": "not run", "reason": f"the stage's {budget:.0f} s budget was spent"}
            continue
        junit, log_path = out / f"tests-{name}.xml", out / f"tests-{name}.log"
        junit.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "pytest", *pytest_args, "-v", "-p", "no:cacheprovider", f"--junitxml={junit}"]
        rc, stopped, seconds = run_limited(cmd, left, log_path, env=env, cwd=cwd)
        counts = (None if stopped else parse_junit(junit)) or parse_pytest_log(log_path.read_text(errors="replace"))
        if stopped:
            status, reason = "timed out", f"{stopped}; counts so far"
        elif rc in (0, 5):  # 5: nothing selected
            status, reason = "ok", "" if rc == 0 else "no test selected"
        elif rc == 1:
            status, reason = "failed", f"{counts['failed']} failed, {counts['errors']} errors"
        else:
            status, reason = "failed", f"pytest exited with {rc}; log tail:\n{_tail(log_path, 6)}"
        results[name] = {"status": status, "reason": reason, "seconds": round(seconds, 1),
                         "command": " ".join(shlex.quote(c) for c in cmd), "log": str(log_path), **counts}
        log(f"tests {name}: {status} in {seconds:.0f} s: {counts['passed']} passed, {counts['failed']} failed, "
            f"{counts['errors']} errors, {counts['skipped']} skipped")
    return results


def run_bench(base_cmd: Sequence[str], cases: Optional[Sequence[str]], budget: float, case_timeout: float, out: Path,
              env: dict, log: Callable[[str], None] = print) -> dict:
    """bench/gpu.py, restarted after the case that hung or crashed until every case ran or the budget is spent."""
    deadline = time.monotonic() + budget
    env = {**env, "PYTHONUNBUFFERED": "1"}
    rows: List[dict] = []
    header: dict = {}
    status: Dict[str, dict] = {}
    pending: Optional[List[str]] = list(cases) if cases else None  # None: the bench's own order, learnt from its JSON
    attempt = 0
    while pending is None or pending:
        left = deadline - time.monotonic()
        if left < 5:
            for c in pending or ["(all)"]:
                status[c] = {"status": "not run", "reason": f"the stage's {budget:.0f} s budget was spent"}
            break
        attempt += 1
        path, log_path = out / f"bench-{attempt}.json", out / f"bench-{attempt}.log"
        path.unlink(missing_ok=True)
        cmd = [*base_cmd, "--json", str(path), "--output", str(out / f"bench-{attempt}.md")] + \
            (["--cases", *pending] if pending is not None else [])

        def watch(path=path) -> Optional[str]:
            progress = _read_json(path)
            current = (progress or {}).get("current") or {}
            if current.get("case") and time.time() - current.get("started", time.time()) > case_timeout:
                return f"case {current['case']} stopped after {case_timeout:.0f} s"
            return None
        rc, stopped, seconds = run_limited(cmd, left, log_path, env=env, cwd=REPO, watch=watch)
        progress = _read_json(path) or {}
        header = progress.get("header") or header
        rows += progress.get("rows", [])
        planned = (progress.get("header") or {}).get("cases") or pending or []
        done = progress.get("done", [])
        for c in done:
            status[c] = {"status": "ok"}
        current = (progress.get("current") or {}).get("case")
        why = stopped or f"exited with {rc}; log tail:\n{_tail(log_path, 6)}"
        if (stopped or rc) and current:
            status[current] = {"status": "timed out" if stopped else "failed", "reason": why}
        elif stopped or rc or not done:  # before its first case: a restart would do the same
            for c in [c for c in planned if c not in status] or ["(all)"]:
                status[c] = {"status": "timed out" if stopped else "failed", "reason": why}
            break
        pending = [c for c in planned if c not in status]
        log(f"bench attempt {attempt}: {len(done)} cases done in {seconds:.0f} s" +
            (f", {current} {status[current]['status']}" if current in status and current not in done else ""))
    return {"header": header, "rows": rows, "cases": status, "attempts": attempt}


# -- the markdown report ------------------------------------------------------------------
def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown(report: dict) -> str:
    st = report["stages"]
    lines = ["# sparsekern GPU check", "",
             f"Command: `{report['command']}`  ", f"Started: {report['started']}; {report['duration_s']} s in all"
             + ("" if report["complete"] else " (run not finished)"), ""]
    env = st["env"]["results"]
    if env:
        lines += [f"Device: {env.get('gpu', 'no CUDA device')} (capability {env.get('capability', '—')}); "
                  f"torch {env.get('torch')} (CUDA {env.get('torch_cuda')}); triton {env.get('triton')}; "
                  f"nvcc: {env.get('nvcc')}; python {env.get('python')}", ""]
    lines += ["## Stages", "", "| stage | status | seconds | budget s | reason |", "|---|---|---:|---:|---|"]
    for name, s in st.items():
        budget = f"{s['budget_s']:g}" if "budget_s" in s else "—"
        lines.append(f"| {name} | {s['status']} | {s['duration_s']} | {budget} | {_cell(s['reason'])} |")
    lines += ["", "## Targets", "", "| target | threshold | measured | status | from |", "|---|---|---|---|---|"]
    for t in report["targets"]:
        lines.append(f"| {t['name']} | {t['threshold']} | {t['measured'] or '—'} | {t['status']} | "
                     f"{_cell(t['detail'])} |")
    lines += ["", "## Fastest backend per op", ""]
    wins = report["backend_wins"]
    if wins:
        lines += ["| op | backend | fastest in | time vs the fastest (geo-mean) |", "|---|---|---|---:|"]
        for op, by_backend in wins.items():
            for b, w in sorted(by_backend.items(), key=lambda kv: kv[1]["relative"]):
                lines.append(f"| {op} | {b} | {w['wins']}/{w['cases']} | {w['relative']:.2f}x |")
    else:
        lines.append("No op was measured on two backends on a GPU: the order below is the current one.")
    lines += ["", "Suggested per-op CUDA order (`cuda_order` in each op's declaration, sparsekern/ops/<op>.py; "
              "not applied):", "", "```python",
              report["suggested_cuda_order_text"], "```"]
    if report["problems"]:
        lines += ["", "## Problems (sparsekern rows without a time)", ""]
        lines += [f"- {_cell(p)}" for p in report["problems"]]
    lines += ["", "## Environment", ""] + [f"- {k}: {_cell(v)}" for k, v in env.items()]
    build = st["build"]["results"]
    if build.get("ops"):
        lines += ["", "## Build", "", f"Extension: {build.get('extension')}  ", f"Launch: {build.get('launch', '—')}",
                  "", "| op | CPU kernel | CUDA kernel |", "|---|---|---|"]
        lines += [f"| {op} | {v['CPU']} | {v['CUDA']} |" for op, v in build["ops"].items()]
    if build.get("install"):
        lines += ["", f"Install: {_cell(build['install'])}"]
    groups = st["tests"]["results"].get("groups", {})
    if groups:
        lines += ["", "## Tests", "", "| group | status | passed | failed | errors | skipped | seconds | notes |",
                  "|---|---|---:|---:|---:|---:|---:|---|"]
        for name, g in groups.items():
            skips = ", ".join(f"{n}x skipped: {r}" for r, n in g.get("skip_reasons", {}).items())
            notes = "; ".join(filter(None, [g.get("reason", ""), ", ".join(g.get("failed_tests", [])[:5]), skips]))
            counts = " | ".join(str(g.get(k, "—")) for k in ("passed", "failed", "errors", "skipped", "seconds"))
            lines.append(f"| {name} | {g['status']} | {counts} | {_cell(notes)} |")
    bench = st["bench"]["results"]
    if bench.get("rows"):
        h = bench.get("header", {})
        lines += ["", "## Benchmark", "", f"{h.get('device')}; torch {h.get('torch')}; sizes {h.get('sizes_name')}; "
                  f"CUDA C++ kernels built: {h.get('cuda_kernels_built')}", "",
                  "| case | implementation | dtype | median ms | TFLOP/s | speedup | notes |",
                  "|---|---|---|---:|---:|---|---|"]
        for r in bench["rows"]:
            ms = f"{r['ms']:.3f}" if r.get("ms") is not None else "—"
            lines.append(f"| {r['case']} | {r['impl']} | {r['dtype']} | {ms} | {r.get('tflops', '—')} | "
                         f"{r.get('speedup', '—')} | {_cell(r.get('note', ''))} |")
    return "\n".join(lines) + "\n"


# -- command line ---------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--out", default="results/gpu-check", help="folder of report.md, report.json and the logs")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="default: all")
    for name, seconds in BUDGETS.items():
        parser.add_argument(f"--budget-{name}", type=float, default=seconds, help=f"seconds (default {seconds})")
    parser.add_argument("--case-timeout", type=float, default=CASE_TIMEOUT,
                        help=f"seconds one benchmark case may take (default {CASE_TIMEOUT})")
    parser.add_argument("--test-groups", nargs="+", choices=[g for g, _ in TEST_GROUPS],
                        default=[g for g, _ in TEST_GROUPS], help="pytest groups, run in this order (default: all)")
    parser.add_argument("--bench-cases", nargs="+", default=None, help="benchmark cases (default: all of bench/gpu.py)")
    parser.add_argument("--sizes", choices=("full", "tiny"), default=None,
                        help="benchmark sizes (default: full on a GPU, tiny on the CPU)")
    parser.add_argument("--install-log", default=None, help="the log of the pip install that built the extension")
    parser.add_argument("--install-rc", type=int, default=None, help="its exit status")
    parser.add_argument("--install-seconds", type=float, default=None, help="its duration")
    return parser


def run_check(args: argparse.Namespace, argv: Sequence[str]) -> int:
    return Check(args, argv).run()


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = add_arguments(argparse.ArgumentParser(prog="sparsekern gpu-check", description=__doc__.split("\n\n")[0]))
    parser.add_argument("--stage", choices=("env", "build"), help=argparse.SUPPRESS)  # the child of one stage
    parser.add_argument("--stage-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        Path(args.stage_out).write_text(json.dumps(child_stage(args.stage, args), indent=1, default=str))
        return 0
    return run_check(args, ["sparsekern", "gpu-check", *argv])


if __name__ == "__main__":
    sys.exit(main())
