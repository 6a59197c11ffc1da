"""``fastmae check``: every op, forward and every gradient, against the eager reference over a grid
of shapes and dtypes on this device, plus a model-level row (a small MAE under "triton" against
the same weights under "torch"). Prints a pass/fail table; exits non-zero on any failure.

    fastmae check [--quick] [--ops NAME,...] [--dtypes fp32,bf16,fp16] [--no-model] [--json PATH]

The error rule is DESIGN.md's numerics contract. Every float output and gradient is compared
with the reference computed in float64 from the same inputs and cotangents (``rel_err``: max abs
difference over max abs expected); the cotangents are drawn in the lowest precision in play, so
every run gets the same values whatever its outputs' dtypes:

- fp32 inputs: error <= the op's tolerance (1e-5; 1e-4 for ops that contain a matmul).
- bf16 / fp16 inputs or autocast (GPU): error <= 2 x the error of the eager reference run in the
  same low precision + one rounding of the dtype (2**-8 for bf16, 2**-11 for fp16), and never
  required below the fp32 tolerance (the FlashAttention rule). The model's loss, an fp32 mean
  over the removed patches' pixels, gets that rounding over the square root of their number
  (``loss_parity_limit``).
- Index outputs, the mask and pure gathers (and their scatter gradients) must equal the eager
  reference bit for bit.

Without a GPU the kernels run on CPU tensors through Triton's interpreter, fp32 and small shapes;
``main`` switches the interpreter on in-process when no kernel module has been imported yet.

The op table ``OPS`` (input builder, fastmae call, reference call, differentiable inputs) is also
what ``benches/`` uses to check parity before it times anything.
"""
import argparse
import contextlib
import functools
import json
import math
import os
import re
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from fastmae import ops, reference, testing
from fastmae._provenance import git_commit, triton_version
from fastmae.precompile import WAYS, forced_environment
from fastmae.backend import interpreter_on, use_backend
from fastmae.cli import output_file_error

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# one rounding of an output in this dtype, relative to the largest value (unit roundoff)
ROUNDING = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
TOL_FP32 = 1e-5
TOL_FP32_MATMUL = 1e-4


# ============================================================================ the interpreter

def kernel_device():
    """Where fastmae's kernels can run in this process: ("cuda", note) with a GPU; ("cpu", note)
    with Triton's interpreter on, switching it on now if no kernel module has been imported yet;
    (None, reason) when the interpreter can no longer be turned on."""
    if torch.cuda.is_available():
        return "cuda", "GPU"
    if interpreter_on():
        return "cpu", "CPU through Triton's interpreter (TRITON_INTERPRET=1)"
    # triton.jit decides at decoration time whether a function is interpreted, and Triton's own
    # library functions are decorated when triton is imported: too late once either happened
    loaded = sorted(m for m in sys.modules if m == "triton" or m.startswith("fastmae.kernels."))
    if loaded:
        return None, ("Triton's interpreter is off and it is too late to switch it on in this "
                      f"process ({', '.join(loaded)} already imported); set TRITON_INTERPRET=1 "
                      "before starting Python")
    os.environ["TRITON_INTERPRET"] = "1"
    return "cpu", "CPU through Triton's interpreter (switched on in-process: TRITON_INTERPRET=1)"


# ============================================================================ the op table

@dataclass
class OpSpec:
    """One public op: how to build its inputs from a parameter tuple, how fastmae and the
    reference call it, which inputs are differentiable."""
    name: str
    params: tuple                      # names of the entries of a parameter tuple
    build: Callable                    # (p: dict, dtype, device, seed) -> kwargs
    call: Callable                     # kwargs -> tuple of outputs, via fastmae.ops
    ref: Callable                      # kwargs -> tuple of outputs, via fastmae.reference
    outputs: tuple                     # output names
    grads: tuple = ()                  # kwargs that get requires_grad
    exact: bool = False                # outputs and gradients equal the eager reference exactly
    tol: float = TOL_FP32
    dtyped: bool = True                # False: the inputs' dtype is fixed (checked once, fp32)
    lowp_inputs: bool = True           # False: bf16/fp16 only as the model runs it, under autocast
    grid_cpu: list = field(default_factory=list)
    grid_gpu: list = field(default_factory=list)

    def describe(self, p):
        return " ".join(f"{k}={v}" for k, v in zip(self.params, p))


def _packed_qkv(case):
    """The packed (B, N, 3*H*d) projection output whose views are an ``attention_case``'s q, k, v."""
    q, k, v = case["q"], case["k"], case["v"]
    B, H, N, d = q.shape
    return torch.stack([q, k, v], dim=2).permute(0, 3, 2, 1, 4).reshape(B, N, 3 * H * d).contiguous()


