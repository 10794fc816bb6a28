"""group_norm_silu: every backend against the float64 reference, forward and backward."""

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import BACKEND_DEVICES, assert_close, dtypes_for, require_backend, run_backend, to_layout
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import diffusion_fast
from diffusion_fast.ops.group_norm_silu import _unsupported, group_norm_silu, group_norm_silu_ref, is_channels_last

# (shape, num_groups), named by intent.
CASES = {
    "odd spatial": ((2, 8, 5, 7), 4),
    "one group": ((2, 6, 4, 3), 1),
    "groups == channels": ((2, 6, 3, 5), 6),
    "batch 1, many elements per group": ((1, 16, 12, 12), 2),
    "1-D spatial": ((3, 8, 11), 2),
    "3-D spatial": ((2, 4, 3, 4, 5), 2),
    "no spatial dims": ((4, 6), 3),
    "minimal": ((1, 2, 1, 1), 1),
    "one-element groups": ((3, 6, 1), 6),  # xhat == 0 exactly: grads must not amplify rounding by 1/sqrt(eps)
}
EXTRAS = {
    "plain": dict(affine=False, pre_bias=False, scale_shift=False, silu=True),
    "affine": dict(affine=True, pre_bias=False, scale_shift=False, silu=True),
    "temb pre_bias": dict(affine=True, pre_bias=True, scale_shift=False, silu=True),
    "scale_shift": dict(affine=True, pre_bias=False, scale_shift=True, silu=True),
    "everything, no silu": dict(affine=True, pre_bias=True, scale_shift=True, silu=False),
}


def make_inputs(shape, dtype, device, layout, affine, pre_bias, scale_shift, param_dtype=None):
    """Fresh random inputs with a non-zero mean (|mean| > std stresses the statistics)."""
    n, c = shape[:2]
    pd = param_dtype or dtype

    def rand(*s, dt=dtype, mean=0.0, std=1.0):
        return (torch.randn(*s, dtype=torch.float64) * std + mean).to(device=device, dtype=dt)

    x = to_layout(rand(*shape, mean=3.0, std=2.0), layout)
    args = dict(
        weight=rand(c, dt=pd, mean=1.0) if affine else None,
        bias=rand(c, dt=pd) if affine else None,
        pre_bias=rand(n, c) if pre_bias else None,
        scale=rand(n, c, std=0.5) if scale_shift else None,
        shift=rand(n, c) if scale_shift else None,
    )
    return x, args


def check_against_reference(backend, x, num_groups, kw, silu, dtype):
    """y and every gradient from ``backend`` match the reference evaluated in float64."""
    leaves = [x] + [t for t in kw.values() if t is not None]
    for t in leaves:
        t.requires_grad_(True)
    y = run_backend(backend, group_norm_silu, x, num_groups, eps=1e-5, silu=silu, **kw)
    assert y.dtype == x.dtype and y.shape == x.shape
    if x.is_contiguous() or is_channels_last(x):
        assert y.stride() == x.stride(), "output must keep the input's memory layout"
    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, grad_y)

    def reference(dtype=None):
        ts = [t.detach().to(dtype or t.dtype).requires_grad_(True) for t in leaves]
        rest = iter(ts[1:])
        kw_ref = {k: (None if v is None else next(rest)) for k, v in kw.items()}
        out = group_norm_silu_ref(ts[0], num_groups, eps=1e-5, silu=silu, **kw_ref)
        return (out,) + torch.autograd.grad(out, ts, grad_y.to(out.dtype))

    expected = reference(torch.float64)
    baseline = reference()  # PyTorch's own result (fp32 math) in the tested dtypes
    names = ["y", "grad_x"] + ["grad_" + k for k, v in kw.items() if v is not None]
    for name, out, exp, base, like in zip(names, (y,) + grads, expected, baseline, [x] + leaves):
        assert out.dtype == like.dtype, f"{name} dtype {out.dtype} != {like.dtype}"
        assert_close(out, exp, dtype, name, baseline=base)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("extras", list(EXTRAS))
def test_matches_reference(backend, device, case, extras):
    shape, groups = CASES[case]
    e = EXTRAS[extras]
    for dtype in dtypes_for(backend, device):
        x, kw = make_inputs(shape, dtype, device, "contiguous", e["affine"], e["pre_bias"], e["scale_shift"])
        require_backend(backend, "group_norm_silu", x, _unsupported)
        check_against_reference(backend, x, groups, kw, e["silu"], dtype)


