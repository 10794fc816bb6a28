"""dwconv_bn_swish and bn_swish: every backend against the float64 reference, forward and backward,
training (batch statistics, running-stat updates) and eval (running statistics)."""

import contextlib
import importlib
import math
import types

import pytest
import torch
from helpers import (
    BACKEND_DEVICES,
    assert_close,
    dtypes_for,
    require_backend,
    run_backend,
    to_layout,
)

import diffusion_fast
from diffusion_fast.ops.dwconv_bn_swish import (
    OPS,
    _unsupported,
    bn_swish,
    bn_swish_ref,
    dwconv_bn_swish,
    dwconv_bn_swish_ref,
    is_channels_last,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add barrier waits

# (N, C, H, W), named by intent.
CASES = {
    "odd spatial": (2, 4, 7, 5),
    "H, W < k": (3, 3, 2, 3),
    "batch 1": (1, 5, 6, 9),
    "wide rows (two 16-blocks)": (2, 3, 3, 19),
    "8 wide, odd H (C++: two rows per vector)": (2, 3, 5, 8),
    "8 wide, 11 rows (C++: a block of 4 row pairs, then single pairs)": (1, 2, 11, 8),
    "8 x 8 (C++: 4 row pairs, all-zero windows skipped; channels-last: whole rows, zero columns skipped)": (2, 3, 8, 8),
    "16 wide, 7 rows (C++: a block of 4 rows, then single rows)": (2, 3, 7, 16),
    "13 wide (C++: one 16-lane row, 13 stored)": (1, 2, 6, 13),
    "1x1 spatial": (8, 3, 1, 1),
}
# Extras: which optional inputs are present, and swish.
EXTRAS = {
    "full": dict(conv_bias=True, affine=True, swish=True),
    "bare, no swish": dict(conv_bias=False, affine=False, swish=False),
}


def make_inputs(shape, k, dtype, device, layout="contiguous", conv_bias=True, affine=True, running=True,
                param_dtype=None):
    """Fresh random inputs; x has |mean| > std so that the conv output's statistics are off-centre."""
    c = shape[1]
    pd = param_dtype or dtype

    def rand(*s, dt=pd, mean=0.0, std=1.0):
        return (torch.randn(*s, dtype=torch.float64) * std + mean).to(device=device, dtype=dt)

    x = to_layout(rand(*shape, dt=dtype, mean=2.0, std=1.5), layout)
    p = dict(
        conv_weight=None if k is None else rand(c, 1, k, k, std=0.4),
        conv_bias=rand(c) if conv_bias and k is not None else None,
        bn_weight=rand(c, mean=1.0, std=0.3) if affine else None,
        bn_bias=rand(c, std=0.5) if affine else None,
        running_mean=rand(c, dt=torch.float32) if running else None,
        running_var=(torch.rand(c, device=device) + 0.5) if running else None,
    )
    return x, p


def call(op, x, p, **kw):
    """dwconv_bn_swish (p has conv_weight) or bn_swish on the tensors of p."""
    if p.get("conv_weight") is not None:
        return op[0](x, p["conv_weight"], p["conv_bias"], p["bn_weight"], p["bn_bias"], p["running_mean"],
                     p["running_var"], **kw)
    return op[1](x, p["bn_weight"], p["bn_bias"], p["running_mean"], p["running_var"], **kw)


OURS = (dwconv_bn_swish, bn_swish)
REF = (dwconv_bn_swish_ref, bn_swish_ref)
GRAD_NAMES = ("conv_weight", "conv_bias", "bn_weight", "bn_bias")


def dtypes_fast(backend, device):
    """fp32 and fp16, or fp32 alone under the Triton interpreter (fp16 there: test_every_dtype_and_extras)."""
    return dtypes_for(backend, device)[: 1 if backend == "triton" and device == "cpu" else 2]


def check_against_reference(backend, x, p, dtype, training, swish=True, momentum=0.1, eps=1e-5):
    """y, every gradient and the updated running stats from ``backend`` match the float64 reference."""
    names = [k for k in GRAD_NAMES if p.get(k) is not None]
    leaves = [x] + [p[k] for k in names]
    mine = {k: v.clone() if k.startswith("running") and v is not None else v for k, v in p.items()}
    mine.update({k: t.detach().clone().requires_grad_() for k, t in zip(names, leaves[1:])})
    x_in = x.detach().clone().requires_grad_()
    kw = dict(training=training, momentum=momentum, eps=eps, swish=swish)
    y = run_backend(backend, call, OURS, x_in, mine, **kw)
    assert y.dtype == x.dtype and y.shape == x.shape
    if x.is_contiguous() or is_channels_last(x):
        assert y.stride() == x.stride(), "output must keep the input's memory layout"
    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x_in] + [mine[k] for k in names], grad_y)

    def reference(cast=None):
        q = {k: (None if v is None else v.detach().to(cast or v.dtype, copy=True)) for k, v in p.items()}
        q.update({k: q[k].requires_grad_() for k in names})
        xr = x.detach().to(cast or x.dtype).contiguous().requires_grad_()  # CPU conv2d is slow channels-last
        out = call(REF, xr, q, **kw)
        g = torch.autograd.grad(out, [xr] + [q[k] for k in names], grad_y.to(out.dtype))
        return (out,) + g, q

    expected, q64 = reference(torch.float64)
    baseline, _ = reference()  # PyTorch's own result (fp32 math) in the tested dtypes
    # Training on 1x1 maps: batch norm cancels any scale and shift of the conv output, so the conv
    # grads are exactly 0 and every backend returns rounding noise, amplified by rstd / conv_weight.
    noise_only = {"grad_conv_weight", "grad_conv_bias"} if training and x[0, 0].numel() == 1 else set()
    for name, out, exp, base, like in zip(["y", "grad_x"] + ["grad_" + k for k in names], (y,) + grads, expected,
                                          baseline, [x] + leaves):
        assert out.dtype == like.dtype, f"{name} dtype {out.dtype} != {like.dtype}"
        assert_close(out, exp, dtype, name, baseline=base, baseline_factor=8.0 if name in noise_only else 2.0)
    for k in ("running_mean", "running_var"):
        if p[k] is not None:
            changed = training
            assert_close(mine[k], q64[k], torch.float32, k)
            assert changed != torch.equal(mine[k], p[k]), f"{k} must change in training, only then"


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_dwconv_matches_reference(backend, device, case, k, training):
    for dtype in dtypes_fast(backend, device):
        x, p = make_inputs(CASES[case], k, dtype, device)
        require_backend(backend, "dwconv_bn_swish", x, _unsupported)
        check_against_reference(backend, x, p, dtype, training)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("extras", list(EXTRAS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_every_dtype_and_extras(backend, device, extras, training):
    e = EXTRAS[extras]
    for dtype in dtypes_for(backend, device):
        x, p = make_inputs((2, 6, 5, 6), 5, dtype, device, conv_bias=e["conv_bias"], affine=e["affine"])
        check_against_reference(backend, x, p, dtype, training, swish=e["swish"], momentum=0.3, eps=1e-3)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
# 20 and 17 channels: more than a 64-byte line; W = 9: a block of 8 positions and a tail (C++). One test per
# shape: on a GPU each compiles its own Triton kernels (one test of all three took 130 s of a worker).
# 8 x 8: channels-last C++ convolves whole rows, skipping the zero rows and columns around the image.
@pytest.mark.parametrize("k,shape", [(5, (2, 20, 5, 7)), (3, (3, 3, 4, 3)), (5, (1, 17, 3, 9)),
                                     (5, (2, 20, 8, 8)), (3, (1, 17, 8, 8))],
                         ids=["k5 20ch", "k3 3ch", "k5 17ch W9", "k5 20ch 8x8", "k3 17ch 8x8"])
def test_layouts(backend, device, layout, training, k, shape):
    for dtype in dtypes_fast(backend, device):
        x, p = make_inputs(shape, k, dtype, device, layout)
        check_against_reference(backend, x, p, dtype, training)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("case", ["odd spatial", "batch 1", "1x1 spatial"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bn_swish_matches_reference(backend, device, case, layout, training):
    for dtype in dtypes_fast(backend, device):
        x, p = make_inputs(CASES[case], None, dtype, device, layout)
        check_against_reference(backend, x, p, dtype, training)


@pytest.mark.parametrize("backend,device", [p for p in BACKEND_DEVICES if p.values[0] != "torch"])
@pytest.mark.parametrize("k", [5, None], ids=["dwconv_bn_swish", "bn_swish"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_no_grad_call_matches(backend, device, k, training):
    """Under no_grad or without inputs that need gradients (the C++ Autograd kernels then call the ops
    directly, without a graph node): the same y and running statistics, and no graph."""
    x, p = make_inputs((2, 6, 5, 7), k, torch.float32, device)
    results = []
    for mode in ("graph", "no_grad", "plain"):
        mine = {name: None if t is None else t.clone() for name, t in p.items()}
        if mode != "plain":
            for name in ("conv_weight", "bn_weight"):
                if mine[name] is not None:
                    mine[name].requires_grad_()
        with torch.no_grad() if mode == "no_grad" else contextlib.nullcontext():
            y = run_backend(backend, call, OURS, x, mine, training=training)
        assert (y.grad_fn is not None) == (mode == "graph"), mode
        results.append((y.detach(), mine["running_mean"], mine["running_var"]))
    for other in results[1:]:
        for got, exp in zip(other, results[0]):
            torch.testing.assert_close(got, exp, rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_no_running_stats_in_training(backend, device):
    """F.batch_norm allows running stats None with training=True: batch statistics, nothing updated."""
    for k in (5, None):
        x, p = make_inputs((2, 4, 5, 5), k, torch.float32, device, running=False)
        check_against_reference(backend, x, p, torch.float32, True)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_mixed_precision_params(backend, device):
    """fp16 activations with fp32 parameters (autocast-style): parameter grads come back in fp32."""
    x, p = make_inputs((2, 6, 6, 5), 3, torch.float16, device, param_dtype=torch.float32)
    check_against_reference(backend, x, p, torch.float16, True)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_extension_large_planes_without_scratch(layout):
    """Channels whose data pass the C++ kernels' 1 MiB scratch: the conv is recomputed in the second pass."""
    shape = (3, 2, 300, 301) if layout == "contiguous" else (2, 20, 70, 71)
    torch.set_num_threads(2)  # tasks (channels) split over threads
    try:
        for training in (True, False):
            x, p = make_inputs(shape, 5, torch.float32, "cpu", layout)
            require_backend("cuda", "dwconv_bn_swish", x, _unsupported)
            check_against_reference("cuda", x, p, torch.float32, training)
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("dtype,shape", [(torch.float32, (3, 48, 128, 128)), (torch.float64, (2, 40, 128, 128))],
                         ids=["float32", "float64"])
def test_extension_channels_last_streamed_output(dtype, shape):
    """Past 16 MiB of x and y, the C++ channels-last forward (eval, and training's second pass) stores y
    around the caches, line by line: y still matches the reference, in both passes' dtypes."""
    torch.set_num_threads(2)
    try:
        for training in (True, False):
            x, p = make_inputs(shape, 5, dtype, "cpu", "channels_last")
            assert 2 * x.numel() * x.element_size() > 16 << 20
            require_backend("cuda", "dwconv_bn_swish", x, _unsupported)
            check_against_reference("cuda", x, p, dtype, training)
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("threads", [1, 2])
def test_extension_training_forward_channel_blocks(threads):
    """The C++ NCHW training forward takes blocks of channels per task (9 at 1 thread, 4 at 2 for 37
    channels of 8 x 8): the last block is partial, and each channel's batch statistics stay its own."""
    torch.set_num_threads(threads)
    try:
        for dtype in (torch.float32, torch.float16):
            x, p = make_inputs((3, 37, 8, 8), 5, dtype, "cpu")
            require_backend("cuda", "dwconv_bn_swish", x, _unsupported)
            check_against_reference("cuda", x, p, dtype, True)
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_extension_training_forward_with_and_without_grad(threads, grad):
    """Without a backward to follow, the C++ channels-last training forward of float32/float64 runs the conv
    once (z kept in y, normalised in place); with one, twice. Both match the float64 reference, running
    statistics included, on channel counts with a partial 64-byte block and rows split over threads."""
    torch.set_num_threads(threads)
    try:
        for dtype in (torch.float32, torch.float64, torch.float16):
            for k, shape in ((5, (2, 20, 5, 7)), (3, (3, 17, 4, 9)), (5, (1, 40, 3, 3))):
                x, p = make_inputs(shape, k, dtype, "cpu", "channels_last")
                require_backend("cuda", "dwconv_bn_swish", x, _unsupported)
                mine = {k: v.clone() if k.startswith("running") else v for k, v in p.items()}
                mine["conv_weight"].requires_grad_(grad)
                with diffusion_fast.use_backend("cuda"):
                    y = call(OURS, x, mine, training=True)
                assert y.stride() == x.stride()
                ref = {k: v.double() for k, v in p.items()}
                expected = call(REF, x.double(), ref, training=True)
                assert_close(y, expected, dtype, "y")
                for name in ("running_mean", "running_var"):
                    assert_close(mine[name], ref[name], torch.float32, name)
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("threads", [1, 2])
def test_extension_channels_last_statistics_far_from_zero(threads):
    """The C++ channels-last training forward sums z - shift per unit of rows (shift: the unit's first row
    mean). With the conv output 2e3 away from zero (by its bias: no border effects) and a ramp down the rows
    (each row's mean off the first's), the batch statistics must still be the float64 ones; plain float
    sums of z and z^2 would lose them to cancellation."""
    torch.set_num_threads(threads)
    try:
        for grad in (False, True):  # conv once (z kept in y) or twice
            x, p = make_inputs((3, 20, 12, 33), 5, torch.float32, "cpu", "channels_last")
            ramp = 0.3 * torch.arange(12, dtype=torch.float32).view(1, 1, 12, 1)
            x = (x + ramp).contiguous(memory_format=torch.channels_last)
            p["conv_bias"] = p["conv_bias"] + 2e3
            require_backend("cuda", "dwconv_bn_swish", x, _unsupported)
            mine = {k: v.clone() if k.startswith("running") else v for k, v in p.items()}
            mine["conv_weight"].requires_grad_(grad)
            with diffusion_fast.use_backend("cuda"):
                y = call(OURS, x, mine, training=True)
            ref = {k: v.double() for k, v in p.items()}
            expected = call(REF, x.double(), ref, training=True)
            baseline = call(REF, x, {k: v.clone() for k, v in p.items()}, training=True)  # fp32 rounding of z
            assert_close(y, expected, torch.float32, "y", baseline=baseline)
            for name in ("running_mean", "running_var"):
                assert_close(mine[name], ref[name], torch.float32, name)
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("k", [3, 5, None], ids=["k3", "k5", "bn_swish"])
def test_gradcheck_extension_cpu(training, k):
    x, p = make_inputs((2, 2, 4, 3), k, torch.float64, "cpu", running=not training)
    p["running_mean"] = None if training else p["running_mean"].double()
    p["running_var"] = None if training else p["running_var"].double()
    require_backend("cuda", "dwconv_bn_swish", x, _unsupported)
    names = [n for n in GRAD_NAMES if p.get(n) is not None]

    def f(x, *ts):
        q = dict(p, **dict(zip(names, ts)))
        with diffusion_fast.use_backend("cuda"):
            return call(OURS, x, q, training=training)

    inputs = [x.requires_grad_()] + [p[n].requires_grad_() for n in names]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_extension_channels_last(layout):
    x, p = make_inputs((2, 3, 3, 2), 3, torch.float64, "cpu", layout, running=False)
    names = [n for n in GRAD_NAMES if p.get(n) is not None]

    def f(x, *ts):
        with diffusion_fast.use_backend("cuda"):
            return call(OURS, x, dict(p, **dict(zip(names, ts))), training=True)

    inputs = [x.requires_grad_()] + [p[n].requires_grad_() for n in names]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------
# torch.library integration
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", [p for p in BACKEND_DEVICES if p.values[0] != "torch"])
def test_opcheck(backend, device):
    x, p = make_inputs((2, 4, 5, 3), 3, torch.float32, device)
    require_backend(backend, "dwconv_bn_swish", x, _unsupported)
    dw = getattr(torch.ops.diffusion_fast, OPS["dwconv_bn_swish"][backend] + "_fwd").default
    bn = getattr(torch.ops.diffusion_fast, OPS["bn_swish"][backend] + "_fwd").default
    for training, needs_grad in ((True, True), (True, False), (False, True)):
        rm, rv = (None, None) if training else (p["running_mean"], p["running_var"])
        torch.library.opcheck(dw, (x, p["conv_weight"], p["conv_bias"], p["bn_weight"], p["bn_bias"], rm, rv,
                                   training, 1e-5, True, needs_grad))
        torch.library.opcheck(dw, (to_layout(x, "channels_last"), p["conv_weight"], None, p["bn_weight"], None, rm,
                                   rv, training, 1e-5, True, needs_grad))
        torch.library.opcheck(bn, (to_layout(x, "channels_last"), p["bn_weight"], None, rm, rv, training, 1e-3,
                                   False, needs_grad))
    # The backward ops too: their fake kernels must give the real outputs' shapes, dtypes and strides.
    dw_bwd = getattr(torch.ops.diffusion_fast, OPS["dwconv_bn_swish"][backend] + "_bwd").default
    bn_bwd = getattr(torch.ops.diffusion_fast, OPS["bn_swish"][backend] + "_bwd").default
    for xl in (x, to_layout(x, "channels_last")):
        _, mean, var = dw(xl, p["conv_weight"], p["conv_bias"], p["bn_weight"], p["bn_bias"], None, None, True, 1e-5,
                          True, True)
        gy = torch.randn_like(xl)
        torch.library.opcheck(dw_bwd, (gy, xl, p["conv_weight"], p["conv_bias"], p["bn_weight"], p["bn_bias"], mean,
                                       var, True, 1e-5, True))
        torch.library.opcheck(bn_bwd, (gy, xl, p["bn_weight"], None, mean, var, False, 1e-5, True))


@pytest.mark.parametrize("backend,device", [p for p in BACKEND_DEVICES if p.values[0] != "triton"])
def test_torch_compile_fullgraph(backend, device):
    """An NVAE cell middle (train and eval) compiles with fullgraph=True and matches eager, buffers included."""
    torch.manual_seed(0)
    eager = torch.nn.Sequential(diffusion_fast.nn.BNSwish(8), torch.nn.Conv2d(8, 8, 1),
                                diffusion_fast.nn.DWConvBNSwish(8, 5)).to(device)
    compiled_model = torch.nn.Sequential(diffusion_fast.nn.BNSwish(8), torch.nn.Conv2d(8, 8, 1),
                                         diffusion_fast.nn.DWConvBNSwish(8, 5)).to(device)
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    x = torch.randn(2, 8, 6, 6, device=device)
    with diffusion_fast.use_backend(backend):
        for training in (True, False):
            eager.train(training)
            compiled_model.train(training)
            torch.testing.assert_close(compiled(x), eager(x), atol=1e-5, rtol=1e-5)
    for (name, a), b in zip(eager.state_dict().items(), compiled_model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=name)


# ---------------------------------------------------------------------------
# Fallback and bad input
# ---------------------------------------------------------------------------
def test_kernel_size_7_falls_back_to_reference(monkeypatch):
    from diffusion_fast import backends

    monkeypatch.setattr(backends, "_fallbacks", {})
    x, p = make_inputs((2, 3, 6, 6), 7, torch.float32, "cpu")
    with diffusion_fast.use_backend("cuda"), pytest.warns(RuntimeWarning, match="kernel size 7"):
        y = call(OURS, x, p, training=False)
    torch.testing.assert_close(y, call(REF, x, p, training=False))


def _bad_cases():
    c = 4
    return [
        ("integer x", dict(x=torch.ones(2, c, 5, 5, dtype=torch.int32)), TypeError, "x"),
        ("3-D x", dict(x=torch.randn(c, 5, 5)), ValueError, "x"),
        ("not depthwise (in/groups)", dict(conv_weight=torch.randn(c, 2, 3, 3)), ValueError, "conv_weight"),
        ("not depthwise (out)", dict(conv_weight=torch.randn(2 * c, 1, 3, 3)), ValueError, "conv_weight"),
        ("non-square kernel", dict(conv_weight=torch.randn(c, 1, 3, 5)), ValueError, "conv_weight"),
        ("even kernel size", dict(conv_weight=torch.randn(c, 1, 4, 4)), ValueError, "odd"),
        ("integer conv_weight", dict(conv_weight=torch.ones(c, 1, 3, 3, dtype=torch.int64)), TypeError, "conv_weight"),
        ("conv_bias length", dict(conv_bias=torch.randn(c + 1)), ValueError, "conv_bias"),
        ("bn_weight length", dict(bn_weight=torch.randn(c - 1)), ValueError, "bn_weight"),
        ("bn_bias length", dict(bn_bias=torch.randn(2, c)), ValueError, "bn_bias"),
        ("integer bn_bias", dict(bn_bias=torch.ones(c, dtype=torch.int32)), TypeError, "bn_bias"),
        ("running_mean length", dict(running_mean=torch.zeros(c + 2)), ValueError, "running_mean"),
        ("running_var only", dict(running_mean=None), ValueError, "running_mean"),
        ("eval without running stats", dict(running_mean=None, running_var=None, training=False), ValueError,
         "running_mean"),
        ("one value per channel", dict(x=torch.randn(1, c, 1, 1)), ValueError, "more than one"),
        ("training not a bool", dict(training=1), TypeError, "training"),
        ("eps zero", dict(eps=0.0), ValueError, "eps"),
        ("momentum nan", dict(momentum=float("nan")), ValueError, "momentum"),
        ("bn_weight on another device", dict(bn_weight=torch.ones(c, device="meta")), ValueError, "bn_weight"),
        ("conv_weight on another device", dict(conv_weight=torch.ones(c, 1, 3, 3, device="meta")), ValueError,
         "conv_weight"),
        ("x not a tensor", dict(x=[1.0]), TypeError, "x"),
    ]


@pytest.mark.parametrize("backend", ["torch", "cuda", "triton"])
@pytest.mark.parametrize("name,change,exc,match", _bad_cases(), ids=[b[0] for b in _bad_cases()])
def test_bad_input(backend, name, change, exc, match):
    args = dict(x=torch.randn(2, 4, 5, 5), conv_weight=torch.randn(4, 1, 3, 3), conv_bias=None,
                bn_weight=torch.ones(4), bn_bias=torch.zeros(4), running_mean=torch.zeros(4),
                running_var=torch.ones(4), training=True, eps=1e-5, momentum=0.1)
    args.update(change)
    with diffusion_fast.use_backend(backend), pytest.raises(exc, match=match):
        dwconv_bn_swish(**args)
    if any(key.startswith("conv") for key in change):
        return
    args.pop("conv_weight"), args.pop("conv_bias")
    with diffusion_fast.use_backend(backend), pytest.raises(exc, match=match):
        bn_swish(**args)


@pytest.mark.cuda
def test_bad_input_device_mix_cuda():
    x = torch.randn(2, 4, 5, 5, device="cuda")
    with pytest.raises(ValueError, match="conv_weight"):
        dwconv_bn_swish(x, torch.randn(4, 1, 3, 3), None, None, None, None, None, training=True)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_auto_backend_choice(device, monkeypatch):
    """auto: our C++ kernels on CPUs; on GPUs PyTorch's for small inputs like this one (host-bound, see below)."""
    mod = importlib.import_module("diffusion_fast.ops.dwconv_bn_swish")  # the module, not the op it exports
    calls = []
    monkeypatch.setattr(mod, "dwconv_bn_swish_ref", lambda *a, **k: calls.append(1) or dwconv_bn_swish_ref(*a, **k))
    x, p = make_inputs(CASES["odd spatial"], 3, torch.float32, device)
    with diffusion_fast.use_backend("auto"):
        call(OURS, x, p, training=True)
    gpu = device == "cuda"
    assert calls == ([1] if gpu or not diffusion_fast.env_info()["backends"]["cuda"]["loaded"] else [])
    assert "dwconv_bn_swish" in diffusion_fast.env_info()["auto_rules"]


@pytest.mark.parametrize("shape, k, contiguous, needs_grad, expected", [
    ((32, 192, 64, 64), 5, True, False, ("cuda", "torch")),   # 25.2M elements: ours won forward on the H100
    ((32, 384, 32, 32), 5, True, False, ("torch",)),          # 12.6M: forward alone lost
    ((32, 384, 32, 32), 5, True, True, ("cuda", "torch")),    # ... forward+backward won
    ((32, 192, 32, 32), 3, True, True, ("torch",)),           # 6.3M: lost both
    ((32, 192, 64, 64), 7, True, True, ("torch",)),           # no tiled kernel for k 7
    ((32, 192, 64, 64), 5, False, True, ("torch",)),          # channels-last: untiled kernels
])
def test_auto_gpu_rule(shape, k, contiguous, needs_grad, expected):
    """The GPU auto rule by size, kernel size and layout (bench_nvae_cell, h100-2026-11-27c), on a stand-in x."""
    mod = importlib.import_module("diffusion_fast.ops.dwconv_bn_swish")
    x = types.SimpleNamespace(device=torch.device("cuda"), numel=lambda: math.prod(shape),
                              is_contiguous=lambda: contiguous)
    assert mod._auto_order(x, k, needs_grad) == expected
    assert mod._auto_order(torch.empty(shape[:2] + (1, 1)), k, needs_grad) is None  # CPU: the default order
