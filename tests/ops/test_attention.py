"""attention: C++ (CPU; CUDA on a GPU), triton (interpreter on the CPU) and torch (SDPA) against the
float64 reference, fwd and bwd."""

import importlib
import json
import os

import pytest
import torch
from helpers import BACKEND_DEVICES, assert_close, dtypes_for, require_backend, run_backend, to_layout

import diffusion_fast
from diffusion_fast import backends
from diffusion_fast.ops.attention import _unsupported, attention, attention_ref, table_key

attention_module = importlib.import_module("diffusion_fast.ops.attention")  # the package binds the function


@pytest.fixture(autouse=True, scope="module")
def _small_ops_use_one_thread(one_thread):
    yield

BACKENDS = BACKEND_DEVICES

# (B, H, Sq, Sk, D, causal), named by intent; interpreter-sized (seq <= 77, batch <= 2)
CASES = {
    "CLIP text: 77 tokens, causal": (1, 2, 77, 77, 64, True),
    "odd seq 7, hd 32, causal": (2, 2, 7, 7, 32, True),
    "single token": (2, 2, 1, 1, 64, False),
    "hd 80, Sq < Sk": (2, 1, 13, 29, 80, False),
    "hd 80 causal, Sq > Sk": (1, 2, 33, 17, 80, True),
    "one query, 70 keys, hd 96, causal": (1, 1, 1, 70, 96, True),
    "DDPM 8x8, hd 256": (2, 1, 64, 64, 256, False),
    "hd 320, causal": (1, 1, 20, 20, 320, True),
    "hd 512": (1, 1, 40, 40, 512, False),
    "hd 512 causal, two query tiles": (1, 1, 70, 70, 512, True),
    "hd 512 causal, Sq < Sk": (1, 1, 9, 45, 512, True),
}
# GPU only: the shapes the op is for
GPU_CASES = {
    "DDPM CIFAR-10 16x16, hd 256": (8, 1, 256, 256, 256, False),
    "DDPM 32x32, hd 512": (2, 1, 1024, 1024, 512, False),
    "CLIP batch, causal": (16, 8, 77, 77, 64, True),
    "long causal Sq > Sk, hd 96": (2, 3, 300, 257, 96, True),
    "hd 320, Sq < Sk": (2, 2, 200, 333, 320, False),
}


def make_qkv(shape, dtype, device, layout="contiguous"):
    """Fresh random q, k, v; scores of O(1) spread so the softmax is neither flat nor one-hot."""
    b, h, sq, sk, d, _ = shape

    def rand(s):
        return to_layout(torch.randn(b, h, s, d, dtype=torch.float64).to(device=device, dtype=dtype), layout)

    return rand(sq), rand(sk), rand(sk)