@pytest.mark.parametrize("backend,device", [p for p in BACKEND_DEVICES if p.values[0] == "triton"])
@pytest.mark.parametrize("schedule", ["split", "channel blocks"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", ["odd spatial", "batch 1, many elements per group", "3-D spatial"])
def test_triton_schedules(backend, device, schedule, layout, case, monkeypatch):
    """The Triton kernels' other schedules, which small tests otherwise never reach: each group split
    over S into several programs (a GPU's choice for few large groups), or one program per group
    walking several channel blocks (large groups: the backward then takes two launches)."""
    from diffusion_fast.kernels import group_norm_silu as kernels

    monkeypatch.setattr(kernels, "_TILE", 16 if schedule == "split" else 2)
    monkeypatch.setattr(kernels, "target_programs", lambda device: 64 if schedule == "split" else 1)
    shape, groups = CASES[case]
    x, kw = make_inputs(shape, torch.float32, device, layout, True, True, True)
    cfg = kernels._config(x, groups, layout == "channels_last")
    if schedule == "split":
        assert cfg["SPLIT"] > 1
    elif cfg["CPG"] <= cfg["BLOCK_C"]:
        pytest.skip("channels-last blocks hold 2 channels here: a group of 2 is one block")
    else:
        assert cfg["SPLIT"] == 1
    check_against_reference(backend, x, groups, kw, True, torch.float32)


@pytest.mark.parametrize("backend,device", [p for p in BACKEND_DEVICES if p.values[0] == "triton"])
@pytest.mark.parametrize("schedule", ["fused", "split"])
@pytest.mark.parametrize("shape,groups", [((2, 64, 5, 7), 16), ((1, 48, 9), 12), ((3, 6, 8, 5), 6)],
                         ids=["2 slabs of 8 groups", "groups of 4, 1-D", "slabs of 2 one-channel groups"])
def test_triton_channels_last_slabs(backend, device, schedule, shape, groups, monkeypatch):
    """The channels-last forward and backward over slabs of several groups per program (one split or
    several), checked to be the path taken."""
    from diffusion_fast.kernels import group_norm_silu as kernels

    if schedule == "split":
        monkeypatch.setattr(kernels, "_TILE", 16)
        monkeypatch.setattr(kernels, "target_programs", lambda device: 64)
    taken = {"fwd": [], "bwd": []}
    for pass_, name in (("fwd", "_slab_fwd"), ("bwd", "_slab_bwd")):
        def spy(*a, f=getattr(kernels, name), p=pass_):
            taken[p].append(a[-1])  # the slab config
            return f(*a)
        monkeypatch.setattr(kernels, name, spy)
    for dtype in dtypes_for(backend, device)[:2]:
        x, kw = make_inputs(shape, dtype, device, "channels_last", True, True, True)
        check_against_reference(backend, x, groups, kw, True, dtype)
    cfgs = taken["fwd"] + taken["bwd"]
    assert taken["fwd"] and taken["bwd"] and all(cfg["SC"] > cfg["CPG"] for cfg in cfgs)
    assert all((cfg["SPLIT"] > 1) == (schedule == "split") for cfg in cfgs)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
# "batch 1, many elements per group": 144 positions, in three chunks of partial sums (64, 64, 16) in the C++
# channels-last kernels, weighted by their counts when merged.
@pytest.mark.parametrize("case", ["odd spatial", "1-D spatial", "3-D spatial", "groups == channels",
                                  "batch 1, many elements per group"])
def test_layouts(backend, device, layout, case):
    shape, groups = CASES[case]
    for dtype in dtypes_for(backend, device)[:2]:
        x, kw = make_inputs(shape, dtype, device, layout, True, True, True)
        check_against_reference(backend, x, groups, kw, True, dtype)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_mixed_precision_params(backend, device):
    """fp16 activations with fp32 parameters (autocast-style): grads come back in fp32."""
    x, kw = make_inputs((2, 8, 6, 5), torch.float16, device, "contiguous", True, True, True,
                        param_dtype=torch.float32)
    check_against_reference(backend, x, 4, kw, True, torch.float16)


@contextlib.contextmanager
def num_threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# 6 groups: the C++ CPU kernel takes NCHW groups whole with one thread, splits them into units with two
# (fewer than 4 groups per thread).
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(2, 6, 3, 4), (2, 6, 4, 4)])  # rows of 12 and of 16 positions (bwd_row_sums)
def test_gradcheck_extension_cpu(threads, shape):
    x, kw = make_inputs(shape, torch.float64, "cpu", "contiguous", True, True, True)
    require_backend("cuda", "group_norm_silu", x, _unsupported)
    names = list(kw)

    def f(x, *ts):
        with diffusion_fast.use_backend("cuda"):
            return group_norm_silu(x, 3, silu=True, **dict(zip(names, ts)))

    inputs = [x.requires_grad_()] + [t.requires_grad_() for t in kw.values()]
    with num_threads(threads):
        assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend,device", [p for p in BACKEND_DEVICES if p.values[0] != "torch"])
