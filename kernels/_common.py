"""Small helpers shared by the launchers."""
import functools
import os

import torch


@functools.lru_cache(maxsize=None)
def interpreting() -> bool:
    """True when Triton's interpreter runs the kernels (CPU tensors, one program at a time).
    Read once: Triton itself fixes the mode when the kernels are decorated, at import."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Host-side integer helpers. triton.cdiv and triton.next_power_of_2 are constexpr functions in
# Triton 3.6+, ~3 us per host call, and the launchers make a few hundred calls per training step.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (asked at launch time, never at import)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count
