"""Record every Triton kernel launch of a ``fastmae.kernels`` module at real MAE shapes, then
compile each recorded launch for an H100 / H200 (CUDA sm_90) on this CPU-only machine.

Used by ``tests/test_gpu_compile.py``, which runs it as a script in a subprocess::

    python tests/_kernel_capture.py [MODULE ...] [--mode quick|full|capture] [--jobs N] [--verbose]
                                    [--kernels NAME,...]   (only those kernels' launches)

prints one JSON report per module (default: every module; ``--verbose`` adds every launch with
its compile time, registers, spilled bytes, shared memory, the warps an SM holds of it (its
occupancy by those resources), its SASS instruction count, the
instructions, barriers, MMAs, cp.async copies and spill accesses of one iteration of each of its
loops, and from its PTX its wgmma shapes and a warp-specialized kernel's setmaxnreg counts).

The subprocess must run WITHOUT ``TRITON_INTERPRET``: then ``@triton.jit`` gives real
``JITFunction`` objects, ``triton.autotune`` the GPU configuration lists, and the launchers'
``interpreting()`` branches choose the GPU tile sizes.

How a launch is recorded, without a GPU and without running anything:

* Triton's active driver is replaced by ``fastmae.testing.StandInDriver``, which only answers
  "device 0, stream 0, target cuda sm_90". With it, ``JITFunction.run`` does exactly what it
  does on the GPU: binds the arguments, specializes them (dtypes of the tensors,
  ``tt.divisibility`` of the pointers and of the ints, ints equal to 1 made constexpr), parses
  the options (num_warps, num_stages, ...) -- and then calls ``JITFunction._do_compile``.
* ``_do_compile`` is replaced by a recorder that stores (kernel, signature, constexprs, attrs,
  options) and returns None, so nothing is compiled and nothing is launched (``run`` returns
  early when the compile gives no kernel). The launchers' outputs stay uninitialized.
* ``Autotuner.run`` is replaced by a loop over the configurations the autotuner would benchmark
  for that call (after ``prune_configs_by``), each passed down to ``run`` (through
  ``triton.heuristics`` when there is one): every configuration gets recorded.

The launchers are called with CPU tensors of the right dtypes, shapes and strides (the values
do not matter: nothing runs), so the recorded specializations are the ones a GPU run would see.
Each unique (kernel, signature, constexprs, attrs, options) is then compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32), options=...)`` -- what
``_do_compile`` itself does -- down to PTX and a cubin (Triton's bundled ptxas).
"""
import contextlib
import functools
import inspect
import json
import os
import sys
import time
import traceback

H100_MAX_SHARED = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)
SM90_REGISTERS = 65536  # 32-bit registers of one SM (sm_80 and sm_90 alike)
SM90_SHARED_PER_SM = 233472  # bytes of shared memory of one sm_90 SM (228 KiB) ...
SM90_BLOCK_RESERVED_SHARED = 1024  # ... of which each resident block reserves 1 KiB
MODULES = ("scale", "masking", "unshuffle", "patch_embed", "mse_loss", "attention", "layer_norm",
           "bias_gelu", "gelu_matmul", "partial_sums")


# ----------------------------------------------------------------------------- capture

class Launch:
    """One recorded specialization of a kernel, ready for ``triton.compile``."""

    def __init__(self, fn, signature, constexprs, attrs, options, config, call):
        self.fn, self.signature, self.constexprs = fn, signature, constexprs
        self.attrs, self.options = attrs, options
        self.config = config  # the autotuner's triton.Config it was recorded for, or None
        self.call = call  # which launcher call (scenario) recorded it first

    @property
    def name(self):
        return self.fn.__name__

    def key(self):
        return (self.fn.fn.__module__, self.fn.__name__, repr(sorted(self.signature.items())),
                repr(sorted(self.constexprs.items(), key=repr)),
                repr(sorted(self.attrs.items(), key=repr)),
                repr(sorted(self.options.__dict__.items(), key=repr)))

    def describe(self):
        """A JSON-ready summary: the kernel, its constexprs and options, its arguments."""
        names = self.fn.arg_names
        consts = {}
        for k, v in self.constexprs.items():
            consts[names[k[0]] if isinstance(k, tuple) and len(k) == 1 else str(k)] = repr(v)
        ptrs = [f"{n}:{t}" for n, t in self.signature.items() if t.startswith("*")]
        scalars = {}
        for t in self.signature.values():
            if not t.startswith("*") and t != "constexpr":
                scalars[t] = scalars.get(t, 0) + 1
        div16 = [names[k[0]] for k, v in self.attrs.items()
                 if isinstance(k, tuple) and len(k) == 1 and "tt.divisibility" in repr(v)]
        args = " ".join(ptrs + [f"{t}x{c}" for t, c in scalars.items()])
        return {
            "kernel": self.name,
            "constexprs": consts,
            "args": args + (f"; 16-divisible: {','.join(div16)}" if div16 else ""),
            "num_warps": self.options.num_warps,
            "num_stages": self.options.num_stages,
            "autotuned": self.config is not None,
            "recorded_by": self.call,
        }