def _ref_packed_attention(qkv, num_heads):
    B, N, C3 = qkv.shape
    d = C3 // (3 * num_heads)
    q, k, v = qkv.reshape(B, N, 3, num_heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    return reference.attention(q, k, v).transpose(1, 2).reshape(B, N, C3 // 3)


def _d(p, keys):
    return dict(zip(keys, p))


OPS = {}


def _register(spec):
    OPS[spec.name] = spec
    return spec


_register(OpSpec(
    "masking_indices", ("N", "L", "keep"),
    build=lambda p, dtype, dev, s: dict(
        noise=testing.distinct_noise(p["N"], p["L"], testing._gen(s, dev), dev), len_keep=p["keep"]),
    call=lambda kw: ops.masking_indices(kw["noise"], kw["len_keep"]),
    ref=lambda kw: reference.masking_indices(kw["noise"], kw["len_keep"]),
    outputs=("ids_keep", "mask", "ids_restore"), exact=True, dtyped=False,
    grid_cpu=[(2, 7, 3), (3, 49, 12), (2, 196, 49)],
    grid_gpu=[(2, 7, 3), (64, 196, 49), (32, 256, 64), (4, 1024, 256), (3, 4099, 1000)],
))

_register(OpSpec(
    "random_masking", ("N", "L", "D", "ratio"),
    build=lambda p, dtype, dev, s: testing.masking_case(p["N"], p["L"], p["D"], p["ratio"], dtype, dev, s),
    call=lambda kw: ops.random_masking(kw["x"], kw["mask_ratio"], kw["noise"]),
    ref=lambda kw: reference.random_masking(kw["x"], kw["mask_ratio"], kw["noise"]),
    outputs=("x_masked", "mask", "ids_restore"), grads=("x",), exact=True,
    grid_cpu=[(2, 7, 5, 0.5), (3, 49, 24, 0.75)],
    grid_gpu=[(2, 7, 5, 0.5), (16, 196, 768, 0.75), (8, 256, 1280, 0.75), (3, 49, 131, 0.6)],
))

_register(OpSpec(
    "patch_embed_visible", ("N", "C", "H", "W", "p", "D", "imgs_grad"),
    build=lambda p, dtype, dev, s: testing.patch_embed_case(
        p["N"], p["C"], p["H"], p["W"], p["p"], p["D"], 0.75, dtype, dev, s),
    call=lambda kw: (ops.patch_embed_visible(kw["imgs"], kw["weight"], kw["bias"], kw["pos_embed"],
                                             kw["ids_keep"]),),
    ref=lambda kw: (reference.patch_embed_visible(kw["imgs"], kw["weight"], kw["bias"],
                                                  kw["pos_embed"], kw["ids_keep"]),),
    # the reference's convolution takes one dtype: low precision comes from autocast, as in the model
    outputs=("out",), grads=("imgs", "weight", "bias"), tol=TOL_FP32_MATMUL, lowp_inputs=False,
    # at ratio 0.75: 1, 1 and 3 patches kept an image (a 2-patch image would keep none)
    grid_cpu=[(2, 3, 8, 8, 4, 16, False), (1, 3, 12, 8, 4, 20, True), (2, 1, 28, 21, 7, 9, True)],
    grid_gpu=[(2, 3, 8, 8, 4, 16, True), (8, 3, 224, 224, 16, 768, False),
              (4, 3, 224, 224, 14, 1280, False), (3, 3, 48, 80, 16, 100, True)],
))

_register(OpSpec(
    "unshuffle", ("N", "L", "D", "ratio"),
    build=lambda p, dtype, dev, s: testing.unshuffle_case(p["N"], p["L"], p["D"], p["ratio"], dtype, dev, s),
    call=lambda kw: (ops.unshuffle(kw["x"], kw["mask_token"], kw["ids_restore"], kw["pos_embed"]),),
    ref=lambda kw: (reference.unshuffle(kw["x"], kw["mask_token"], kw["ids_restore"], kw["pos_embed"]),),
    outputs=("out",), grads=("x", "mask_token"),
    grid_cpu=[(2, 7, 5, 0.5), (3, 49, 24, 0.75)],
    grid_gpu=[(2, 7, 5, 0.5), (32, 196, 512, 0.75), (16, 256, 512, 0.75), (3, 49, 131, 0.6)],
))

_register(OpSpec(
    "masked_mse_loss", ("N", "C", "H", "W", "p", "norm_pix"),
    build=lambda p, dtype, dev, s: testing.loss_case(
        p["N"], p["C"], p["H"], p["W"], p["p"], 0.75, p["norm_pix"], dtype, dev, s),
    call=lambda kw: (ops.masked_mse_loss(kw["imgs"], kw["pred"], kw["mask"], kw["patch_size"],
                                         kw["norm_pix"]),),
    ref=lambda kw: (reference.masked_mse_loss(kw["imgs"], kw["pred"], kw["mask"], kw["patch_size"],
                                              kw["norm_pix"]),),
    outputs=("loss",), grads=("pred",),
    grid_cpu=[(2, 3, 8, 8, 4, True), (2, 3, 8, 8, 4, False), (1, 3, 12, 8, 4, True)],
    grid_gpu=[(2, 3, 8, 8, 4, True), (32, 3, 224, 224, 16, True), (16, 3, 224, 224, 14, True),
              (8, 3, 224, 224, 16, False), (3, 1, 40, 24, 8, True)],
))

_register(OpSpec(
    "attention", ("B", "H", "N", "d", "layout"),
    build=lambda p, dtype, dev, s: testing.attention_case(p["B"], p["H"], p["N"], p["d"], p["layout"],
                                                          dtype, dev, s),
    call=lambda kw: (ops.attention(kw["q"], kw["k"], kw["v"]),),
    ref=lambda kw: (reference.attention(kw["q"], kw["k"], kw["v"]),),
    outputs=("o",), grads=("q", "k", "v"), tol=TOL_FP32_MATMUL,
    grid_cpu=[(1, 2, 10, 32, "contiguous"), (2, 1, 17, 64, "qkv"), (1, 1, 9, 80, "transposed")],
    grid_gpu=[(8, 12, 50, 64, "qkv"), (8, 16, 197, 32, "qkv"), (4, 16, 65, 80, "qkv"),
              (4, 16, 257, 32, "contiguous"), (2, 3, 1000, 128, "transposed"), (1, 2, 7, 96, "contiguous")],
))

_register(OpSpec(
    "packed_attention", ("B", "N", "H", "d"),
    build=lambda p, dtype, dev, s: dict(
        qkv=_packed_qkv(testing.attention_case(p["B"], p["H"], p["N"], p["d"], "qkv", dtype, dev, s)),
        num_heads=p["H"]),
    call=lambda kw: (ops.packed_attention(kw["qkv"], kw["num_heads"]),),
    ref=lambda kw: (_ref_packed_attention(kw["qkv"], kw["num_heads"]),),
    outputs=("o",), grads=("qkv",), tol=TOL_FP32_MATMUL,
    grid_cpu=[(2, 10, 2, 32), (1, 17, 1, 64)],
    grid_gpu=[(8, 50, 12, 64), (8, 197, 16, 32), (4, 65, 16, 80), (2, 300, 4, 64)],
))

_register(OpSpec(
    "layer_norm", ("M", "D"),
    build=lambda p, dtype, dev, s: testing.layer_norm_case(p["M"], p["D"], False, dtype, dev, s),
    call=lambda kw: (ops.layer_norm(kw["x"], kw["weight"], kw["bias"], kw["eps"]),),
    ref=lambda kw: (reference.layer_norm(kw["x"], kw["weight"], kw["bias"], kw["eps"]),),
    outputs=("y",), grads=("x", "weight", "bias"),
    grid_cpu=[(7, 16), (3, 100), (2, 768)],
    grid_gpu=[(7, 16), (4096, 768), (2048, 1024), (1000, 1280), (3001, 512), (5, 5000)],
))

_register(OpSpec(
    "add_layer_norm", ("M", "D"),
    build=lambda p, dtype, dev, s: testing.layer_norm_case(p["M"], p["D"], True, dtype, dev, s),
    call=lambda kw: ops.add_layer_norm(kw["x"], kw["residual"], kw["weight"], kw["bias"], kw["eps"]),
    ref=lambda kw: reference.add_layer_norm(kw["x"], kw["residual"], kw["weight"], kw["bias"], kw["eps"]),
    outputs=("s", "y"), grads=("x", "residual", "weight", "bias"),
    grid_cpu=[(7, 16), (3, 100), (2, 768)],
    grid_gpu=[(7, 16), (4096, 768), (2048, 1024), (1000, 1280), (3001, 512)],
))

_register(OpSpec(
    "bias_gelu", ("M", "D"),
    build=lambda p, dtype, dev, s: testing.bias_gelu_case(p["M"], p["D"], dtype, dev, s),
    call=lambda kw: (ops.bias_gelu(kw["x"], kw["bias"]),),
    ref=lambda kw: (reference.bias_gelu(kw["x"], kw["bias"]),),
    outputs=("y",), grads=("x", "bias"),
    grid_cpu=[(7, 16), (3, 100), (2, 3072)],
    grid_gpu=[(7, 16), (4096, 3072), (2048, 4096), (1000, 5120), (3001, 2048)],
))


# ============================================================================ comparing one case

@dataclass
class Row:
    """One compared quantity: an output or a gradient of one op at one shape and dtype."""
    op: str
    case: str
    dtype: str
    quantity: str
    error: float | None        # relative error against float64 (None: compared exactly)
    limit: float | None        # the largest error allowed (None: must be exact)
    eager_error: float | None  # the eager reference's own error in the same precision
    ok: bool
    note: str = ""


def _clone_inputs(kw, grads, dtype=None):
    """Fresh leaves: float tensors cast to ``dtype`` if given (layout kept where possible), the
    differentiable ones requiring grad."""
    out = {}
    for name, v in kw.items():
        if isinstance(v, torch.Tensor):
            t = v.detach()
            if dtype is not None and t.dtype.is_floating_point:
                t = t.to(dtype)
            if name in grads:
                t.requires_grad_(True)
            out[name] = t
        else:
            out[name] = v
    return out


def _as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _run(fn, kw, grads, cotangents, backend=None, autocast=None):
    """Outputs of ``fn(kw)``, the gradients of sum(out * cotangent) w.r.t. ``grads``, and the
    cotangents (``cotangents`` may be a function of the outputs that makes them)."""
    ctx = use_backend(backend) if backend else contextlib.nullcontext()
    device = next(v.device for v in kw.values() if isinstance(v, torch.Tensor))
    amp = (torch.autocast(device.type, dtype=autocast) if autocast is not None
           else contextlib.nullcontext())
    with ctx:
        with amp:
            outs = _as_tuple(fn(kw))
        if callable(cotangents):
            cotangents = cotangents(outs)
        if not grads:
            return outs, {}, cotangents
        pairs = [(o, c) for o, c in zip(outs, cotangents)
                 if isinstance(o, torch.Tensor) and o.requires_grad and c is not None]
        leaves = [kw[g] for g in grads]
        got = torch.autograd.grad([o for o, _ in pairs], leaves,
                                  [c.to(o.dtype) for o, c in pairs], allow_unused=True)
    return outs, dict(zip(grads, got)), cotangents


def _low_precision(dtype, autocast):
    """The dtype whose rounding bounds the result: the lowest precision in play."""
    if autocast is not None and dtype == torch.float32:
        return autocast
    return dtype


def grads_of(spec, p):
    """The inputs whose gradients are checked for one parameter tuple."""
    grads = tuple(spec.grads)
    if spec.name == "patch_embed_visible" and not _d(p, spec.params).get("imgs_grad", True):
        grads = tuple(g for g in grads if g != "imgs")
    return grads


def compare_case(spec, p, dtype=torch.float32, device="cpu", seed=0, autocast=None):
    """fastmae (backend "triton") against the reference on one case: a Row per output and per
    gradient. ``p`` is a parameter tuple in ``spec.params`` order; the inputs are
    ``spec.build(p, dtype, device, seed)``, so a caller building them the same way gets the very
    tensors checked here."""
    pd = _d(p, spec.params)
    grads = grads_of(spec, p)
    kw = spec.build(pd, dtype, device, seed)
    dname = DTYPE_NAMES[dtype] + (f"+amp-{DTYPE_NAMES[autocast]}" if autocast is not None else "")
    rows = []
    low = _low_precision(dtype, autocast)

    def cotangents(outs):
        # representable in the lowest precision in play, so that each run gets the same values
        # whatever its output's dtype: fastmae writes some outputs in that precision where the
        # reference's are fp32 (a LayerNorm's or a bias + GELU's under autocast), and the
        # cotangent is cast to each output's dtype -- rounded for fastmae's only, its parameter
        # gradients (sums over rows) paid for that rounding beyond one of the dtype's
        g = testing._gen(seed + 1, device)
        return [torch.randn(o.shape, generator=g, device=device, dtype=torch.float32).to(low)
                .to(torch.float64)
                if isinstance(o, torch.Tensor) and o.dtype.is_floating_point else None for o in outs]

    # float64 reference first: it fixes the cotangents
    out64, g64, cot = _run(spec.ref, _clone_inputs(kw, grads, torch.float64), grads, cotangents)
    oute, ge, _ = _run(spec.ref, _clone_inputs(kw, grads), grads, cot, autocast=autocast)
    outk, gk, _ = _run(spec.call, _clone_inputs(kw, grads), grads, cot, backend="triton",
                       autocast=autocast)

    base_tol = spec.tol

    def judge(qname, got, eager, exact_ref):
        if got is None and exact_ref is None:
            return
        if got is None or exact_ref is None:
            rows.append(Row(spec.name, spec.describe(p), dname, qname, None, None, None, False,
                            "missing" if got is None else "unexpected gradient"))
            return
        if tuple(got.shape) != tuple(exact_ref.shape):
            rows.append(Row(spec.name, spec.describe(p), dname, qname, None, None, None, False,
                            f"shape {tuple(got.shape)} != {tuple(exact_ref.shape)}"))
            return
        if spec.exact or not got.dtype.is_floating_point or qname == "mask":
            same = got.dtype == eager.dtype and torch.equal(got, eager)
            rows.append(Row(spec.name, spec.describe(p), dname, qname, None, None, None, same,
                            "" if same else f"differs from the eager reference ({got.dtype} vs {eager.dtype})"))
            return
        err = testing.rel_err(got, exact_ref)
        err_e = testing.rel_err(eager, exact_ref)
        limit = max(base_tol, 2 * err_e + ROUNDING[low]) if low != torch.float32 else max(base_tol, 2 * err_e)
        rows.append(Row(spec.name, spec.describe(p), dname, qname, err, limit, err_e, err <= limit))

    if len(outk) > len(spec.outputs):
        rows.append(Row(spec.name, spec.describe(p), dname, "outputs", None, None, None, False,
                        f"{len(outk)} outputs where the reference has {len(spec.outputs)}"))
    # an output the op did not return is a missing row, not one zip() leaves out
    outk = tuple(outk) + (None,) * (len(spec.outputs) - len(outk))
    for name, k, e, r in zip(spec.outputs, outk, oute, out64):
        ref_val = r if isinstance(k, torch.Tensor) and k.dtype.is_floating_point else e
        judge(name, k, e, ref_val)
    for name in grads:
        judge(f"grad {name}", gk.get(name), ge.get(name), g64.get(name))
    return rows


def _error_row(spec_name, case, dname, exc):
    msg = re.sub(r"\s*\(with implementation in <module [^>]*>\)", "", f"{type(exc).__name__}: {exc}")
    msg = " ".join(msg.split())
    return Row(spec_name, case, dname, "-", None, None, None, False,
               msg if len(msg) <= 240 else msg[:237] + "...")


# ============================================================================ the model row

def micro_mae(**kw):
    """A small MAE whose heads the kernels serve (head dim 32): 16x16 images, 4-pixel patches."""
    from fastmae.model import MaskedAutoencoderViT
    cfg = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=64, depth=2, num_heads=2,
               decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2, mlp_ratio=4.0,
               norm_pix_loss=True)
    cfg.update(kw)
    from functools import partial
    cfg.setdefault("norm_layer", partial(torch.nn.LayerNorm, eps=1e-6))
    return MaskedAutoencoderViT(**cfg)


def model_step_grads(model, imgs, noise, backend, mask_ratio=0.75, autocast=None):
    """One forward + backward of ``model`` under ``backend``: loss, pred, mask and every
    parameter gradient (by name). The model's .grad fields are cleared before and after."""
    model.zero_grad(set_to_none=True)
    amp = (torch.autocast(imgs.device.type, dtype=autocast) if autocast is not None
           else contextlib.nullcontext())
    with use_backend(backend):
        with amp:
            loss, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
        loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), pred.detach(), mask.detach(), grads


