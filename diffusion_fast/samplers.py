"""Sampling loops over the fused step ops: ancestral DDPM (Ho et al. 2020, Alg. 2), DDIM
(Song et al. 2021, Eq. 12) and (annealed) Langevin dynamics (Song & Ermon 2019, Alg. 1).

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

import math
import numbers
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from diffusion_fast.cuda_graphs import graphed
from diffusion_fast.diffusion.schedules import linear_betas
from diffusion_fast.ops.langevin_step import langevin_step
from diffusion_fast.ops.philox import philox_normal_ref
from diffusion_fast.ops.sampler_steps import ddim_coefficients, ddim_step, ddpm_coefficients, ddpm_step

__all__ = ["sample_ddpm", "sample_ddim", "initial_noise", "langevin_dynamics", "annealed_langevin_dynamics"]


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
    # The table is built and checked on the CPU (its checks read values), then copied once, asynchronously.
    table = ddpm_coefficients(betas.cpu(), variance).to(device, non_blocking=True)
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
    defaults to the paper's linear schedule. ``cuda_graph``, ``x_init`` as in ``sample_ddpm``.
    Returns x_0 of ``shape`` in ``dtype``.
    """
    shape = _check_shape(shape)
    device = torch.device(device) if device is not None else torch.device("cpu")
    model = _denoiser(model, cuda_graph, device)
    if alphas_cumprod is None:
        alphas_cumprod = torch.cumprod(1.0 - linear_betas(), 0)
    if timesteps is None:
        valid = isinstance(num_steps, int) and not isinstance(num_steps, bool)
        if not valid or not 1 <= num_steps <= alphas_cumprod.numel():
            raise ValueError(f"num_steps must be an int in [1, {alphas_cumprod.numel()}], got {num_steps!r}")
        stride = alphas_cumprod.numel() // num_steps
        timesteps = [i * stride for i in reversed(range(num_steps))]
    table = ddim_coefficients(alphas_cumprod.cpu(), timesteps, eta).to(device, non_blocking=True)  # as in sample_ddpm
    x = _start(shape, seed, table.shape[0], device, dtype, x_init)
    t_batch = torch.empty(shape[0], dtype=torch.long, device=device)
    for i, t in enumerate(timesteps):
        eps = model(x, t_batch.fill_(int(t)))
        x = ddim_step(x, eps.to(dtype), table, i, seed=seed, clip_x0=clip_x0)
        if progress is not None:
            progress(i)
    return x


# ---------------------------------------------------------------------------
# Langevin dynamics over score models (NCSN, Song & Ermon 2019; NCSNv2, Song & Ermon 2020).
# Score-model convention: ``model(x, labels)`` returns s(x, sigma_i) of x's shape for labels: (B,)
# int64 indices i into the decreasing noise levels (see ``diffusion_fast.score_matching``).
# ---------------------------------------------------------------------------
@torch.no_grad()
def langevin_dynamics(score_fn: Callable[[Tensor], Tensor], x: Tensor, step_size: float | Tensor,
                      n_steps: int, *, seed: int = 0) -> Tensor:
    """Plain (unadjusted) Langevin dynamics x_{t+1} = x_t + a s(x_t) + sqrt(2a) z_t, t = 0..n_steps-1,
    with one fused ``langevin_step`` per step (Philox stream (seed, t)). ``score_fn(x)`` returns the
    score of x's shape; ``step_size`` a > 0 (float or one-element tensor on x's device)."""
    if isinstance(n_steps, bool) or not isinstance(n_steps, numbers.Integral) or not 0 <= n_steps < 2**32:
        raise ValueError(f"langevin_dynamics: n_steps must be an int in [0, 2**32), got {n_steps!r}")
    for t in range(int(n_steps)):
        x = langevin_step(x, score_fn(x), step_size, seed=seed, step=t)
    return x


