"""Triton kernels and their host launchers (installed as ``fastmae.kernels``).

One file per op: ``@triton.jit`` kernels first, then the launcher that allocates outputs and
launches them. No autograd here (that lives in ``fastmae.ops``) and no CUDA query at import.
Under the Triton interpreter (``TRITON_INTERPRET=1`` set before these modules are imported)
the same kernels run on CPU tensors.
"""
