"""Sampling loops over the fused step ops: ancestral DDPM (Ho et al. 2020, Alg. 2) and DDIM
(Song et al. 2021, Eq. 12).

One signature per algorithm, k-diffusion style: ``sample_*(model, shape, ..., seed=...)`` with
``model(x_t, t)`` predicting ε for x_t: (B, C, H, W) and t: (B,) int64 timesteps.

No host synchronisation per step: the coefficient table lives on the device and is indexed by
Python ints, timesteps are Python ints, and the noise is generated inside the step kernel from
(seed, step, element index). The starting noise x_T is the same Philox stream at step
``len(table)``, so one seed gives the same samples on every backend and device (to rounding).

``cuda_graph=True`` (CUDA only) replays the model's forward from a CUDA graph captured once per
shape and kept with the model (``diffusion_fast.cuda_graphs``): each step then costs a graph
replay, one fused step kernel and one copy, whatever the model's kernel count.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from diffusion_fast.cuda_graphs import graphed
from diffusion_fast.diffusion.schedules import linear_betas
from diffusion_fast.ops.philox import philox_normal_ref
from diffusion_fast.ops.sampler_steps import ddim_coefficients, ddim_step, ddpm_coefficients, ddpm_step

__all__ = ["sample_ddpm", "sample_ddim", "initial_noise"]


def initial_noise(shape: Sequence[int], seed: int, step: int, device, dtype: torch.dtype) -> Tensor:
    """x_T ~ N(0, I) from the Philox stream (seed, step): identical on every device."""
    numel = 1
    for s in shape:
        numel *= int(s)
    return philox_normal_ref(seed, step, numel, torch.float32, device).reshape(tuple(shape)).to(dtype)


def _check_shape(shape) -> tuple:
    if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) < 2 or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"shape must be a sequence of positive ints (B, C, ...), got {shape!r}")
    return tuple(shape)


def _start(shape: tuple, seed: int, step: int, device: torch.device, dtype: torch.dtype,
           x_init: Optional[Tensor]) -> Tensor:
    """x_T: the caller's ``x_init`` (copied, cast to ``dtype``) or the Philox stream (seed, step)."""
    if x_init is None:
        return initial_noise(shape, seed, step, device, dtype)
    if not isinstance(x_init, Tensor) or not x_init.is_floating_point():
        raise TypeError(f"x_init must be a floating tensor, got {type(x_init).__name__}")
    same_device = x_init.device.type == device.type and device.index in (None, x_init.device.index)
    if tuple(x_init.shape) != shape or not same_device:
        raise ValueError(f"x_init must have shape {shape} on {device}, got {tuple(x_init.shape)} on {x_init.device}")
    return x_init.to(dtype=dtype, copy=True)


def _denoiser(model: Callable[[Tensor, Tensor], Tensor], cuda_graph: bool, device: torch.device) -> Callable:
    if not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph must be a bool, got {type(cuda_graph).__name__}")
    if not cuda_graph:
        return model
    if device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device, got device={device}")
    return graphed(model)


@torch.no_grad()
def sample_ddpm(model: Callable[[Tensor, Tensor], Tensor], shape: Sequence[int], *, betas: Optional[Tensor] = None,
                variance: str = "fixedlarge", clip_x0: bool = True, seed: int = 0, device=None,
                dtype: torch.dtype = torch.float32, progress: Optional[Callable[[int], None]] = None,
                cuda_graph: bool = False, x_init: Optional[Tensor] = None) -> Tensor:
    """Ancestral sampling x_T -> x_0 with one fused ``ddpm_step`` per timestep.

    ``betas``: (T,) schedule (default: the paper's linear 1e-4 -> 0.02, T = 1000). ``variance``:
    "fixedlarge" or "fixedsmall"; ``clip_x0`` clips the predicted x0 to [-1, 1] as the official
    sampler does; no noise is added at t = 0. ``progress(t)`` is called after each step.
    ``cuda_graph``: replay the model from a CUDA graph (see the module docstring). ``x_init``:
    start from this x_T (of ``shape``, on ``device``) instead of the seed's Philox noise.
    Returns x_0 of ``shape`` in ``dtype``.
    """
    shape = _check_shape(shape)
    device = torch.device(device) if device is not None else torch.device("cpu")
    model = _denoiser(model, cuda_graph, device)
    betas = linear_betas() if betas is None else betas
    table = ddpm_coefficients(betas.to(device), variance)
    steps = table.shape[0]
    x = _start(shape, seed, steps, device, dtype, x_init)
    t_batch = torch.empty(shape[0], dtype=torch.long, device=device)
    for t in reversed(range(steps)):
        eps = model(x, t_batch.fill_(t))
        x = ddpm_step(x, eps.to(dtype), table, t, seed=seed, clip_x0=clip_x0)
        if progress is not None:
            progress(t)
    return x


@torch.no_grad()
def sample_ddim(model: Callable[[Tensor, Tensor], Tensor], shape: Sequence[int], *, num_steps: int = 50,
                eta: float = 0.0, alphas_cumprod: Optional[Tensor] = None, timesteps: Optional[Sequence[int]] = None,
                clip_x0: bool = True, seed: int = 0, device=None, dtype: torch.dtype = torch.float32,
                progress: Optional[Callable[[int], None]] = None, cuda_graph: bool = False,
                x_init: Optional[Tensor] = None) -> Tensor:
    """DDIM sampling with one fused ``ddim_step`` per step, for any η >= 0.

    ``timesteps`` (strictly decreasing) defaults to ``num_steps`` evenly spaced timesteps of T
    (diffusers' "leading" spacing: T/num_steps * [num_steps-1, ..., 0]). ``alphas_cumprod``
    defaults to the paper's linear schedule. ``cuda_graph`` and ``x_init`` as in ``sample_ddpm``.
    Returns x_0 of ``shape`` in ``dtype``.
    """
    shape = _check_shape(shape)
    device = torch.device(device) if device is not None else torch.device("cpu")
    model = _denoiser(model, cuda_graph, device)
    if alphas_cumprod is None:
        alphas_cumprod = torch.cumprod(1.0 - linear_betas(), 0)
    if timesteps is None:
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= alphas_cumprod.numel():
            raise ValueError(f"num_steps must be an int in [1, {alphas_cumprod.numel()}], got {num_steps!r}")
        stride = alphas_cumprod.numel() // num_steps
        timesteps = [i * stride for i in reversed(range(num_steps))]
    table = ddim_coefficients(alphas_cumprod.to(device), timesteps, eta)
    x = _start(shape, seed, table.shape[0], device, dtype, x_init)
    t_batch = torch.empty(shape[0], dtype=torch.long, device=device)
    for i, t in enumerate(timesteps):
        eps = model(x, t_batch.fill_(int(t)))
        x = ddim_step(x, eps.to(dtype), table, i, seed=seed, clip_x0=clip_x0)
        if progress is not None:
            progress(i)
    return x
