"""Inputs and error measures shared by the tests, the benchmarks and ``fastmae check``, so that
all three measure the same thing; and a stand-in Triton driver and compiled kernels for running
Triton's launch path on a machine without a GPU.

Every builder draws fresh random inputs (never zeros) from its own seeded generator and returns
a dict of keyword arguments for the op it feeds.
"""
import math

import torch


# ----------------------------------------------------------------------------- error measures

def rel_err(actual: torch.Tensor, expected: torch.Tensor, floor: float = 0.0) -> float:
    """max |actual - expected| / max(max |expected|, floor), computed in float64 (0 for two empty
    tensors). ``floor``: the size of the terms that cancel where the exact result is ~0 (the
    query and key gradients of a one-key softmax), so that rounding of those terms is measured
    against them, not against the float64 reference's own rounding residue."""
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(device=a.device, dtype=torch.float64)
    if a.shape != e.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    if e.numel() == 0:
        return 0.0
    if not torch.isfinite(a).all():
        return math.inf
    scale = max(e.abs().max().item(), floor)
    diff = (a - e).abs().max().item()
    return diff / scale if scale > 0 else diff


def assert_rel_close(actual, expected, tol, name="output", floor=0.0):
    err = rel_err(actual, expected, floor)
    if not err <= tol:
        raise AssertionError(f"{name}: relative error {err:.3e} > {tol:.1e}")
    return err


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with a value no kernel writes (NaN for floats, a huge index for ints)."""
    if t.dtype.is_floating_point:
        return t.fill_(float("nan"))
    return t.fill_(torch.iinfo(t.dtype).max if t.dtype != torch.bool else True)


def poisoned_empty(shape, dtype, device):
    """A drop-in for a launcher's ``_empty`` allocator whose buffers start poisoned, so an
    element a kernel fails to write shows up (tests monkeypatch it into the kernel module)."""
    return poison_(torch.empty(shape, dtype=dtype, device=device))


GUARD = 4096  # elements of sentinel on each side of a guarded buffer
SENTINEL = 12345.0


def guarded_empty(buffers):
    """An ``_empty`` drop-in whose buffers start poisoned (``poison_``: NaN, or a huge index for
    integer ones) and sit inside larger ones filled with a sentinel on both sides, each appended
    to ``buffers``: a store out of the buffer's bounds changes the sentinel
    (``assert_guards_intact``)."""
    def alloc(shape, dtype, device):
        n = math.prod(shape)
        big = torch.full((n + 2 * GUARD,), SENTINEL, dtype=dtype, device=device)
        buffers.append((big, n))
        return poison_(big[GUARD:GUARD + n].view(*shape))
    return alloc


def assert_guards_intact(buffers):
    for big, n in buffers:
        assert (big[:GUARD] == SENTINEL).all() and (big[GUARD + n:] == SENTINEL).all(), \
            "a kernel wrote outside its output buffer"


def grad_with_layout(shape, layout, device="cpu", seed=0):
    """An incoming (M, D) gradient laid out as autograd may hand it over: "contiguous",
    "expanded" (stride 0, as the gradient of a .sum()) or "transposed"."""
    g = _gen(seed, device)
    M, D = shape
    if layout == "contiguous":
        return torch.randn(M, D, generator=g, device=device)
    if layout == "expanded":
        return torch.randn(1, D, generator=g, device=device).expand(M, D)
    if layout == "transposed":
        return torch.randn(D, M, generator=g, device=device).t()
    raise ValueError(f"layout must be 'contiguous', 'expanded' or 'transposed', got {layout!r}")


def _gen(seed, device):
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _randn(shape, g, device, dtype, scale=1.0):
    return (torch.randn(shape, generator=g, device=device, dtype=torch.float32) * scale).to(dtype)


def distinct_noise(N, L, g, device):
    """Noise in [0, 1) with distinct values in each row (argsort is then unambiguous)."""
    perm = torch.argsort(torch.rand(N, L, generator=g, device=device), dim=1)
    jitter = torch.rand(N, L, generator=g, device=device) * 0.5
    return ((perm.float() + 0.25 + jitter) / L).clamp_(max=1 - 1e-7)


def keep_count(L, mask_ratio):
    return int(L * (1 - mask_ratio))


def ids_keep_from_noise(noise, len_keep):
    return torch.argsort(noise, dim=1)[:, :len_keep]


# ----------------------------------------------------------------------------- op inputs

def masking_case(N, L, D, mask_ratio=0.75, dtype=torch.float32, device="cpu", seed=0):
    g = _gen(seed, device)
    return dict(x=_randn((N, L, D), g, device, dtype), mask_ratio=mask_ratio,
                noise=distinct_noise(N, L, g, device))


def patch_embed_case(N, C, H, W, p, D, mask_ratio=0.75, dtype=torch.float32, device="cpu", seed=0):
    """imgs (N, C, H, W), weight (D, C, p, p), bias (D,), pos_embed (1, 1 + L, D) fp32,
    ids_keep (N, keep) int64 for the grid (H/p) x (W/p)."""
    g = _gen(seed, device)
    L = (H // p) * (W // p)
    fan_in = C * p * p
    return dict(
        imgs=_randn((N, C, H, W), g, device, dtype),
        weight=_randn((D, C, p, p), g, device, torch.float32, fan_in ** -0.5),
        bias=_randn((D,), g, device, torch.float32, 0.1),
        pos_embed=_randn((1, 1 + L, D), g, device, torch.float32, 0.5),
        ids_keep=ids_keep_from_noise(distinct_noise(N, L, g, device), keep_count(L, mask_ratio)),
    )


def unshuffle_case(N, L, D, mask_ratio=0.75, dtype=torch.float32, device="cpu", seed=0):
    """x (N, 1 + keep, D), mask_token (1, 1, D), ids_restore (N, L), pos_embed (1, 1 + L, D)."""
    g = _gen(seed, device)
    keep = keep_count(L, mask_ratio)
    noise = distinct_noise(N, L, g, device)
    return dict(
        x=_randn((N, 1 + keep, D), g, device, dtype),
        mask_token=_randn((1, 1, D), g, device, torch.float32, 0.02),
        ids_restore=torch.argsort(torch.argsort(noise, dim=1), dim=1),
        pos_embed=_randn((1, 1 + L, D), g, device, torch.float32, 0.5),
    )


def loss_case(N, C, H, W, p, mask_ratio=0.75, norm_pix=True, pred_dtype=torch.float32,
              device="cpu", seed=0):
    """imgs (N, C, H, W) fp32, pred (N, L, p*p*C), mask (N, L) fp32 with 0 = kept."""
    g = _gen(seed, device)
    L = (H // p) * (W // p)
    keep = keep_count(L, mask_ratio)
    noise = distinct_noise(N, L, g, device)
    mask = torch.ones(N, L, device=device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, torch.argsort(torch.argsort(noise, dim=1), dim=1))
    return dict(
        imgs=_randn((N, C, H, W), g, device, torch.float32),
        pred=_randn((N, L, p * p * C), g, device, pred_dtype),
        mask=mask, patch_size=p, norm_pix=norm_pix,
    )


def attention_case(B, H, N, d, layout="contiguous", dtype=torch.float32, device="cpu", seed=0):
    """q, k, v of shape (B, H, N, d). layout "contiguous": three contiguous tensors;
    "qkv": views of one packed (B, N, 3, H, d) projection output, as the model produces;
    "transposed": (B, N, H, d) storage seen as (B, H, N, d)."""
    g = _gen(seed, device)
    if layout == "contiguous":
        q, k, v = (_randn((B, H, N, d), g, device, dtype) for _ in range(3))
    elif layout == "qkv":
        qkv = _randn((B, N, 3, H, d), g, device, dtype)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    elif layout == "transposed":
        q, k, v = (_randn((B, N, H, d), g, device, dtype).transpose(1, 2) for _ in range(3))
    else:
        raise ValueError(f"layout must be 'contiguous', 'qkv' or 'transposed', got {layout!r}")
    return dict(q=q, k=k, v=v)


def layer_norm_case(M, D, residual=False, dtype=torch.float32, device="cpu", seed=0, eps=1e-6):
    """x (M, D), weight and bias (D,) fp32; with residual=True also residual (M, D)."""
    g = _gen(seed, device)
    case = dict(
        x=_randn((M, D), g, device, dtype, 2.0) + 0.5,
        weight=1 + _randn((D,), g, device, torch.float32, 0.1),
        bias=_randn((D,), g, device, torch.float32, 0.1),
        eps=eps,
    )
    if residual:
        case["residual"] = _randn((M, D), g, device, torch.float32)
    return case


def bias_gelu_case(M, D, dtype=torch.float32, device="cpu", seed=0):
    g = _gen(seed, device)
    return dict(x=_randn((M, D), g, device, dtype, 2.0), bias=_randn((D,), g, device, torch.float32))


# ----------------------------------------------------------------------------- no GPU

class StandInDriver:
    """Just enough of a Triton driver for ``JITFunction.run`` to bind, specialize and look up a
    kernel for ``target`` (e.g. ``GPUTarget("cuda", 90, 32)``) without a GPU: device 0, stream 0.
    Install with ``triton.runtime.driver.driver.set_active(StandInDriver(target))``; used where
    compiling or launching is itself replaced (tests/_kernel_capture.py, benches/host_cost.py)."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


