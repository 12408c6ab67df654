"""Ahead-of-time compile of every Triton kernel for sm_90 and sm_80, without a GPU.

The other Triton tests run the kernels under TRITON_INTERPRET=1 on a CPU, which never lowers them:
this test runs tests/triton/aot_compile.py (the real compiler, through ptxas) in a subprocess
without TRITON_INTERPRET, so that a lowering or type error in any kernel, dtype, constexpr
combination or autotune config fails CI on a machine without a GPU. The default selection of
variants keeps it around a minute on two cores; ``python tests/triton/aot_compile.py --all-configs``
is the exhaustive run.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed: no Triton kernels to compile")

pytestmark = pytest.mark.triton_build

SCRIPT = Path(__file__).with_name("aot_compile.py")
TIMEOUT_S = 900


def test_triton_kernels_compile_for_sm90_and_sm80(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # conftest sets it without a GPU
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # a fresh cache: every variant really compiles
    proc = subprocess.run([sys.executable, str(SCRIPT), "--arch", "90", "80"], env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        lines = out.splitlines()
        # ERR lines, their indented detail, the summary line, and any traceback of the script itself.
        shown = [ln for ln in lines if ln.startswith(("ERR", "    |")) or " variants (archs " in ln]
        if not shown or "Traceback" in proc.stderr:
            shown += proc.stderr.splitlines()[-40:]
        pytest.fail(f"{SCRIPT.name} exited with {proc.returncode}:\n" + "\n".join(shown), pytrace=False)
    assert " 0 ERR" in out, out[-2000:]
