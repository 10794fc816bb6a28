"""Tensors derived from a module's parameters (a reshaped or packed weight), kept between
sampling calls while the parameters are unchanged.

They live beside the module, not in it (a weak-keyed table), so ``copy.deepcopy``, pickling and
``torch.save`` of a model never see them: oneDNN's packed weights (opaque tensors) cannot be
copied or saved, and the others would only be dead weight in a checkpoint.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

__all__ = ["derived_params", "cached"]

_caches: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()  # module -> {name: (key, value)}


def derived_params(module: nn.Module, name: str, params: tuple, make, extra: tuple = ()) -> object:
    """``make(*params)``, kept for ``module`` under ``name`` and reused while the params are
    unchanged (in place: their version counters move; replaced or moved: their storage does) and
    ``extra`` (e.g. an input shape the result depends on) is equal. Only outside autograd
    (sampling) and outside torch.compile; else computed on every call. A value kept from an
    inference_mode call is an inference tensor, which autograd cannot save (a gradient with respect
    to the input of a frozen network, as guidance takes): with grad mode on, it is made again.
    """
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
        return make(*params)
    key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params) + extra
    caches = _caches.get(module)
    if caches is None:
        caches = _caches[module] = {}
    cache = caches.get(name)
    if cache is None or cache[0] != key or (torch.is_grad_enabled() and _holds_inference_tensor(cache[1])):
        cache = caches[name] = (key, make(*params))
    return cache[1]


def _holds_inference_tensor(value) -> bool:
    """Whether value (a tensor, or a tuple or list of them and other things) holds an inference tensor."""
    if isinstance(value, torch.Tensor):
        return value.is_inference()
    return isinstance(value, (tuple, list)) and any(_holds_inference_tensor(v) for v in value)


def cached(module: nn.Module, name: str) -> object:
    """What ``derived_params`` keeps for ``module`` under ``name`` (None if nothing)."""
    entry = _caches.get(module, {}).get(name)
    return None if entry is None else entry[1]
