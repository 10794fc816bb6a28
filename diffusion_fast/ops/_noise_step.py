"""Scaffolding shared by the fused noise-step ops: ``ddpm_step``/``ddim_step`` (ops/sampler_steps.py),
``langevin_step`` and ``dpm2015_step``.

Each op ``fn`` is a pair of torch.library ops with one schema: ``fn`` (our extension: C++ on CPU
tensors, CUDA on GPU tensors) and ``fn_triton`` (a launcher in kernels/, imported on first use so
that importing diffusion_fast never imports triton; CPU tensors reach it only under
TRITON_INTERPRET=1), chosen per call by ``diffusion_fast.backends``.

A sampling loop calls these ops once per step, and at one small image the Python around the
kernel costs more than the kernel: the checks test the cheapest thing first (exact types before
ABC isinstance), never sync with the device, and name the op and the argument in every error.
"""

from __future__ import annotations

import importlib
import numbers
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from diffusion_fast import backends

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FLOAT_DTYPE_SET = frozenset(FLOAT_DTYPES)  # a hash lookup: cheaper than the tuple's comparisons


# ---------------------------------------------------------------------------
# Schemas and kernels
# ---------------------------------------------------------------------------
def _contiguous_like_x(x, *args):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def define(fn: str, schema: str, fake: Callable = _contiguous_like_x, *, kernels: str, launcher: str,
           no_backward: bool = False) -> dict:
    """Define ``fn`` and ``fn + "_triton"`` with ``schema``, register the shape function ``fake``
    (default: one contiguous output like the first argument, x) for both, and
    ``diffusion_fast.kernels.<kernels>.<launcher>`` as the Triton twin's CPU and CUDA kernel.
    ``no_backward``: backward through either raises NotImplementedError (a sampling op).
    Returns the op names by backend, {"cuda": fn, "triton": fn + "_triton"}."""
    names = {"cuda": fn, "triton": fn + "_triton"}

    def backward(ctx, grad):
        raise NotImplementedError(f"{fn} is a sampling op and has no backward; use {fn}_ref to differentiate")

    for name in names.values():
        backends.LIBRARY.define(name + schema)
        op = getattr(torch.ops.diffusion_fast, name).default
        torch.library.register_fake(op, fake)
        if no_backward:
            torch.library.register_autograd(op, backward, setup_context=lambda ctx, inputs, output: None)
    launch = None

    def triton_impl(*args):
        nonlocal launch
        if launch is None:
            launch = getattr(importlib.import_module("diffusion_fast.kernels." + kernels), launcher)
        return launch(*args)

    for key in ("CPU", "CUDA"):
        backends.LIBRARY.impl(names["triton"], triton_impl, key)
    return names


def overloads(names: dict) -> dict:
    """The ``.default`` overload of each op in ``names`` (resolved once, not per call)."""
    return {backend: getattr(torch.ops.diffusion_fast, name).default for backend, name in names.items()}


def backend_selector(fn: str, unsupported=backends.unsupported) -> Callable[[Tensor], str]:
    """x -> the backend that runs ``fn`` on x. ``backends.select`` answers from the requested
    backend, x's device and dtype alone, so its answer is kept per (requested, device, dtype)."""
    selected: dict = {}
    is_compiling, current = torch.compiler.is_compiling, backends.current  # looked up once

    def backend(x: Tensor) -> str:
        if is_compiling():
            return backends.select(fn, x, unsupported)
        key = (current(), x.device, x.dtype)
        chosen = selected.get(key)
        if chosen is None:
            chosen = selected[key] = backends.select(fn, x, unsupported)
        return chosen

    return backend


# ---------------------------------------------------------------------------
# Argument checks: a ValueError/TypeError that names the op and the argument.
# ---------------------------------------------------------------------------
def check_float_tensor(fn: str, name: str, t, x: Optional[Tensor], x_name: str = "x") -> None:
    """t is a floating tensor (FLOAT_DTYPES), on x's device unless x is None."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: {name} must be a Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPE_SET:
        raise TypeError(f"{fn}: {name} must be a floating tensor ({', '.join(map(str, FLOAT_DTYPES))}), got {t.dtype}")
    if x is not None and t.device != x.device:
        raise ValueError(f"{fn}: {name} is on {t.device} but {x_name} is on {x.device}; move them to one device")


def check_int(fn: str, name: str, v, high: int) -> int:
    """v as an int, checked: an int (numpy ints too; a tensor would sync) in [0, high), not a bool."""
    if type(v) is not int:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{fn}: {name} must be an int, got {type(v).__name__}")
        v = int(v)
    if not 0 <= v < high:
        raise ValueError(f"{fn}: {name} must be in [0, {high}), got {v}")
    return v


def check_bool(fn: str, name: str, v) -> None:
    if v is not True and v is not False:
        raise TypeError(f"{fn}: {name} must be a bool, got {type(v).__name__}")


def check_scalar(fn: str, name: str, v, x: Tensor) -> bool:
    """v is a step parameter: a one-element floating tensor on x's device (True; its value is not
    read, that would sync) or a real number (False; the caller checks its range)."""
    if isinstance(v, Tensor):
        check_float_tensor(fn, name, v, x)
        if v.numel() != 1:
            raise ValueError(f"{fn}: {name} must be a number or a one-element tensor, got shape {tuple(v.shape)}")
        return True
    if type(v) is not float and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
        raise TypeError(f"{fn}: {name} must be a float or a one-element floating tensor, got {type(v).__name__}")
    return False


# ---------------------------------------------------------------------------
# Kernel arguments
# ---------------------------------------------------------------------------
def kernel_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the kernels' math and of their parameter tensors: float64 for float64 x, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def scalar_arg(v, x: Tensor) -> Tuple[Optional[Tensor], float]:
    """A checked step parameter as the schemas take it: (a (1,) tensor in kernel_dtype(x), 0.0)
    for a tensor, (None, the number) for a number."""
    if type(v) is float:  # the common call, tested first
        return None, v
    if isinstance(v, Tensor):
        return v.to(kernel_dtype(x)).reshape(1), 0.0
    return None, float(v)


def like_x(t: Tensor, x: Tensor) -> Tensor:
    """t in x's dtype, contiguous (no copy when it already is)."""
    return (t if t.dtype == x.dtype else t.to(x.dtype)).contiguous()


def signed_seed(seed: int) -> int:
    """A seed in [0, 2**64) as the int64 of the schemas (same 64 bits)."""
    return seed - 2**64 if seed >= 2**63 else seed
