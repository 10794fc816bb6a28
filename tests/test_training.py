"""Training utilities: warmup, EMA, flips, batching, and a tiny DDPM whose loss drops on the CPU."""

import copy
import math

import pytest
import torch

from diffusion_fast.diffusion import linear_schedule, loss_simple
from diffusion_fast.models import DDPMUNet
from diffusion_fast.training import EMA, PAPER_SETTINGS, Trainer, batches, random_hflip, uint8_to_model_range, warmup_lr


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one thread is fastest


def test_warmup_is_linear_from_zero():
    assert warmup_lr(0, 2e-4, 5000) == 0.0  # the official first step has lr 0
    assert warmup_lr(2500, 2e-4, 5000) == pytest.approx(1e-4)
    assert warmup_lr(5000, 2e-4, 5000) == warmup_lr(10 ** 6, 2e-4, 5000) == 2e-4
    assert warmup_lr(0, 2e-4, 0) == 2e-4
    assert PAPER_SETTINGS["cifar10"]["lr"] == 2e-4 and PAPER_SETTINGS["celebahq256"]["lr"] == 2e-5


def test_ema_copies_then_averages():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    assert torch.equal(ema.module.weight, model.weight)  # first update copies
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model)
    assert torch.allclose(ema.module.weight, torch.full((2, 3), 0.9 * 1.0 + 0.1 * 3.0))
    assert not ema.module.weight.requires_grad and not ema.module.training
    restored = EMA(torch.nn.Linear(3, 2))
    restored.load_state_dict(ema.state_dict())
    assert torch.equal(restored.module.weight, ema.module.weight) and restored.num_updates == 2
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.0)


def test_random_hflip_flips_whole_images():
    x = torch.arange(2 * 64 * 3 * 4, dtype=torch.float32).reshape(128, 3, 1, 4)
    y = random_hflip(x, generator=torch.Generator().manual_seed(0))
    flipped = (y == x.flip(-1)).flatten(1).all(1)
    assert ((y == x).flatten(1).all(1) | flipped).all()
    assert 40 < flipped.sum() < 88  # about half of 128
    with pytest.raises(ValueError, match="x must have shape"):
        random_hflip(x[0])


def test_uint8_to_model_range():
    x = torch.tensor([0, 255, 128], dtype=torch.uint8)
    assert torch.allclose(uint8_to_model_range(x), torch.tensor([-1.0, 1.0, 128 / 127.5 - 1]), atol=1e-6)
    with pytest.raises(TypeError, match="integer tensor"):
        uint8_to_model_range(x.float())


def test_batches_cover_each_epoch():
    data = torch.arange(10)
    stream = batches(data, 3, generator=torch.Generator().manual_seed(0))
    epoch = torch.cat([next(stream) for _ in range(3)])
    assert len(set(epoch.tolist())) == 9  # one epoch, the short last batch dropped
    with pytest.raises(ValueError, match="batch_size"):
        next(batches(data, 11))


def test_trainer_validates_arguments():
    model, schedule = DDPMUNet.tiny(resolution=8, attn_resolutions=(4,)), linear_schedule(10, 1e-3, 0.2)
    for kwargs, match in ((dict(lr=0), "lr"), (dict(warmup=-1), "warmup"), (dict(grad_clip=0), "grad_clip")):
        with pytest.raises(ValueError, match=match):
            Trainer(model, schedule, **kwargs)


def test_tiny_model_loss_drops_within_a_few_dozen_steps():
    """Smooth colour ramps; L_simple on fixed (t, ε) before vs after 40 steps of the paper's recipe."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 8), torch.linspace(-1, 1, 8), indexing="ij")
    angle, colour = torch.rand(32, generator=g) * 2 * math.pi, torch.rand(32, 3, generator=g) * 2 - 1
    ramp = torch.tanh(2 * (xx * angle.cos()[:, None, None] + yy * angle.sin()[:, None, None]))
    data = ramp[:, None] * colour[..., None, None]
    schedule = linear_schedule(100, 1e-3, 0.1)
    model = DDPMUNet.tiny(resolution=8, attn_resolutions=(4,), dropout=0.1)

    def held_out_loss():
        with torch.no_grad():
            return loss_simple(model.eval(), schedule, data, generator=torch.Generator().manual_seed(7)).mean().item()

    before = held_out_loss()
    trainer = Trainer(model, schedule, lr=1e-3, warmup=5, generator=torch.Generator().manual_seed(1))
    stream = batches(data, 8, generator=torch.Generator().manual_seed(2))
    stats = [trainer.step(next(stream)) for _ in range(40)]
    assert stats[0]["lr"] == 0.0 and stats[-1]["lr"] == 1e-3 and trainer.step_count == 40
    assert all(torch.isfinite(s["loss"]) and torch.isfinite(s["grad_norm"]) for s in stats)
    after = held_out_loss()
    assert after < 0.6 * before, (before, after)
    assert trainer.ema.num_updates == 40
    assert any(not torch.equal(a, b) for a, b in zip(trainer.ema.module.parameters(), model.parameters()))
    resumed = Trainer(DDPMUNet.tiny(resolution=8, attn_resolutions=(4,)), schedule)
    resumed.load_state_dict(trainer.state_dict())
    assert resumed.step_count == 40
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.parameters(), model.parameters()))


def test_a_custom_loss_draws_from_the_trainers_generator():
    """``loss(model, x0, generator)`` gets the Trainer's generator (one per rank under DDP)."""
    generator = torch.Generator().manual_seed(4)
    model = torch.nn.Linear(3, 3)
    got = []

    def loss(m, x, g):
        got.append(g)
        return (m(x + torch.randn(x.shape, generator=g)) ** 2).mean()

    trainer = Trainer(model, None, lr=1e-3, warmup=0, random_flip=False, generator=generator, loss=loss)
    x = torch.randn(5, 3)
    before = copy.deepcopy(model)
    first = trainer.step(x)["loss"]
    assert got == [generator]
    generator.manual_seed(4)
    assert torch.equal(first, loss(before, x, generator).detach())  # the same draw from the same seed
