"""Score matching and annealed Langevin dynamics on 2-D toy data (Song & Ermon 2019): a small
noise-conditional score network trained by denoising score matching on a Gaussian mixture and on
the swiss roll, sampled with ``annealed_langevin_dynamics`` (one fused ``langevin_step`` per update).

    python examples/score_toy_2d.py --out examples/results

Writes ``score_toy_2d.png``: per data set, the data, the annealed-Langevin samples, and the learned
score field s(x, σ) as arrows at a small and a middle noise level. Prints, for the mixture, the
fraction of samples per component against the true weights.

Network: an MLP on (x, log σ) whose output is divided by σ (NCSNv2's Technique 3, noise
conditioning by rescaling). Noise levels: geometric from σ_1 = the largest pairwise distance of the
data (Technique 1) to σ_L = 0.01; ε from Technique 4 (``step_size_for``).
"""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from diffusion_fast.data import gaussian_mixture, swiss_roll
from diffusion_fast.samplers import annealed_langevin_dynamics
from diffusion_fast.score_matching import dsm_loss, geometric_sigmas, sigma_max_from_data, step_size_for
from diffusion_fast.training import EMA, batches

import _example  # examples/_example.py: command line and figure saving


class ToyScoreNet(nn.Module):
    """s(x, i) = MLP([x, log σ_i]) / σ_i for 2-D points x: (B, 2), level indices i: (B,) int64."""

    def __init__(self, sigmas: Tensor, hidden: int = 128) -> None:
        super().__init__()
        self.register_buffer("sigmas", sigmas.float())
        self.net = nn.Sequential(nn.Linear(3, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2))

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        sigma = self.sigmas[labels].unsqueeze(1)
        return self.net(torch.cat([x, sigma.log()], dim=1)) / sigma


def train(data: Tensor, args, generator: torch.Generator) -> tuple:
    """(EMA score network, noise levels, ε) after args.steps Adam steps of DSM on ``data`` (N, 2)."""
    sigmas = geometric_sigmas(sigma_max_from_data(data), 0.01, args.levels)
    model = ToyScoreNet(sigmas)
    ema = EMA(model, decay=0.999)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    for step, x in zip(range(args.steps), batches(data, args.batch_size, generator=generator), strict=False):
        labels = torch.randint(0, args.levels, (x.shape[0],), generator=generator)
        loss = dsm_loss(model, x, sigmas, labels, noise=torch.randn(x.shape, generator=generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(model)
        if (step + 1) % max(args.steps // 5, 1) == 0:
            print(f"  step {step + 1:5d}  DSM loss {loss.item():.3f}")
    gamma = float(sigmas[0] / sigmas[1])
    return ema.module.eval(), sigmas, step_size_for(0.01, gamma, args.n_steps_each)


def mixture_fractions(samples: Tensor, means: Tensor) -> Tensor:
    """Fraction of samples nearest to each mixture mean."""
    nearest = torch.cdist(samples, means).argmin(dim=1)
    return torch.bincount(nearest, minlength=means.shape[0]).float() / samples.shape[0]


def plot(panels: list):
    fig, axes = _example.subplots(len(panels), 4, figsize=(13, 3.3 * len(panels)), squeeze=False)
    for row, (name, data, samples, model, sigmas) in zip(axes, panels):
        lo, hi = data.min(0).values - 0.5, data.max(0).values + 0.5
        row[0].scatter(*data[:2000].T, s=1, c="tab:blue")
        row[0].set_title(f"{name}: data")
        row[1].scatter(*samples.T, s=1, c="tab:red")
        row[1].set_title(f"annealed Langevin samples ({samples.shape[0]})")
        gx, gy = torch.meshgrid(torch.linspace(lo[0], hi[0], 21), torch.linspace(lo[1], hi[1], 21), indexing="xy")
        grid = torch.stack([gx.flatten(), gy.flatten()], 1)
        for ax, level in ((row[2], len(sigmas) - 1), (row[3], len(sigmas) // 2)):
            with torch.no_grad():
                score = model(grid, torch.full((grid.shape[0],), level))
            score = score / score.norm(dim=1, keepdim=True).clamp_min(1e-12)  # directions; length: see title
            ax.scatter(*data[:2000].T, s=1, c="lightgrey")
            ax.quiver(grid[:, 0], grid[:, 1], score[:, 0], score[:, 1], angles="xy", width=0.004, color="black")
            ax.set_title(f"learned score, σ = {float(sigmas[level]):.3g} (unit arrows)")
        for ax in row:
            ax.set(xlim=(lo[0], hi[0]), ylim=(lo[1], hi[1]), aspect="equal")
    return fig


def main() -> None:
    parser = _example.parser(__doc__)
    parser.add_argument("--steps", type=int, default=6000, help="optimizer steps per data set")
    parser.add_argument("--levels", type=int, default=20, help="number of noise levels L")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--n-steps-each", type=int, default=100, help="Langevin steps per noise level")
    parser.add_argument("--n-samples", type=int, default=2000)
    args = _example.parse(parser)

    means = torch.tensor([[-2.0, -2.0], [2.0, 2.0], [2.0, -2.0]])
    weights = torch.tensor([0.2, 0.5, 0.3])
    sets = {"Gaussian mixture": gaussian_mixture(10000, means=means, weights=weights, std=0.3, seed=args.seed),
            "swiss roll": swiss_roll(10000, noise=0.5, seed=args.seed) * 2.0}
    panels = []
    for name, data in sets.items():
        print(f"{name}: training")
        generator = torch.Generator().manual_seed(args.seed)
        start = time.perf_counter()
        model, sigmas, eps = train(data, args, generator)
        x_init = (torch.rand(args.n_samples, 2, generator=generator) * 2 - 1) * data.abs().max()
        samples = annealed_langevin_dynamics(model, x_init, sigmas, n_steps_each=args.n_steps_each, step_lr=eps,
                                             seed=args.seed)
        print(f"  {time.perf_counter() - start:.0f} s; L = {args.levels}, σ_1 = {float(sigmas[0]):.2f}, ε = {eps:.2e}")
        if name == "Gaussian mixture":
            fractions = mixture_fractions(samples, means)
            print("  samples per component", [round(f, 3) for f in fractions.tolist()],
                  "true weights", weights.tolist())
        panels.append((name, data, samples, model, sigmas))
    _example.save(plot(panels), args.out, "score_toy_2d.png")


if __name__ == "__main__":
    main()
