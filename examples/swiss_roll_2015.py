"""Train the Gaussian diffusion model of Sohl-Dickstein et al. 2015 on the 2-D swiss roll and
report its bound K and K - L_null in bits beside the paper's Table 1 (K = 2.35, K - L_null = 6.45).

    python examples/swiss_roll_2015.py --out examples/results                        # paper's 16 units
    python examples/swiss_roll_2015.py --out examples/results --hidden 128 --steps 8000

On one CPU thread these gave K = -1.64 / 1.37 bits and K - L_null = 2.47 / 5.47 bits in
18 s / 67 s of training (paper: 2.35 and 6.45). The bound, L_null (log π(x^0), bits per 2-D point)
and the data scale (variance 1, Table 1) follow the paper: the gap is the fit of the 16-unit network.
K keeps rising with training at 16 units (1k / 4k / 16k / 30k steps: K = -2.64 / -1.64 / -1.05 /
-0.74 bits, 30k in 170 s), about 0.3 bits per doubling, while 128 units reach 1.37 in 8k steps.

Data: scikit-learn's ``make_swiss_roll`` (noise 0), its (x, z) coordinates, standardised to zero
mean and unit variance per coordinate with the training set's statistics (so that π = N(0, I)
matches the data's scale and L_null is the log-likelihood under it; the paper scales by one
constant, which here changes K by 0.001 bits). T = 40 Gaussian steps.
Writes ``swiss_roll_2015_h<hidden>.png``: data, model samples, and the reverse trajectory at three times.
"""

from __future__ import annotations

import time

import torch

from diffusion_fast.diffusion.dpm2015 import DiffusionProcess2015, null_log_likelihood, to_bits, train_dpm2015
from diffusion_fast.models.dpm2015 import RBFReverseNet

import _example  # examples/_example.py: command line and figure saving

PAPER = {"K": 2.35, "K - L_null": 6.45}  # bits, Table 1 of the paper


def swiss_roll(n: int, seed: int) -> torch.Tensor:
    from sklearn.datasets import make_swiss_roll

    x, _ = make_swiss_roll(n, noise=0.0, random_state=seed)
    return torch.tensor(x[:, [0, 2]], dtype=torch.float32)


def plot(data: torch.Tensor, trajectory, num_steps: int):
    shown = [("data", data), (f"x^{num_steps} (prior)", trajectory[0]),
             (f"x^{num_steps // 2}", trajectory[num_steps - num_steps // 2]), ("x^0 (samples)", trajectory[-1])]
    fig, axes = _example.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.2))
    for ax, (title, pts) in zip(axes, shown, strict=True):
        ax.scatter(pts[:, 0], pts[:, 1], s=1.5, alpha=0.5, color="C1" if title == "data" else "C0")
        ax.set(title=title, xlim=(-2.6, 2.6), ylim=(-2.6, 2.6), aspect="equal", xticks=[], yticks=[])
    return fig


def main() -> None:
    parser = _example.parser(__doc__)
    parser.add_argument("--steps", type=int, default=4000, help="optimizer steps")
    parser.add_argument("--hidden", type=int, default=16, help="RBF units (the paper: 16)")
    parser.add_argument("--num-steps", type=int, default=40, help="diffusion steps T (the paper: 40)")
    parser.add_argument("--step1-beta", type=float, default=1e-5, help="the fixed β_1")
    parser.add_argument("--lr", type=float, default=2e-2)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--n-train", type=int, default=20000)
    parser.add_argument("--n-test", type=int, default=5000)
    args = _example.parse(parser)

    train, test = swiss_roll(args.n_train, args.seed), swiss_roll(args.n_test, args.seed + 1)
    mean, std = train.mean(0), train.std(0)
    train, test = (train - mean) / std, (test - mean) / std

    net = RBFReverseNet(2, args.num_steps, args.hidden)
    process = DiffusionProcess2015(net, args.num_steps, step1_beta=args.step1_beta)
    start = time.perf_counter()
    history = train_dpm2015(process, train, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    seconds = time.perf_counter() - start

    k = to_bits(process.bound(test, samples=4, generator=torch.Generator().manual_seed(args.seed))).mean().item()
    l_null = to_bits(null_log_likelihood(test)).mean().item()
    train_k = to_bits(torch.tensor(history[-100:])).mean().item()
    print(f"trained {args.steps} steps in {seconds:.0f} s (train K over the last 100 steps {train_k:.2f} bits)")
    print(f"{'':14s}{'ours':>8s}{'paper':>8s}   (bits per point, {args.n_test} held-out points, T = {args.num_steps}, "
          f"{args.hidden} RBF units)")
    print(f"{'K':14s}{k:8.2f}{PAPER['K']:8.2f}")
    print(f"{'K - L_null':14s}{k - l_null:8.2f}{PAPER['K - L_null']:8.2f}   (L_null = {l_null:.2f})")

    trajectory = process.sample(2000, seed=args.seed, trajectory=True)
    _example.save(plot(test[:2000], trajectory, args.num_steps), args.out, f"swiss_roll_2015_h{args.hidden}.png")


if __name__ == "__main__":
    main()
