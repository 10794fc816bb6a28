"""Test setup: Triton runs in its interpreter on machines without a GPU.

TRITON_INTERPRET must be set before any @triton.jit is defined and before diffusion_fast
reads it at import, so it is set here, first. CUDA tests carry the ``cuda`` mark and are
skipped without a GPU; on a GPU machine ``pytest -m cuda`` runs them all.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import diffusion_fast  # noqa: E402,F401

HAS_CUDA = torch.cuda.is_available()
if HAS_CUDA:
    # cuDNN convolutions default to TF32 (10-bit mantissa) for float32 on Ampere and later: tests
    # compare float32 models with float64 references at float32 tolerances, so they get full float32.
    torch.backends.cudnn.allow_tf32 = False


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny networks: one intra-op thread is as fast, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
