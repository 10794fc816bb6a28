"""Named model configs, checkpoints (save, load, resume) and the shipped demo model.

A checkpoint is one ``torch.save`` dict::

    format    "diffusion_fast.checkpoint/1"
    kind      "ddpm", "ncsnv2" or "dpm2015" (the model family: network class, loss and samplers)
    config    the network's constructor arguments (``model.config``)
    schedule  ddpm: {"num_timesteps", "beta_start", "beta_end"} (linear β schedule);
              ncsnv2: {"n_steps_each", "step_lr"} of annealed Langevin (σ's are in the config);
              dpm2015: {} (T and β_1 are in the config, β_2..T are learned: part of the weights)
    data      {"name", "shape": [C, H, W]}; dpm2015: {"name", "shape": [D], "mean", "std"}, the
              per-coordinate statistics that standardised the training points (the model's space)
    ema       the EMA weights: what sampling uses (stored in fp16 for the shipped model)
    trainer   optional ``Trainer.state_dict()`` (model, EMA, optimizer, step) for --resume
    command   the command line that produced it, and ``steps``

Built-in names (``MODELS``) are configs to train from scratch, plus ``digits``: the small DDPM
shipped in the package (``pretrained/digits_ddpm.pt``), trained by the command in its ``command``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from diffusion_fast.diffusion.dpm2015 import DiffusionProcess2015
from diffusion_fast.models.ddpm_unet import DDPMUNet
from diffusion_fast.models.dpm2015 import RBFReverseNet
from diffusion_fast.models.ncsnv2 import NCSNv2

__all__ = ["MODELS", "PRETRAINED", "FORMAT", "TRAIN_DEFAULTS", "build", "dpm2015_process", "save_checkpoint",
           "load_checkpoint", "load_model"]

FORMAT = "diffusion_fast.checkpoint/1"
PRETRAINED = {"digits": Path(__file__).parent / "pretrained" / "digits_ddpm.pt"}

# name -> (kind, network config, data set, schedule); every DDPM here uses the paper's schedule shape.
PAPER_SCHEDULE = dict(num_timesteps=1000, beta_start=1e-4, beta_end=0.02)
MODELS = {
    "ddpm-digits": ("ddpm", dict(in_channels=1, out_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                                 attn_resolutions=(4,), resolution=8, dropout=0.0), "digits", PAPER_SCHEDULE),
    "ddpm-tiny": ("ddpm", dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=16),
                  None, PAPER_SCHEDULE),
    "ddpm-cifar10": ("ddpm", dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                                  resolution=32, dropout=0.1), None, PAPER_SCHEDULE),
    # NCSNv2 on digits in [-1, 1]: σ_1 = 10 ≈ the largest pairwise distance (NCSNv2's Technique 1).
    "ncsnv2-digits": ("ncsnv2", dict(channels=1, ngf=16, num_classes=20, sigma_begin=10.0, sigma_end=0.01,
                                     dilations=(1, 2), rescaled=True), "digits", dict(n_steps_each=20, step_lr=5e-5)),
    # Sohl-Dickstein et al. 2015's swiss roll: T = 40 Gaussian steps, an RBF network of 16 units,
    # β_2..T learned over 10 temporal bumps; β_1 = 1e-5 as in examples/swiss_roll_2015.py.
    "dpm2015-swissroll": ("dpm2015", dict(dim=2, num_steps=40, n_hidden=16, step1_beta=1e-5, n_temporal_basis=10),
                          "swiss_roll", {}),
}
# Training defaults per kind (the train command's --batch, --lr, --warmup, --ema when not given).
# dpm2015: measured on the swiss roll (4000 steps): Adam at 2e-2 with EMA 0.99 beats 2e-4..1e-2.
TRAIN_DEFAULTS = {
    "ddpm": dict(batch=128, lr=2e-4, warmup=200, ema=0.999),
    "ncsnv2": dict(batch=128, lr=2e-4, warmup=200, ema=0.999),
    "dpm2015": dict(batch=500, lr=2e-2, warmup=0, ema=0.99),
}


def dpm2015_process(dim: int = 2, num_steps: int = 40, n_hidden: int = 16, step1_beta: float = 1e-5,
                    n_temporal_basis: int = 10) -> DiffusionProcess2015:
    """The 2015 model as one module: ``RBFReverseNet`` inside ``DiffusionProcess2015``, with
    ``config`` (these arguments) like the other networks."""
    net = RBFReverseNet(dim, num_steps, n_hidden)
    process = DiffusionProcess2015(net, num_steps, dim=dim, step1_beta=step1_beta, n_temporal_basis=n_temporal_basis)
    process.config = dict(dim=dim, num_steps=num_steps, n_hidden=n_hidden, step1_beta=step1_beta,
                          n_temporal_basis=n_temporal_basis)
    return process


NETWORKS = {"ddpm": DDPMUNet, "ncsnv2": NCSNv2, "dpm2015": dpm2015_process}
SAMPLERS = {"ddpm": ("ddpm", "ddim"), "ncsnv2": ("langevin",), "dpm2015": ("ancestral",)}
POINT_KINDS = ("dpm2015",)  # kinds that model points (N, D), not images


def build(kind: str, config: dict) -> nn.Module:
    """The network of ``kind`` built from ``config``."""
    if kind not in NETWORKS:
        raise ValueError(f"unknown model kind {kind!r}: expected one of {sorted(NETWORKS)}")
    return NETWORKS[kind](**config)


def save_checkpoint(path, *, kind: str, model: nn.Module, ema: nn.Module, schedule: dict, data: dict,
                    command: str, steps: int, trainer: dict | None = None, half: bool = False) -> None:
    """Write a checkpoint; ``half`` stores the EMA weights in fp16 (the shipped model)."""
    state = {k: (v.half() if half and v.is_floating_point() else v).cpu() for k, v in ema.state_dict().items()}
    ckpt = dict(format=FORMAT, kind=kind, config=dict(model.config), schedule=dict(schedule), data=dict(data),
                ema=state, command=command, steps=steps)
    if trainer is not None:
        ckpt["trainer"] = trainer
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)


def load_checkpoint(path) -> dict:
    """A checkpoint dict, checked; a clear ValueError for anything that is not one of ours."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors of all kinds: not a readable checkpoint
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ValueError(f"checkpoint {str(path)!r} cannot be read ({type(exc).__name__}: {first[:200]})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"checkpoint {str(path)!r} is not a diffusion_fast checkpoint (format {FORMAT})")
    missing = [k for k in ("kind", "config", "schedule", "data", "ema") if k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} lacks {missing}")
    return ckpt


def load_model(name_or_path: str) -> tuple:
    """(EMA network in eval mode, float32, on the CPU; its checkpoint dict) for a shipped name or a path."""
    path = PRETRAINED.get(name_or_path, name_or_path)
    if name_or_path in MODELS:
        raise ValueError(f"{name_or_path!r} is an untrained config: train it first "
                         f"(diffusion-fast train --model {name_or_path} ...) or sample from a checkpoint")
    if not Path(path).exists() and name_or_path not in PRETRAINED:
        raise ValueError(f"unknown model {name_or_path!r}: expected one of {sorted(PRETRAINED)} or a checkpoint path")
    ckpt = load_checkpoint(path)
    model = build(ckpt["kind"], ckpt["config"])
    state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["ema"].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"checkpoint {str(path)!r} does not fit its config: {str(exc).splitlines()[0]}") from exc
    return model.eval().requires_grad_(False), ckpt


def new_model(name: str) -> tuple:
    """(fresh network, kind, config, data set name, schedule) for a built-in config name."""
    if name not in MODELS:
        raise ValueError(f"unknown model config {name!r}: expected one of {sorted(MODELS)}")
    kind, config, data, schedule = MODELS[name]
    config = copy.deepcopy(config)
    return build(kind, config), kind, config, data, dict(schedule)
