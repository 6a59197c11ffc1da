"""The launchers' host-side integer helpers agree with Triton's own (which cost ~3 us a call)."""
import triton

from fastmae.kernels._common import cdiv, next_pow2


def test_cdiv_matches_triton():
    for a in (0, 1, 2, 7, 16, 17, 255, 256, 257, 12800, 50432, 2**31 + 3):
        for b in (1, 2, 3, 16, 64, 128, 1000):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)


def test_next_pow2_matches_triton():
    for n in list(range(1, 300)) + [768, 1023, 1024, 1025, 1280, 3072, 2**31 - 1, 2**31]:
        assert next_pow2(n) == triton.next_power_of_2(n), n
    assert next_pow2(0) == 1 and next_pow2(-3) == 1  # the launchers' max(n, 1)