@contextlib.contextmanager
def recording(target):
    """Within the block, kernel launches are recorded (into the yielded list), never run:
    fastmae.precompile.compiles_recorded with Triton's driver standing in for ``target``."""
    from triton.runtime.driver import driver

    from fastmae.precompile import compiles_recorded
    from fastmae.testing import StandInDriver

    records = []
    state = {"call": None}

    def on_compile(fn, a, config):
        records.append(Launch(fn, a["signature"], a["constexprs"], a["attrs"], a["options"],
                              config, state["call"]))

    saved = driver._active
    driver.set_active(StandInDriver(target))
    try:
        with compiles_recorded(on_compile):
            yield records, state
    finally:
        driver._active = saved


# ----------------------------------------------------------------------------- scenarios
# Each scenario calls a module's public launchers as fastmae.ops does, at MAE's shapes:
# ViT-B/16 (encoder D 768, 12 heads of 64; decoder D 512, 16 heads of 32), ViT-L/16 (D 1024),
# ViT-H/14 (D 1280, 16 heads of 80, L = 256), 224 x 224 images, mask ratio 0.75, in fp32 and
# in the bf16 / fp16 of autocast; plus a few small odd shapes (tails, ints not divisible by 16).
# Batch 16: the ints (rows = batch * tokens) come out divisible by 16, as with real batches;
# the odd shapes give the other specialization.

