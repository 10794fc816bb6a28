"""kernels/launch.py: the launchers' plain-Python grid arithmetic gives triton's own answers."""

import pytest

triton = pytest.importorskip("triton")

from diffusion_fast.kernels.launch import cdiv, next_power_of_2  # noqa: E402


def test_cdiv_and_next_power_of_2_match_triton():
    for n in list(range(0, 1100)) + [2**31 - 1, 2**31, 2**31 + 1, 3 * 2**40 + 7]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for b in (1, 2, 3, 7, 16, 255, 256, 1024):
            assert cdiv(n, b) == triton.cdiv(n, b), (n, b)
