"""DistributedDataParallel training: 2 gloo ranks on half batches == one process on the whole batch;
each rank draws its own noise (the train command's per-rank generators), for DDPM and NCSNv2."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from diffusion_fast.diffusion.schedules import DiffusionSchedule, linear_betas, linear_schedule
from diffusion_fast.models import DDPMUNet
from diffusion_fast.score_matching import dsm_loss
from diffusion_fast.train_cli import make_trainer, stream_seed
from diffusion_fast.training import Trainer
from diffusion_fast.zoo import PAPER_SCHEDULE

BATCH = 4


def make_model():
    torch.manual_seed(0)
    return DDPMUNet(in_channels=1, out_channels=1, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                    resolution=8, num_groups=8)


def make_batch():
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(BATCH, 1, 8, 8, generator=g) * 2 - 1
    t = torch.randint(0, 1000, (BATCH,), generator=g)
    noise = torch.randn(BATCH, 1, 8, 8, generator=g)
    return x0, t, noise


def two_steps(trainer, x0, t, noise):
    for _ in range(2):
        trainer.step(x0, t=t, noise=noise)


def worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    trainer = Trainer(model, linear_schedule(), lr=1e-3, warmup=0, random_flip=False)
    half = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    two_steps(trainer, *(v[half] for v in make_batch()))
    torch.save({"model": trainer.module.state_dict(), "ema": trainer.ema.module.state_dict()},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_ddp_step_equals_the_single_process_step_on_the_whole_batch(tmp_path, one_thread):
    mp.spawn(worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    trainer = Trainer(make_model(), linear_schedule(), lr=1e-3, warmup=0, random_flip=False)
    two_steps(trainer, *make_batch())
    expected = trainer.module.state_dict()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["model"].keys() == expected.keys()
        for name, want in (("model", expected), ("ema", trainer.ema.module.state_dict())):
            errors = {k: (got[name][k].double() - v.double()).abs().max().item() for k, v in want.items()}
            worst = max(errors, key=errors.get)
            assert errors[worst] < 1e-5, f"{name} {worst}: max error {errors[worst]:.2e}"
    moved = max((expected[k] - make_model().state_dict()[k]).abs().max().item() for k in expected)
    assert moved > 1e-4  # the step did change the weights


# ---------------------------------------------------------------------------- per-rank noise
SEED, SIGMAS, STEPS = 3, torch.tensor([1.0, 0.5, 0.25, 0.1]), 2


class TinyNet(torch.nn.Module):
    """A score / ε model (x, index) -> conv(x) * scale[index % 4] that records its inputs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
        self.scale = torch.nn.Parameter(torch.linspace(1.0, 2.0, 4))
        self.register_buffer("sigmas", SIGMAS.clone())
        self.seen = []

    def forward(self, x, index):
        self.seen.append((x.detach().clone(), index.clone()))
        return self.conv(x) * self.scale[index % 4][:, None, None, None]