@contextlib.contextmanager
def _no_tf32():
    """Full fp32 matmuls and convolutions (for a reference run in fp32 on a GPU)."""
    mm, cd = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = mm, cd


def parity_limit(eager_err, low=torch.float32, tol=TOL_FP32_MATMUL):
    """The largest error allowed where the eager reference in the same precision errs by
    ``eager_err``: 2x it plus one rounding of the low-precision dtype, never below ``tol``."""
    return max(tol, 2 * eager_err + ROUNDING[low])


def loss_parity_limit(eager_err, low=torch.float32, terms=1, tol=TOL_FP32_MATMUL):
    """The largest loss error allowed where the eager reference's loss errs by ``eager_err``:
    2x it plus one rounding of the low-precision dtype over the square root of the ``terms``
    the loss averages (independent roundings of pred average out so), never below ``tol``.
    The loss is an fp32 mean over every removed patch's pixels: a whole rounding (0.4% in
    bf16) would let a target off by a tenth of a percent pass (a biased variance for the
    unbiased one norm_pix_loss takes: 1/767 at p = 16), while a tiny model's few terms still
    get their rounding's share."""
    return max(tol, 2 * eager_err + ROUNDING[low] / math.sqrt(max(terms, 1)))


@dataclass
class ModelParity:
    """fastmae ("triton") against the reference ("torch") on one shared step: same weights,
    same images, same noise. Errors are against the reference run without autocast in
    ``exact``; each gradient is judged against the eager reference's error on that same
    gradient (``parity_limit``)."""
    loss_fastmae: float
    loss_reference: float
    loss_err: float            # |loss_fastmae - loss_exact| / |loss_exact|
    loss_err_eager: float      # the same for the eager reference in the same precision
    loss_limit: float          # loss_parity_limit of it, over the loss's terms
    pred_err: float
    pred_err_eager: float
    grad_err: float            # fastmae's worst gradient error relative to its limit ...
    grad_worst: str            # ... on this parameter
    grad_err_eager: float      # the eager reference's error on that parameter
    grad_err_eager_max: float  # the eager reference's worst gradient error
    grad_failed: list          # parameters whose gradient error is over its limit
    n_grads: int
    mask_equal: bool
    missing_grads: list
    exact: str
    low: str                   # the precision the limits are for
    passed: bool
    # gradients fastmae gives where the reference gives none (a frozen parameter trained)
    unexpected_grads: list = field(default_factory=list)
    # "loss", "pred" or a parameter's name where fastmae's dtype is not the reference's
    dtype_differs: list = field(default_factory=list)

    def rows(self, case, dname):
        low = DTYPES[self.low]
        lim = functools.partial(parity_limit, low=low)
        differs = [n for n in self.dtype_differs if n not in ("loss", "pred")]
        grads_ok = not (self.grad_failed or self.missing_grads or self.unexpected_grads
                        or differs)
        notes = []
        if self.missing_grads:
            notes.append(f"missing: {', '.join(self.missing_grads)}")
        if self.unexpected_grads:
            notes.append(f"not in the reference: {', '.join(self.unexpected_grads)}")
        if differs:
            notes.append(f"another dtype: {', '.join(differs[:6])}"
                         + (" ..." if len(differs) > 6 else ""))
        if self.grad_failed:
            notes.append(f"over the limit: {', '.join(self.grad_failed[:6])}"
                         + (" ..." if len(self.grad_failed) > 6 else ""))

        def dtype_note(name):
            return "dtype differs from the reference's" if name in self.dtype_differs else ""
        return [
            Row("model", case, dname, "loss", self.loss_err, self.loss_limit,
                self.loss_err_eager,
                self.loss_err <= self.loss_limit and "loss" not in self.dtype_differs,
                dtype_note("loss")),
            Row("model", case, dname, "pred", self.pred_err, lim(self.pred_err_eager),
                self.pred_err_eager,
                self.pred_err <= lim(self.pred_err_eager) and "pred" not in self.dtype_differs,
                dtype_note("pred")),
            Row("model", case, dname, "mask", None, None, None, self.mask_equal,
                "" if self.mask_equal else "masks differ"),
            Row("model", case, dname, f"grads ({self.n_grads}), worst {self.grad_worst}",
                self.grad_err, lim(self.grad_err_eager), self.grad_err_eager, grads_ok,
                "; ".join(notes)),
        ]


