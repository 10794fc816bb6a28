"""Training as in Ho et al. 2020 (Sec. 4, Appendix B; official ``tpu_utils.run_training``), on any tensor dataset.

Recipe: Adam (β = 0.9/0.999, eps 1e-8) at lr 2e-4 for CIFAR-10 (2e-5 for the 256x256 runs),
linearly warmed up over the first 5000 steps; global gradient-norm clipping at 1.0; an
exponential moving average of the weights with decay 0.9999 (the EMA weights are the ones
evaluated); random horizontal flips; L_simple with t uniform (Algorithm 1).

    model = DDPMUNet.cifar10()
    trainer = Trainer(model, linear_schedule())
    for step in range(num_steps):
        stats = trainer.step(next(batches))        # batches: (B, C, H, W) floats in [-1, 1]
    ema_model = trainer.ema.module                 # evaluate / sample with this
"""

from __future__ import annotations

import copy
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from diffusion_fast.diffusion.ddpm import loss_simple
from diffusion_fast.diffusion.schedules import DiffusionSchedule

__all__ = ["PAPER_SETTINGS", "uint8_to_model_range", "random_hflip", "warmup_lr", "EMA", "Trainer", "batches"]

# Per-dataset settings of the official scripts (scripts/run_{cifar,celebahq,lsun}.py).
PAPER_SETTINGS = {
    "cifar10": dict(lr=2e-4, batch_size=128, warmup=5000, grad_clip=1.0, ema_decay=0.9999, random_flip=True),
    "celebahq256": dict(lr=2e-5, batch_size=64, warmup=5000, grad_clip=1.0, ema_decay=0.9999, random_flip=True),
    "lsun256": dict(lr=2e-5, batch_size=64, warmup=5000, grad_clip=1.0, ema_decay=0.9999, random_flip=True),
}


def uint8_to_model_range(x: Tensor) -> Tensor:
    """8-bit images (any int dtype, values 0..255) -> float32 in [-1, 1]: x / 127.5 - 1."""
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"uint8_to_model_range: x must be an integer tensor of 0..255 values, got {x.dtype}")
    return x.to(torch.float32) / 127.5 - 1.0


def random_hflip(x: Tensor, *, p: float = 0.5, generator: Optional[torch.Generator] = None) -> Tensor:
    """Flip each image of x: (B, C, H, W) left-right with probability p, independently."""
    if x.dim() != 4:
        raise ValueError(f"random_hflip: x must have shape (B, C, H, W), got {tuple(x.shape)}")
    device = generator.device if generator is not None else x.device
    flip = (torch.rand(x.shape[0], generator=generator, device=device) < p).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def warmup_lr(step: int, base_lr: float, warmup: int) -> float:
    """The learning rate for optimizer step ``step`` (0-based): base_lr * min(step / warmup, 1).

    As in the official ``get_warmed_up_lr``, the very first step has lr 0; warmup=0 disables warmup.
    """
    return base_lr if warmup == 0 else base_lr * min(step / warmup, 1.0)


class EMA:
    """Exponential moving average of a model's parameters: θ_ema <- d θ_ema + (1 - d) θ.

    ``module`` is a frozen copy of the model in eval mode holding the averages (buffers are
    copied as they are). The first ``update`` copies the weights, later ones use ``decay``
    (the official EMA uses decay 1e-10 until the first step, 0.9999 after).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA: decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_params = [p for p in self.module.parameters()]
        params = [p.detach() for p in model.parameters()]
        if len(ema_params) != len(params):
            raise ValueError("EMA.update: model does not have the parameters the EMA was built from")
        weight = 1.0 if self.num_updates == 0 else 1.0 - self.decay
        torch._foreach_lerp_(ema_params, params, weight)
        for ema_buf, buf in zip(self.module.buffers(), model.buffers()):
            ema_buf.copy_(buf)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.num_updates = state["decay"], state["num_updates"]
        self.module.load_state_dict(state["module"])


def batches(data: Tensor, batch_size: int, *, generator: Optional[torch.Generator] = None) -> Iterator[Tensor]:
    """Endless minibatches of ``data`` (N, ...): reshuffled every epoch, the last short batch dropped."""
    if batch_size < 1 or batch_size > data.shape[0]:
        raise ValueError(f"batches: batch_size must be in [1, {data.shape[0]}] for {data.shape[0]} examples, "
                         f"got {batch_size}")
    while True:
        order = torch.randperm(data.shape[0], generator=generator)
        for start in range(0, data.shape[0] - batch_size + 1, batch_size):
            yield data[order[start:start + batch_size].to(data.device)]


class Trainer:
    """One optimizer step of L_simple at a time, with the paper's Adam, warmup, clipping, EMA and flips.

    ``step(x0, t=None, noise=None)``: x0 (B, C, H, W) float in [-1, 1] on the model's device (t
    and noise drawn from the generator unless given); returns a dict with the mean ``loss`` and
    pre-clipping ``grad_norm`` (0-d tensors, not synchronised) and the ``lr`` used.
    ``state_dict``/``load_state_dict`` cover model, EMA, optimizer and step count.

    ``model`` may be wrapped in ``DistributedDataParallel``: gradients are then averaged over
    ranks before clipping, and the EMA and state dicts hold the unwrapped module.

    ``loss(model, x0, generator) -> 0-d tensor`` replaces L_simple (then ``schedule`` may be None),
    e.g. denoising score matching for a score model:
    ``lambda m, x, g: dsm_loss(m, x, sigmas, generator=g)``. It gets the Trainer's ``generator``
    and must draw its noise from it: under DDP each rank passes its own generator, so the ranks'
    noise differs (the global RNG is seeded alike on every rank).
    """

    def __init__(self, model: nn.Module, schedule: Optional[DiffusionSchedule], *, lr: float = 2e-4,
                 warmup: int = 5000, grad_clip: Optional[float] = 1.0, ema_decay: float = 0.9999,
                 random_flip: bool = True, generator: Optional[torch.Generator] = None,
                 loss: Optional[Callable[[nn.Module, Tensor, Optional[torch.Generator]], Tensor]] = None) -> None:
        if schedule is None and loss is None:
            raise ValueError("Trainer: give a schedule (for L_simple) or a loss function")
        if lr <= 0:
            raise ValueError(f"Trainer: lr must be > 0, got {lr}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"Trainer: warmup must be an int >= 0, got {warmup!r}")
        if grad_clip is not None and grad_clip <= 0:
            raise ValueError(f"Trainer: grad_clip must be None or > 0, got {grad_clip}")
        self.model, self.schedule = model, schedule
        self.lr, self.warmup, self.grad_clip, self.random_flip = lr, warmup, grad_clip, random_flip
        self.generator, self.loss = generator, loss
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
        self.ema = EMA(self.module, ema_decay)
        self.step_count = 0

    @property
    def module(self) -> nn.Module:
        """The model itself, unwrapped from DistributedDataParallel if it is wrapped."""
        return getattr(self.model, "module", self.model)

    def step(self, x0: Tensor, *, t: Optional[Tensor] = None, noise: Optional[Tensor] = None) -> dict:
        self.model.train()
        if self.random_flip:
            x0 = random_hflip(x0, generator=self.generator)
        if self.loss is not None:
            loss = self.loss(self.model, x0, self.generator)
        else:
            loss = loss_simple(self.model, self.schedule, x0, t=t, noise=noise, generator=self.generator).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.grad_clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        lr = warmup_lr(self.step_count, self.lr, self.warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.ema.update(self.module)
        self.step_count += 1
        return {"loss": loss.detach(), "grad_norm": grad_norm.detach(), "lr": lr}

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "step": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = state["step"]
