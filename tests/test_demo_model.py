"""The shipped digits DDPM makes recognisable digits: judged by a classifier trained here on the
real 8x8 digits, against the same judgement of noise and of the untrained network."""

import numpy as np
import pytest
import torch

from diffusion_fast import zoo
from diffusion_fast.sample_cli import sample_images

sklearn = pytest.importorskip("sklearn")
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402

N = 200


@pytest.fixture(scope="module")
def judge():
    """images in [-1, 1] -> (mean top-class probability, total variation of the class histogram from uniform)."""
    digits = load_digits()
    clf = LogisticRegression(max_iter=3000).fit(digits.data / 16.0, digits.target)

    def score(x: torch.Tensor) -> tuple:
        features = ((x.clamp(-1, 1) + 1) / 2).reshape(x.shape[0], -1).double().numpy()
        probs = clf.predict_proba(features)
        hist = np.bincount(probs.argmax(1), minlength=10) / len(probs)
        return probs.max(1).mean(), 0.5 * np.abs(hist - 0.1).sum()

    return score


def draw(model, ckpt) -> torch.Tensor:
    return sample_images(model, ckpt, N, sampler="ddim", steps=50, eta=0.0, seed=0, device=torch.device("cpu"),
                         dtype=torch.float32, progress=False)


def test_shipped_model_is_listed_and_small():
    path = zoo.PRETRAINED["digits"]
    assert path.is_file() and path.stat().st_size < 4 << 20
    ckpt = zoo.load_checkpoint(path)
    assert ckpt["command"].startswith("diffusion-fast train") and ckpt["data"]["shape"] == [1, 8, 8]


def test_samples_are_confidently_classified_and_cover_the_classes(judge, one_thread):
    model, ckpt = zoo.load_model("digits")
    samples = draw(model, ckpt)
    assert samples.shape == (N, 1, 8, 8) and samples.min() >= -1 and samples.max() <= 1

    confidence, spread = judge(samples)
    real_confidence, real_spread = judge(torch.from_numpy(load_digits().images[:N]).float().div(8).sub(1)[:, None])
    noise_confidence, noise_spread = judge(torch.rand(N, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    untrained = zoo.build(ckpt["kind"], ckpt["config"]).eval()
    torch.nn.init.normal_(untrained.conv_out.weight, std=0.1)  # zero-initialised: would only copy x_T
    untrained_confidence, untrained_spread = judge(draw(untrained, ckpt))

    print(f"confidence / histogram TV: samples {confidence:.3f}/{spread:.3f}, real {real_confidence:.3f}/"
          f"{real_spread:.3f}, noise {noise_confidence:.3f}/{noise_spread:.3f}, "
          f"untrained {untrained_confidence:.3f}/{untrained_spread:.3f}")
    assert confidence > 0.75 and spread < 0.2  # real digits: about 0.92 and 0.02
    for other_confidence, other_spread in ((noise_confidence, noise_spread), (untrained_confidence, untrained_spread)):
        assert confidence > other_confidence + 0.1 or spread < other_spread - 0.15
