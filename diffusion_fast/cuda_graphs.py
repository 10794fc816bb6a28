"""Replay a denoiser's forward from a CUDA graph: one launch per sampling step instead of hundreds.

A UNet forward at small batch is launch-bound (a few hundred kernels, each a few µs of GPU
work). ``GraphedModel(model)`` captures ``model(x, t)`` once per (shape, dtype, device) with
PyTorch's own ``torch.cuda.CUDAGraph``, into static input buffers; each later call copies x and t
in, replays, and returns the static output. t is an input tensor, so one graph serves every
timestep of a sampling loop; the fused step op stays outside the graph (its timestep and seed
are kernel arguments).

Limits (PyTorch's for any CUDA graph): the model must not synchronise with the host or branch
on tensor values, and the returned tensor is overwritten by the next call — consume or clone it
first (the samplers do). Inference only (run under ``torch.no_grad()``).
"""

from __future__ import annotations

import weakref
from typing import Callable, Dict, Tuple

import torch
from torch import Tensor

__all__ = ["GraphedModel", "graphed"]

WARMUP_CALLS = 3  # on a side stream before capture, as PyTorch's CUDA-graph notes advise


class GraphedModel:
    """``GraphedModel(model)(x, t)`` == ``model(x, t)`` for CUDA tensors x: (B, ...) and t: (B,)."""

    def __init__(self, model: Callable[[Tensor, Tensor], Tensor]):
        if not callable(model):
            raise TypeError(f"GraphedModel: model must be callable, got {type(model).__name__}")
        self.model = model
        self._graphs: Dict[Tuple, Tuple[torch.cuda.CUDAGraph, Tensor, Tensor, Tensor]] = {}

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        if x.device.type != "cuda" or t.device != x.device:
            raise ValueError(f"GraphedModel: x and t must be CUDA tensors on one device, got {x.device} and {t.device}")
        if torch.is_grad_enabled():
            raise RuntimeError("GraphedModel: inference only; call it under torch.no_grad()")
        key = (tuple(x.shape), x.dtype, tuple(t.shape), t.dtype, x.device)
        if key not in self._graphs:
            self._graphs[key] = self._capture(x, t)
        graph, static_x, static_t, static_out = self._graphs[key]
        static_x.copy_(x)
        static_t.copy_(t)
        graph.replay()
        return static_out

    def _capture(self, x: Tensor, t: Tensor) -> Tuple:
        static_x, static_t = x.clone(), t.clone()
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):  # warm-up: cuDNN/cuBLAS/Triton pick and compile their kernels
            for _ in range(WARMUP_CALLS):
                self.model(static_x, static_t)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.model(static_x, static_t)
        return graph, static_x, static_t, static_out


_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def graphed(model: Callable[[Tensor, Tensor], Tensor]) -> GraphedModel:
    """The ``GraphedModel`` of ``model``, kept while the model lives, so repeated sampling calls
    reuse its captured graphs (an nn.Module or any weak-referenceable callable)."""
    try:
        wrapper = _CACHE.get(model)
        if wrapper is None:
            wrapper = _CACHE[model] = GraphedModel(model)
        return wrapper
    except TypeError:  # not weak-referenceable (e.g. a bound method): no cache
        return GraphedModel(model)