def check_against_reference(backend, q, k, v, causal, dtype, scale=None):
    """out and dq, dk, dv from ``backend`` match the reference evaluated in float64."""
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    out = run_backend(backend, attention, q, k, v, causal=causal, scale=scale)
    assert out.dtype == q.dtype and out.shape == q.shape and out.device == q.device
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)

    def reference(dtype=None, upcast=True):
        ts = [t.detach().to(dtype or t.dtype).requires_grad_(True) for t in leaves]
        o = attention_ref(*ts, causal, scale, upcast=upcast)
        return (o,) + torch.autograd.grad(o, ts, grad_out.to(o.dtype))

    expected = reference(torch.float64)
    baseline = reference(upcast=False)  # PyTorch's own result in the tested dtype
    for name, got, exp, base, like in zip(("out", "grad_q", "grad_k", "grad_v"), (out,) + grads, expected,
                                          baseline, [q] + leaves):
        assert got.dtype == like.dtype and got.shape == like.shape, f"{name}: {got.dtype} {tuple(got.shape)}"
        assert_close(got, exp, dtype, f"{name} ({backend})", baseline=base)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(backend, device, case):
    shape = CASES[case]
    for dtype in dtypes_for(backend, device):
        q, k, v = make_qkv(shape, dtype, device)
        require_backend(backend, "attention", q, _unsupported)
        check_against_reference(backend, q, k, v, shape[-1], dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_matches_reference_gpu_shapes(backend, case):
    shape = GPU_CASES[case]
    for dtype in dtypes_for(backend, "cuda"):
        q, k, v = make_qkv(shape, dtype, "cuda")
        require_backend(backend, "attention", q, _unsupported)
        check_against_reference(backend, q, k, v, shape[-1], dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("layout", ["bshd", "strided", "packed qkv"])
def test_non_contiguous_inputs(backend, device, layout):
    """q, k, v as views: (B, S, H, D) transposed, every other element of D, slices of one qkv tensor."""
    b, h, s, d = 2, 3, 19, 40
    dtype = torch.float32
    if layout == "bshd":
        q, k, v = (torch.randn(b, s, h, d, device=device).transpose(1, 2) for _ in range(3))
    elif layout == "strided":
        q, k, v = make_qkv((b, h, s, s, d, False), dtype, device, "strided")
    else:
        qkv = torch.randn(b, s, 3, h, d, device=device)
        q, k, v = (qkv[:, :, i].transpose(1, 2).detach() for i in range(3))
    assert not any(t.is_contiguous() for t in (q, k, v))
    for causal in (False, True):
        check_against_reference(backend, q, k, v, causal, dtype)


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] != "torch"])
def test_no_grad_call_matches(backend, device):
    """Under no_grad or without inputs that need gradients (the C++ Autograd kernel then calls the op
    directly, without a graph node): the same values, and no graph."""
    q, k, v = make_qkv((2, 2, 9, 11, 32, True), torch.float32, device)
    graph = run_backend(backend, attention, *(t.clone().requires_grad_() for t in (q, k, v)), causal=True)
    with torch.no_grad():
        no_grad = run_backend(backend, attention, *(t.clone().requires_grad_() for t in (q, k, v)), causal=True)
    plain = run_backend(backend, attention, q, k, v, causal=True)
    assert graph.grad_fn is not None and no_grad.grad_fn is None and plain.grad_fn is None
    torch.testing.assert_close(no_grad, graph.detach(), rtol=0, atol=0)
    torch.testing.assert_close(plain, graph.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_explicit_scale(backend, device):
    q, k, v = make_qkv((1, 2, 9, 12, 48, False), torch.float32, device)
    check_against_reference(backend, q, k, v, True, torch.float32, scale=0.3)


@pytest.mark.parametrize("device", [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("shape,dtype", [
    ((2, 1, 45, 45, 32, True), torch.float16),  # one D chunk (tiles hoisted), causal
    ((1, 1, 37, 53, 80, True), torch.float32),  # 4 chunks of 32 over D_PAD 128, causal Sq < Sk
    ((1, 2, 53, 21, 80, False), torch.float16),  # 4 chunks, Sq > Sk
], ids=["hd32-causal", "hd80-causal-sq<sk", "hd80-sq>sk"])
def test_small_blocks_many_tiles(monkeypatch, device, shape, dtype):
    """Blocks of 16 and head-dim chunks of 32: every loop (query and key tiles, D chunks) runs
    several times, with the causal skip and ragged tails, at interpreter-sized shapes."""
    from diffusion_fast.kernels import attention as kernels

    small = {size: {p: (16, 16, 4, 1) for p in (32, 64, 128, 256, 512)} for size in (2, 4)}
    for table in ("_FWD", "_BWD_DKDV", "_BWD_DQ"):
        monkeypatch.setattr(kernels, table, small)
    monkeypatch.setattr(kernels, "_CHUNK", {2: 32, 4: 32})
    q, k, v = make_qkv(shape, dtype, device)
    require_backend("triton", "attention", q, _unsupported)
    check_against_reference("triton", q, k, v, shape[-1], dtype)


@pytest.mark.parametrize("device", [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("b,h,sq,sk,d,causal,layout", [
    (2, 3, 21, 21, 64, True, "packed qkv"),  # CLIP-like strided views, ragged tails, causal
    (1, 1, 40, 40, 256, False, "contiguous"),  # DDPM's head dim, q whole
    (1, 2, 9, 33, 128, True, "contiguous"),  # Sq < Sk, causal
], ids=["hd64-packed-causal", "hd256", "hd128-sq<sk-causal"])
def test_tma_forward_kernel(device, b, h, sq, sk, d, causal, layout):
    """The TMA-descriptor forward (kernels/attention.py, run where asked: the sweep probe) against the float64
    reference, blocks of 16 so that its loops run several times; and its refusals of what TMA cannot take."""
    import math

    from diffusion_fast.kernels import attention as kernels

    dtype = torch.float16 if device == "cpu" else torch.bfloat16  # the interpreter's bf16 arithmetic is wrong
    if layout == "packed qkv":
        q, k, v = torch.randn(b, sq, 3, h, d, device=device).to(dtype).permute(2, 0, 3, 1, 4)
    else:
        q = torch.randn(b, h, sq, d, device=device).to(dtype)
        k, v = (torch.randn(b, h, sk, d, device=device).to(dtype) for _ in range(2))
    require_backend("triton", "attention", q, _unsupported)
    blocks = dict(TMA=True, BLOCK_M=16, BLOCK_N=16, BLOCK_D=d, num_warps=4, num_stages=2)
    out, lse = kernels.attention_fwd(q, k, v, causal, 1 / math.sqrt(d), blocks=blocks)
    expected = attention_ref(q.double(), k.double(), v.double(), causal=causal)
    assert_close(out, expected, dtype, "out (TMA)")
    _, lse_ptr = kernels.attention_fwd(q, k, v, causal, 1 / math.sqrt(d))
    torch.testing.assert_close(lse, lse_ptr, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="16-bit inputs only"):
        kernels.attention_fwd(q.float(), k.float(), v.float(), causal, 0.1, blocks=blocks)
    with pytest.raises(ValueError, match="held whole"):
        kernels.attention_fwd(q, k, v, causal, 0.1, blocks=dict(blocks, BLOCK_D=16))
    shifted = torch.empty(q.numel() + 1, dtype=dtype, device=device)[1:].view(q.shape).copy_(q)  # base 2 B off
    with pytest.raises(ValueError, match="16-byte aligned"):
        kernels.attention_fwd(shifted, k, v, causal, 0.1, blocks=blocks)


@pytest.mark.parametrize("backend", ["cuda", "torch"])
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck(backend, causal):
    q, k, v = (torch.randn(1, 2, s, 6, dtype=torch.float64, requires_grad=True) for s in (5, 7, 7))
    require_backend(backend, "attention", q, _unsupported)

    def f(q, k, v):
        with diffusion_fast.use_backend(backend):
            return attention(q, k, v, causal=causal)

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-7)


def test_cpp_chunks_of_batch_heads():
    """Scores beyond the C++ workspace budget (64 MiB on the CPU) run in chunks of batch * heads:
    5 heads of 2048 x 2048 fp32 scores (16 MiB each) make chunks of 4 + 1 forward, 2 + 2 + 1 backward
    (2 and 5 batched matmuls per chunk), with the reference's values."""
    q, k, v = make_qkv((1, 5, 2048, 2048, 8, True), torch.float32, "cpu")
    require_backend("cuda", "attention", q, _unsupported)
    leaves = [t.requires_grad_() for t in (q, k, v)]

    def bmm_calls(fn):
        with torch.profiler.profile() as prof:
            fn()
        return sum(e.name == "aten::bmm" for e in prof.events())

    with diffusion_fast.use_backend("cuda"):
        out = None

        def forward():
            nonlocal out
            out = attention(*leaves, causal=True)

        assert bmm_calls(forward) == 2 * 2
        assert bmm_calls(lambda: out.backward(torch.randn_like(out))) == 3 * 5
    check_against_reference("cuda", q.detach(), k.detach(), v.detach(), True, torch.float32)


# ---------------------------------------------------------------------------
# torch.library integration
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] != "torch"])
def test_opcheck(backend, device):
    q, k, v = make_qkv((2, 2, 9, 11, 40, False), torch.float32, device)
    require_backend(backend, "attention", q, _unsupported)
    name = attention_module.OPS[backend]
    fwd = getattr(torch.ops.diffusion_fast, name + "_fwd").default
    for causal in (False, True):
        torch.library.opcheck(fwd, (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), causal, 0.2))
    out, lse = fwd(q.detach(), k.detach(), v.detach(), True, 0.2)
    grad_out = to_layout(torch.randn_like(out), "strided")
    bwd = getattr(torch.ops.diffusion_fast, name + "_bwd").default
    torch.library.opcheck(bwd, (grad_out, q.detach(), k.detach(), v.detach(), out, lse, True, 0.2))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_torch_compile_fullgraph(backend, device):
    """attention (fwd and bwd) inside a compiled function: one graph, same values as eager."""
    q, k, v = make_qkv((2, 2, 11, 11, 32, True), torch.float32, device)

    def f(q, k, v):
        return attention(q * 0.5, k, v, causal=True).square().sum()

    with diffusion_fast.use_backend(backend):
        require_backend(backend, "attention", q, _unsupported)
        leaves = [t.requires_grad_() for t in (q, k, v)]
        expected = f(*leaves)
        grads_expected = torch.autograd.grad(expected, leaves)
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
        actual = compiled(*leaves)
        grads = torch.autograd.grad(actual, leaves)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    for g, g_ref in zip(grads, grads_expected):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
def test_torch_compile_auto_gpu():
    """auto on a GPU reads the device's table (a compile-time constant) inside a fullgraph trace."""
    q, k, v = make_qkv((1, 1, 64, 64, 512, False), torch.bfloat16, "cuda")
    compiled = torch.compile(lambda q, k, v: attention(q, k, v), fullgraph=True)
    assert_close(compiled(q, k, v), attention_ref(q.double(), k.double(), v.double()), torch.bfloat16, "compiled")


# ---------------------------------------------------------------------------
# Backend choice: auto, forced backends, the benchmark table.
# ---------------------------------------------------------------------------
def _select(q, k, causal=False, mode="fwd"):
    auto = attention_module._auto_order(q, k, causal, mode)
    return backends.select("attention", q, _unsupported, auto=auto, implemented=attention_module.IMPLEMENTED)


def test_auto_is_the_cpp_op_on_cpu(monkeypatch):
    monkeypatch.setattr(backends, "_fallbacks", {})
    q, k, v = make_qkv((1, 1, 5, 5, 512, False), torch.float32, "cpu")
    require_backend("cuda", "attention", q, _unsupported)
    with backends.warnings.catch_warnings():
        backends.warnings.simplefilter("error")  # no fallback warning
        assert _select(q, k) == "cuda"
        torch.testing.assert_close(attention(q, k, v), attention_ref(q, k, v))
    assert backends.fallbacks() == []


def test_cuda_request_runs_the_cpp_op(monkeypatch):
    """use_backend("cuda") runs our C++ op (here its CPU kernels), without a fallback."""
    monkeypatch.setattr(backends, "_fallbacks", {})
    q, k, v = make_qkv((1, 1, 5, 5, 16, False), torch.float32, "cpu")
    require_backend("cuda", "attention", q, _unsupported)
    calls = []
    fwd_ops = importlib.import_module("diffusion_fast.ops.attention")._FWD  # backend -> op the wrapper calls
    real = fwd_ops["cuda"]
    assert real is torch.ops.diffusion_fast.attention_fwd.default  # the C++ op, not the Triton twin
    monkeypatch.setitem(fwd_ops, "cuda", lambda *a: calls.append(a) or real(*a))
    with diffusion_fast.use_backend("cuda"), backends.warnings.catch_warnings():
        backends.warnings.simplefilter("error")
        assert _select(q, k) == "cuda"
        out = attention(q, k, v)
    assert len(calls) == 1
    assert_close(out, attention_ref(q.double(), k.double(), v.double()), torch.float32, "cuda on the CPU")
    assert backends.fallbacks() == []


def test_cpp_op_rejects_bad_input():
    """The C++ op checks its arguments itself (it is reachable without the Python wrapper)."""
    q = torch.randn(1, 2, 5, 8)
    fwd = torch.ops.diffusion_fast.attention_fwd
    require_backend("cuda", "attention", q, _unsupported)
    with pytest.raises(RuntimeError, match="k must have shape"):
        fwd(q, torch.randn(1, 2, 5, 4), q, False, 1.0)
    with pytest.raises(RuntimeError, match="v must have k's sequence length"):
        fwd(q, q, q[:, :, :3], False, 1.0)
    with pytest.raises(RuntimeError, match="v must have q's dtype"):
        fwd(q, q, q.double(), False, 1.0)
    with pytest.raises(RuntimeError, match="must be float16, bfloat16, float32 or float64"):
        fwd(*(t.int() for t in (q, q, q)), False, 1.0)
    out, lse = fwd(q, q, q, False, 1.0)
    with pytest.raises(RuntimeError, match="lse must be"):
        torch.ops.diffusion_fast.attention_bwd(out, q, q, q, out, lse.double(), False, 1.0)


def test_triton_without_interpreter_falls_back(monkeypatch):
    monkeypatch.setattr(backends, "_fallbacks", {})
    monkeypatch.setattr(backends, "_INTERPRET", False)
    q, k, _ = make_qkv((1, 1, 5, 5, 16, False), torch.float32, "cpu")
    with diffusion_fast.use_backend("triton"), pytest.warns(RuntimeWarning, match="Triton needs a GPU"):
        assert _select(q, k) == "cuda"  # auto's order on the CPU


def test_table_key_buckets():
    assert table_key(80, 77, 77, True, torch.float16, "fwd") == (128, 128, True, "fp16", "fwd")
    assert table_key(512, 1024, 1024, False, torch.bfloat16, "fwd+bwd") == (512, 1024, False, "bf16", "fwd+bwd")
    assert table_key(8, 1, 3, False, torch.float32, "fwd") == (16, 64, False, "fp32", "fwd")
    assert table_key(256, 200, 4097, False, torch.float32, "fwd") == (256, 8192, False, "fp32", "fwd")