def model_parity(model, imgs, noise, autocast=None, exact_dtype=torch.float64, mask_ratio=0.75):
    """fastmae against the reference on one shared step of ``model`` (its weights are not changed).

    Errors are measured against the reference run in ``exact_dtype`` without autocast (float64 on
    CPU; torch.float32, TF32 off, for big models on a GPU), and the eager reference in the same
    precision as fastmae gives the scale of an acceptable error."""
    import copy
    low = autocast if autocast is not None else torch.float32
    exact = copy.deepcopy(model).to(exact_dtype)
    with _no_tf32():
        l64, p64, m64, g64 = model_step_grads(exact, imgs.to(exact_dtype), noise, "torch", mask_ratio)
    del exact
    le, pe, me, ge = model_step_grads(model, imgs, noise, "torch", mask_ratio, autocast)
    lk, pk, mk, gk = model_step_grads(model, imgs, noise, "triton", mask_ratio, autocast)
    missing = [n for n in g64 if n not in gk]
    unexpected = [n for n in gk if n not in g64]
    # drop-in: the loss, pred and every gradient come in the dtype the reference gives them
    dtype_differs = [name for name, k, e in [("loss", lk, le), ("pred", pk, pe)]
                     + [(n, gk[n], ge[n]) for n in gk if n in ge]
                     if k.dtype != e.dtype]
    worst_ratio, worst = -1.0, ("-", 0.0, 0.0)
    failed, eager_max = [], 0.0
    for n, g in g64.items():
        e_e = testing.rel_err(ge[n], g) if n in ge else math.inf
        eager_max = max(eager_max, e_e)
        if n not in gk:
            continue
        e_k = testing.rel_err(gk[n], g)
        lim = parity_limit(e_e, low)
        if not e_k <= lim:
            failed.append(n)
        ratio = e_k / lim if lim > 0 else math.inf
        if ratio > worst_ratio:
            worst_ratio, worst = ratio, (n, e_k, e_e)
    lx = float(l64)
    loss_err = abs(float(lk) - lx) / max(abs(lx), 1e-30)
    loss_err_eager = abs(float(le) - lx) / max(abs(lx), 1e-30)
    pred_err, pred_err_eager = testing.rel_err(pk, p64), testing.rel_err(pe, p64)
    mask_equal = bool(torch.equal(mk, me) and torch.equal(mk.to(m64.dtype), m64))
    # the loss averages (removed patches) x (values a patch): pred's last dim
    terms = int(mk.sum().item()) * pk.shape[-1]
    loss_limit = loss_parity_limit(loss_err_eager, low, terms)
    passed = (loss_err <= loss_limit and
              pred_err <= parity_limit(pred_err_eager, low) and
              mask_equal and not failed and not missing and not unexpected
              and not dtype_differs)
    return ModelParity(
        loss_fastmae=float(lk), loss_reference=float(le), loss_err=loss_err,
        loss_err_eager=loss_err_eager, loss_limit=loss_limit, pred_err=pred_err,
        pred_err_eager=pred_err_eager,
        grad_err=worst[1], grad_worst=worst[0], grad_err_eager=worst[2],
        grad_err_eager_max=eager_max, grad_failed=failed, n_grads=len(g64),
        mask_equal=mask_equal, missing_grads=missing,
        exact="reference in " + ("float64" if exact_dtype == torch.float64
                                 else DTYPE_NAMES.get(exact_dtype, str(exact_dtype)) + " (no TF32)"),
        low=DTYPE_NAMES[low], passed=passed, unexpected_grads=unexpected,
        dtype_differs=dtype_differs,
    )


