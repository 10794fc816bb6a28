"""Which implementation runs an op: ``cuda``, ``triton`` or ``torch``.

- ``cuda``: our compiled extension ``diffusion_fast._C`` (C++ kernels for CPU tensors,
  CUDA kernels for GPU tensors; PyTorch's dispatcher picks by device).
- ``triton``: kernels/ (GPU tensors; CPU tensors only under ``TRITON_INTERPRET=1``).
- ``torch``: the plain PyTorch reference (``*_ref``), which runs anything.

``auto`` tries them in that order and takes the first that supports the call (an op may pass
its own order for a call, e.g. attention's per-shape table; see ``select``). A user
forces one with ``DIFFUSION_FAST_BACKEND=triton`` (read at import) or, per block of
code, ``with diffusion_fast.use_backend("triton"):``. A forced backend that cannot run
a call falls back to the next in order; every fallback warns once and is listed by
``diffusion_fast.env_info()``.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import platform
import warnings
from typing import Callable, Iterator, Optional

import torch

__all__ = ["BACKENDS", "use_backend", "current", "select", "env_info"]

BACKENDS = ("cuda", "triton", "torch")
ENV_VAR = "DIFFUSION_FAST_BACKEND"
LIBRARY = torch.library.Library("diffusion_fast", "DEF")
log = logging.getLogger("diffusion_fast")


def _check_name(name: Optional[str], source: str, optional: bool = False) -> Optional[str]:
    """name if it is a backend or "auto" (or None, if optional), else ValueError naming source."""
    if name in BACKENDS + ("auto",) or (optional and name is None):
        return name
    raise ValueError(f"{source} must be {'None or ' if optional else ''}one of {BACKENDS + ('auto',)}, got {name!r}")


_default = _check_name(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", ENV_VAR)
_stack: list = []  # innermost use_backend() last; a plain list so torch.compile can trace reads


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops called inside the block on ``name`` ("cuda", "triton", "torch" or "auto")."""
    _stack.append(_check_name(name, "use_backend(name)"))
    try:
        yield
    finally:
        _stack.pop()


def check_optional_name(name: Optional[str], source: str) -> Optional[str]:
    """A model's ``backend=`` argument: None (follow the context) or a backend name, else ValueError."""
    return _check_name(name, source, optional=True)


def maybe_use_backend(name: Optional[str]) -> contextlib.AbstractContextManager:
    """``use_backend(name)``, or a no-op for None (the surrounding choice stands)."""
    return use_backend(name) if name is not None else contextlib.nullcontext()


def current() -> str:
    """The backend requested right now ("auto" unless forced)."""
    return _stack[-1] if _stack else _default


# ---------------------------------------------------------------------------
# Loading: the extension at import (errors kept), triton on first use.
# ---------------------------------------------------------------------------
_state = {"extension": None, "extension_error": None, "extension_devices": (), "triton": None, "triton_error": None}


def load_extension() -> None:
    """Import diffusion_fast._C, which registers its kernels (and the C++ autograd of some ops) with
    the dispatcher; diffusion_fast/__init__.py calls it before the op modules define the schemas."""
    try:
        ext = importlib.import_module("diffusion_fast._C")
        _state["extension"] = ext
        _state["extension_devices"] = ("cpu", "cuda") if ext.WITH_CUDA else ("cpu",)
    except Exception as exc:  # a failed build must not break import
        _state["extension_error"] = f"{type(exc).__name__}: {exc}"


def extension_loaded() -> bool:
    return _state["extension"] is not None


def register_fwd_bwd(name: str, fake_fwd: Callable, fake_bwd: Callable, make_backward: Callable,
                     setup_context: Callable) -> None:
    """The fake (shape) kernels of the op pair ``<name>_fwd``/``<name>_bwd``, and the forward's autograd
    in Python, ``make_backward(bwd_op)``, registered only when our extension did not load: when it did,
    csrc/<op>/<op>_autograd.cpp serves the same backward in C++, with no Python per call
    (diffusion_fast/__init__.py loads the extension before any op module defines its schemas)."""
    fwd = getattr(torch.ops.diffusion_fast, name + "_fwd").default
    bwd = getattr(torch.ops.diffusion_fast, name + "_bwd").default
    torch.library.register_fake(fwd, fake_fwd)
    torch.library.register_fake(bwd, fake_bwd)
    if not extension_loaded():
        torch.library.register_autograd(fwd, make_backward(bwd), setup_context=setup_context)


def _triton_module():
    if _state["triton"] is None and _state["triton_error"] is None:
        try:
            _state["triton"] = importlib.import_module("triton")
        except Exception as exc:
            _state["triton_error"] = f"{type(exc).__name__}: {exc}"
    return _state["triton"]


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_INTERPRET = triton_interpret()


def extension_unsupported(x: torch.Tensor) -> Optional[str]:
    """Why our extension cannot run on x's device (None if it can). Plain Python: compile traces it."""
    if _state["extension"] is None:
        return f"extension diffusion_fast._C did not load ({_state['extension_error']})"
    if x.device.type not in _state["extension_devices"]:
        return f"extension has no {x.device.type} kernels (built without CUDA?)"
    return None


