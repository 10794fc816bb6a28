"""Shared test helpers: backend/device matrix, float64 comparison, layouts."""

import pytest
import torch

import diffusion_fast
from diffusion_fast import backends
from diffusion_fast.ops.philox import philox_normal_ref

HAS_CUDA = torch.cuda.is_available()

# (backend, device): our extension and the reference on both devices; Triton on the GPU,
# and on the CPU through its interpreter where there is no GPU.
BACKEND_DEVICES = [
    pytest.param("torch", "cpu", id="torch-cpu"),
    pytest.param("cuda", "cpu", id="ext-cpu"),
    pytest.param("triton", "cpu", id="triton-interp",
                 marks=pytest.mark.skipif(not backends.triton_interpret(), reason="TRITON_INTERPRET not set")),
    pytest.param("torch", "cuda", id="torch-cuda", marks=pytest.mark.cuda),
    pytest.param("cuda", "cuda", id="ext-cuda", marks=pytest.mark.cuda),
    pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.cuda),
]


def backend_devices_without(backend: str) -> list:
    """BACKEND_DEVICES less the entries of one backend."""
    return [p for p in BACKEND_DEVICES if p.values[0] != backend]


OURS = backend_devices_without("torch")  # our kernels: every backend but the reference

# Max error allowed, relative to the largest magnitude of the float64 reference.
TOL = {torch.float64: 1e-10, torch.float32: 3e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}


def dtypes_for(backend: str, device: str) -> list:
    """Dtypes each backend must support on each device."""
    if backend == "triton" and device == "cpu":
        return [torch.float32, torch.float16]  # interpreter: bf16 arithmetic is unreliable
    low = [torch.float32, torch.float16, torch.bfloat16]
    return low + ([torch.float64] if backend != "triton" else [])


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str,
                 baseline: torch.Tensor = None, baseline_factor: float = 2.0) -> None:
    """max|actual - expected| <= TOL x max(1, max|expected|), plus twice PyTorch's own error.

    ``expected`` is the float64 reference; ``baseline`` (optional) is PyTorch's own result in
    the tested dtype, whose error measures the problem's conditioning (flash-attention's rule:
    at most 2x the error of PyTorch's own low-precision result; ``baseline_factor`` changes the 2
    where the exact result is 0 and both errors are pure rounding noise).
    """
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    expected = expected.double().cpu()
    scale = expected.abs().max().clamp_min(1.0).item()
    allowed = TOL[dtype] * scale
    if baseline is not None:
        allowed += baseline_factor * (baseline.double().cpu() - expected).abs().max().item()
    err = (actual.double().cpu() - expected).abs().max().item()
    assert err <= allowed, f"{what}: max error {err:.3g} > allowed {allowed:.3g} ({dtype}, scale {scale:.3g})"


def to_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """'contiguous', 'channels_last' (C innermost, any rank) or 'strided' (neither)."""
    if layout == "channels_last":
        return x.movedim(1, -1).contiguous().movedim(-1, 1)
    if layout == "strided":
        wide = torch.cat([x, x], dim=-1)  # every other element along the last dim
        return wide[..., ::2].copy_(x)
    return x.contiguous()


def randomize_(model: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
    """Add N(0, scale²) noise to every parameter in place, so norm affines, zero biases and
    zero-initialised layers take non-trivial values; returns the model."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def require_backend(backend: str, op: str, x: torch.Tensor, unsupported) -> None:
    """Fail (not skip) when a backend that must run here cannot: a silent fallback is a bug."""
    reason = unsupported(backend, x)
    assert reason is None, f"backend {backend} cannot run {op} on {x.device}: {reason}"


def run_backend(backend: str, fn, *args, **kwargs):
    with diffusion_fast.use_backend(backend):
        return fn(*args, **kwargs)


# In-kernel Philox noise of the noise-step ops: max |z - philox_normal_ref|, z ~ N(0, 1).
NOISE_TOL = {torch.float32: 4e-6, torch.float64: 1e-12}
# (seed, step, numel): seeds and steps at the ends of their 64/32 bits, and partial noise tiles.
NOISE_CASES = [(0, 0, 1), (1234, 5, 2200), (2**64 - 1, 2**32 - 1, 1500), (2**64 - 1, 2**31 - 1, 1500),
               (2**63, 2**31, 1100), (2**63, 2**32 - 1, 1100), (2**40 + 3, 999, 385)]


def assert_noise_stream(backend: str, device: str, draw) -> None:
    """``draw(zeros, seed, step)`` returns an op's noise term z for x = ``zeros`` (1-D, float32 and,
    off Triton, float64); z must be ``philox_normal_ref(seed, step, numel)`` for every NOISE_CASES."""
    dtypes = [torch.float32] + ([torch.float64] if backend != "triton" else [])
    for seed, step, numel in NOISE_CASES:
        expected = philox_normal_ref(seed, step, numel)
        for dtype in dtypes:
            z = draw(torch.zeros(numel, dtype=dtype, device=device), seed, step)
            assert z.shape == expected.shape and z.dtype == dtype
            err = (z.double().cpu() - expected).abs().max().item()
            assert err <= NOISE_TOL[dtype], f"seed {seed} step {step}: noise error {err:.3g} ({dtype}, {backend})"
