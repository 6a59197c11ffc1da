"""Small helpers shared by the launchers."""
import functools
import os

import torch
import triton


def interpreting() -> bool:
    """True when Triton's interpreter runs the kernels (CPU tensors, one program at a time)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (asked at launch time, never at import)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count
