"""Replay a model's forward from a CUDA graph: one launch per call instead of hundreds.

A UNet forward at small batch is launch-bound (a few hundred kernels, each a few µs of GPU
work), and so is a text encoder's. ``GraphedModel(model)`` captures ``model(*inputs)`` (e.g. a
denoiser's ``(x, t)``, a text encoder's ``(tokens,)``) once per (shapes, dtypes, device) with
PyTorch's own ``torch.cuda.CUDAGraph``, into static input buffers; each later call copies the
inputs in, replays, and returns the static output. A denoiser's t is an input tensor, so one
graph serves every timestep of a sampling loop; the fused step op stays outside the graph (its
timestep and seed are kernel arguments).

The warm-up calls before a capture run with cuDNN's benchmark mode on (``cudnn_benchmark=True``, the
default): cuDNN times its algorithms for each convolution of those fixed shapes, as
``torch.compile(mode="max-autotune")`` times its candidates, and the graph replays the winners. The
global flag is restored after the capture, so nothing else runs differently.

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
    """``GraphedModel(model)(*inputs)`` == ``model(*inputs)`` for CUDA tensors on one device, e.g.
    a denoiser's x: (B, ...) and t: (B,). ``cudnn_benchmark``: autotune the convolutions while
    capturing (module doc)."""

    def __init__(self, model: Callable[..., Tensor], *, cudnn_benchmark: bool = True):
        if not callable(model):
            raise TypeError(f"GraphedModel: model must be callable, got {type(model).__name__}")
        if not isinstance(cudnn_benchmark, bool):
            raise TypeError(f"GraphedModel: cudnn_benchmark must be a bool, got {type(cudnn_benchmark).__name__}")
        self.model = model
        self.cudnn_benchmark = cudnn_benchmark
        self._graphs: Dict[Tuple, Tuple[torch.cuda.CUDAGraph, Tuple[Tensor, ...], Tensor]] = {}

    def __call__(self, *inputs: Tensor) -> Tensor:
        if not inputs or any(not isinstance(a, Tensor) for a in inputs):
            raise TypeError(f"GraphedModel: the inputs must be tensors, got {[type(a).__name__ for a in inputs]}")
        devices = {a.device for a in inputs}
        if len(devices) != 1 or next(iter(devices)).type != "cuda":
            raise ValueError(f"GraphedModel: the inputs must be CUDA tensors on one device, "
                             f"got {sorted(map(str, devices))}")
        if torch.is_grad_enabled():
            raise RuntimeError("GraphedModel: inference only; call it under torch.no_grad()")
        key = tuple((tuple(a.shape), a.dtype) for a in inputs) + (inputs[0].device,)
        if key not in self._graphs:
            self._graphs[key] = self._capture(inputs)
        graph, static_inputs, static_out = self._graphs[key]
        for static, a in zip(static_inputs, inputs):
            static.copy_(a)
        graph.replay()
        return static_out

    def _capture(self, inputs: Tuple[Tensor, ...]) -> Tuple:
        static_inputs = tuple(a.clone() for a in inputs)
        device = inputs[0].device
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        was_benchmark = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = self.cudnn_benchmark or was_benchmark
        try:
            with torch.cuda.stream(side):  # warm-up: cuDNN (timing, in benchmark mode)/cuBLAS/Triton pick kernels
                for _ in range(WARMUP_CALLS):
                    self.model(*static_inputs)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # the same shapes: cuDNN finds its timed choices in its cache
                static_out = self.model(*static_inputs)
        finally:
            torch.backends.cudnn.benchmark = was_benchmark
        return graph, static_inputs, static_out


_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def graphed(model: Callable[..., Tensor]) -> GraphedModel:
    """The ``GraphedModel`` of ``model``, kept while the model lives, so repeated sampling calls
    reuse its captured graphs (an nn.Module or any weak-referenceable callable)."""
    try:
        wrapper = _CACHE.get(model)
        if wrapper is None:
            wrapper = _CACHE[model] = GraphedModel(model)
        return wrapper
    except TypeError:  # not weak-referenceable (e.g. a bound method): no cache
        return GraphedModel(model)