def _model_rows(device, dtypes):
    rows = []
    gen = testing._gen(1234, device)
    if device == "cuda":
        from fastmae.model import mae_vit_tiny_patch4
        torch.manual_seed(0)
        model = mae_vit_tiny_patch4(norm_pix_loss=True).to(device)
        N, case = 8, "mae_vit_tiny_patch4 N=8 32px"
    else:
        torch.manual_seed(0)
        model = micro_mae().to(device)
        N, case = 2, "micro MAE (16px, p4, D64x2, dec64x1) N=2"
    H, W = model.patch_embed.img_size
    imgs = torch.randn(N, model.in_chans, H, W, generator=gen, device=device)
    noise = testing.distinct_noise(N, model.patch_embed.num_patches, gen, device)
    settings = [(None, "fp32")]
    if device == "cuda":
        settings += [(DTYPES[d], f"fp32+amp-{d}") for d in dtypes if d != "fp32"]
    for amp, dname in settings:
        # every way of each kernel path chosen by timing on a GPU (the MLP's fused matmuls, by
        # threads or by TMA, or cuBLAS + the bias + GELU kernels, attention's backward holding a
        # head's keys or its queries, or two kernels): a run keeps only the fastest, and the
        # check covers the others (the TMA way where it applies: gelu_matmul.tma_applies)
        from fastmae.kernels import gelu_matmul
        tma = gelu_matmul.tma_applies(torch.device(device), amp or torch.float32)
        for paths in KERNEL_PATHS if tma else tuple(p for p in KERNEL_PATHS if p != "fused_tma"):
            label = f"{case}, paths {paths}"
            try:
                with _forced_paths(paths):
                    par = model_parity(model, imgs, noise, autocast=amp)
                rows += par.rows(label, dname)
            except Exception as exc:  # noqa: BLE001 - reported as a failed row
                rows.append(_error_row("model", label, dname, exc))
    return rows