def _check_sigmas(sigmas) -> Tensor:
    """The noise levels as a float64 CPU tensor (one device-to-host copy if they live on a GPU)."""
    table = sigmas.detach() if isinstance(sigmas, Tensor) else torch.as_tensor(sigmas)
    table = table.to(device="cpu", dtype=torch.float64)
    if table.dim() != 1 or table.numel() == 0 or not (torch.isfinite(table) & (table > 0)).all():
        raise ValueError("annealed_langevin_dynamics: sigmas must be a non-empty 1-D sequence of finite values > 0")
    if (table[1:] >= table[:-1]).any():
        raise ValueError("annealed_langevin_dynamics: sigmas must be strictly decreasing (sigma_1 > ... > sigma_L)")
    return table


@torch.no_grad()
def annealed_langevin_dynamics(model: Callable[[Tensor, Tensor], Tensor], x_init: Tensor, sigmas,
                               *, n_steps_each: int = 5, step_lr: float = 6.2e-6, seed: int = 0,
                               denoise: bool = True, return_all: bool = False,
                               cuda_graph: bool = False) -> Tensor | list[Tensor]:
    """Annealed Langevin dynamics, NCSN Algorithm 1, with NCSNv2's final denoising step.

    For each level i = 1..L (``sigmas`` decreasing, a sequence or a tensor): alpha_i =
    ``step_lr`` * sigma_i^2 / sigma_L^2, then T = ``n_steps_each`` fused steps
    x <- x + alpha_i model(x, i) + sqrt(2 alpha_i) z, z from the Philox stream (seed, i * T + t).
    ``denoise`` ends with x <- x + sigma_L^2 model(x, L) (no noise). The defaults are NCSNv2's
    CIFAR-10 settings (sigma 50 -> 0.01, L = 232, T = 5, epsilon = 6.2e-6).

    ``x_init``: (B, ...) starting samples (NCSN: uniform noise). No host sync per step: the step
    sizes and the labels are device tables made once and indexed by Python ints (sigmas given on a
    GPU are copied to the host once, up front). Returns the final samples, or with ``return_all``
    the list of the samples after every update (L * T, plus the denoised ones), on x's device.
    ``cuda_graph`` as in ``sample_ddpm``: the model replayed from a CUDA graph (one graph serves every level,
    its label being an input tensor).
    """
    fn = "annealed_langevin_dynamics"
    if not isinstance(x_init, Tensor) or not x_init.is_floating_point() or x_init.dim() < 1:
        raise ValueError(f"{fn}: x_init must be a floating tensor (B, ...)")
    table = _check_sigmas(sigmas)
    if isinstance(n_steps_each, bool) or not isinstance(n_steps_each, numbers.Integral) or n_steps_each < 1:
        raise ValueError(f"{fn}: n_steps_each must be an int >= 1, got {n_steps_each!r}")
    if isinstance(step_lr, bool) or not isinstance(step_lr, numbers.Real) or not (
            math.isfinite(step_lr) and step_lr > 0):
        raise ValueError(f"{fn}: step_lr must be a finite number > 0, got {step_lr!r}")
    levels, steps = table.numel(), int(n_steps_each)
    if levels * steps >= 2**32:
        raise ValueError(f"{fn}: len(sigmas) * n_steps_each must stay below 2**32 (the noise stream's step)")
    device = x_init.device
    model = _denoiser(model, cuda_graph, device)
    alpha_dtype = torch.float64 if x_init.dtype == torch.float64 else torch.float32
    alphas = (step_lr * (table / table[-1]) ** 2).to(dtype=alpha_dtype).to(device, non_blocking=True)
    labels = torch.arange(levels, device=device).unsqueeze(1).expand(levels, x_init.shape[0]).contiguous()
    x, states = x_init, []
    for i in range(levels):
        for t in range(steps):
            x = langevin_step(x, model(x, labels[i]), alphas[i], seed=seed, step=i * steps + t)
            if return_all:
                states.append(x)
    if denoise:
        x = langevin_step(x, model(x, labels[levels - 1]), float(table[-1]) ** 2, add_noise=False)
        if return_all:
            states.append(x)
    return states if return_all else x
