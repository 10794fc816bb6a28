"""Build diffusion_fast and its compiled extension ``diffusion_fast._C``.

Install without build isolation so the torch already in the environment is
used (and never downloaded again):

    pip install --no-build-isolation -e .

Environment variables:
    DIFFUSION_FAST_SKIP_CUDA=1   build the C++ CPU kernels only (fast local builds).
    TORCH_CUDA_ARCH_LIST         CUDA architectures (default "8.0;9.0": A100 and H100/H200).
    MAX_JOBS                     parallel compile jobs (read by torch's ninja build).
    DIFFUSION_FAST_DEBUG=1       keep debug info in the C++ objects (-g; default -g0, a faster build).
"""

import glob
import importlib.util
import os
import shutil
import sys


def _set_cuda_home() -> None:
    """Point CUDA_HOME at a toolkit that has both nvcc and libcudart, unless the user set one.

    torch guesses CUDA_HOME from the nvcc on PATH (dirname of its bin/); a wrapper script such
    as /usr/local/bin/nvcc then yields /usr/local, where libcudart is missing and linking fails.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = ([os.path.dirname(os.path.dirname(nvcc))] if nvcc else []) + ["/usr/local/cuda"]
    for home in candidates:
        has_nvcc = os.path.exists(os.path.join(home, "bin", "nvcc"))
        if has_nvcc and glob.glob(os.path.join(home, "lib*", "libcudart.so*")):
            os.environ["CUDA_HOME"] = home
            return


_set_cuda_home()  # before torch.utils.cpp_extension reads it

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def _cuda_wanted() -> bool:
    if os.environ.get("DIFFUSION_FAST_SKIP_CUDA", "0") not in ("", "0"):
        return False
    return CUDA_HOME is not None and torch.version.cuda is not None


def _wheel_cuda_includes() -> list:
    """torch's CUDA 13 wheels ship cuBLAS/cuSPARSE headers in site-packages/nvidia/cu13/include."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    found = []
    for base in spec.submodule_search_locations:
        for sub in ("cu13", "cu12"):
            inc = os.path.join(base, sub, "include")
            if os.path.isdir(inc):
                found.append(inc)
    return found


def _sources(pattern: str) -> list:
    found = glob.glob(os.path.join(ROOT, "csrc", "**", pattern), recursive=True)
    return sorted(os.path.relpath(p, ROOT) for p in found)


def _extension():
    # -fno-trapping-math lets GCC vectorise the CPU kernels' branch-free selects. -g0 drops the debug info that
    # Python's CFLAGS ask for: it cost over a third of the compile time of the template-heavy CPU kernels
    # (DIFFUSION_FAST_DEBUG=1 keeps it).
    cxx_flags = ["-O3", "-fno-math-errno", "-fno-trapping-math"]
    if os.environ.get("DIFFUSION_FAST_DEBUG", "0") in ("", "0"):
        cxx_flags.append("-g0")
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is an inline `#pragma omp parallel` (torch's OpenMP build): serial without -fopenmp.
        # The module then shares the libgomp.so.1 that torch has already loaded.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not _cuda_wanted():
        return CppExtension(
            "diffusion_fast._C",
            _sources("*.cpp"),
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    return CUDAExtension(
        "diffusion_fast._C",
        _sources("*.cpp") + _sources("*.cu"),
        include_dirs=include_dirs + _wheel_cuda_includes(),
        define_macros=[("DIFFUSION_FAST_WITH_CUDA", None)],
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"],
        },
        extra_link_args=link_flags,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