# one model run a way, each forcing every timed path ("fused_q": attention's backward that holds
# a head's queries, the MLP and the patch embedding's weight gradient then fused; without its
# run no model run would reach fused_q, as every run forces attention's way)
KERNEL_PATHS = ("fused", "fused_q", "fused_tma", "split")
_PATH_VARIABLES = tuple(WAYS)  # FASTMAE_MLP, FASTMAE_ATTN_BWD, FASTMAE_PATCH_WGRAD


def _forced_paths(name):
    """Every kernel path chosen by timing forced to ``name`` ("fused", "fused_q", "fused_tma" or
    "split") meanwhile; a path without that way ("fused_q" is attention's only, "fused_tma" the
    MLP's) to "fused"."""
    return forced_environment({v: name if name in WAYS[v] else "fused" for v in _PATH_VARIABLES})


# ============================================================================ the command

def _fmt_err(v):
    return "-" if v is None else ("inf" if v == math.inf else f"{v:.2e}")


def format_table(rows):
    head = ("op", "case", "dtype", "quantity", "error", "limit", "eager err", "result")
    body = []
    for r in rows:
        exact = r.error is None and r.limit is None and not r.note.startswith(("missing", "shape"))
        body.append((r.op, r.case, r.dtype, r.quantity,
                     "exact" if exact and r.ok and r.quantity != "-" else _fmt_err(r.error),
                     "exact" if exact and r.quantity != "-" else _fmt_err(r.limit),
                     _fmt_err(r.eager_error),
                     ("pass" if r.ok else "FAIL") + (f"  {r.note}" if r.note else "")))
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h)
              for i, h in enumerate(head)]
    widths[-1] = len(head[-1])
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def _parser():
    p = argparse.ArgumentParser(
        prog="fastmae check",
        description="Check every fastmae op (forward and every gradient) against the eager "
                    "reference over a grid of shapes and dtypes on this device, plus a small "
                    "MAE under 'triton' vs 'torch'. Exits non-zero on any failure.")
    p.add_argument("--quick", action="store_true",
                   help="one shape per op (the first of the grid)")
    p.add_argument("--ops", default=None,
                   help=f"comma-separated subset of: {', '.join(OPS)}")
    p.add_argument("--dtypes", default=None,
                   help="comma-separated subset of fp32,bf16,fp16 (default: fp32 on CPU, all on GPU; "
                        "the interpreter runs fp32 only)")
    p.add_argument("--no-model", action="store_true", help="skip the model-level row")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    return p


