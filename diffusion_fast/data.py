"""Small data sets for training on a CPU: scikit-learn's 8x8 digits, the 2-D swiss roll, image folders.

Every loader returns a float32 tensor in the model range: images (N, C, H, W) in [-1, 1],
points (N, 2). scikit-learn and Pillow are imported only when their data set is asked for.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

__all__ = ["DATASETS", "load_dataset", "digits", "digit_labels", "swiss_roll", "gaussian_mixture", "image_folder"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _sklearn():
    try:
        import sklearn.datasets
    except ImportError as exc:
        raise ImportError("this data set needs scikit-learn: pip install 'diffusion_fast[demo]'") from exc
    return sklearn.datasets


def digits() -> Tensor:
    """scikit-learn's 1,797 handwritten digits: (1797, 1, 8, 8) float32, 17 grey levels 0..16 -> [-1, 1]."""
    data = _sklearn().load_digits()
    return torch.from_numpy(data.images).float().div(8.0).sub(1.0).unsqueeze(1).contiguous()


def digit_labels() -> Tensor:
    """The class (0..9) of each of ``digits()``, as int64."""
    return torch.from_numpy(_sklearn().load_digits().target).long()


def swiss_roll(n: int = 10000, *, noise: float = 0.0, seed: int = 0) -> Tensor:
    """(n, 2) float32 points of scikit-learn's swiss roll, its (x, z) plane, scaled by 1/10 as in
    Sohl-Dickstein et al.'s experiment (unit-scale data)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"swiss_roll: n must be a positive int, got {n!r}")
    points, _ = _sklearn().make_swiss_roll(n_samples=n, noise=noise, random_state=seed)
    return torch.from_numpy(points[:, [0, 2]]).float() / 10.0


def gaussian_mixture(n: int = 10000, *, means: Tensor, weights: Tensor | None = None, std: float = 0.1,
                     seed: int = 0) -> Tensor:
    """(n, D) float32 points of sum_k w_k N(means[k], std^2 I): ``means`` (K, D), ``weights`` (K,)
    summing to 1 (uniform when None)."""
    means = torch.as_tensor(means, dtype=torch.float32)
    if means.dim() != 2:
        raise ValueError(f"gaussian_mixture: means must be (K, D), got shape {tuple(means.shape)}")
    weights = torch.full((means.shape[0],), 1.0 / means.shape[0]) if weights is None else torch.as_tensor(weights)
    if weights.shape != (means.shape[0],) or (weights < 0).any() or abs(float(weights.sum()) - 1.0) > 1e-6:
        raise ValueError(f"gaussian_mixture: weights must be {means.shape[0]} non-negative numbers summing to 1")
    if not std > 0:
        raise ValueError(f"gaussian_mixture: std must be > 0, got {std!r}")
    generator = torch.Generator().manual_seed(seed)
    component = torch.multinomial(weights.double(), n, replacement=True, generator=generator)
    return means[component] + std * torch.randn(n, means.shape[1], generator=generator)


def image_folder(path, *, size: int = 32, channels: int = 3) -> Tensor:
    """Every image under ``path`` (recursively), centre-cropped to a square, resized to
    ``size`` x ``size`` and converted to ``channels`` (1: greyscale, 3: RGB): (N, C, size, size)."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError("image folders need Pillow: pip install pillow") from exc
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"image folder {str(path)!r} is not a directory")
    if channels not in (1, 3):
        raise ValueError(f"image_folder: channels must be 1 or 3, got {channels!r}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"image folder {str(path)!r} holds no {'/'.join(IMAGE_SUFFIXES)} files")
    images = []
    for file in files:
        with Image.open(file) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            side = min(img.size)
            left, top = (img.width - side) // 2, (img.height - side) // 2
            img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
            pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
            images.append(pixels.reshape(size, size, channels).permute(2, 0, 1))
    return torch.stack(images).float().div(127.5).sub(1.0)


DATASETS = {"digits": digits, "swiss_roll": swiss_roll}
POINT_DATASETS = ("swiss_roll",)  # sets of points (N, D), not images


def load_dataset(name: str, **kwargs) -> Tensor:
    """A data set by name ("digits", "swiss_roll") or an image folder path."""
    if name in DATASETS:
        return DATASETS[name](**kwargs)
    if Path(name).is_dir():
        return image_folder(name, **kwargs)
    raise ValueError(f"unknown data set {name!r}: expected one of {sorted(DATASETS)} or an image folder")
