"""Backend choice: overrides, fallbacks that warn once, and env_info()."""

import json
import os
import subprocess
import sys

import pytest
import torch

import diffusion_fast
from diffusion_fast import backends
from diffusion_fast.ops.group_norm_silu import _unsupported


def test_use_backend_nests_and_restores():
    assert backends.current() == "auto"
    with diffusion_fast.use_backend("torch"):
        assert backends.current() == "torch"
        with diffusion_fast.use_backend("cuda"):
            assert backends.current() == "cuda"
        assert backends.current() == "torch"
    assert backends.current() == "auto"


def test_use_backend_rejects_unknown_name():
    with pytest.raises(ValueError, match="use_backend"):
        with diffusion_fast.use_backend("tensorrt"):
            pass


def test_auto_prefers_extension_on_cpu():
    x = torch.randn(2, 4, 3)
    assert backends.select("group_norm_silu", x, _unsupported) == "cuda"


def test_fallback_warns_once_and_is_reported(monkeypatch):
    """A forced backend that cannot run the call falls back loudly, once."""
    monkeypatch.setattr(backends, "_fallbacks", {})
    monkeypatch.setitem(backends._state, "extension", None)
    monkeypatch.setitem(backends._state, "extension_error", "ImportError: simulated build failure")
    x = torch.randn(2, 4, 3)
    with diffusion_fast.use_backend("cuda"):
        with pytest.warns(RuntimeWarning, match="simulated build failure"):
            y = diffusion_fast.group_norm_silu(x, 2)
        with backends.warnings.catch_warnings():
            backends.warnings.simplefilter("error")
            diffusion_fast.group_norm_silu(x, 2)  # second time: silent
    torch.testing.assert_close(y, diffusion_fast.group_norm_silu_ref(x, 2))
    info = diffusion_fast.env_info()
    assert info["fallbacks"] == [dict(op="group_norm_silu", wanted="cuda",
                                      reason="extension diffusion_fast._C did not load "
                                             "(ImportError: simulated build failure)", used="torch")]
    assert info["backends"]["cuda"]["error"] == "ImportError: simulated build failure"


def test_triton_on_cpu_without_interpreter_falls_back(monkeypatch):
    monkeypatch.setattr(backends, "_fallbacks", {})
    monkeypatch.setattr(backends, "_INTERPRET", False)
    x = torch.randn(2, 4, 3)
    with diffusion_fast.use_backend("triton"), pytest.warns(RuntimeWarning, match="Triton needs a GPU"):
        assert backends.select("group_norm_silu", x, _unsupported) == "cuda"


def test_env_info_reports_everything():
    info = diffusion_fast.env_info()
    for key in ("diffusion_fast", "torch", "triton", "device", "backends", "fallbacks", "requested_backend"):
        assert key in info
    ext = info["backends"]["cuda"]
    assert ext["loaded"], ext["error"]
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("diffusion_fast::group_norm_silu_fwd", "CUDA")
    assert ext["cuda_kernels"] == has_cuda_kernel
    json.dumps(info)  # plain data


def test_env_info_lists_the_settings_in_force(monkeypatch):
    monkeypatch.setenv("DIFFUSION_FAST_GNS_VECS_PER_THREAD", "4")
    monkeypatch.setenv("UNRELATED_SETTING", "1")
    settings = diffusion_fast.env_info()["settings"]
    assert settings["DIFFUSION_FAST_GNS_VECS_PER_THREAD"] == "4" and "UNRELATED_SETTING" not in settings


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)


def test_environment_variable_selects_backend():
    out = _run("import diffusion_fast.backends as b; print(b.current())", DIFFUSION_FAST_BACKEND="torch")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "torch"


def test_environment_variable_rejects_unknown_name():
    out = _run("import diffusion_fast", DIFFUSION_FAST_BACKEND="fastest")
    assert out.returncode != 0 and "DIFFUSION_FAST_BACKEND" in out.stderr


def test_kernels_are_importable_from_the_package():
    from diffusion_fast.kernels import group_norm_silu as kernels

    assert callable(kernels.group_norm_silu_fwd) and callable(kernels.group_norm_silu_bwd)


def test_fallback_inside_torch_compile_keeps_the_graph_whole(monkeypatch):
    """A fallback first met while tracing is recorded for env_info() without a graph break."""
    monkeypatch.setattr(backends, "_fallbacks", {})
    monkeypatch.setitem(backends._state, "extension", None)
    monkeypatch.setitem(backends._state, "extension_error", "ImportError: simulated")
    torch._dynamo.reset()
    x = torch.randn(2, 4, 3)
    compiled = torch.compile(lambda t: diffusion_fast.group_norm_silu(t, 2), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), diffusion_fast.group_norm_silu_ref(x, 2))
    assert [f["used"] for f in diffusion_fast.env_info()["fallbacks"]] == ["torch"]
    torch._dynamo.reset()


def _fused_calls(x, w):
    """The ops whose autograd is C++ when the extension loaded: C++ Function name -> call."""
    return {
        "GroupNormSiLUFunction": lambda: diffusion_fast.group_norm_silu(x, 2),
        "DWConvBNSwishFunction": lambda: diffusion_fast.dwconv_bn_swish(x, w, None, None, None, None, None,
                                                                        training=True),
        "BNSwishFunction": lambda: diffusion_fast.bn_swish(x, None, None, None, None, training=True),
        "AttentionFunction": lambda: diffusion_fast.attention(x, x, x),  # (B, H, S, D) = (2, 4, 5, 5)
    }


def test_autograd_runs_in_cpp_when_the_extension_loaded():
    """Each fwd op (ours and its Triton twin) gets its graph node from C++, not Python."""
    x, w = torch.randn(2, 4, 5, 5, requires_grad=True), torch.randn(4, 1, 3, 3, requires_grad=True)
    for backend in ("cuda", "triton"):
        for name, call in _fused_calls(x, w).items():
            with diffusion_fast.use_backend(backend):
                y = call()
            assert name in y.grad_fn.name(), (backend, y.grad_fn.name())


def test_autograd_in_python_without_the_extension():
    """A failed _C build: the Triton ops' backward is registered from Python instead, and is right
    (fp32 grads against the torch backend's in float64)."""
    code = (
        "import sys, torch\n"
        "sys.modules['diffusion_fast._C'] = None  # import of _C fails\n"
        "import diffusion_fast as df\n"
        f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
        "from helpers import assert_close\n"
        "from test_backends import _fused_calls\n"
        "assert not df.backends.extension_loaded()\n"
        "x, w = torch.randn(2, 4, 5, 5, requires_grad=True), torch.randn(4, 1, 3, 3, requires_grad=True)\n"
        "x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))\n"
        "for name, call in _fused_calls(x, w).items():\n"
        "    with df.use_backend('triton'):\n"
        "        call().square().sum().backward()\n"
        "    with df.use_backend('torch'):\n"
        "        _fused_calls(x64, w64)[name]().square().sum().backward()\n"
        "    for got, want in ((x.grad, x64.grad), (w.grad, w64.grad)):\n"
        "        assert (got is None) == (want is None), name\n"
        "        if want is not None:\n"
        "            assert_close(got, want, torch.float32, name)\n"
        "    x.grad = w.grad = x64.grad = w64.grad = None\n"
        "print('ok')\n"
    )
    out = _run(code, TRITON_INTERPRET="1")
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr
