"""Smoke tests of every benchmark script, --quick, on the CPU (and of the attention winner table).

torch.compile is left out: its first CPU compile alone can take ~20 s on a small machine.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import harness  # noqa: E402
import torch  # noqa: E402


def run_quick(tmp_path: Path, name: str, providers: str = "eager,cpu", timeout: int = 120) -> dict:
    """Runs benchmarks/<name>.py --device cpu --quick --out tmp_path; returns the JSON it wrote."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # conftest sets it
    cmd = [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--device", "cpu", "--quick",
           "--providers", providers, "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((tmp_path / f"{name}.json").read_text())


def assert_timed(row: dict) -> None:
    """The row's timing quartiles are ordered and positive and it counts the bytes moved or the FLOPs."""
    assert 0 < row["p25_ms"] <= row["median_ms"] <= row["p75_ms"] and (row["bytes"] > 0 or row["tflops"] > 0)


def assert_cpu_ran_or_skipped(data: dict) -> list:
    """Our C++ backend either ran or is listed as skipped with a reason, never silently missing: its rows."""
    ours = [r for r in data["rows"] if r["provider"] == "cpu"]
    assert ours or any(s["provider"] == "cpu" and s["reason"] for s in data["skipped"])
    return ours


def test_group_norm_silu_bench_quick_cpu(tmp_path):
    data = run_quick(tmp_path, "bench_group_norm_silu")
    assert (tmp_path / "bench_group_norm_silu.md").read_text().startswith("# bench_group_norm_silu")
    assert data["env"]["copy_gbps"] > 0 and "backends" in data["env"]["env_info"]
    fields = {f.name for f in dataclasses.fields(harness.Row)}
    rows = data["rows"]
    assert rows
    for row in rows:
        assert set(row) == fields
        assert row["device"] == "cpu" and row["provider"] in ("eager", "cpu")
        assert_timed(row)
        assert row["gbps"] > 0 and row["ratio_to_eager"] > 0
        assert row["ratio_to_compile"] is None  # compile not run
        assert row["kernel_ms"] is None and row["kernel_ratio_to_eager"] is None  # GPU only
    eager = [(r["variant"], r["mode"]) for r in rows if r["provider"] == "eager"]
    assert {m for _, m in eager} == set(harness.MODES) and {v for v, _ in eager} >= {"plain", "temb", "scale_shift"}
    assert all(row["max_abs_diff"] < 1e-3 for row in assert_cpu_ran_or_skipped(data))


def test_ddpm_bench_quick_cpu(tmp_path):
    """The end-to-end bench runs the UNet forward and the sampling loop and reports images/s."""
    rows = run_quick(tmp_path, "bench_ddpm", timeout=300)["rows"]
    assert {(r["variant"], r["provider"]) for r in rows} == {
        (v, p) for v in ("tiny-forward", "tiny-sample") for p in ("eager", "cpu")}
    for row in rows:
        assert row["extra"]["images_per_s"] > 0 and row["extra"]["flops"] > 0
        assert row["max_abs_diff"] < 1e-3  # DDIM eta = 0: every provider computes the same samples
    assert "images/s" in (tmp_path / "bench_ddpm.md").read_text()


def test_clip_text_bench_quick_cpu(tmp_path):
    pytest.importorskip("open_clip")
    rows = run_quick(tmp_path, "bench_clip_text")["rows"]
    assert {(r["provider"], r["shape"][0]) for r in rows} == {(p, b) for p in ("eager", "cpu") for b in (1, 2)}
    for row in rows:
        assert row["variant"] == "tiny" and row["shape"][1] == 77 and row["extra"]["flops"] > 0
        assert_timed(row)
        assert row["max_abs_diff"] < 1e-4  # our encoder vs open_clip's on the same weights


def test_langevin_bench_quick_cpu(tmp_path):
    data = run_quick(tmp_path, "bench_langevin")
    rows = data["rows"]
    assert {r["variant"] for r in rows} == {"langevin", "langevin_table", "langevin_noise", "denoise", "anneal"}
    anneal = [r for r in rows if r["variant"] == "anneal"]
    assert {r["provider"] for r in anneal} == {"eager", "cpu"} and all(r["extra"]["model_forwards"] > 1 for r in anneal)
    assert all(r["provider"] in ("eager", "cpu") and r["median_ms"] > 0 and r["bytes"] > 0 for r in rows)
    for row in assert_cpu_ran_or_skipped(data):
        if row["variant"] in ("langevin_noise", "denoise"):  # like for like: the same values as eager
            assert row["max_abs_diff"] < 1e-5


def test_dpm2015_step_bench_quick_cpu(tmp_path):
    rows = run_quick(tmp_path, "bench_dpm2015_step")["rows"]
    assert {(r["variant"], r["provider"]) for r in rows} == {
        (v, p) for v in ("dpm2015", "dpm2015_table", "mean") for p in ("eager", "cpu")}
    for row in rows:
        assert_timed(row)
        if row["provider"] == "cpu" and row["variant"] == "mean":  # like for like: eager's values
            assert row["max_abs_diff"] < 1e-5


def test_sampler_step_bench_quick_cpu(tmp_path):
    data = run_quick(tmp_path, "bench_sampler_step")
    rows = data["rows"]
    assert {r["variant"] for r in rows} >= {"ddpm", "ddpm_noise", "ddim_eta0"}
    assert all(r["provider"] in ("eager", "cpu") and r["median_ms"] > 0 for r in rows)
    assert all(r["bytes"] == (3 + (r["variant"] == "ddpm_noise")) * 2 * 3 * 8 * 8 * 4 for r in rows)  # fp32 2x3x8x8
    for row in assert_cpu_ran_or_skipped(data):
        if row["variant"] in ("ddpm_noise", "ddim_eta0"):  # like for like: the same values as eager
            assert row["max_abs_diff"] < 1e-5


def test_attention_bench_quick_cpu(tmp_path):
    data = run_quick(tmp_path, "bench_attention", "eager,cpu,sdpa,sdpa_math", timeout=180)
    rows = data["rows"]
    assert {(r["variant"], r["mode"]) for r in rows} == {(v, m) for v in ("ddpm", "clip") for m in harness.MODES}
    for row in rows:
        assert row["tflops"] > 0 and row["max_abs_diff"] < 1e-3
    assert_cpu_ran_or_skipped(data)
    table = json.loads((tmp_path / "bench_attention_table.json").read_text())
    assert table["device"] == "cpu" and table["entries"] == []  # the table is of GPU providers


def test_attention_winner_table_feeds_auto(tmp_path, monkeypatch):
    """The table the bench writes is the one diffusion_fast.attention's auto backend reads."""
    import importlib

    import bench_attention

    op = importlib.import_module("diffusion_fast.ops.attention")

    def row(provider, shape, ms, causal=False, mode="fwd"):
        return dict(variant="ddpm", provider=provider, shape=list(shape), dtype="bf16", mode=mode, median_ms=ms,
                    extra={"causal": causal})

    rows = [row("triton", (1, 1, 256, 256, 256), 2.0), row("sdpa", (1, 1, 256, 256, 256), 3.0),  # 1.5x
            row("triton", (32, 1, 256, 256, 256), 2.0), row("sdpa", (32, 1, 256, 256, 256), 1.6),  # 0.8x
            row("cuda", (1, 1, 256, 256, 256), 2.5), row("cuda", (32, 1, 256, 256, 256), 1.7),  # 1.2x, 0.94x
            row("triton", (8, 8, 77, 77, 64), 1.0, True), row("sdpa", (8, 8, 77, 77, 64), 0.5, True),
            row("eager", (8, 8, 77, 77, 64), 9.0, True),
            row("cuda", (4, 1, 1024, 1024, 512), 1.0), row("triton", (4, 1, 1024, 1024, 512), 3.0),
            row("sdpa", (4, 1, 1024, 1024, 512), 2.0)]
    entries = bench_attention.winner_table(rows)
    by_key = {(e["head_dim"], e["seq"], e["causal"]): e for e in entries}
    # geometric means: triton sqrt(1.5 * 0.8) = 1.095, cuda sqrt(1.2 * 0.941) = 1.063
    assert by_key[(256, 256, False)]["backend"] == "triton"
    assert abs(by_key[(256, 256, False)]["speedup"] - (1.5 * 0.8) ** 0.5) < 1e-4
    assert abs(by_key[(256, 256, False)]["speedups"]["cuda"] - (1.2 * 1.6 / 1.7) ** 0.5) < 1e-4
    assert by_key[(64, 128, True)]["backend"] == "torch" and by_key[(64, 128, True)]["cases"] == 1
    assert by_key[(512, 1024, False)]["backend"] == "cuda" and by_key[(512, 1024, False)]["speedup"] == 2.0
    path = tmp_path / "table.json"
    path.write_text(json.dumps(dict(device_name="Some GPU", date="2026-01-01", entries=entries)))
    monkeypatch.setenv(op.TABLE_ENV, str(path))
    tables, errors = op._load_tables()
    assert not errors
    monkeypatch.setattr(op, "_TABLES", tables)
    assert op.auto_choice("Some GPU", op.table_key(256, 256, 256, False, torch.bfloat16, "fwd")) == "triton"
    assert op.auto_choice("Some GPU", op.table_key(64, 77, 77, True, torch.bfloat16, "fwd")) == "torch"
    assert op.auto_choice("Some GPU", op.table_key(512, 1024, 1024, False, torch.bfloat16, "fwd")) == "cuda"


def test_instance_norm_plus_bench_quick_cpu(tmp_path):
    rows = run_quick(tmp_path, "bench_instance_norm_plus")["rows"]
    assert {(r["variant"], r["mode"]) for r in rows if r["provider"] == "eager"} == {
        (v, m) for v in ("elu", "swish") for m in harness.MODES}
    assert all(r["max_abs_diff"] < 1e-3 and r["gbps"] > 0 for r in rows if r["provider"] == "cpu")


def test_nvae_cell_bench_quick_cpu(tmp_path):
    """The NVAE cell bench (dwconv 5x5 + BN + Swish), --quick on the CPU: every variant and mode, our C++ run."""
    rows = run_quick(tmp_path, "bench_nvae_cell")["rows"]
    seen = {(r["variant"], r["mode"], r["provider"]) for r in rows}
    variants = [p + v for p in ("", "cell_") for v in ("train", "eval", "train_cl", "eval_cl")]
    assert seen == {(v, m, p) for v in variants for m in harness.MODES for p in ("eager", "cpu")}
    for row in rows:
        assert_timed(row)
        if row["provider"] == "cpu":
            assert row["max_abs_diff"] < 1e-3
        if row["variant"].startswith("cell_"):  # the whole cell: FLOPs counted, no bytes
            assert row["gbps"] is None and row["tflops"] > 0


def test_nvae_cell_bench_plain_twin():
    """Eager's generative cell is the library's cell with plain layers in place of the fused modules:
    no fused module left, the same parameters in the same order, the same outputs as our cell."""
    import bench_nvae_cell as bench
    from diffusion_fast.models.nvae.cells import GenerativeResidualCell
    from diffusion_fast.nn import BNSwish, DWConvBNSwish

    torch.manual_seed(0)
    cell = GenerativeResidualCell(4, 4)
    twin = bench.plain_twin(cell)
    assert not any(isinstance(m, (BNSwish, DWConvBNSwish)) for m in twin.modules())
    assert [p.shape for p in twin.parameters()] == [p.shape for p in cell.parameters()]
    x = torch.randn(3, 4, 7, 7, dtype=torch.float64)
    cell, twin = cell.double(), twin.double()
    torch.testing.assert_close(twin(x), cell(x))  # training mode: batch statistics
    cell.eval(), twin.eval()
    torch.testing.assert_close(twin(x), cell(x))


def test_run_gpu_script_steps(tmp_path):
    """benchmarks/run_gpu.sh runs only the steps STEPS names, logs each, and reports a failing one
    (its build/test/bench steps need a GPU machine; env_info runs anywhere)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = str(ROOT / "benchmarks" / "run_gpu.sh")
    done = subprocess.run(["bash", script, str(tmp_path)], env={**env, "STEPS": "env_info", "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=120)
    summary = (tmp_path / "summary.txt").read_text()
    assert done.returncode == 0, summary + done.stderr[-2000:]
    assert "DONE  env_info rc=0" in summary and "failed: none" in summary
    assert not any(s in summary for s in ("RUN   build", "RUN   tests", "RUN   bench_"))
    assert '"backends"' in (tmp_path / "env_info.log").read_text()  # env_info()'s JSON
    failing = subprocess.run(["bash", script, str(tmp_path)], env={**env, "STEPS": "env_info", "PYTHON": "false"},
                             capture_output=True, text=True, timeout=120)
    assert failing.returncode != 0 and "failed: env_info" in (tmp_path / "summary.txt").read_text()
    # BENCHES picks benches in order, each with a share of the time in proportion to its weight
    picked = subprocess.run(["bash", script, str(tmp_path)], capture_output=True, text=True, timeout=120,
                            env={**env, "STEPS": "benches", "BENCHES": "ddpm:3 bench_langevin", "BUDGET_S": "400",
                                 "PYTHON": "true"})
    runs = [line for line in (tmp_path / "summary.txt").read_text().splitlines() if line.startswith("RUN")]
    assert picked.returncode == 0 and len(runs) == 2, runs
    assert "bench_ddpm (limit 300s)" in runs[0] and "benchmarks/bench_ddpm.py" in runs[0]
    assert "bench_langevin (limit " in runs[1]  # the time left: ddpm here returned at once


def test_interrupted_case_keeps_the_rows_timed_so_far(tmp_path):
    """A time limit's SIGINT (KeyboardInterrupt) during a slow provider still writes the rows of the
    providers timed before it, with compile timed last so that its compile cannot starve the others."""
    args = harness.parse_args("interrupt test", ["--device", "cpu", "--quick", "--providers", "eager,stop,compile",
                                                 "--out", str(tmp_path)])
    bench = harness.Harness("bench_interrupt", "interrupt", args)
    case = harness.Case("plain", (64,), torch.float32, "fwd", lambda rg: (torch.randn(64, requires_grad=rg),), 512)

    def stop(x):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        bench.run(case, torch.sin, torch.sin, lambda backend, x: None, others={"stop": stop})
    rows = json.loads((tmp_path / "bench_interrupt.json").read_text())["rows"]
    assert [r["provider"] for r in rows] == ["eager"]


def test_same_bytes_copy_rotates_no_more_than_twice_the_cache():
    """The copy baseline allocates sets x nbytes: a sampling bench (weights counted in nbytes, dozens
    of small input sets) once asked for 64 x 360 MB and was killed for memory."""
    llc = 32 << 20
    assert harness.copy_sets(360 << 20, 64, llc) == 1
    assert harness.copy_sets(8 << 20, 64, llc) == 8
    assert harness.copy_sets(1 << 10, 5, llc) == 5


def test_make_pool_shares_weights():
    """Pool sets copy the rotating inputs and share the kept ones (a model's weights), and only the rotating
    bytes decide how many sets fill 2x the cache."""
    x, w = torch.randn(1 << 10), torch.randn(1 << 20)
    pool = harness.make_pool((x, w), llc=1 << 16, keep=frozenset({1}))
    assert len(pool) == 32  # 2 x 64 KiB of 4 KiB x sets; w's 4 MiB not counted
    assert all(s[1] is w for s in pool) and all(s[0] is not x and torch.equal(s[0], x) for s in pool[1:])


@pytest.mark.cuda
def test_kernel_ms_counts_device_time_once():
    """kernel_ms sums each kernel's device time once: two copies of 64 MiB take about twice one,
    and both are within the range a GPU can copy at (not 0, not the launching CPU events again)."""
    dev = torch.device("cuda")
    src = torch.ones(16 << 20, device=dev)
    dst = torch.empty_like(src)
    one = harness.kernel_ms(lambda: dst.copy_(src), dev)
    two = harness.kernel_ms(lambda: (dst.copy_(src), dst.copy_(src)), dev)
    assert one is not None and 0.005 < one < 50
    assert 1.6 < two / one < 2.4


KEEP_FREED_MEMORY_PROBE = """
import resource, sys, torch
sys.path.insert(0, sys.argv[1])
import harness
print(harness.keep_freed_memory())
def step():  # an eager op's pattern: outputs and intermediates of a few MiB, freed out of order
    a = torch.empty(3 << 20, dtype=torch.uint8).fill_(1)
    b = torch.empty(3 << 20, dtype=torch.uint8).fill_(1)
    del a
    return b, torch.empty(6 << 20, dtype=torch.uint8).fill_(1)
for _ in range(3):  # the heap grows to the pattern's size
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_stops_page_faults_between_calls():
    # Without it this pattern page-faults ~3000 times in 10 calls here (glibc trims the freed 6 MiB).
    done = subprocess.run([sys.executable, "-c", KEEP_FREED_MEMORY_PROBE, str(ROOT / "benchmarks")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    setting, faults = done.stdout.split("\n")[-3:-1]
    assert setting.startswith("glibc heap kept") and int(faults) < 64, done.stdout


def test_ddpm_bench_gpu_sampling_providers_build_on_any_module():
    """bench_ddpm's GPU sampling providers are built (not run) for our model, and skipped for the compiled
    function (no module to copy into channels_last or to graph): the bug that stopped the H100 run of
    2026-11-27 (second run) at its first sampling case."""
    import bench_ddpm
    from diffusion_fast.models import DDPMUNet

    model = DDPMUNet.tiny()
    _, _, others = bench_ddpm.sampling_loops({}, model, model, 2, "cuda")
    assert {"cuda+graph", "cuda+cl+graph"} <= set(others)
    compiled = bench_ddpm.compiled_ours(model)
    _, ours, others = bench_ddpm.sampling_loops({}, model, compiled, 2, "cuda", graphs=False)
    assert callable(ours) and not others


def test_ddpm_bench_gpu_forward_providers_build_and_run_on_the_cpu():
    """bench_ddpm's GPU-only forward providers are built for any model; those that need no GPU run here and
    give the main provider's result (``ours+nchw`` is ours with the channels-last rule turned off)."""
    import bench_ddpm
    from diffusion_fast.models import DDPMUNet

    model = DDPMUNet.tiny().eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])

    def ours(x, t):
        with torch.no_grad():
            return model(x, t)

    others = bench_ddpm.gpu_forwards(model, model, ours, torch.float32)
    assert set(others) == {"eager+cl", "ours+cl", "ours+nchw", "cuda+graph"}
    fn, context = others["ours+nchw"]
    with context():
        torch.testing.assert_close(fn(x, t), ours(x, t))
    torch.testing.assert_close(others["ours+cl"](x, t), ours(x, t))


def test_attention_sweep_configs_compute_attention():
    """benchmarks/probes/attention_fwd_sweep.py launches the Triton forward with its own block sizes: q kept
    whole (chunk >= D) or in chunks, causal or not, every config it would time gives SDPA's result."""
    sys.path.insert(0, str(ROOT / "benchmarks" / "probes"))
    import attention_fwd_sweep as sweep

    for (b, h, s, d, causal) in [(2, 1, 40, 256, False), (1, 2, 21, 64, True)]:
        q, k, v = (torch.randn(b, h, s, d) for _ in range(3))
        ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal)
        cfgs = sweep.configs(d, quick=False)
        assert len({c["chunk"] for c in cfgs}) == (2 if d > 128 else 1)
        assert all(c["chunk"] >= d for c in cfgs if c["tma"]) and any(c["tma"] for c in cfgs)
        for cfg in cfgs[:: len(cfgs) // 5 | 1]:  # a few (an odd step: TMA and not alternate), both chunkings at d 256
            if cfg["tma"]:  # 16-bit only (fp16: the interpreter's bf16 arithmetic is wrong)
                out = sweep.run_config(q.half(), k.half(), v.half(), causal, cfg)
                torch.testing.assert_close(out.double(), ref, atol=2e-3, rtol=2e-3)
            else:
                out = sweep.run_config(q, k, v, causal, cfg)
                torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)


def test_cudnn_benchmark_option_is_set_and_recorded(tmp_path, monkeypatch):
    """--cudnn-benchmark turns cuDNN's algorithm search on for every provider and says so in the JSON and table."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # restored after the test
    args = harness.parse_args("cudnn test", ["--device", "cpu", "--quick", "--cudnn-benchmark", "--out", str(tmp_path)])
    assert torch.backends.cudnn.benchmark
    bench = harness.Harness("bench_cudnn", "cudnn", args)
    bench.finish()
    assert json.loads((tmp_path / "bench_cudnn.json").read_text())["env"]["cudnn_benchmark"] is True
    assert "cuDNN benchmark mode on" in (tmp_path / "bench_cudnn.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit; on a GPU the probes run for real")
@pytest.mark.parametrize("probe", sorted(p.name for p in (ROOT / "benchmarks" / "probes").glob("*.py")))
def test_probes_import_and_exit_cleanly_without_a_gpu(probe, tmp_path):
    """Each probe runs only on a lent GPU, where a broken import would waste the lease: here it must import
    everything it needs and exit 0, saying it has nothing to do."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "probes" / probe), "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "nothing" in done.stdout or "no CUDA" in done.stdout, done.stdout[-500:]


def test_kernel_breakdown_sorts_kernels_by_kind():
    """kernel_breakdown_probe's UNet tables sum kernels by kind from their names (cuDNN, cuBLAS, ours, ATen,
    inductor's Triton kernels)."""
    sys.path.insert(0, str(ROOT / "benchmarks" / "probes"))
    import kernel_breakdown_probe as probe

    kinds = {
        "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64": "convolution",
        "void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16>(...)": "copy",
        "ampere_bf16_s16816gemm_bf16_128x64_ldg8_f2f_stages_64x3_tn": "gemm",
        "void diffusion_fast::(anonymous namespace)::gns_fwd_cl_slab_kernel<c10::BFloat16, float, 8>(...)": "norm",
        "triton_red_fused_native_group_norm_silu_3": "norm",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>(...)":
            "elementwise",
        "triton_poi_fused_add_cat_0": "elementwise",
        "void at::native::(anonymous namespace)::CatArrayBatchedCopy<...>": "concatenation",
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<256, 64, 64, 4>>(...)": "attention",
        "something_else": "other",
    }
    assert {name: probe.kind_of(name) for name in kinds} == kinds
    rows = [(1.0, 2, "conv_a"), (0.5, 1, "conv_b"), (0.25, 3, "triton_poi_fused_add_0")]
    assert probe.by_kind(rows) == [(1.5, 3, "convolution"), (0.25, 3, "elementwise")]
