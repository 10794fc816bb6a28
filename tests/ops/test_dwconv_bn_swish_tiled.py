"""The CUDA tiled forward of dwconv_bn_swish, checked without a GPU: its tile configurations (read from
the .cu) and index math, replayed in NumPy by tests/dwconv_tiled_emulate.py against a direct conv + BN + Swish
(every output written once, every shared-memory slot read written first, partials merged exactly)."""

import dwconv_tiled_emulate as emulate
import numpy as np
import pytest


def test_configs_read_from_the_kernel_source():
    assert set(emulate.CFGS) == {"L", "M", "S"}
    for cfg in emulate.CFGS.values():
        assert cfg.THREADS % 32 == 0 and cfg.TW % emulate.KV == 0 and cfg.TH % cfg.RY == 0


@pytest.mark.parametrize("case", emulate.CASES, ids=lambda c: "x".join(map(str, c[:4])) + f" K={c[4]}")
def test_tiled_index_math(case):
    rng = np.random.default_rng(0)
    assert emulate.check(case, rng)
    if case[3] % 2 == 0:
        assert emulate.check(case, rng, pair_load=False, vec_store=False)  # misaligned x / y: scalar paths


def test_tiled_index_math_without_params_and_with_a_large_mean():
    rng = np.random.default_rng(1)
    assert emulate.check((2, 3, 10, 12, 5), rng, params=False, swish=False)
    assert emulate.check((2, 3, 10, 12, 3), rng, shift=100.0)  # robust variance
