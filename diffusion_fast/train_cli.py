"""``diffusion-fast train``: the paper's DDPM recipe (``training.Trainer``) on a small data set,
with checkpoints that resume, a progress bar, a final sample grid, and DistributedDataParallel
under torchrun (each rank draws its own minibatches; gradients are averaged by DDP)."""

from __future__ import annotations

from pathlib import Path

import torch

import diffusion_fast
from diffusion_fast import distributed, zoo
from diffusion_fast.cli import UsageError, _progress, command_line, sample_images
from diffusion_fast.data import load_dataset
from diffusion_fast.diffusion.schedules import DiffusionSchedule, linear_betas
from diffusion_fast.score_matching import dsm_loss
from diffusion_fast.training import Trainer, batches

__all__ = ["cmd_train"]


def cmd_train(args) -> int:
    ctx = distributed.setup(args.device)
    torch.manual_seed(args.seed)  # same initial weights on every rank (DDP also broadcasts them)
    model, kind, config, data_name, schedule = zoo.new_model(args.model)
    data_name = args.data or data_name
    if data_name is None:
        raise UsageError(f"--model {args.model} has no default data set: pass --data")
    if not 0 <= args.ema < 1 or args.lr <= 0 or args.warmup < 0:
        raise UsageError("--ema must be in [0, 1), --lr > 0 and --warmup >= 0")
    kwargs = {} if data_name == "digits" else dict(size=config.get("resolution", 8),
                                                   channels=config.get("in_channels", config.get("channels")))
    data = load_dataset(data_name, **kwargs)
    channels = config.get("in_channels", config.get("channels"))
    size = tuple(data.shape[2:]) if kind == "ncsnv2" else (config["resolution"],) * 2  # NCSNv2: any even H, W
    want = (channels, *size)
    if data.dim() != 4 or tuple(data.shape[1:]) != want:
        raise UsageError(f"data set {data_name!r} has items of shape {tuple(data.shape[1:])}, "
                         f"--model {args.model} needs {want}")
    if args.batch > data.shape[0]:
        raise UsageError(f"--batch {args.batch} exceeds the {data.shape[0]} examples of {data_name!r}")
    data = data.to(ctx.device)
    model = model.to(ctx.device)
    ddp = ctx.world_size > 1
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == "cuda"
                                                    else None) if ddp else model
    generator = torch.Generator(ctx.device).manual_seed(distributed.rank_seed(args.seed, ctx.rank))
    if kind == "ncsnv2":  # denoising score matching, NCSNv2's recipe: no gradient clipping
        sigmas = model.sigmas
        trainer = Trainer(net, None, lr=args.lr, warmup=args.warmup, ema_decay=args.ema, random_flip=False,
                          grad_clip=None, loss=lambda m, x: dsm_loss(m, x, sigmas))
    else:
        trainer = Trainer(net, DiffusionSchedule.from_betas(linear_betas(**schedule)), lr=args.lr,
                          warmup=args.warmup, ema_decay=args.ema, random_flip=False, generator=generator)
    out = Path(args.out)
    if args.resume and out.is_file():
        ckpt = zoo.load_checkpoint(out)
        if "trainer" not in ckpt or ckpt["config"] != dict(model.config):
            raise UsageError(f"--resume: {out} has no trainer state for --model {args.model}")
        trainer.load_state_dict(ckpt["trainer"])
    data_gen = torch.Generator().manual_seed(distributed.rank_seed(args.seed, ctx.rank) + 10_000 * trainer.step_count)
    stream = batches(data, args.batch, generator=data_gen)
    bar = _progress(args.steps, ctx.is_main and not args.no_progress, "train")
    if bar is not None:
        bar.update(min(trainer.step_count, args.steps))

    def save() -> None:
        if ctx.is_main:
            zoo.save_checkpoint(out, kind=kind, model=trainer.module, ema=trainer.ema.module, schedule=schedule,
                                data=dict(name=data_name, shape=list(want)), command=command_line(args.argv),
                                steps=trainer.step_count, trainer=None if args.half else trainer.state_dict(),
                                half=args.half)

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
        from diffusion_fast.images import save_grid

        ckpt = dict(schedule=schedule, data=dict(shape=list(want)))
        with diffusion_fast.use_backend(args.backend):
            x = sample_images(trainer.ema.module.eval(), dict(ckpt, kind=kind), 64, sampler=zoo.SAMPLERS[kind][-1],
                              steps=100, eta=0.0,
                              seed=args.seed, device=ctx.device, dtype=torch.float32, progress=False)
        save_grid(x, grid, scale=max(1, 64 // want[-1]))
        print(f"trained {trainer.step_count} steps; checkpoint {out}; samples {grid}")
    return 0
