"""Benchmark the DDPM UNet end to end: one forward, and a whole DDIM sampling loop (images/s).

    python benchmarks/bench_ddpm.py --device cuda --compile-mode max-autotune --out DIR
    python benchmarks/bench_ddpm.py --device cpu --quick                 # smoke run

Providers, all on the same weights: the random init plus small noise on every parameter, so that
the zero-initialised output layers do not make every output ~0 and the max-abs-diff column
means something (speed does not depend on the values). Inputs handed over in fp32 (the harness's
reference run) are cast to the model's dtype.
    eager            DDPMUNet with the plain-PyTorch backend (F.group_norm, F.silu, SDPA) and,
                     for sampling, the eager step formula x' = sqrt(abar') x0 + sqrt(1-abar') eps
    compile          torch.compile of eager (the whole loop for sampling; --compile-mode)
    cpu/cuda/triton  DDPMUNet + fused steps on our backends (``sample_ddim`` for sampling)
    diffusers        diffusers' UNet2DModel (DDPM layout, weights converted), eager
    diffusers+patch  the same after ``diffusion_fast.patch`` (our kernels inside diffusers)
    diffusers+cl     (CPU) diffusers' model in channels_last memory, eager
    diffusers+cl+patch  (CPU) the same after ``diffusion_fast.patch``: on the CPU the patch's
                     convolutions need channels_last for oneDNN's packed path, so it is measured so
    cuda+graph       (GPU) ours replayed from a CUDA graph (sampling: ``cuda_graph=True``, one replay per step)
    cuda+cl+graph    (GPU, sampling) the same in channels_last, weights and x_T
    eager+cl/ours+cl (GPU, forward) eager and ours on channels_last inputs and weights (ours runs fp16/bf16
                     channels_last anyway: ``blocks.run_channels_last``)
    ours+nchw        (GPU, forward) ours kept in NCHW memory (DIFFUSION_FAST_CHANNELS_LAST=0)

Configs: ``cifar10`` (35.7M parameters, 32x32) on a GPU at batch 1 and 128 in fp32 and bf16;
``small`` (ch 64, ch_mult 1,2,2, 32x32) and ``tiny`` (16x16) on a CPU in fp32 and bf16 (oneDNN
runs bf16 convolutions on AMX / AVX512-BF16 where the CPU has them). Sampling runs
--sample-steps DDIM steps (eta = 0, so every provider computes the same samples); images/s is
``batch / median``, and a 1000-step DDPM run costs about 1000 / steps times as long.
FLOPs of one forward are counted from the convolutions, linears and attention matmuls
(2 per multiply-add) with forward hooks, so TFLOP/s = flops / median.
"""

from __future__ import annotations

import copy
import math

import harness  # first: puts the repo root on sys.path when diffusion_fast is not installed
import torch

import diffusion_fast
from diffusion_fast.backends import unsupported
from diffusion_fast.cuda_graphs import GraphedModel
from diffusion_fast.models import DDPMUNet
from diffusion_fast.samplers import sample_ddim

T = 1000
CONFIGS = {
    "cifar10": lambda: DDPMUNet.cifar10(dropout=0.0),
    "small": lambda: DDPMUNet(ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(16,), resolution=32),
    "tiny": lambda: DDPMUNet.tiny(),
}


def plan(device: str, quick: bool, dtypes, steps: int) -> list:
    """(config, task, batch, dtype): the most telling first (a --budget-s may cut the tail)."""
    fp32, bf16 = torch.float32, torch.bfloat16
    if quick:
        return [("tiny", task, 2, d) for task in ("forward", "sample") for d in dtypes or [fp32]]
    if device == "cpu":
        return [(c, task, b, d) for task in ("forward", "sample") for d in dtypes or [fp32, bf16]
                for c, b in (("tiny", 8), ("small", 1), ("small", 8))]
    return [("cifar10", task, b, d) for task in ("forward", "sample") for d in dtypes or [fp32, bf16]
            for b in (1, 128)]


def perturbed(model: DDPMUNet, scale: float = 0.02) -> DDPMUNet:
    """``model`` with N(0, scale^2) noise added to every parameter (seeded by the caller)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=scale)
    return model


def forward_flops(model: DDPMUNet, x: torch.Tensor, t: torch.Tensor) -> int:
    """2 x multiply-adds of the convolutions, linears and attention matmuls in one forward."""
    total = 0

    def conv_or_linear(module, inputs, output):
        nonlocal total
        weight = module.weight
        per_output = weight[0].numel()  # in_channels/groups x kernel area (conv) or in_features
        total += 2 * output.numel() * per_output

    hooks = [m.register_forward_hook(conv_or_linear) for m in model.modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model(x, t)
    for h in hooks:
        h.remove()
    res, ch = model.config["resolution"], model.config["ch"]
    for level, mult in enumerate(model.config["ch_mult"]):  # q k^T and (attn) v, per attention block
        r = res >> level
        if r in model.config["attn_resolutions"]:
            blocks = 2 * model.config["num_res_blocks"] + 1
            total += blocks * 2 * 2 * x.shape[0] * (r * r) ** 2 * ch * mult
    last = res >> (len(model.config["ch_mult"]) - 1)
    total += 2 * 2 * x.shape[0] * (last * last) ** 2 * ch * model.config["ch_mult"][-1]  # mid.attn_1
    return total


def diffusers_models(model: DDPMUNet) -> dict:
    """label -> diffusers UNet2DModel with the same weights: plain, and patched if we can; on the
    CPU both also channels_last (the layout our patched convolutions need for oneDNN's packed path,
    and a speed-up eager users can have by themselves, hence its own row)."""
    try:
        import diffusers
    except ImportError:
        return {}
    from diffusion_fast.models.convert import diffusers_config, to_diffusers_state_dict

    ref = diffusers.UNet2DModel(**diffusers_config(model))
    ref.load_state_dict(to_diffusers_state_dict(model))
    ref = ref.to(next(model.parameters())).eval()
    models = {"diffusers": ref}
    cpu = next(model.parameters()).device.type == "cpu"
    if cpu:
        models["diffusers+cl"] = copy.deepcopy(ref).to(memory_format=torch.channels_last)
    patch = getattr(diffusion_fast, "patch", None)
    if patch is not None:
        patched = copy.deepcopy(models["diffusers+cl"] if cpu else ref)
        patch(patched)
        models["diffusers+cl+patch" if cpu else "diffusers+patch"] = patched
    return models


def compiled_ours(model: DDPMUNet, mode=None):
    """``torch.compile`` over our model on the automatic backend: our ops stay opaque custom
    ops in the graph and Inductor fuses what lies between them."""
    torch._dynamo.reset()
    compiled = torch.compile(model, mode=mode, dynamic=False)
    return torch.no_grad()(lambda x, t: compiled(x, t))


def gpu_forwards(eager_model: DDPMUNet, ours_model: DDPMUNet, ours, dtype: torch.dtype) -> dict:
    """GPU-only forward providers: eager and ours on channels_last inputs (and weights), where
    cuDNN's bf16/fp16 convolutions need no NCHW <-> NHWC transposes (inductor picks that layout
    itself); ``ours`` (the main provider) kept in NCHW; ours replayed from a CUDA graph
    (``GraphedModel``: no host overhead per kernel)."""
    cl = torch.channels_last
    eager_cl = copy.deepcopy(eager_model).to(memory_format=cl)
    graphed = GraphedModel(ours_model)

    @torch.no_grad()
    def eager_channels_last(x, t):
        return eager_cl(x.to(dtype).contiguous(memory_format=cl), t)

    @torch.no_grad()
    def ours_channels_last(x, t):
        return ours_model(x.to(dtype).contiguous(memory_format=cl), t)

    @torch.no_grad()
    def ours_graphed(x, t):
        return graphed(x.to(dtype), t)

    def nchw():  # our model's forward kept in NCHW memory (the automatic rule runs 16-bit channels_last)
        return harness.env_var("DIFFUSION_FAST_CHANNELS_LAST", "0")

    return {"eager+cl": eager_channels_last, "ours+cl": ours_channels_last, "ours+nchw": (ours, nchw),
            "cuda+graph": ours_graphed}


def ddim_table(steps: int, device) -> tuple:
    abar = torch.cumprod(1.0 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0)
    timesteps = [i * (T // steps) for i in reversed(range(steps))]
    return abar, timesteps


def sampling_loops(models: dict, eager_model, ours_model, steps: int, device, graphs: bool = True) -> tuple:
    """(eager loop, ours loop, others' loops) over DDIM eta = 0 from a given x_T. ``graphs``: on a GPU, also
    ours replayed from CUDA graphs (``ours_model`` must then be a module, not a compiled function)."""
    abar, timesteps = ddim_table(steps, device)
    dtype = next(eager_model.parameters()).dtype
    pairs = [(float(abar[t]), float(abar[timesteps[i + 1]]) if i + 1 < steps else 1.0)
             for i, t in enumerate(timesteps)]

    def loop(denoise):
        def run(x):
            x = x.to(dtype)
            tb = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
            for t, (a, a_prev) in zip(timesteps, pairs):
                eps = denoise(x, tb.fill_(t)).to(x.dtype)
                x0 = ((x - math.sqrt(1 - a) * eps) / math.sqrt(a)).clamp(-1, 1)
                x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
            return x
        return torch.no_grad()(run)

    def ours(graph: bool, model=ours_model, memory_format=torch.contiguous_format):
        def run(x):
            x = x.to(dtype).contiguous(memory_format=memory_format)
            return sample_ddim(model, tuple(x.shape), alphas_cumprod=abar, timesteps=timesteps,
                               eta=0.0, device=x.device, dtype=x.dtype, x_init=x, cuda_graph=graph)
        return run

    others = {label: loop(lambda x, t, m=m: m(x, t).sample) for label, m in models.items()}
    if graphs and torch.device(device).type == "cuda":
        others["cuda+graph"] = ours(True)
        cl = torch.channels_last  # the steps keep x_T's layout: channels_last from end to end
        others["cuda+cl+graph"] = ours(True, copy.deepcopy(ours_model).to(memory_format=cl), cl)
    return loop(eager_model), ours(False), others


def main(argv=None) -> None:
    extra = harness.argparse.ArgumentParser(add_help=False)
    extra.add_argument("--sample-steps", type=int, default=None, help="DDIM steps per sampling run")
    known, rest = extra.parse_known_args(argv)
    args = harness.parse_args(__doc__.splitlines()[0], rest)
    steps = known.sample_steps or (4 if args.quick else 20)
    bench = harness.Harness("bench_ddpm", "DDPMUNet forward / DDIM sampling", args)
    device = bench.device
    for config, task, batch, dtype in plan(args.device, args.quick, args.dtypes, steps):
        print(f"{config} {task} B={batch} {dtype}", flush=True)
        torch.manual_seed(0)
        base = perturbed(CONFIGS[config]()).to(device=device, dtype=dtype).eval()
        eager_model = copy.deepcopy(base)
        eager_model.backend = "torch"
        res, cin = base.config["resolution"], base.config["in_channels"]
        shape = (batch, cin, res, res)
        t_probe = torch.full((batch,), T // 2, device=device)
        flops = forward_flops(base, torch.randn(shape, device=device, dtype=dtype), t_probe)
        params = sum(p.numel() for p in base.parameters())
        others_models = diffusers_models(base) if dtype != torch.float16 or device.type == "cuda" else {}
        size = torch.finfo(dtype).bits // 8
        if task == "forward":
            def make(requires_grad, shape=shape, batch=batch, dtype=dtype):
                return (torch.randn(shape, device=device, dtype=dtype), torch.randint(0, T, (batch,), device=device))

            def eager(x, t, m=eager_model, dtype=dtype):
                with torch.no_grad():
                    return m(x.to(dtype), t)

            def ours(x, t, m=base, dtype=dtype):
                with torch.no_grad():
                    return m(x.to(dtype), t)

            others = {label: (lambda x, t, m=m: torch.no_grad()(lambda: m(x, t).sample)())
                      for label, m in others_models.items()}
            others["ours+compile"] = compiled_ours(base, args.compile_mode)
            if device.type == "cuda":
                others.update(gpu_forwards(eager_model, base, ours, dtype))
            nbytes, work = params * size + 2 * math.prod(shape) * size, flops
        else:
            def make(requires_grad, shape=shape, dtype=dtype):
                return (torch.randn(shape, device=device, dtype=dtype),)

            eager, ours, others = sampling_loops(others_models, eager_model, base, steps, device)
            compiled = compiled_ours(base, args.compile_mode)
            others["ours+compile"] = sampling_loops({}, eager_model, compiled, steps, device, graphs=False)[1]
            nbytes, work = steps * (params * size + 2 * math.prod(shape) * size), steps * flops
        case = harness.Case(f"{config}-{task}", shape, dtype, "fwd", make, nbytes,
                            extra=dict(config=config, task=task, params=params, flops=work,
                                       steps=steps if task == "sample" else 1))
        bench.run(case, eager, ours, unsupported, others=others)
        add_throughput(bench)
    bench.finish()


def add_throughput(bench) -> None:
    """images/s and TFLOP/s of every row, in its ``extra`` and in a second table under the first."""
    lines = ["", "| config-task | batch | dtype | provider | images/s | TFLOP/s | x eager | x compile |",
             "|---|--:|---|---|--:|--:|--:|--:|"]
    for row in bench.rows:
        seconds = row.median_ms * 1e-3
        row.extra = dict(row.extra, images_per_s=row.shape[0] / seconds, tflops=row.extra["flops"] / seconds / 1e12)
        lines.append(f"| {row.variant} | {row.shape[0]} | {row.dtype} | {row.provider} "
                     f"| {row.extra['images_per_s']:.1f} | {row.extra['tflops']:.3f} "
                     f"| {harness._fmt(row.ratio_to_eager, '.2f')} | {harness._fmt(row.ratio_to_compile, '.2f')} |")
    bench.notes = lines


if __name__ == "__main__":
    main()