def _scenarios(name):
    import torch

    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    low = (bf16, f16)
    B = 16

    def empty(*shape, dtype=f32):
        return torch.empty(shape, dtype=dtype)

    def ids(n, keep, L):
        return torch.stack([torch.randperm(L)[:keep] for _ in range(n)])

    def restore(n, L):
        return torch.stack([torch.randperm(L) for _ in range(n)])

    # (patch size, L, keep, encoder D, encoder heads, head dim) of ViT-B/16, ViT-L/16, ViT-H/14
    vits = ((16, 196, 49, 768, 12, 64), (16, 196, 49, 1024, 16, 64), (14, 256, 64, 1280, 16, 80))

    if name == "scale":
        from fastmae.kernels.scale import scale
        # (x, out): as x; and the loss's fp32 gradient of an fp16 pred (ops._loss_grad_dtype)
        for dt, out_dt in ((f32, f32), (bf16, bf16), (f16, f16), (f32, f16)):
            for n in (B * 196 * 768, 1000):
                yield (f"scale {dt} -> {out_dt} numel={n}",
                       lambda dt=dt, out_dt=out_dt, n=n: scale(empty(n, dtype=dt), torch.ones(()),
                                                               out_dt))

    elif name == "masking":
        from fastmae.kernels import masking as m
        for L, keep in ((196, 49), (256, 64), (1024, 256), (7, 2)):
            yield f"masking_indices L={L}", lambda L=L, keep=keep: m.masking_indices(
                empty(B, L), keep)
        for dt in (f32,) + low:
            for (L, keep, D) in ((196, 49, 768), (196, 49, 1024), (256, 64, 1280), (7, 3, 100)):
                n = B if L > 7 else 3
                yield (f"gather/scatter_tokens {dt} L={L} D={D}",
                       lambda dt=dt, L=L, keep=keep, D=D, n=n: (
                           m.gather_tokens(empty(n, L, D, dtype=dt), ids(n, keep, L)),
                           m.scatter_tokens(empty(n, keep, D, dtype=dt), restore(n, L), keep)))

    elif name == "unshuffle":
        from fastmae.kernels import unshuffle as u
        # decoder D 512; under autocast x comes from decoder_embed in bf16/fp16, the mask token
        # and the position table are fp32
        for x_dt, p_dt in ((f32, f32), (bf16, f32), (f16, f32), (bf16, bf16), (f16, f16)):
            for (L, keep, D) in ((196, 49, 512), (256, 64, 512), (7, 3, 100)):
                n = B if L > 7 else 3
                yield (f"unshuffle x={x_dt} pos={p_dt} L={L} D={D}",
                       lambda x_dt=x_dt, p_dt=p_dt, L=L, keep=keep, D=D, n=n: (
                           u.unshuffle_fwd(empty(n, 1 + keep, D, dtype=x_dt),
                                           empty(1, 1, D, dtype=p_dt), restore(n, L),
                                           empty(1, 1 + L, D, dtype=p_dt)),
                           u.unshuffle_bwd(empty(n, 1 + L, D, dtype=torch.promote_types(
                               x_dt, p_dt)), restore(n, L), keep, x_dt, p_dt)))

    elif name == "patch_embed":
        from fastmae.kernels import patch_embed as pe
        takes_compute = "compute_dtype" in inspect.signature(pe.patch_embed_visible_fwd).parameters
        bwd_takes_compute = ("compute_dtype" in
                             inspect.signature(pe.patch_embed_visible_bwd).parameters)
        # (imgs, out, compute): fp32; autocast (fastmae.ops: out = promote(compute, pos_embed)
        # = fp32, the matmul in bf16 / fp16); a bf16 / fp16 model
        combos = ((f32, f32, f32), (f32, f32, bf16), (f32, f32, f16), (f32, bf16, bf16),
                  (bf16, bf16, bf16), (f16, f16, f16))
        for (p, L, keep, D, _, _) in vits:
            side = p * int(L ** 0.5)
            for img_dt, out_dt, comp_dt in combos:
                extra = {"compute_dtype": comp_dt} if takes_compute else {}
                bwd_extra = {"compute_dtype": comp_dt} if bwd_takes_compute else {}

                def run(p=p, L=L, keep=keep, D=D, side=side, img_dt=img_dt, out_dt=out_dt,
                        comp_dt=comp_dt, extra=extra, bwd_extra=bwd_extra):
                    imgs = empty(B, 3, side, side, dtype=img_dt)
                    weight = empty(D, 3, p, p)
                    ids_keep = ids(B, keep, L)
                    pe.patch_embed_visible_fwd(imgs, weight, empty(D), empty(1, 1 + L, D),
                                               ids_keep, out_dt, **extra)
                    pe.patch_embed_visible_bwd(empty(B, keep, D, dtype=out_dt), imgs, weight,
                                               ids_keep, need_imgs_grad=True, **bwd_extra)
                    if hasattr(pe, "gather_visible_patches") and comp_dt != f32:
                        pe.gather_visible_patches(imgs, ids_keep, p, comp_dt)
                yield (f"patch_embed p={p} D={D} imgs={img_dt} out={out_dt} compute={comp_dt}",
                       run)

    elif name == "mse_loss":
        from fastmae.kernels import mse_loss as ml
        from fastmae.ops import _loss_grad_dtype
        for (p, L, _, _, _, _) in vits[::2]:
            side = p * int(L ** 0.5)
            for pred_dt in (f32,) + low:
                for norm_pix in (True, False):
                    for need_grad in (True, False):
                        yield (f"masked_mse p={p} pred={pred_dt} norm_pix={norm_pix} "
                               f"need_grad={need_grad}",
                               lambda p=p, L=L, side=side, dt=pred_dt, np_=norm_pix, g=need_grad:
                               ml.masked_mse_fwd(empty(B, 3, side, side),
                                                 empty(B, L, p * p * 3, dtype=dt), empty(B, L),
                                                 p, np_, g, _loss_grad_dtype(dt)))

    elif name == "attention":
        from fastmae.kernels import attention as at
        shapes = set()
        for (_, L, keep, D, heads, d) in vits:
            shapes.add((1 + keep, heads, d))  # encoder: cls + visible patches
            shapes.add((1 + L, 16, 32))  # decoder: D 512, 16 heads of 32
        shapes.add((13, 2, 64))  # small odd shape
        for (N, H, d) in sorted(shapes):
            for dt in (f32,) + low:
                def run(N=N, H=H, d=d, dt=dt):
                    # q, k, v: views of the packed (B, N, 3, H, d) qkv projection output, as
                    # fastmae.ops.packed_attention passes them; o, dq, dk, dv likewise packed
                    qkv = empty(B, N, 3, H, d, dtype=dt)
                    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
                    out = empty(B, N, H, d, dtype=dt).transpose(1, 2)
                    o, lse = at.attention_fwd(q, k, v, d ** -0.5, out=out)
                    if N == 13:  # a negative scale: the forward's other softmax (POS_SCALE)
                        at.attention_fwd(q, k, v, -d ** -0.5, out=out)
                    do = empty(B, N, H, d, dtype=dt).transpose(1, 2)
                    dq, dk, dv = empty(B, N, 3, H, d, dtype=dt).permute(2, 0, 3, 1, 4).unbind(0)
                    # every backward strategy (on a GPU the fastest is chosen by timing), each
                    # with and without the column sums (the transformer block's qkv bias)
                    dsum = empty(*at.grad_sum_shape(B, H, N, d))
                    saved = os.environ.get("FASTMAE_ATTN_BWD")
                    try:
                        for strategy in ("fused", "fused_q", "split"):
                            os.environ["FASTMAE_ATTN_BWD"] = strategy
                            for sums in (None, dsum):
                                at.attention_bwd(do, q, k, v, o, lse, d ** -0.5, dq=dq, dk=dk,
                                                 dv=dv, dsum=sums)
                    finally:
                        if saved is None:
                            os.environ.pop("FASTMAE_ATTN_BWD", None)
                        else:
                            os.environ["FASTMAE_ATTN_BWD"] = saved
                yield f"attention N={N} H={H} d={d} {dt}", run

    elif name == "layer_norm":
        from fastmae.kernels import layer_norm as lnk
        takes_dx2 = "dx2_dtype" in inspect.signature(lnk.layer_norm_bwd).parameters
        takes_bb = "branch_bias_grad" in inspect.signature(lnk.layer_norm_bwd).parameters
        # The backward spreads the rows over one wave of programs (a few per SM) on a GPU, each
        # walking several tiles; on CPU tensors the launcher takes 4 programs, which at
        # M = B * 50 also gives several tiles a program, and M = 3 records the specialization
        # tiles_per_program == 1 (a constexpr) of small inputs.
        for D in (768, 1024, 1280, 512, 100):
            for M in (B * 50, 3):
                for x_dt, r_dt, out_dt in ((f32, f32, f32), (bf16, f32, bf16), (f16, f32, f16),
                                           (bf16, bf16, bf16)):
                    def run(D=D, M=M, x_dt=x_dt, r_dt=r_dt, out_dt=out_dt):
                        w, b = empty(D), empty(D)
                        # the plain LayerNorm and the fused residual add + LayerNorm, as
                        # fastmae.ops.layer_norm / add_layer_norm call them, and backwards
                        lnk.layer_norm_fwd(empty(M, D, dtype=x_dt), w, b, 1e-6, out_dt)
                        _, s, mean, rstd = lnk.layer_norm_fwd(
                            empty(M, D, dtype=x_dt), w, b, 1e-6, out_dt,
                            residual=empty(M, D, dtype=r_dt), residual_dtype=r_dt)
                        dy = empty(M, D, dtype=out_dt)
                        lnk.layer_norm_bwd(dy, empty(M, D, dtype=x_dt), w, mean, rstd,
                                           dx_dtype=x_dt)
                        ds = empty(M, D, dtype=r_dt)
                        lnk.layer_norm_bwd(dy, s, w, mean, rstd, ds=ds, dx_dtype=r_dt)
                        if takes_dx2:
                            lnk.layer_norm_bwd(dy, s, w, mean, rstd, ds=ds, dx_dtype=r_dt,
                                               dx2_dtype=x_dt)
                        if takes_bb:  # the block's hand-off with its projection's bias
                            lnk.layer_norm_fwd(
                                empty(M, D, dtype=x_dt), w, b, 1e-6, out_dt,
                                residual=empty(M, D, dtype=r_dt), residual_dtype=r_dt,
                                branch_bias=empty(D))
                            lnk.layer_norm_bwd(dy, s, w, mean, rstd, ds=ds, dx_dtype=r_dt,
                                               branch_bias_grad=True)
                            lnk.layer_norm_bwd(dy, s, w, mean, rstd, ds=ds, dx_dtype=r_dt,
                                               dx2_dtype=x_dt, branch_bias_grad=True)
                    yield f"layer_norm M={M} D={D} x={x_dt} residual={r_dt} out={out_dt}", run

    elif name == "bias_gelu":
        from fastmae.kernels import bias_gelu as bg
        # M = 3: tiles_per_program == 1, as on a GPU (see layer_norm)
        for D in (3072, 4096, 5120, 2048, 100):  # 4 x the widths above; a small odd one
            for M in (B * 50, 3):
                for dt in (f32,) + low:
                    def run(D=D, M=M, dt=dt):
                        x = empty(M, D, dtype=dt)
                        bg.bias_gelu_fwd(x, empty(D), dt)
                        bg.bias_gelu_bwd(empty(M, D, dtype=dt), x, empty(D), dt)
                    yield f"bias_gelu M={M} D={D} {dt}", run
    elif name == "gelu_matmul":
        from fastmae.kernels import gelu_matmul as gmm
        # the MLP of each encoder (M = B * (1 + keep) rows, D -> 4 D) and of the decoder (512 ->
        # 2048 over B * (1 + L) rows), and a small odd one (K = 40: no tile divides it)
        shapes = {(B * (1 + keep), 4 * D, D) for (_, _, keep, D, _, _) in vits}
        shapes |= {(B * (1 + L), 2048, 512) for (_, L, _, _, _, _) in vits} | {(3, 100, 40)}
        # the TMA kernels too, in 16-bit dtypes (as on a GPU): their launchers' device check
        # (an sm_90 GPU) is what these CPU tensors cannot pass, so it is skipped for them; the
        # operands' layout is checked
        gmm.tma_ok = lambda device, out_dtype, N, **operands: all(
            map(gmm._describable, operands.values()))
        for (M, N, K) in sorted(shapes):
            for dt in (f32,) + low:
                for tma in (False, True):
                    if tma and (dt == f32 or N * dt.itemsize % 16 or K * dt.itemsize % 16):
                        continue

                    def run(M=M, N=N, K=K, dt=dt, tma=tma):
                        f, _ = gmm.matmul_bias_gelu(empty(M, K, dtype=dt),
                                                    empty(N, K, dtype=dt), empty(N), dt, tma=tma)
                        gmm.matmul_gelu_bwd(empty(M, K, dtype=dt), empty(K, N, dtype=dt), f,
                                            empty(N), dt, tma=tma)
                    yield f"gelu_matmul M={M} N={N} K={K} {dt}{' tma' if tma else ''}", run
    elif name == "partial_sums":
        from fastmae.kernels import partial_sums as psum
        # a block backward's four buffers as a GPU sizes them (the MLP's, the two LayerNorms'
        # over a wave of programs, the attention's over the batch); three without a qkv bias;
        # six (two launches); small odd ones (ints of 1 and not divisible by 16)
        for (_, _, keep, D, _, _) in vits:
            four = [(B * (1 + keep) // 64, 4 * D), (3, 396, D), (3, 396, D), (B, 3 * D)]
            for shapes in (four, four[:3], four + four[:2]):
                yield (f"partial_sums {shapes}",
                       lambda shapes=shapes: psum.sum_partials([empty(*s) for s in shapes]))
        odd = [(1, 1), (3, 7, 5), (2, 1, 40), (13, 100)]
        yield f"partial_sums {odd}", lambda: psum.sum_partials([empty(*s) for s in odd])
    else:
        raise ValueError(f"no scenarios for module {name!r}")


def capture(name, target):
    """Call the scenarios of module ``name`` with launches recorded. Returns (unique launches
    in recorded order, number of launches recorded, errors of launcher calls that raised)."""
    records, errors = [], []
    with recording(target) as (recorded, state):
        for label, call in _scenarios(name):
            state["call"] = label
            try:
                call()
            except Exception:  # noqa: BLE001 -- a launcher that cannot even be called
                errors.append({"call": label, "error": traceback.format_exc(limit=-4)})
        records = list(recorded)
    unique = {}
    for r in records:
        unique.setdefault(r.key(), r)
    return list(unique.values()), len(records), errors


def unlaunched_kernels(name, launches):
    """The jit functions of module ``name`` that no scenario launched and that no other jit
    function of the module names (so not device helpers, called or passed as a tl.reduce
    combine function): kernels the scenarios miss."""
    import importlib
    import re

    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.jit import JITFunction

    module = importlib.import_module(f"fastmae.kernels.{name}")
    jitted = {}
    for obj in vars(module).values():
        while isinstance(obj, (Autotuner, Heuristics)):
            obj = obj.fn
        if isinstance(obj, JITFunction) and obj.fn.__module__ == module.__name__:
            jitted[obj.__name__] = obj
    launched = {launch.name for launch in launches}
    sources = {n: f.src for n, f in jitted.items()}
    return sorted(n for n in jitted if n not in launched and not any(
        re.search(rf"\b{n}\b", src) for other, src in sources.items() if other != n))


# Boolean constexprs that the launchers legitimately pass with one value only, as
# "kernel.FLAG"; any other flag recorded with one value only fails the check (a code path no
# scenario reaches is a code path whose compilation is not checked).
ONE_SIDED_FLAGS = set()


def _flags_this_triton_leaves_one_sided():
    """Flags whose other value this Triton is not given: gelu_matmul offers its warp-specialized
    TMA loops only under the Tritons that compile them (_warp_specialize_offered)."""
    gelu_matmul = sys.modules.get("fastmae.kernels.gelu_matmul")
    if gelu_matmul is not None and not gelu_matmul._warp_specialize_offered():
        return {"_matmul_bias_gelu_tma.WARP_SPECIALIZE", "_matmul_gelu_bwd_tma.WARP_SPECIALIZE"}
    return set()


def one_sided_flags(launches):
    """The bool constexprs of the launched kernels recorded with one value only."""
    allowed = ONE_SIDED_FLAGS | _flags_this_triton_leaves_one_sided()
    values = {}
    for launch in launches:
        for k, v in launch.constexprs.items():
            if isinstance(v, bool) and isinstance(k, tuple) and len(k) == 1:
                values.setdefault(f"{launch.name}.{launch.fn.arg_names[k[0]]}", set()).add(v)
    return sorted(f"{flag} only {next(iter(v))}" for flag, v in values.items()
                  if len(v) == 1 and flag not in allowed)


# ----------------------------------------------------------------------------- selection

def _split(launch):
    """(variant, tiling) of a launch. The variant: the argument types and the constexprs that are
    not ints (flags such as HAS_RESIDUAL, strings); the tiling: the int constexprs (block sizes,
    ...), num_warps, num_stages. For an autotuned kernel the tiling is the configuration (its
    meta-parameters, warps, stages) and every other constexpr (HEAD_DIM, K, ...) is variant.
    Divisibility hints are in neither."""
    names = launch.fn.arg_names
    tuned = set(launch.config.kwargs) if launch.config is not None else set()
    flags, ints = [], []
    for k, v in launch.constexprs.items():
        name = names[k[0]] if isinstance(k, tuple) and len(k) == 1 else str(k)
        is_int = isinstance(v, int) and not isinstance(v, bool)
        if tuned and name not in tuned:
            is_int = False  # autotuned: the shape-derived ints (HEAD_DIM, K, ...) are variants
        (ints if is_int else flags).append((name, repr(v)))
    variant = (tuple(sorted(launch.signature.items())), tuple(sorted(flags)))
    tiling = (tuple(sorted(ints)), launch.options.num_warps, launch.options.num_stages)
    return variant, tiling


def select_quick(launches):
    """The CI subset of the unique launches, per kernel:

    * every variant (argument dtypes + flag constexprs) is compiled at least once;
    * a kernel that is not autotuned also gets every tiling (int constexprs + warps + stages)
      compiled at least once -- each tiling with the first variant that uses it; a kernel with
      a one-wave grid (``one_wave_budget``) every variant at every tiling;
    * an autotuned kernel gets, for each variant, ONE of the configurations the autotuner would
      try: one not yet used by another variant, alternately from the start and the end of the
      list (small and large tiles), so that the variants together go through as many
      configurations as there are variants (all of them: ``full`` mode).

    Launches that differ only in divisibility hints count once (the first recorded, from the
    batch-16 shapes, as on a GPU)."""
    chosen, seen_v, seen_t, seen_vt, uses = [], set(), set(), set(), {}
    candidates = {}
    for launch in launches:
        variant, tiling = _split(launch)
        v, t = (launch.name, variant), (launch.name, tiling)
        if launch.config is None:
            # a one-wave kernel: every (variant, tiling) pair, each checked against its budget
            if v not in seen_v or t not in seen_t or (
                    one_wave_budget(launch) is not None and (v, t) not in seen_vt):
                chosen.append(launch)
            seen_v.add(v)
            seen_t.add(t)
            seen_vt.add((v, t))
        else:
            candidates.setdefault(v, []).append(launch)
    for i, (v, members) in enumerate(candidates.items()):
        count = uses.setdefault(v[0], {})
        least = min(count.get(_split(m)[1], 0) for m in members)
        members = [m for m in members if count.get(_split(m)[1], 0) == least]
        # alternately the first and the last of the least used: both ends of the config list
        best = members[0] if i % 2 == 0 else members[-1]
        count[_split(best)[1]] = least + 1
        chosen.append(best)
    return chosen


# ----------------------------------------------------------------------------- compile

def _cuobjdump(cubin, flag):
    """``cuobjdump FLAG`` (Triton's wheel has it beside ptxas) on ``cubin``; None without it."""
    import subprocess
    import tempfile

    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True).stdout


def cubin_resources(cubin):
    """(registers, stack bytes) a thread of the (one) kernel in ``cubin`` uses, as ``cuobjdump
    -res-usage`` reports them (REG, STACK: registers spilled to local memory, where Triton's
    kernels call no functions); (None, None) where that tool is missing."""
    import re
    out = _cuobjdump(cubin, "-res-usage") or ""
    found = [re.findall(rf"{field}:(\d+)", out) for field in ("REG", "STACK")]
    return tuple(int(f[0]) if f else None for f in found)


def cubin_sass(cubin):
    """The kernel's SASS (``cuobjdump -sass``): its instruction count and its loops -- for each
    backward branch, in program order, the instructions from its target to it, the BAR.SYNC
    barriers, the tensor-core MMAs (HGMMA: sm_90's wgmma; HMMA: mma.sync), the asynchronous
    global-to-shared copies (LDGSTS: cp.async) and the local-memory accesses (STL / LDL: spills)
    among them, what one iteration of that loop issues a warp. (None, None) without cuobjdump."""
    import re
    out = _cuobjdump(cubin, "-sass")
    if out is None:
        return None, None
    code = [(int(m.group(1), 16), m.group(2)) for m in
            re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", out)]
    loops = []
    for addr, text in code:
        branch = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", text)
        if branch and int(branch.group(1), 16) < addr:
            body = [t for a, t in code if int(branch.group(1), 16) <= a <= addr]
            loops.append({"instructions": len(body),
                          "barriers": sum("BAR.SYNC" in t for t in body),
                          "wgmma": sum(bool(re.search(r"\bHGMMA\b", t)) for t in body),
                          "mma_sync": sum(bool(re.search(r"\bHMMA\b", t)) for t in body),
                          "async_copies": sum("LDGSTS" in t for t in body),
                          "local_memory": sum(bool(re.search(r"\b(STL|LDL)\b", t)) for t in body)})
    return len(code), loops


def ptx_facts(ptx):
    """From a kernel's PTX: its wgmma shapes ("m64n256k16", ...) and, where it is
    warp-specialized, the register counts its warp groups move to (setmaxnreg: "dec 40",
    "inc 232", ...), each distinct one once."""
    import re
    wgmma = r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)"
    return {"wgmma_shapes": sorted(set(re.findall(wgmma, ptx))),
            "setmaxnreg": sorted({f"{d} {n}" for d, n in
                                  re.findall(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+)",
                                             ptx)})}


