"""Compile every Triton kernel of diffusion_fast for a GPU, on a machine without one.

The Triton interpreter (how the test suite runs our kernels on a CPU) executes a kernel's
Python with NumPy: it never type-checks the kernel as the compiler does, nor lowers it, so a
kernel can pass every interpreter test and still fail to compile for a GPU (``tl.exp`` on
fp16, a ``tl.dot`` tile under 16, too much shared memory, ...). This script runs the public
ops on CPU tensors with Triton's driver replaced by a stand-in for an NVIDIA GPU of the given
compute capability: each launch compiles (Triton's own specialization, its compiler and
``ptxas``) and stops before it would run. Outputs are garbage; only the compiles count.

    python tests/compile_for_gpu.py [--arch 90 80]   # exit 1 on any failure

Run without TRITON_INTERPRET (tests/test_compile_for_gpu.py runs it in a subprocess).
Shared memory per kernel is checked against the architecture's per-block opt-in limit.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Callable, Dict, List

import torch

# Per-block shared memory opt-in limit (bytes) by compute capability; SM count of the card
# that sizes the grids (H100 SXM: 132, A100: 108).
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
SM_COUNT = {80: 108, 86: 84, 89: 128, 90: 132}
FP = (torch.float16, torch.bfloat16, torch.float32)


def install_fake_gpu(arch: int, compiled: List[dict]) -> None:
    """Make every JIT launch compile for sm_``arch`` and return before launching."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    class CompileOnlyDriver:  # what JITFunction.run asks of the active driver
        target = GPUTarget("cuda", arch, 32)

        def is_active(self):
            return True

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return self.target

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(CompileOnlyDriver())
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append(dict(kernel=self.fn.__name__, shared=kernel.metadata.shared,
                             num_warps=kernel.metadata.num_warps, num_stages=kernel.metadata.num_stages))
        return kernel

    JITFunction.run = compile_only

    # Size grids as on the GPU (the launchers read the SM count from the CUDA device).
    from diffusion_fast import backends
    from diffusion_fast.kernels import dwconv_bn_swish, group_norm_silu

    backends._INTERPRET = True  # let the ops send CPU tensors to the Triton backend
    for module in (group_norm_silu, dwconv_bn_swish):
        module.target_programs = lambda device: 4 * SM_COUNT.get(arch, 132)


def _randn(*shape, dtype, grad=False, channels_last=False):
    t = torch.randn(*shape, dtype=torch.float32).to(dtype)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)
    return t.requires_grad_(grad)


def _backward(y: torch.Tensor, *inputs: torch.Tensor) -> None:
    torch.autograd.grad(y.float().sum(), [t for t in inputs if t is not None and t.requires_grad])


def group_norm_silu_cases() -> Dict[str, Callable]:
    from diffusion_fast import group_norm_silu

    cases = {}
    for dtype in FP:
        for cl in (False, True):
            for variant in ("affine", "pre_bias", "scale_shift", "plain_norm"):
                def case(dtype=dtype, cl=cl, variant=variant):
                    N, C = 4, 128
                    x = _randn(N, C, 16, 16, dtype=dtype, grad=True, channels_last=cl)
                    w, b = (_randn(C, dtype=dtype, grad=True) for _ in range(2))
                    nc = {"pre_bias": ("pre_bias",), "scale_shift": ("scale", "shift")}.get(variant, ())
                    extra = {k: _randn(N, C, dtype=dtype, grad=True) for k in nc}
                    if variant == "plain_norm":
                        y = group_norm_silu(x, 32, silu=False)
                        w = b = None
                    else:
                        y = group_norm_silu(x, 32, w, b, **extra)
                    _backward(y, x, w, b, *extra.values())
                cases[f"group_norm_silu {variant} {dtype} {'NHWC' if cl else 'NCHW'}"] = case
    for shape, groups in (((2, 64, 1000), 1), ((2, 32, 4, 8, 8), 32)):  # 1-D and 3-D inputs
        def case(shape=shape, groups=groups):
            x = _randn(*shape, dtype=torch.float16, grad=True)
            _backward(group_norm_silu(x, groups), x)
        cases[f"group_norm_silu {shape} groups={groups}"] = case

    def slab_split_case():  # channels-last slabs, one program per sample: the split (two-launch) forward
        x = _randn(1, 64, 16, 16, dtype=torch.bfloat16, grad=True, channels_last=True)
        _backward(group_norm_silu(x, 32), x)
    cases["group_norm_silu NHWC slabs, split"] = slab_split_case
    return cases


def attention_cases() -> Dict[str, Callable]:
    from diffusion_fast import attention

    cases = {}
    for dtype in FP:
        for B, H, S, D, causal in ((2, 8, 77, 64, True), (1, 1, 64, 80, False), (1, 1, 256, 256, False),
                                   (1, 1, 256, 512, False)):
            def case(dtype=dtype, shape=(B, H, S, D), causal=causal):
                q, k, v = (_randn(*shape, dtype=dtype, grad=True) for _ in range(3))
                _backward(attention(q, k, v, causal=causal), q, k, v)
            cases[f"attention {dtype} B,H,S,D={B, H, S, D} causal={causal}"] = case
    return cases