def _parse(argv):
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return None, (e.code if isinstance(e.code, int) else 2)
    for attr, allowed, what in (("ops", OPS, "op(s)"), ("dtypes", DTYPES, "dtype(s)")):
        text = getattr(args, attr)
        if not text:
            continue
        names = [s.strip() for s in text.split(",") if s.strip()]
        bad = [n for n in names if n not in allowed]
        if bad:
            parser.print_usage(sys.stderr)
            print(f"fastmae check: error: unknown {what} {', '.join(bad)}; choose from "
                  f"{', '.join(allowed)}", file=sys.stderr)
            return None, 2
        setattr(args, attr, names)
    # before the checks, not after them: a bad --json path would otherwise waste the run
    why = args.json and output_file_error("--json", args.json)
    if why:
        parser.print_usage(sys.stderr)
        print(f"fastmae check: error: {why}", file=sys.stderr)
        return None, 2
    return args, 0


def run_checks(device, op_names, dtypes, quick=False, model=True, progress=None):
    rows = []
    for name in op_names:
        spec = OPS[name]
        grid = spec.grid_gpu if device == "cuda" else spec.grid_cpu
        if quick:
            grid = grid[:1]
        for p in grid:
            for dname in (dtypes if spec.dtyped else ["fp32"]):
                dtype = DTYPES[dname]
                settings = [(dtype, None)]
                if dname != "fp32":  # (the CLI asks a CPU for fp32 only)
                    # as the model calls them: fp32 tensors under autocast
                    settings.append((torch.float32, dtype))
                    if not spec.lowp_inputs:
                        settings = settings[1:]
                for dt, amp in settings:
                    label = DTYPE_NAMES[dt] + (f"+amp-{DTYPE_NAMES[amp]}" if amp else "")
                    try:
                        seed = zlib.crc32(repr((name, p)).encode()) % 10007
                        rows += compare_case(spec, p, dt, device, seed=seed, autocast=amp)
                    except Exception as exc:  # noqa: BLE001 - reported as a failed row
                        rows.append(_error_row(name, spec.describe(p), label, exc))
                    if progress:
                        progress(name)
    if model:
        rows += _model_rows(device, dtypes)
    return rows


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args, code = _parse(argv)
    if args is None:
        return code
    t0 = time.perf_counter()
    device, where = kernel_device()
    if device is None:
        print(f"fastmae check: cannot run the kernels: {where}", file=sys.stderr)
        return 1
    if args.dtypes is None:
        dtypes = list(DTYPES) if device == "cuda" else ["fp32"]
    else:
        dtypes = args.dtypes
        if device == "cpu" and any(d != "fp32" for d in dtypes):
            print("fastmae check: Triton's interpreter runs fp32 only; checking fp32", file=sys.stderr)
            dtypes = ["fp32"]
    op_names = args.ops or list(OPS)
    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    print(f"fastmae check on {gpu or 'CPU'}: kernels on {where}; dtypes {', '.join(dtypes)}; "
          f"{'quick grid (one shape per op)' if args.quick else 'full grid'}; "
          f"torch {torch.__version__} | triton {triton_version()} | fastmae {git_commit()}")
    print("errors: max|x - x64| / max|x64| against the reference in float64; bf16/fp16 limit = "
          "2 x eager error + one rounding; 'exact' = bit-equal to the eager reference")
    print()
    rows = run_checks(device, op_names, dtypes, quick=args.quick, model=not args.no_model)
    print(format_table(rows))
    failed = [r for r in rows if not r.ok]
    secs = time.perf_counter() - t0
    print()
    print(f"{len(rows)} checks, {len(rows) - len(failed)} passed, {len(failed)} failed "
          f"({secs:.1f} s)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)  # as bench does
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"device": gpu or "cpu", "where": where, "dtypes": dtypes,
                       "env": {"torch": torch.__version__, "triton": triton_version(),
                               "commit": git_commit()},
                       "quick": args.quick, "seconds": secs, "passed": not failed,
                       "rows": [asdict(r) for r in rows]}, f, indent=1, default=str)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