def test_no_grad_call_matches(backend, device):
    """Under no_grad or without inputs that need gradients: the same values, and no graph."""
    x, kw = make_inputs((2, 8, 3, 3), torch.float32, device, "contiguous", True, True, True)
    y_graph = run_backend(backend, group_norm_silu, x.clone().requires_grad_(), 4, **kw)
    with torch.no_grad():
        y_no_grad = run_backend(backend, group_norm_silu, x.clone().requires_grad_(), 4, **kw)
    y_plain = run_backend(backend, group_norm_silu, x, 4, **kw)
    assert y_graph.grad_fn is not None and y_no_grad.grad_fn is None and y_plain.grad_fn is None
    torch.testing.assert_close(y_no_grad, y_graph.detach(), rtol=0, atol=0)
    torch.testing.assert_close(y_plain, y_graph.detach(), rtol=0, atol=0)


# The C++ CPU kernel's NCHW schedules (group_norm_silu_cpu.cpp), with 1 and 2 threads.
CPU_NCHW_CASES = {
    # whole groups (<= 4096 elements), 136 per block: 17 blocks, the last partial; 2 threads split mid-sample
    "whole groups, 3x5 maps, many blocks": ((71, 64, 3, 5), 32),
    "whole groups, 2x2 maps": ((5, 64, 2, 2), 4),
    # rows of a multiple of 8 positions: the backward sums 8 rows at once (bwd_row_sums), here over
    # blocks of 64 rows (S = 8), 60 rows (S = 16: 7 full octets and 4 rows) and 63 + 57 rows (S = 64)
    "whole groups, rows of 8 positions": ((4, 16, 2, 4), 4),
    "whole groups, 4x4 maps, 5 channels per group": ((3, 20, 4, 4), 4),
    "whole groups, 8x8 maps, 3 channels per group": ((5, 24, 8, 8), 8),
    # 24 positions: the forward's M2 about per-row means (pre_bias, group_m2) takes 16 in lanes, 8 in its tail
    "whole groups, 4x6 maps": ((6, 32, 4, 6), 8),
    "whole groups (forward; units backward), rows of >= 128 positions": ((4, 16, 12, 12), 8),
    "units: groups of 6400 elements": ((4, 8, 40, 40), 2),
}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", list(CPU_NCHW_CASES))
def test_extension_cpu_nchw_schedules(case, threads):
    shape, groups = CPU_NCHW_CASES[case]
    require_backend("cuda", "group_norm_silu", torch.empty(0), _unsupported)
    # (dtype, affine, pre_bias, scale_shift, silu): every extra and both activations across the dtypes
    for dtype, affine, pre_bias, scale_shift, silu in [
        (torch.float32, True, True, True, True),
        (torch.float16, True, True, False, True),
        (torch.bfloat16, True, False, True, False),
        (torch.float32, False, False, False, True),
    ]:
        x, kw = make_inputs(shape, dtype, "cpu", "contiguous", affine, pre_bias, scale_shift)
        with num_threads(threads):
            check_against_reference("cuda", x, groups, kw, silu, dtype)


