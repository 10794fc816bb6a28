"""Every Triton kernel compiles for an H100/H200 (sm_90), checked on a machine without a GPU.

The interpreter tests check what the kernels compute; this checks that the compiler accepts
them as launched by the ops (types, tile shapes, shared memory within sm_90's limit), which
the interpreter never does. See tests/compile_for_gpu.py.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

SCRIPT = Path(__file__).with_name("compile_for_gpu.py")


def _has_ptxas() -> bool:
    """Triton's wheels ship ptxas with the NVIDIA backend; TRITON_PTXAS_PATH may point elsewhere."""
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return bundled.exists() or Path(os.environ.get("TRITON_PTXAS_PATH", "/nonexistent")).exists()


@pytest.mark.skipif(not _has_ptxas(), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_every_triton_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--arch", "90"], env=env, capture_output=True, text=True,
                          timeout=1500)
    summary = [line for line in proc.stdout.splitlines() if line.startswith(("sm_", "FAILED"))]
    assert proc.returncode == 0, "\n".join(summary) + "\n" + proc.stderr[-4000:]
    assert summary and " 0 failures" in summary[0], summary