def resident_warps(registers, shared, num_warps):
    """Warps of a kernel's programs an sm_90 SM holds at once, by its registers a thread (a
    warp's allocated in units of 256), its shared memory (plus the 1 KiB each block reserves)
    and the SM's limits of 64 warps and 32 blocks: the occupancy its resources allow."""
    per_warp = -(-registers * 32 // 256) * 256
    blocks = min(SM90_REGISTERS // (per_warp * num_warps),
                 SM90_SHARED_PER_SM // (shared + SM90_BLOCK_RESERVED_SHARED),
                 64 // num_warps, 32)
    return blocks * num_warps


def one_wave_budget(launch):
    """(registers a thread, programs an SM) the launch's grid counts on if it is a kernel whose
    launcher sizes its grid as one wave -- kernel modules declare
    ``ONE_WAVE_WARPS_PER_SM[kernel](constexprs by name)``, the warps per SM of that grid --
    else None. An SM has SM90_REGISTERS; a warp's registers are allocated in units of 256
    (8 a thread)."""
    import importlib
    module = importlib.import_module(launch.fn.fn.__module__)
    warps_per_sm = getattr(module, "ONE_WAVE_WARPS_PER_SM", {}).get(launch.name)
    if warps_per_sm is None:
        return None
    names = launch.fn.arg_names
    constexprs = {names[k[0]]: v for k, v in launch.constexprs.items()
                  if isinstance(k, tuple) and len(k) == 1}
    warps = max(warps_per_sm(constexprs), launch.options.num_warps)
    return SM90_REGISTERS // (warps * 32) // 8 * 8, warps // launch.options.num_warps


def compile_launch(launch, target, details=None):
    """(error, shared memory bytes, registers a thread): error is None if the launch compiles to
    a cubin that an sm_90 GPU can load and, for a one-wave kernel, fits its register budget.
    A ``details`` dict receives the bytes a thread spills and the SASS's instruction count and
    loops (cubin_sass)."""
    import triton
    from triton.compiler import ASTSource

    src = ASTSource(launch.fn, launch.signature, launch.constexprs, launch.attrs)
    try:
        kernel = triton.compile(src, target=target, options=launch.options.__dict__)
    except Exception as e:  # noqa: BLE001 -- every compiler error is a finding
        return f"{type(e).__name__}: {e}".strip(), None, None
    asm = getattr(kernel, "asm", {})
    if "ptx" not in asm or "cubin" not in asm:
        return f"no PTX / cubin produced (stages: {sorted(asm)})", None, None
    shared = getattr(kernel.metadata, "shared", 0)
    if shared > H100_MAX_SHARED:
        return (f"OutOfResources at load: needs {shared} bytes of shared memory, an sm_90 block "
                f"has at most {H100_MAX_SHARED}"), shared, None
    registers, stack = cubin_resources(asm["cubin"])
    if details is not None:
        details["spill_bytes"] = stack
        details["sass_instructions"], details["loops"] = cubin_sass(asm["cubin"])
        details.update(ptx_facts(asm["ptx"]))
        if registers is not None:
            # the compiled kernel's warps: warp specialization adds its partitions' warps to
            # the num_warps asked for (gelu_matmul's WARP_SPECIALIZE: 4 asked, 12 launched)
            details["warps_per_sm"] = resident_warps(
                registers, shared, getattr(kernel.metadata, "num_warps", launch.options.num_warps))
    budget = one_wave_budget(launch)
    if budget is not None:
        max_registers, programs = budget
        if registers is None:
            return "cannot read the register count (no cuobjdump in Triton's wheel)", shared, None
        if -(-registers // 8) * 8 > max_registers:
            return (f"uses {registers} registers a thread; its launcher's one-wave grid counts "
                    f"on at most {max_registers} (ONE_WAVE_WARPS_PER_SM of its module): fewer "
                    f"programs fit on an SM than the grid assumes"), shared, registers
        if programs * (shared + SM90_BLOCK_RESERVED_SHARED) > SM90_SHARED_PER_SM:
            return (f"uses {shared} bytes of shared memory; the {programs} programs an SM its "
                    f"launcher's one-wave grid counts on need more than an SM's "
                    f"{SM90_SHARED_PER_SM}"), shared, registers
    return None, shared, registers


def _cpu_s():
    import resource
    own, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@functools.lru_cache(maxsize=None)
def _copy_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)

    return _copy


def preflight(target):
    """None if this environment can compile a trivial kernel for ``target``, else why not."""
    import triton
    from triton.compiler import ASTSource

    src = ASTSource(_copy_kernel(),
                    {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"},
                    {"BLOCK": 128})
    why = f"triton.compile fails for {target} on a trivial kernel"
    try:
        kernel = triton.compile(src, target=target, options={"num_warps": 4})
    except Exception as e:  # noqa: BLE001
        return f"{why}: {type(e).__name__}: {e}"
    if "cubin" not in getattr(kernel, "asm", {}):
        return f"{why}: no cubin produced (stages: {sorted(kernel.asm)})"
    return None


_LAUNCHES, _TARGET, _DETAILS = [], None, False


def _compile_one(i):
    """Compile launch i of the module being checked (a pool worker inherits it by fork)."""
    c0 = _cpu_s()
    details = {} if _DETAILS else None
    err, shared, registers = compile_launch(_LAUNCHES[i], _TARGET, details)
    return i, err, shared, registers, details, round(_cpu_s() - c0, 2)


def check_module(name, mode="quick", jobs=1, verbose=False, only=None):
    """The report (a dict, JSON-ready) of module ``name``: capture, select, compile (with
    ``only``, a set of kernel names, only those kernels' launches are selected)."""
    global _LAUNCHES, _TARGET, _DETAILS
    import triton
    from triton.backends.compiler import GPUTarget

    _TARGET = GPUTarget("cuda", 90, 32)
    report = {"module": name, "triton": triton.__version__, "mode": mode,
              "environment_error": None, "call_errors": [], "unlaunched": [],
              "one_sided_flags": [], "failures": []}
    t0, c0 = time.time(), _cpu_s()
    from fastmae.precompile import triton_internals_problem
    env_error = triton_internals_problem() or preflight(_TARGET)
    if env_error is not None:
        report["environment_error"] = env_error
        return report
    if name not in MODULES:
        report["environment_error"] = (f"no capture scenarios for fastmae.kernels.{name}: add "
                                       f"them to tests/_kernel_capture.py (_scenarios, MODULES)")
        return report
    launches, n_recorded, call_errors = capture(name, _TARGET)
    report["call_errors"] = call_errors
    if not call_errors:
        report["unlaunched"] = unlaunched_kernels(name, launches)
        report["one_sided_flags"] = one_sided_flags(launches)
    if only:
        launches = [launch for launch in launches if launch.name in only]
    selected = select_quick(launches) if mode == "quick" else launches
    _LAUNCHES, _DETAILS = selected, verbose
    t1, c1 = time.time(), _cpu_s()
    if mode == "capture":
        results = []
    elif jobs > 1:
        import concurrent.futures as cf
        import multiprocessing as mp
        with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("fork")) as pool:
            results = list(pool.map(_compile_one, range(len(selected))))
    else:
        results = [_compile_one(i) for i in range(len(selected))]
    per_launch = []
    for i, err, shared, registers, details, cpu in results:
        entry = dict(selected[i].describe(), error=err, shared=shared, registers=registers,
                     **(details or {}), cpu_s=cpu)
        per_launch.append(entry)
        if err is not None:
            report["failures"].append(entry)
    kernels = {}
    for launch in selected:
        kernels[launch.name] = kernels.get(launch.name, 0) + 1
    report.update({
        "recorded": n_recorded,
        "unique": len(launches),
        "compiled": len(results),
        "kernels": kernels,
        "capture_s": round(t1 - t0, 2),
        "compile_s": round(time.time() - t1, 2),
        "cpu_s": round(_cpu_s() - c0, 2),
        "compile_cpu_s": round(_cpu_s() - c1, 2),
    })
    if verbose:
        report["launches"] = per_launch
    return report


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("modules", nargs="*", default=list(MODULES))
    ap.add_argument("--mode", choices=("quick", "full", "capture"), default="quick",
                    help="quick: the CI subset (select_quick); full: every unique launch; "
                         "capture: record only")
    ap.add_argument("--jobs", type=int, default=1, help="compiler processes")
    ap.add_argument("--verbose", action="store_true",
                    help="add per-launch results and timings, with the bytes a thread spills, the "
                         "warps an SM holds (by registers and shared memory), the SASS "
                         "instruction count and each loop's instructions, barriers, MMAs, "
                         "cp.async copies and spill accesses an iteration")
    ap.add_argument("--kernels", default="",
                    help="comma-separated kernel names: select only their launches")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run without TRITON_INTERPRET: the interpreter replaces the compiler")
    for name in a.modules:
        only = set(filter(None, a.kernels.split(",")))
        print(json.dumps(check_module(name, a.mode, a.jobs, a.verbose, only)), flush=True)


if __name__ == "__main__":
    main()
