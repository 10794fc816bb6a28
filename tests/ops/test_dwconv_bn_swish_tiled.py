"""The CUDA tiled forward of dwconv_bn_swish, checked without a GPU: its tile configurations (read from
the .cu) and index math, replayed in NumPy by tests/dwconv_tiled_emulate.py against a direct conv + BN + Swish
(every output written once, every shared-memory slot read written first, partials merged exactly)."""

import dwconv_tiled_emulate as emulate
import numpy as np
import pytest
import torch

import diffusion_fast


def test_configs_read_from_the_kernel_source():
    assert set(emulate.CFGS) == {"L", "M", "S"}
    for cfg in emulate.CFGS.values():
        assert cfg.THREADS % 32 == 0 and cfg.TW % emulate.KV == 0 and cfg.TH % cfg.RY == 0


@pytest.mark.parametrize("case", emulate.CASES, ids=lambda c: "x".join(map(str, c[:4])) + f" K={c[4]}")
def test_tiled_index_math(case):
    rng = np.random.default_rng(0)
    assert emulate.check(case, rng)
    if case[3] % 2 == 0:
        assert emulate.check(case, rng, pair_load=False, vec_store=False)  # misaligned x / y: scalar paths


def test_tiled_index_math_without_params_and_with_a_large_mean():
    rng = np.random.default_rng(1)
    assert emulate.check((2, 3, 10, 12, 5), rng, params=False, swish=False)
    assert emulate.check((2, 3, 10, 12, 3), rng, shift=100.0)  # robust variance


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cuda_forward_takes_the_tiled_kernels_on_nchw(layout):
    """The CUDA backend's forward of NCHW x with K = 5 runs the tiled kernels (profiled), channels-last x the
    others; both match PyTorch (float64 checks: tests/ops/test_dwconv_bn_swish.py)."""
    import os

    x = torch.randn(2, 8, 12, 20, device="cuda")
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w, cb, g, b = torch.randn(8, 1, 5, 5, device="cuda") * 0.2, *(torch.randn(8, device="cuda") for _ in range(3))
    with diffusion_fast.use_backend("cuda"), torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        y = diffusion_fast.dwconv_bn_swish(x, w, cb, g, b, None, None, training=True)
        torch.cuda.synchronize()
    tiled = any("dwconv_tiled" in e.name for e in prof.events())
    assert tiled == (layout == "nchw" and os.environ.get("DIFFUSION_FAST_DWCONV_TILED") != "0")
    z = torch.nn.functional.conv2d(x, w, cb, padding=2, groups=8)
    want = torch.nn.functional.silu(torch.nn.functional.batch_norm(z, None, None, g, b, True, 0.1, 1e-5))
    torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)