def noise_worker(rank, world, init_file, out_dir):
    """What ``diffusion-fast train`` does per rank: same global seed, DDP, the rank's generator."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    x0 = make_batch()[0][rank * BATCH // world:(rank + 1) * BATCH // world]
    for kind, schedule in (("ncsnv2", {}), ("ddpm", PAPER_SCHEDULE)):
        torch.manual_seed(SEED)  # the global RNG is alike on every rank
        model = TinyNet()
        generator = torch.Generator().manual_seed(stream_seed(SEED, rank, 0))
        trainer = make_trainer(kind, torch.nn.parallel.DistributedDataParallel(model), schedule, generator,
                               lr=1e-2, warmup=0, ema=0.9)
        for _ in range(STEPS):
            trainer.step(x0)
        torch.save({"model": model.state_dict(), "ema": trainer.ema.module.state_dict(), "seen": model.seen},
                   os.path.join(out_dir, f"{kind}-rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def noise_runs(tmp_path_factory):
    """{(kind, rank): what rank saved} of a 2-rank run of ``noise_worker``."""
    out = tmp_path_factory.mktemp("ddp_noise")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        mp.spawn(noise_worker, args=(2, str(out / "rendezvous"), str(out)), nprocs=2, join=True)
    finally:
        torch.set_num_threads(threads)
    return {(kind, rank): torch.load(out / f"{kind}-rank{rank}.pt") for kind in ("ncsnv2", "ddpm") for rank in (0, 1)}


def rank_noise(kind, seen, rank):
    """The standard normal noise each step of ``rank`` added to its half batch, recovered from
    the noisy input the model saw: x~ = x + σ z (NCSNv2) or sqrt(ᾱ) x + sqrt(1 - ᾱ) z (DDPM)."""
    x0 = make_batch()[0][rank * BATCH // 2:(rank + 1) * BATCH // 2]
    if kind == "ncsnv2":
        return [(x - x0) / SIGMAS[i][:, None, None, None] for x, i in seen]
    schedule = DiffusionSchedule.from_betas(linear_betas(**PAPER_SCHEDULE))
    a, b = schedule.sqrt_alphas_cumprod.float(), schedule.sqrt_one_minus_alphas_cumprod.float()
    return [(x - a[t][:, None, None, None] * x0) / b[t][:, None, None, None] for x, t in seen]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
@pytest.mark.parametrize("kind", ["ncsnv2", "ddpm"])
def test_each_rank_draws_its_own_noise(noise_runs, kind):
    noise = [rank_noise(kind, noise_runs[kind, rank]["seen"], rank) for rank in (0, 1)]
    assert len(noise[0]) == len(noise[1]) == STEPS
    for step in range(STEPS):
        z0, z1 = noise[0][step], noise[1][step]
        assert 0.2 < z0.std() < 3 and 0.2 < z1.std() < 3  # really the noise: N(0, 1) draws
        assert (z0 - z1).abs().max() > 0.5, f"{kind} step {step}: the ranks drew the same noise"


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_ncsnv2_ddp_step_equals_the_single_process_step_with_the_ranks_noise(noise_runs, one_thread):
    """dsm_loss draws (labels, then noise) from the rank's generator; one process given the two
    ranks' draws on the whole batch takes the same optimizer steps."""
    draws = []
    generators = [torch.Generator().manual_seed(stream_seed(SEED, rank, 0)) for rank in (0, 1)]
    for _ in range(STEPS):
        per_rank = [(torch.randint(0, 4, (BATCH // 2,), generator=g), torch.randn(BATCH // 2, 1, 8, 8, generator=g))
                    for g in generators]
        draws.append(tuple(torch.cat(parts) for parts in zip(*per_rank, strict=True)))
    for rank in (0, 1):  # the ranks did draw exactly these
        for step, (x, labels) in enumerate(noise_runs["ncsnv2", rank]["seen"]):
            half = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
            assert torch.equal(labels, draws[step][0][half])
            assert torch.allclose(x, make_batch()[0][half] + SIGMAS[labels][:, None, None, None] * draws[step][1][half])
    given = iter(draws)

    def loss(m, x, generator):
        labels, noise = next(given)
        return dsm_loss(m, x, SIGMAS, labels, noise=noise)

    model = TinyNet()
    trainer = Trainer(model, None, lr=1e-2, warmup=0, grad_clip=None, ema_decay=0.9, random_flip=False, loss=loss)
    for _ in range(STEPS):
        trainer.step(make_batch()[0])
    for rank in (0, 1):
        for name, want in (("model", model.state_dict()), ("ema", trainer.ema.module.state_dict())):
            got = noise_runs["ncsnv2", rank][name]
            for k, v in want.items():
                assert torch.allclose(got[k], v, atol=1e-6, rtol=1e-5), f"rank {rank} {name} {k}"
    assert (model.conv.weight - TinyNet().conv.weight).abs().max() > 1e-3  # the steps moved the weights


@pytest.mark.parametrize("device,expected", [(None, "cuda:0"), ("cuda", "cuda:0"), ("cuda:1", "cuda:1")])
def test_setup_gives_set_device_an_indexed_device(monkeypatch, device, expected):
    """One process on a GPU machine: torch.cuda.set_device refuses a bare "cuda" (seen on an H100 with torch
    2.11: the train command failed there), so setup names the current device's index (CUDA stood in for here)."""
    from diffusion_fast import distributed

    chosen = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(d) if d.index is not None else
                        pytest.fail(f"set_device got {d}"))
    ctx = distributed.setup(device)
    assert chosen == [torch.device(expected)] and ctx.device == torch.device(expected) and ctx.world_size == 1