def triton_unsupported(x: torch.Tensor) -> Optional[str]:
    """Why Triton cannot run on x's device (None if it can)."""
    if x.device.type == "cpu" and not _INTERPRET:
        return "Triton needs a GPU tensor (or TRITON_INTERPRET=1 on the CPU)"
    if x.device.type not in ("cpu", "cuda"):
        return f"Triton kernels do not run on {x.device.type}"
    if _triton_module() is None:
        return f"triton is not importable ({_state['triton_error']})"
    return None


def unsupported(backend: str, x: torch.Tensor) -> Optional[str]:
    """Why ``backend`` cannot run an op on x (None when it can), for ops whose C++/CUDA kernels
    take fp16/bf16/fp32/fp64 and whose Triton kernels take all but fp64; the reference runs anything."""
    if backend == "cuda":
        return extension_unsupported(x)
    if backend == "triton":
        if x.dtype == torch.float64:
            return "Triton kernels do not take float64"
        return triton_unsupported(x)
    return None


# ---------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------
_fallbacks: dict = {}  # (op, wanted, reason) -> backend used instead


def _order(requested: str, x: torch.Tensor, auto: Optional[tuple]) -> tuple:
    if auto is None:
        auto = ("cuda", "triton", "torch") if x.device.type == "cuda" else ("cuda", "torch")
    if requested == "auto":
        return auto
    return (requested,) + tuple(b for b in dict.fromkeys(auto + ("torch",)) if b != requested)


def select(op: str, x: torch.Tensor, unsupported: Callable[[str, torch.Tensor], Optional[str]],
           auto: Optional[tuple] = None, implemented: tuple = BACKENDS) -> str:
    """The backend that runs ``op`` on x: the requested one, or the next that supports it.

    ``unsupported(backend, x)`` returns why a backend cannot run the call, or None. ``auto``:
    the op's own order of backends for this call (default: cuda, triton on GPU tensors, torch);
    a forced backend that cannot run falls back along it. A request for a backend the op does
    not have at all (not in ``implemented``, e.g. cuda for attention) is served like "auto",
    without a fallback warning: forcing cuda on a model keeps its ops without C++ kernels on
    their best backend.
    """
    requested = current()
    order = _order(requested if requested in implemented else "auto", x, auto)
    first_reason = unsupported(order[0], x)
    if first_reason is None:
        return order[0]
    for backend in order[1:]:
        if unsupported(backend, x) is None:
            _note_fallback(op, order[0], first_reason, backend)
            return backend
    raise RuntimeError(f"diffusion_fast: no backend can run {op}")  # unreachable: torch runs anything


def _note_fallback(op: str, wanted: str, reason: str, used: str) -> None:
    key = (op, wanted, reason)
    if key in _fallbacks:
        return
    _fallbacks[key] = used
    if torch.compiler.is_compiling():
        return  # recorded for env_info(); a warning here would break a fullgraph trace
    msg = f"diffusion_fast: {op} falls back from {wanted} to {used}: {reason}"
    log.info(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


_auto_rules: dict = {}  # op -> callable returning how its auto order is chosen (for env_info)


def register_auto_rule(op: str, describe: Callable[[], dict]) -> None:
    """Let env_info() report how ``op`` picks its backend under "auto" (rule and its source)."""
    _auto_rules[op] = describe


def fallbacks() -> list:
    """Every fallback seen so far, as dicts (op, wanted, reason, used)."""
    return [dict(op=o, wanted=w, reason=r, used=u) for (o, w, r), u in _fallbacks.items()]


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------
def env_info() -> dict:
    """Versions, device, which backends loaded and why the others did not."""
    from diffusion_fast import __version__

    cuda = torch.cuda.is_available()
    _triton_module()
    triton = _state["triton"]
    ext = _state["extension"]
    return {
        "diffusion_fast": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": getattr(triton, "__version__", None),
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "cuda_available": cuda,
        "requested_backend": current(),
        "backends": {
            "cuda": {
                "loaded": ext is not None,
                "cuda_kernels": bool(getattr(ext, "WITH_CUDA", False)),
                "error": _state["extension_error"],
            },
            "triton": {
                "loaded": triton is not None,
                "interpret": _INTERPRET,
                "usable_on": ("cuda" if cuda else "") + (" cpu (interpreter)" if _INTERPRET else "") or None,
                "error": _state["triton_error"],
            },
            "torch": {"loaded": True, "error": None},
        },
        "auto_rules": {op: describe() for op, describe in _auto_rules.items()},
        "fallbacks": fallbacks(),
        # every DIFFUSION_FAST_* setting in force (backend, tuning knobs, attention tables, ...)
        "settings": {k: v for k, v in sorted(os.environ.items()) if k.startswith("DIFFUSION_FAST_")},
    }
