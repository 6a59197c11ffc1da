"""Small helpers shared by the launchers."""
import os

import triton


def interpreting() -> bool:
    """True when Triton's interpreter runs the kernels (CPU tensors, one program at a time)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))