def test_gradcheck_extension_channels_last():
    x, kw = make_inputs((2, 4, 3, 3), torch.float64, "cpu", "channels_last", True, False, False)
    require_backend("cuda", "group_norm_silu", x, _unsupported)

    def f(x, w, b):
        with diffusion_fast.use_backend("cuda"):
            return group_norm_silu(x, 2, w, b)

    assert torch.autograd.gradcheck(f, [x.requires_grad_(), kw["weight"].requires_grad_(),
                                        kw["bias"].requires_grad_()], eps=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------
# Property test: random shapes, groups, dtypes, layouts and extras; zero mismatches.
# ---------------------------------------------------------------------------
@st.composite
def random_case(draw):
    groups = draw(st.integers(1, 4))
    channels = groups * draw(st.integers(1, 4))
    spatial = draw(st.lists(st.integers(1, 6), min_size=0, max_size=3))
    shape = (draw(st.integers(1, 3)), channels, *spatial)
    # F.group_norm (the reference) refuses groups of a single element.
    assume(channels // groups * math.prod(spatial) > 1)
    layout = draw(st.sampled_from(["contiguous", "channels_last", "strided"] if spatial else ["contiguous"]))
    flags = draw(st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans()))
    return shape, groups, layout, flags


@pytest.mark.parametrize("backend,device,dtypes", [
    pytest.param("cuda", "cpu", [torch.float32, torch.float16, torch.bfloat16, torch.float64], id="ext-cpu"),
    pytest.param("triton", "cpu", [torch.float32, torch.float16], id="triton-interp",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter runs without a GPU")),
    pytest.param("cuda", "cuda", [torch.float32, torch.float16, torch.bfloat16], id="ext-cuda", marks=pytest.mark.cuda),
    pytest.param("triton", "cuda", [torch.float32, torch.float16, torch.bfloat16], id="triton-cuda",
                 marks=pytest.mark.cuda),
])
def test_property_random_shapes(backend, device, dtypes):
    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(case=random_case(), dtype=st.sampled_from(dtypes))
    def check(case, dtype):
        shape, groups, layout, (affine, pre_bias, scale_shift, silu) = case
        x, kw = make_inputs(shape, dtype, device, layout, affine, pre_bias, scale_shift)
        check_against_reference(backend, x, groups, kw, silu, dtype)

    check()


# ---------------------------------------------------------------------------
# torch.library integration
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", [p for p in BACKEND_DEVICES if p.values[0] != "torch"])
def test_opcheck(backend, device):
    from diffusion_fast.ops.group_norm_silu import OPS

    x, kw = make_inputs((2, 4, 3, 5), torch.float32, device, "contiguous", True, True, True)
    require_backend(backend, "group_norm_silu", x, _unsupported)
    fwd = getattr(torch.ops.diffusion_fast, OPS[backend] + "_fwd").default
    args = (x, kw["weight"], kw["bias"], kw["pre_bias"], kw["scale"], kw["shift"], 2, 1e-5, True)
    torch.library.opcheck(fwd, args)
    x_cl = to_layout(x, "channels_last")
    torch.library.opcheck(fwd, (x_cl, None, None, None, None, None, 4, 1e-6, False))
    # The backward op too: its fake kernel must give the real grads' shapes, dtypes and strides.
    bwd = getattr(torch.ops.diffusion_fast, OPS[backend] + "_bwd").default
    for xl, kwl in ((x, kw), (x_cl, dict.fromkeys(kw))):
        _, mean, rstd = fwd(xl, *kwl.values(), 2, 1e-5, True)
        torch.library.opcheck(bwd, (torch.randn_like(xl), xl, *kwl.values(), mean, rstd, 2, True))


@pytest.mark.parametrize("backend,device", [p for p in BACKEND_DEVICES if p.values[0] != "triton"])
def test_torch_compile_fullgraph(backend, device):
    """A res-block fragment compiles with fullgraph=True (no graph breaks) and matches eager."""
    norm = diffusion_fast.nn.FusedGroupNormSiLU(2, 8).to(device)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1).to(device)

    def block(x, temb):
        return conv(norm(x, pre_bias=temb)) + x

    x = torch.randn(2, 8, 6, 6, device=device)
    temb = torch.randn(2, 8, device=device)
    with diffusion_fast.use_backend(backend):
        expected = block(x, temb)
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
        actual = compiled(x, temb)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_torch_compile_inductor_cpu():
    """Inductor itself (not only aot_eager) compiles the op into a CPU graph, with backward."""
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    w, b = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)

    def f(x, w, b):
        return group_norm_silu(x, 4, w, b).square().sum()

    with diffusion_fast.use_backend("cuda"):
        require_backend("cuda", "group_norm_silu", x, _unsupported)
        loss = torch.compile(f, fullgraph=True)(x, w, b)
        grads = torch.autograd.grad(loss, (x, w, b))
    expected = group_norm_silu_ref(x, 4, w, b).square().sum()
    torch.testing.assert_close(loss, expected, atol=1e-4, rtol=1e-5)
    for g, g_ref in zip(grads, torch.autograd.grad(expected, (x, w, b))):
        torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------
# nn module
# ---------------------------------------------------------------------------
def test_module_loads_group_norm_checkpoint():
    ref = torch.nn.GroupNorm(4, 16)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    fused = diffusion_fast.nn.FusedGroupNormSiLU(4, 16)
    assert fused.load_state_dict(ref.state_dict()) is not None
    assert set(fused.state_dict()) == {"weight", "bias"}
    x = torch.randn(2, 16, 4, 4)
    torch.testing.assert_close(fused(x), F.silu(ref(x)), atol=1e-5, rtol=1e-5)
    assert "silu=True" in repr(fused) and "eps=1e-05" in repr(fused)
    shared = diffusion_fast.nn.FusedGroupNormSiLU.from_group_norm(ref, silu=False)
    assert shared.weight is ref.weight
    torch.testing.assert_close(shared(x), ref(x), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------
# The CUDA kernel's block size knob (DIFFUSION_FAST_GNS_VECS_PER_THREAD, read once per process).
# ---------------------------------------------------------------------------
_BLOCK_SIZE_CHECK = """
import torch, diffusion_fast
from diffusion_fast.ops.group_norm_silu import group_norm_silu_ref
for shape, layout, dtype in [((4, 64, 16, 16), torch.contiguous_format, torch.float32),
                             ((2, 96, 9, 7), torch.channels_last, torch.float16), ((8, 32, 33), None, torch.float32)]:
    x = (torch.randn(shape, device="cuda") + 1).to(dtype)
    x = x.to(memory_format=layout) if layout is not None else x
    x.requires_grad_()
    w, b = (torch.randn(shape[1], device="cuda", requires_grad=True) for _ in range(2))
    with diffusion_fast.use_backend("cuda"):
        y = diffusion_fast.group_norm_silu(x, 16, w, b)
    g = torch.randn_like(y)
    got = (y,) + torch.autograd.grad(y, (x, w, b), g)
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    ref = group_norm_silu_ref(leaves[0], 16, leaves[1], leaves[2])
    want = (ref,) + torch.autograd.grad(ref, leaves, g.double())
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    for a, e in zip(got, want):
        err = (a.double() - e).abs().max().item() / max(1.0, e.abs().max().item())
        assert err < tol, (shape, dtype, err)
print("ok")
"""


@pytest.mark.cuda
@pytest.mark.parametrize("vecs", ["1", "2", "32", "64"])
def test_cuda_block_size_knob(vecs):
    """Every value the sweep probe may set gives the right result (thread counts and reductions change)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "DIFFUSION_FAST_GNS_VECS_PER_THREAD": vecs}
    done = subprocess.run([sys.executable, "-c", _BLOCK_SIZE_CHECK], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


@pytest.mark.cuda
def test_cuda_channels_last_slabs_knob(monkeypatch):
    """The CUDA channels-last forward over slabs of groups (the default; read at each call) runs where a group
    is one 4-16 byte vector, and matches the float64 reference, fused and split; with
    DIFFUSION_FAST_GNS_CL_SLABS=0 the per-group kernel runs."""
    def run_profiled(fn) -> tuple:
        """(fn(), whether the slab kernel ran)."""
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            out = fn()
            torch.cuda.synchronize()
        return out, any("gns_fwd_slab_kernel" in e.name for e in prof.events())

    # (shape, groups): 4-channel groups (fp32: 16-byte vectors), one-channel groups over a large map (split
    # path), 8-channel groups (fp16/bf16: 16 bytes; fp32 falls back to the per-group kernel), 3-D x
    for shape, groups in [((2, 64, 5, 7), 16), ((1, 32, 64, 64), 32), ((4, 256, 8, 8), 32), ((3, 48, 9), 12)]:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            n, c = shape[:2]
            x = (torch.randn(shape, device="cuda") * 2 + 3).to(dtype)
            x = x.movedim(1, -1).contiguous().movedim(-1, 1)  # channels-last (also for 3-D x)
            w, b = torch.randn(c, device="cuda") + 1, torch.randn(c, device="cuda")
            pb, sc, sh = (torch.randn(n, c, device="cuda") * 0.5 for _ in range(3))

            def run():
                with diffusion_fast.use_backend("cuda"):
                    return diffusion_fast.group_norm_silu(x, groups, w, b, pre_bias=pb, scale=sc, shift=sh)

            monkeypatch.setenv("DIFFUSION_FAST_GNS_CL_SLABS", "0")
            assert not run_profiled(run)[1], (shape, dtype, "slab kernel ran with DIFFUSION_FAST_GNS_CL_SLABS=0")
            monkeypatch.delenv("DIFFUSION_FAST_GNS_CL_SLABS", raising=False)
            y, slab = run_profiled(run)
            assert slab == (c // groups * x.element_size() in (4, 8, 16)), (shape, dtype, "slab kernel ran", slab)
            assert y.stride() == x.stride()
            ref = group_norm_silu_ref(x.double(), groups, w.double(), b.double(), pre_bias=pb.double(),
                                      scale=sc.double(), shift=sh.double())
            tol = 1e-4 if dtype == torch.float32 else 3e-2
            err = (y.double() - ref).abs().max().item() / max(1.0, ref.abs().max().item())
            assert err < tol, (shape, dtype, err)


# ---------------------------------------------------------------------------
# Large tensors: offsets past 2**31 elements.
# ---------------------------------------------------------------------------
def _check_large(device, backend):
    length = 2**28 + 3
    x = torch.randn(2, 4, length, dtype=torch.float16, device=device)  # 2**31 + 24 elements
    with diffusion_fast.use_backend(backend):
        require_backend(backend, "group_norm_silu", x, _unsupported)
        y = group_norm_silu(x, 2)
    tail = slice(length - 4096, length)  # the very end of the last group
    # float64 statistics of the last group, in chunks (a float64 copy of it alone would be 4 GiB)
    total = total_sq = 0.0
    for chunk in x[1, 2:].reshape(-1).split(1 << 24):
        chunk = chunk.double()
        total, total_sq = total + chunk.sum().item(), total_sq + chunk.square().sum().item()
    n = 2 * length
    mean = total / n
    rstd = (total_sq / n - mean * mean + 1e-5) ** -0.5
    ref = torch.nn.functional.silu((x[1, 2:, tail].double() - mean) * rstd)
    assert_close(y[1, 2:, tail], ref, torch.float16, "y (last group)")


@pytest.mark.slow
def test_large_tensor_extension_cpu():
    _check_large("cpu", "cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_large_tensor_cuda(backend):
    _check_large("cuda", backend)


# ---------------------------------------------------------------------------
# Bad input: a clear error that names the argument, on every backend.
# ---------------------------------------------------------------------------
BAD = [
    ("integer x", lambda x: dict(x=x.long()), TypeError, "x"),
    ("1-D x", lambda x: dict(x=x[0, 0, 0]), ValueError, "x"),
    ("channels not divisible", lambda x: dict(num_groups=3), ValueError, "num_groups"),
    ("num_groups zero", lambda x: dict(num_groups=0), ValueError, "num_groups"),
    ("num_groups float", lambda x: dict(num_groups=2.0), TypeError, "num_groups"),
    ("weight wrong length", lambda x: dict(weight=torch.ones(5)), ValueError, "weight"),
    ("bias wrong dtype", lambda x: dict(bias=torch.ones(8, dtype=torch.int32)), TypeError, "bias"),
    ("eps zero", lambda x: dict(eps=0.0), ValueError, "eps"),
    ("eps negative", lambda x: dict(eps=-1e-5), ValueError, "eps"),
    ("eps nan", lambda x: dict(eps=float("nan")), ValueError, "eps"),
    ("eps inf", lambda x: dict(eps=float("inf")), ValueError, "eps"),
    ("pre_bias wrong shape", lambda x: dict(pre_bias=torch.ones(2, 4)), ValueError, "pre_bias"),
    ("scale wrong shape", lambda x: dict(scale=torch.ones(2, 8, 3)), ValueError, "scale"),
    ("shift not a tensor", lambda x: dict(shift=[1.0]), TypeError, "shift"),
    ("x not a tensor", lambda x: dict(x=x.tolist()), TypeError, "x"),
]


@pytest.mark.parametrize("backend", ["torch", "cuda", "triton"])
@pytest.mark.parametrize("name,change,exc,arg", BAD, ids=[b[0] for b in BAD])
def test_bad_input(backend, name, change, exc, arg):
    x = torch.randn(2, 8, 4, 4)
    call = dict(x=x, num_groups=4)
    call.update(change(x))
    with diffusion_fast.use_backend(backend), pytest.raises(exc, match=arg):
        group_norm_silu(call.pop("x"), call.pop("num_groups"), **call)


@pytest.mark.cuda
def test_bad_input_device_mix():
    x = torch.randn(2, 8, 4, 4, device="cuda")
    with pytest.raises(ValueError, match="weight"):
        group_norm_silu(x, 4, torch.ones(8))


def test_bad_input_device_mix_meta():
    """Device mix checked without a GPU: a meta-device weight beside a CPU x."""
    with pytest.raises(ValueError, match="weight"):
        group_norm_silu(torch.randn(2, 8, 4, 4), 4, torch.ones(8, device="meta"))