class StandInKernel:
    """Stands for a compiled Triton kernel where none can be compiled: ``run`` is its C
    launcher, called as ``JITFunction.run`` and fastmae's direct launch call it, with the
    grid, stream, function handle, metadata, launch metadata, enter and exit hooks and the
    kernel's arguments; like the C launcher it calls the hooks given (not None) with the launch
    metadata, and it hands each call to ``on_launch(kernel, call_args)``."""
    function, packed_metadata = 0, ()

    def __init__(self, name, on_launch):
        self.name, self._on_launch = name, on_launch

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, *call_args):
        launch_metadata, enter_hook, exit_hook = call_args[6:9]
        if enter_hook is not None:
            enter_hook(launch_metadata)
        self._on_launch(self, call_args)
        if exit_hook is not None:
            exit_hook(launch_metadata)


def use_stand_in_kernels(on_launch, target=None):
    """Let Triton's Python launch path (``Autotuner.run``, ``Heuristics.run``, ``JITFunction.run``
    with its binding, specialization and cache lookup) run without a GPU up to the C launcher:
    installs a ``StandInDriver`` (default target CUDA sm_90), makes ``JITFunction._do_compile``
    cache a ``StandInKernel`` reporting to ``on_launch`` instead of compiling, and gives every
    configuration the autotuner benchmarks the same time (it keeps the first). For a process
    without ``TRITON_INTERPRET`` (benches/host_cost.py, tests/_launch_check.py); not undone."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    def compile_stand_in(self, key, signature, device, constexprs, options, attrs, warmup):
        kernel = StandInKernel(self.__name__, on_launch)
        self.device_caches[device][0][key] = kernel
        return kernel

    JITFunction._do_compile = compile_stand_in
    Autotuner._bench = lambda self, *args, config, **meta: [1.0, 1.0, 1.0]
    driver.set_active(StandInDriver(target or GPUTarget("cuda", 90, 32)))