def test_table_drives_auto(monkeypatch, tmp_path):
    """A table (as bench_attention writes it) overrides the default rule for its keys only."""
    def table(date, backend):
        return dict(device_name="Test GPU", date=date, entries=[
            dict(head_dim=64, seq=128, causal=True, dtype="bf16", mode="fwd", backend=backend, speedup=1.3)])

    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(table("2026-01-01", "torch")))
    new.write_text(json.dumps(table("2026-02-01", "triton")))
    (tmp_path / "broken.json").write_text("{")
    paths = [old, new, tmp_path / "broken.json"]
    monkeypatch.setenv(attention_module.TABLE_ENV, os.pathsep.join(map(str, paths)))
    tables, errors = attention_module._load_tables()
    assert tables["Test GPU"]["path"] == str(new) and len(errors) == 1 and "broken.json" in errors[0]
    monkeypatch.setattr(attention_module, "_TABLES", tables)
    choice = attention_module.auto_choice
    assert choice("Test GPU", (64, 128, True, "bf16", "fwd")) == "triton"  # measured
    assert choice("Test GPU", (64, 128, True, "bf16", "fwd+bwd")) == "torch"  # not measured: default
    assert choice("Test GPU", (512, 1024, False, "bf16", "fwd")) == "cuda"  # default: D > 256
    assert choice("Other GPU", (64, 128, True, "bf16", "fwd")) == "torch"


def test_env_info_reports_the_rule():
    rule = diffusion_fast.env_info()["auto_rules"]["attention"]
    assert "head_dim > 256" in rule["rule"] and rule["source"]
    json.dumps(rule)


def test_ddpm_attention_block_uses_the_op():
    """The UNet's one attention call runs the op: the triton result matches SDPA's."""
    from diffusion_fast.models import attention as model_attention

    q, k, v = make_qkv((2, 1, 16, 16, 64, False), torch.float32, "cpu")
    require_backend("triton", "attention", q, _unsupported)
    with diffusion_fast.use_backend("triton"):
        got = model_attention(q, k, v)
    assert_close(got, attention_ref(q.double(), k.double(), v.double()), torch.float32, "models.attention")


# ---------------------------------------------------------------------------
# Bad input: a clear error that names the argument, on every backend.
# ---------------------------------------------------------------------------
BAD = [
    ("integer q", lambda q, k, v: dict(q=q.long()), TypeError, "q"),
    ("q not a tensor", lambda q, k, v: dict(q=q.tolist()), TypeError, "q"),
    ("3-D q", lambda q, k, v: dict(q=q[0]), ValueError, "q"),
    ("k of another dtype", lambda q, k, v: dict(k=k.half()), TypeError, "k"),
    ("v of another dtype", lambda q, k, v: dict(v=v.double()), TypeError, "v"),
    ("k head dim differs", lambda q, k, v: dict(k=k[..., :8]), ValueError, "k"),
    ("v batch differs", lambda q, k, v: dict(v=v[:1]), ValueError, "v"),
    ("v seq differs from k", lambda q, k, v: dict(v=v[:, :, :3]), ValueError, "v"),
    ("head dim > 512", lambda q, k, v: {n: torch.randn(2, 2, 5, 513) for n in "qkv"}, ValueError, "q"),
    ("no keys", lambda q, k, v: dict(k=k[:, :, :0], v=v[:, :, :0]), ValueError, "k"),
    ("causal not a bool", lambda q, k, v: dict(causal=1), TypeError, "causal"),
    ("scale a string", lambda q, k, v: dict(scale="0.1"), TypeError, "scale"),
    ("scale nan", lambda q, k, v: dict(scale=float("nan")), ValueError, "scale"),
    ("k on another device", lambda q, k, v: dict(k=k.to("meta")), ValueError, "k"),
]


@pytest.mark.parametrize("backend", ["torch", "cuda", "triton", "auto"])
@pytest.mark.parametrize("name,change,exc,arg", BAD, ids=[b[0] for b in BAD])
def test_bad_input(backend, name, change, exc, arg):
    q, k, v = (torch.randn(2, 2, 5, 16) for _ in range(3))
    call = dict(q=q, k=k, v=v)
    call.update(change(q, k, v))
    with diffusion_fast.use_backend(backend), pytest.raises(exc, match=arg):
        attention(**call)


@pytest.mark.cuda
def test_bad_input_device_mix():
    q = torch.randn(1, 1, 4, 16, device="cuda")
    with pytest.raises(ValueError, match="v"):
        attention(q, q, q.cpu())
