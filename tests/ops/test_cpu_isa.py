"""The C++ CPU kernels' other instruction-set copies.

group_norm_silu, dwconv_bn_swish and attention compile their hot stages for AVX-512, AVX2+FMA and baseline
x86-64 and run the one ATen chose (csrc/cpu_vec.h, DF_MULTIVERSION); the rest of the suite runs only this
machine's best. Here the ops' extension tests run again in a subprocess with ``ATEN_CPU_CAPABILITY`` set
lower, which makes ATen, and so our dispatch, pick the AVX2 or the baseline copy.
"""

import os
import platform
import subprocess
import sys

import pytest
import torch

from diffusion_fast import backends

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
FILES = ["test_group_norm_silu.py", "test_dwconv_bn_swish.py", "test_attention.py"]
SELECT = "ext-cpu or extension or cpp"  # the C++ CPU backend's cases


def _capability(env) -> str:
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120).stdout.strip()


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 instruction sets")
@pytest.mark.parametrize("isa", ["avx2", "default"])
def test_extension_tests_pass_on_lower_instruction_sets(isa):
    if not backends.extension_loaded():
        pytest.skip("the C++ extension did not load")
    order = ["DEFAULT", "AVX2", "AVX512"]
    native = torch.backends.cpu.get_cpu_capability()
    if native not in order or order.index(native) <= order.index(isa.upper()):
        pytest.skip(f"this CPU's best is {native}: the main suite already runs the {isa} copy")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=isa)
    assert _capability(env) == isa.upper()
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", SELECT]
    done = subprocess.run(cmd + [os.path.join(HERE, f) for f in FILES], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout
