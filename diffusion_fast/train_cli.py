"""``diffusion-fast train``: a built-in config trained on a small data set by ``training.Trainer``
(DDPM: the paper's L_simple; NCSNv2: denoising score matching; dpm2015: ascent on the bound K of
Sohl-Dickstein et al. 2015), with checkpoints that resume, a progress bar, final samples (an image
grid; for the 2015 model a scatter plot, and K and K - L_null in bits on held-out points), and
DistributedDataParallel under torchrun: each rank draws its own minibatches and its own noise
(generators seeded from --seed, the rank and the step), gradients are averaged by DDP."""

from __future__ import annotations

from pathlib import Path

import torch

import diffusion_fast
from diffusion_fast import distributed, zoo
from diffusion_fast.cli import UsageError, _progress, command_line
from diffusion_fast.data import POINT_DATASETS, load_dataset
from diffusion_fast.diffusion.dpm2015 import null_log_likelihood, to_bits
from diffusion_fast.diffusion.schedules import DiffusionSchedule, linear_betas
from diffusion_fast.sample_cli import sample_images, sample_points
from diffusion_fast.score_matching import dsm_loss
from diffusion_fast.training import Trainer, batches

__all__ = ["cmd_train", "make_trainer", "stream_seed", "PAPER_2015"]

PAPER_2015 = {"K": 2.35, "K - L_null": 6.45}  # bits per point on the swiss roll: the paper's Table 1
HELD_OUT = 5000  # held-out points (the data set's loader with seed 1) that K is reported on
PLOTTED = 2000  # points in the final scatter plot


def stream_seed(seed: int, rank: int, step: int) -> int:
    """The seed of rank ``rank``'s noise and minibatch generators when training (re)starts at
    ``step``: distinct per rank (``distributed.rank_seed``) and moved on by the step, so that a
    resumed run does not replay the noise it began with."""
    return distributed.rank_seed(seed, rank) + 10_000 * step


def make_trainer(kind: str, net: torch.nn.Module, schedule: dict, generator: torch.Generator, *, lr: float,
                 warmup: int, ema: float) -> Trainer:
    """The Trainer of a model family; ``net`` is the model, maybe wrapped in DDP. Every loss draws
    its noise from ``generator`` (one per rank)."""
    common = dict(lr=lr, warmup=warmup, ema_decay=ema, random_flip=False, generator=generator)
    module = getattr(net, "module", net)
    if kind == "ncsnv2":  # denoising score matching, NCSNv2's recipe: no gradient clipping
        sigmas = module.sigmas
        return Trainer(net, None, grad_clip=None, loss=lambda m, x, g: dsm_loss(m, x, sigmas, generator=g), **common)
    if kind == "dpm2015":  # maximise K (Sec. 2.4): loss -K in nats per point, the module's forward
        return Trainer(net, None, grad_clip=None, loss=lambda m, x, g: -m(x, g).mean(), **common)
    return Trainer(net, DiffusionSchedule.from_betas(linear_betas(**schedule)), **common)


def _load_data(args, kind: str, config: dict, data_name: str) -> tuple:
    """(training tensor, the checkpoint's ``data`` dict): images (N, C, H, W) in [-1, 1], or
    points (N, D) standardised per coordinate (the statistics go into the dict)."""
    points = kind in zoo.POINT_KINDS
    if points and data_name not in POINT_DATASETS:
        raise UsageError(f"--model {args.model} models 2-D points: use --data {' or '.join(POINT_DATASETS)}, "
                         f"not {data_name!r}")
    if not points and data_name in POINT_DATASETS:
        raise UsageError(f"data set {data_name!r} holds 2-D points, not images: --model {args.model} is a {kind} "
                         f"image model (train points with --model dpm2015-swissroll)")
    if points:
        data = load_dataset(data_name)
        if data.dim() != 2 or data.shape[1] != config["dim"]:
            raise UsageError(f"data set {data_name!r} has points of shape {tuple(data.shape[1:])}, "
                             f"--model {args.model} needs ({config['dim']},)")
        mean, std = data.mean(0), data.std(0)
        return (data - mean) / std, dict(name=data_name, shape=[config["dim"]], mean=mean.tolist(), std=std.tolist())
    kwargs = {} if data_name == "digits" else dict(size=config.get("resolution", 8),
                                                   channels=config.get("in_channels", config.get("channels")))
    data = load_dataset(data_name, **kwargs)
    channels = config.get("in_channels", config.get("channels"))
    size = tuple(data.shape[2:]) if kind == "ncsnv2" else (config["resolution"],) * 2  # NCSNv2: any even H, W
    want = (channels, *size)
    if data.dim() != 4 or tuple(data.shape[1:]) != want:
        raise UsageError(f"data set {data_name!r} has items of shape {tuple(data.shape[1:])}, "
                         f"--model {args.model} needs {want}")
    return data, dict(name=data_name, shape=list(want))


