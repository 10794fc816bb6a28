"""The CUDA tiled forward and backward of dwconv_bn_swish, checked without a GPU: their tile configurations
(read from the .cu) and index math, replayed in NumPy by tests/dwconv_tiled_emulate.py against a direct conv + BN
+ Swish and against PyTorch's autograd of it (every output written once, every shared-memory slot read written
first, partials merged exactly)."""

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


@pytest.mark.parametrize("case", emulate.STORE_Z_CASES, ids=lambda c: "x".join(map(str, c[:4])) + f" K={c[4]}")
def test_tiled_store_z_index_math(case):
    """The 16-bit training forward (z' less its tile mean kept in y, then applied in place): exact in float64, and
    with the rounding to bf16 in y at a mean of z' far above its spread."""
    rng = np.random.default_rng(4)
    assert emulate.check(case, rng, store_z=lambda a: a)
    assert emulate.check(case, rng, store_z=emulate.round_bf16, shift=1000.0, tol=emulate.BF16_TOL)
    if case[3] % 2 == 0:
        assert emulate.check(case, rng, pair_load=False, vec_store=False, store_z=lambda a: a)


def test_tiled_index_math_without_params_and_with_a_large_mean():
    rng = np.random.default_rng(1)
    assert emulate.check((2, 3, 10, 12, 5), rng, params=False, swish=False)
    assert emulate.check((2, 3, 10, 12, 3), rng, shift=100.0)  # robust variance


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", emulate.BWD_CASES, ids=lambda c: "x".join(map(str, c[:4])) + f" K={c[4]}")
def test_tiled_backward_index_math(case, training):
    rng = np.random.default_rng(2)
    assert emulate.check_bwd(case, rng, training=training)
    if case[3] % 2 == 0:
        assert emulate.check_bwd(case, rng, training=training, pair_load=False, vec_store=False)


def test_tiled_backward_without_params():
    assert emulate.check_bwd((2, 3, 10, 12, 5), np.random.default_rng(3), params=False, swish=False)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cuda_takes_the_tiled_kernels_on_nchw(layout):
    """The CUDA backend's forward and backward of NCHW x with K = 5 run the tiled kernels (profiled), channels-last
    x the others; both match PyTorch (float64 checks: tests/ops/test_dwconv_bn_swish.py)."""
    import os

    x = torch.randn(2, 8, 12, 20, device="cuda")
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w, cb, g, b = torch.randn(8, 1, 5, 5, device="cuda") * 0.2, *(torch.randn(8, device="cuda") for _ in range(3))
    leaves = [t.requires_grad_() for t in (x, w, cb, g, b)]
    dy = torch.randn_like(x)
    with diffusion_fast.use_backend("cuda"), torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        y = diffusion_fast.dwconv_bn_swish(x, w, cb, g, b, None, None, training=True)
        grads = torch.autograd.grad(y, leaves, dy)
        torch.cuda.synchronize()
    tiled = [e.name for e in prof.events() if "dwconv_tiled" in e.name]
    expected = layout == "nchw" and os.environ.get("DIFFUSION_FAST_DWCONV_TILED") != "0"
    assert any("apply_kernel" in n for n in tiled) == expected  # the forward's last pass
    assert any("bwd_dx_kernel" in n for n in tiled) == expected  # the backward's
    z = torch.nn.functional.conv2d(x, w, cb, padding=2, groups=8)
    want = torch.nn.functional.silu(torch.nn.functional.batch_norm(z, None, None, g, b, True, 0.1, 1e-5))
    torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)
    for got, exp in zip(grads, torch.autograd.grad(want, leaves, dy)):
        torch.testing.assert_close(got, exp, atol=1e-3, rtol=1e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,k", [((2, 8, 12, 20), 5), ((3, 4, 33, 36), 3), ((6, 3, 1, 1), 5)],
                         ids=["M", "L", "1x1"])
def test_cuda_16bit_training_keeps_z_in_y(shape, k, dtype):
    """16-bit training forwards run stats_kernel<..., kStoreZ> + apply_z_kernel (no second conv) unless
    DIFFUSION_FAST_DWCONV_STORE_Z=0; y matches the float64 reference within 2x PyTorch's own bf16/fp16 error plus
    the dtype's tolerance, also at a mean of x far above its spread (z' is stored less its tile's mean)."""
    import os

    from helpers import assert_close

    from diffusion_fast.ops.dwconv_bn_swish import dwconv_bn_swish_ref

    x = (torch.randn(shape, device="cuda", dtype=torch.float64) * 1.5 + 50.0).to(dtype)
    c = shape[1]
    w = (0.3 * torch.randn(c, 1, k, k, device="cuda", dtype=torch.float64)).to(dtype)
    cb, g, b = ((torch.randn(c, device="cuda", dtype=torch.float64) * s + m).to(dtype)
                for s, m in ((1.0, 0.0), (0.3, 1.0), (0.3, 0.0)))
    with diffusion_fast.use_backend("cuda"), torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        y = diffusion_fast.dwconv_bn_swish(x, w, cb, g, b, None, None, training=True)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if "dwconv_tiled" in e.name]
    assert any("apply_z_kernel" in n for n in names) == (os.environ.get("DIFFUSION_FAST_DWCONV_STORE_Z") != "0")
    args = (None, None)
    expected = dwconv_bn_swish_ref(x.double(), w.double(), cb.double(), g.double(), b.double(), *args, training=True)
    baseline = dwconv_bn_swish_ref(x, w, cb, g, b, *args, training=True)  # fp32 math, rounded once at the end
    assert_close(y, expected, dtype, "y", baseline=baseline)
