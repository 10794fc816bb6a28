"""DistributedDataParallel training: 2 gloo ranks on half batches == one process on the whole batch."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from diffusion_fast.diffusion.schedules import linear_schedule
from diffusion_fast.models import DDPMUNet
from diffusion_fast.training import Trainer

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