def cmd_train(args) -> int:
    ctx = distributed.setup(args.device)
    torch.manual_seed(args.seed)  # same initial weights on every rank (DDP also broadcasts them)
    model, kind, config, data_name, schedule = zoo.new_model(args.model)
    for name, value in zoo.TRAIN_DEFAULTS[kind].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    data_name = args.data or data_name
    if data_name is None:
        raise UsageError(f"--model {args.model} has no default data set: pass --data")
    if not 0 <= args.ema < 1 or args.lr <= 0 or args.warmup < 0:
        raise UsageError("--ema must be in [0, 1), --lr > 0 and --warmup >= 0")
    data, data_info = _load_data(args, kind, config, data_name)
    if args.batch > data.shape[0]:
        raise UsageError(f"--batch {args.batch} exceeds the {data.shape[0]} examples of {data_name!r}")
    data = data.to(ctx.device)
    model = model.to(ctx.device)
    ddp = ctx.world_size > 1
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == "cuda"
                                                    else None) if ddp else model
    generator = torch.Generator(ctx.device)
    trainer = make_trainer(kind, net, schedule, generator, lr=args.lr, warmup=args.warmup, ema=args.ema)
    out = Path(args.out)
    if args.resume and out.is_file():
        ckpt = zoo.load_checkpoint(out)
        if "trainer" not in ckpt or ckpt["config"] != dict(model.config):
            raise UsageError(f"--resume: {out} has no trainer state for --model {args.model}")
        trainer.load_state_dict(ckpt["trainer"])
    seed = stream_seed(args.seed, ctx.rank, trainer.step_count)
    generator.manual_seed(seed)
    stream = batches(data, args.batch, generator=torch.Generator().manual_seed(seed))
    bar = _progress(args.steps, ctx.is_main and not args.no_progress, "train")
    if bar is not None:
        bar.update(min(trainer.step_count, args.steps))

    def save() -> None:
        if ctx.is_main:
            zoo.save_checkpoint(out, kind=kind, model=trainer.module, ema=trainer.ema.module, schedule=schedule,
                                data=data_info, command=command_line(args.argv), steps=trainer.step_count,
                                trainer=None if args.half else trainer.state_dict(), half=args.half)

    with diffusion_fast.use_backend(args.backend):
        while trainer.step_count < args.steps:
            stats = trainer.step(next(stream))
            if bar is not None:
                bar.update(1)
                if trainer.step_count % 50 == 0:
                    bar.set_postfix(loss=f"{stats['loss'].item():.4f}")
            if trainer.step_count % args.save_every == 0:
                save()
    if bar is not None:
        bar.close()
    save()
    if ctx.is_main:
        grid = args.grid or str(out.with_suffix(".png"))
        ckpt = dict(kind=kind, schedule=schedule, data=data_info)
        ema = trainer.ema.module.eval()
        with diffusion_fast.use_backend(args.backend):
            if kind in zoo.POINT_KINDS:
                _finish_points(ema, ckpt, data, grid, args.seed, ctx.device)
            else:
                from diffusion_fast.images import save_grid

                x = sample_images(ema, ckpt, 64, sampler=zoo.SAMPLERS[kind][-1], steps=100, eta=0.0, seed=args.seed,
                                  device=ctx.device, dtype=torch.float32, progress=False)
                save_grid(x, grid, scale=max(1, 64 // data_info["shape"][-1]))
        print(f"trained {trainer.step_count} steps; checkpoint {out}; samples {grid}")
    return 0


def _finish_points(process, ckpt: dict, data: torch.Tensor, path: str, seed: int, device: torch.device) -> None:
    """Print K and K - L_null in bits per point on held-out points (the paper's Table 1 measures)
    and write the scatter plot of data vs samples. ``data``: the standardised training points."""
    from diffusion_fast.images import save_scatter

    info = ckpt["data"]
    mean, std = torch.tensor(info["mean"], device=device), torch.tensor(info["std"], device=device)
    held_out = (load_dataset(info["name"], n=HELD_OUT, seed=1).to(device) - mean) / std
    k = to_bits(process.bound(held_out, samples=4, generator=torch.Generator(device).manual_seed(seed))).mean().item()
    l_null = to_bits(null_log_likelihood(held_out)).mean().item()
    print(f"K = {k:.2f} bits, K - L_null = {k - l_null:.2f} bits per point on {HELD_OUT} held-out points "
          f"(paper: {PAPER_2015['K']} / {PAPER_2015['K - L_null']}; L_null = {l_null:.2f})")
    samples = sample_points(process, ckpt, PLOTTED, seed=seed, device=device, dtype=torch.float32)
    save_scatter(samples, path, data=data[:PLOTTED] * std + mean, title="ancestral samples")