def dwconv_bn_swish_cases() -> Dict[str, Callable]:
    from diffusion_fast import bn_swish, dwconv_bn_swish

    cases = {}
    for dtype in FP:
        for cl in (False, True):
            for training in (True, False):
                for k in (3, 5):
                    def case(dtype=dtype, cl=cl, training=training, k=k):
                        C = 96
                        x = _randn(4, C, 16, 16, dtype=dtype, grad=True, channels_last=cl)
                        w = _randn(C, 1, k, k, dtype=dtype, grad=True)
                        cb, bw, bb = (_randn(C, dtype=dtype, grad=True) for _ in range(3))
                        rm, rv = torch.zeros(C), torch.ones(C)
                        y = dwconv_bn_swish(x, w, cb, bw, bb, rm, rv, training=training)
                        _backward(y, x, w, cb, bw, bb)
                    cases[f"dwconv_bn_swish k={k} {dtype} {'NHWC' if cl else 'NCHW'} train={training}"] = case

                def bn_case(dtype=dtype, cl=cl, training=training):
                    C = 96
                    x = _randn(4, C, 16, 16, dtype=dtype, grad=True, channels_last=cl)
                    bw, bb = (_randn(C, dtype=dtype, grad=True) for _ in range(2))
                    y = bn_swish(x, bw, bb, torch.zeros(C), torch.ones(C), training=training)
                    _backward(y, x, bw, bb)
                cases[f"bn_swish {dtype} {'NHWC' if cl else 'NCHW'} train={training}"] = bn_case
    return cases


def sampler_step_cases() -> Dict[str, Callable]:
    from diffusion_fast import ops

    cases = {}
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ddpm_coef = ops.ddpm_coefficients(betas)
    ddim_coef = ops.ddim_coefficients(torch.cumprod(1 - betas, 0), list(range(999, -1, -100)), eta=1.0)
    for dtype in FP:
        x, e = (_randn(2, 3, 32, 32, dtype=dtype) for _ in range(2))

        def ddpm(x=x, e=e):
            ops.ddpm_step(x, e, ddpm_coef, 10, seed=1, return_x0=True)
            ops.ddpm_step(x, e, ddpm_coef, 10, clip_x0=False, noise=torch.randn_like(x))

        def ddim(x=x, e=e):
            ops.ddim_step(x, e, ddim_coef, 3, seed=1, return_x0=True)
            ops.ddim_step(x, e, ddim_coef, 3, clip_x0=False, noise=torch.randn_like(x))

        def langevin(x=x, e=e):
            ops.langevin_step(x, e, 1e-3, seed=1, step=2)
            ops.langevin_step(x, e, torch.tensor([1e-3]), noise=torch.randn_like(x))
            ops.langevin_step(x, e, 1e-3, add_noise=False)

        def dpm2015(dtype=dtype):
            x, m, s = (_randn(1000, 2, dtype=dtype) for _ in range(3))
            ops.dpm2015_step(x, m, s, 0.05, seed=1, step=3)
            ops.dpm2015_step(x, m, s, torch.tensor([0.05]), add_noise=False)

        for name, fn in (("ddpm_step", ddpm), ("ddim_step", ddim), ("langevin_step", langevin),
                         ("dpm2015_step", dpm2015)):
            cases[f"{name} {dtype}"] = fn
    return cases


ALL_CASES = (group_norm_silu_cases, attention_cases, dwconv_bn_swish_cases, sampler_step_cases)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200, 80: A100)")
    p.add_argument("-k", default="", help="only cases whose name contains this")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        p.error("run without TRITON_INTERPRET: the interpreter never compiles")

    import diffusion_fast

    compiled: List[dict] = []
    install_fake_gpu(args.arch, compiled)
    limit = SHARED_LIMIT.get(args.arch)
    failures = []
    with diffusion_fast.use_backend("triton"):
        for make in ALL_CASES:
            for name, case in make().items():
                if args.k not in name:
                    continue
                first = len(compiled)
                try:
                    case()
                except Exception as exc:  # report every failing case, not just the first
                    failures.append(f"{name}: {type(exc).__name__}: {exc}")
                    traceback.print_exc()
                    continue
                if first == len(compiled):  # the op fell back to another backend: nothing was checked
                    failures.append(f"{name}: launched no Triton kernel")
                for k in compiled[first:]:
                    if limit is not None and k["shared"] > limit:
                        failures.append(f"{name}: {k['kernel']} needs {k['shared']} B of shared memory, "
                                        f"sm_{args.arch} allows {limit}")
                print(f"ok  {name}: " + ", ".join(f"{k['kernel']} ({k['shared']} B smem, {k['num_warps']} warps)"
                                                  for k in compiled[first:]), flush=True)
    kernels = {k["kernel"] for k in compiled}
    print(f"sm_{args.arch}: {len(compiled)} launches compiled, {len(kernels)} kernels, {len(failures)} failures")
    for f in failures:
        print("FAILED", f)
    return 1 if failures or not compiled else 0


if __name__ == "__main__":
    sys.exit(main())
