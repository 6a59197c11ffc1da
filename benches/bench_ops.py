"""Every fastmae op ("fastmae": backend "triton") against the eager reference ("eager": backend
"torch"), forward, backward and both, at the shapes and dtypes the MAE training step gives it.

On a GPU the shapes are ViT-B/16 and ViT-L/16 at batch 256 and ViT-H/14 at batch 128, 224 px,
mask ratio 0.75, under bf16 autocast with the dtypes the model feeds each op (e.g. the
residual stream in fp32, matmul outputs in bf16). Without a GPU: the micro model's shapes
(16 px) at batch 2, fp32, through Triton's interpreter (a smoke test: --benchmark-disable).

Each benchmark first checks parity on the very inputs it times (``fastmae.check.compare_case``:
output and every gradient against the float64 reference, DESIGN.md's rule), so a wrong kernel
fails instead of being timed. On a GPU the time is measured with CUDA events around each call,
L2 flushed before it, warm-up and autotuning excluded (median of the calls); it goes with the
bytes / FLOPs the op must move / do, the floor they imply at the measured copy bandwidth and bf16
matmul rate, and the fraction of the floor reached, into ``extra_info``. pytest-benchmark's own
columns time one call + ``torch.cuda.synchronize()`` (launch latency included).
"""
import contextlib
import functools
import statistics

import pytest
import torch

from fastmae.backend import use_backend
from fastmae.bench import build_model
from fastmae.check import DTYPE_NAMES, OPS, compare_case, grads_of

MODES = ("fwd", "bwd", "fwdbwd")
IMPLS = {"fastmae": "triton", "eager": "torch"}
SEED = 5
DEFAULT_BATCH = {"vit_b16": 256, "vit_l16": 256, "vit_h14": 128, "tiny": 8, "micro": 2}

# bench id -> (fastmae.check.OPS entry, modes)
BENCH_OPS = {
    "masking_indices": ("masking_indices", ("fwd",)),
    "random_masking": ("random_masking", MODES),
    "patch_embed_visible": ("patch_embed_visible", MODES),
    "unshuffle": ("unshuffle", MODES),
    "masked_mse_loss": ("masked_mse_loss", MODES),
    "attention_enc": ("attention", MODES),
    "attention_dec": ("attention", MODES),
    "packed_attention_enc": ("packed_attention", MODES),
    "packed_attention_dec": ("packed_attention", MODES),
    "layer_norm_enc": ("layer_norm", MODES),
    "add_layer_norm_enc": ("add_layer_norm", MODES),
    "add_layer_norm_dec": ("add_layer_norm", MODES),
    "bias_gelu_enc": ("bias_gelu", MODES),
    "bias_gelu_dec": ("bias_gelu", MODES),
}
OP_MODES = [(op, mode) for op, (_, modes) in BENCH_OPS.items() for mode in modes]

FLOOR_NOTES = {
    "masked_mse_loss": "loss floor: fwd = the loss alone (images + pred + mask read); bwd = scaling "
                       "the gradient the forward saved (read + write); fwdbwd = loss and gradient in "
                       "one pass (images + pred + mask read, gradient written)",
    "attention": "attention FLOPs: fwd 4·N²·d per head, bwd 10·N²·d (five products, P recomputed)",
    "patch_embed_visible": "patch embedding: only the kept patches are read; FLOPs 2·keep·(C·p²)·D "
                           "per image and per pass",
}


# ----------------------------------------------------------------------------- shapes

@functools.lru_cache(maxsize=None)
def model_dims(name, batch):
    """The sizes the MAE step gives each op, read off the model (built on the meta device)."""
    m = build_model(name, "meta")
    pe = m.patch_embed
    L = pe.num_patches
    keep = int(L * (1 - 0.75))
    enc, dec = m.blocks[0], m.decoder_blocks[0]
    D, Dd = pe.proj.out_channels, m.decoder_embed.out_features
    return dict(B=batch, L=L, keep=keep, C=pe.proj.in_channels, H=pe.img_size[0], W=pe.img_size[1],
                p=pe.patch_size[0], D=D, heads=enc.attn.num_heads, Dd=Dd,
                dheads=dec.attn.num_heads, hid=enc.mlp.fc1.out_features,
                dhid=dec.mlp.fc1.out_features)


def op_case(bench_id, dims, lowp):
    """(spec, params, input dtype, autocast dtype or None) for one op at the model's shapes.
    ``lowp`` is the autocast dtype (bf16 on a GPU) or fp32 (no autocast, CPU)."""
    B, L, keep, D, Dd = dims["B"], dims["L"], dims["keep"], dims["D"], dims["Dd"]
    C, H, W, p = dims["C"], dims["H"], dims["W"], dims["p"]
    act = lowp                       # matmul outputs: the autocast dtype
    f32 = torch.float32              # the residual stream, images, embeddings + positions
    amp = lowp if lowp != torch.float32 else None
    h, dh = dims["heads"], dims["dheads"]
    cases = {
        "masking_indices": ((B, L, keep), f32),
        "random_masking": ((B, L, D, 0.75), f32),
        "patch_embed_visible": ((B, C, H, W, p, D, False), f32),
        "unshuffle": ((B, L, Dd, 0.75), act),
        "masked_mse_loss": ((B, C, H, W, p, True), act),
        "attention_enc": ((B, h, 1 + keep, D // h, "qkv"), act),
        "attention_dec": ((B, dh, 1 + L, Dd // dh, "qkv"), act),
        "packed_attention_enc": ((B, 1 + keep, h, D // h), act),
        "packed_attention_dec": ((B, 1 + L, dh, Dd // dh), act),
        "layer_norm_enc": ((B * (1 + keep), D), f32),
        "add_layer_norm_enc": ((B * (1 + keep), D), act),
        "add_layer_norm_dec": ((B * (1 + L), Dd), act),
        "bias_gelu_enc": ((B * (1 + keep), dims["hid"]), act),
        "bias_gelu_dec": ((B * (1 + L), dims["dhid"]), act),
    }
    params, dtype = cases[bench_id]
    return OPS[BENCH_OPS[bench_id][0]], params, dtype, amp


# ----------------------------------------------------------------------------- bytes and FLOPs

def _nb(t):
    return t.numel() * t.element_size()


def traffic(spec_name, kw, outs, mode):
    """(bytes, FLOPs) the op must move / do in ``mode``: every input read once, every output and
    gradient written once, gathers counting only the rows they touch."""
    def split(fwd, bwd):
        return {"fwd": fwd, "bwd": bwd, "fwdbwd": (fwd[0] + bwd[0], fwd[1] + bwd[1])}[mode]

    if spec_name == "masking_indices":
        return sum(_nb(o) for o in outs) + _nb(kw["noise"]), 0
    if spec_name == "random_masking":
        xm, mask, ids_restore = outs
        idx = _nb(kw["noise"]) + _nb(mask) + _nb(ids_restore)
        return split((idx + 2 * _nb(xm), 0), (_nb(xm) + _nb(ids_restore) + _nb(kw["x"]), 0))
    if spec_name == "patch_embed_visible":
        out = outs[0]
        N, keep, D = out.shape
        w = kw["weight"]
        K = w.shape[1] * w.shape[2] * w.shape[3]
        patches = N * keep * K * kw["imgs"].element_size()
        params = _nb(w) + _nb(kw["bias"])
        flops = 2 * N * keep * K * D
        return split((patches + params + _nb(kw["pos_embed"]) + _nb(kw["ids_keep"]) + _nb(out), flops),
                     (_nb(out) + patches + _nb(kw["ids_keep"]) + params, flops))
    if spec_name == "unshuffle":
        out = outs[0]
        small = _nb(kw["ids_restore"]) + _nb(kw["mask_token"])
        return split((_nb(kw["x"]) + small + _nb(kw["pos_embed"]) + _nb(out), 0),
                     (_nb(out) + small + _nb(kw["x"]), 0))
    if spec_name == "masked_mse_loss":
        inputs = _nb(kw["imgs"]) + _nb(kw["pred"]) + _nb(kw["mask"])
        return {"fwd": (inputs, 0), "bwd": (2 * _nb(kw["pred"]), 0),
                "fwdbwd": (inputs + _nb(kw["pred"]), 0)}[mode]
    if spec_name in ("attention", "packed_attention"):
        o = outs[0]
        if spec_name == "attention":
            B, H, N, d = kw["q"].shape
        else:
            B, N, C = o.shape
            H = kw["num_heads"]
            d = C // H
        S = B * H * N * d * o.element_size()
        lse = B * H * N * 4
        return split((4 * S + lse, 4 * B * H * N * N * d), (8 * S + lse, 10 * B * H * N * N * d))
    if spec_name == "layer_norm":
        x, y = kw["x"], outs[0]
        wb = _nb(kw["weight"]) + _nb(kw["bias"])
        stats = x.shape[0] * 8
        return split((_nb(x) + _nb(y) + wb + stats, 0), (_nb(y) + 2 * _nb(x) + stats + wb, 0))
    if spec_name == "add_layer_norm":
        x, r = kw["x"], kw["residual"]
        s, y = outs
        wb = _nb(kw["weight"]) + _nb(kw["bias"])
        stats = x.shape[0] * 8
        return split((_nb(x) + _nb(r) + _nb(s) + _nb(y) + wb + stats, 0),
                     (2 * _nb(s) + _nb(y) + stats + _nb(x) + _nb(r) + wb, 0))
    if spec_name == "bias_gelu":
        x, y = kw["x"], outs[0]
        return split((_nb(x) + _nb(y) + _nb(kw["bias"]), 0), (_nb(y) + 2 * _nb(x) + _nb(kw["bias"]), 0))
    raise KeyError(spec_name)


# ----------------------------------------------------------------------------- running one op

def _leaves(kw, grads):
    out = {}
    for k, v in kw.items():
        if isinstance(v, torch.Tensor):
            v = v.detach()
            if k in grads:
                v.requires_grad_(True)
        out[k] = v
    return out


def make_call(spec, kw, grads, mode, backend, amp, device, seed=0):
    """A no-argument function doing ``mode`` of the op once, and the forward outputs."""
    amp_ctx = (lambda: torch.autocast(device, dtype=amp)) if amp is not None else contextlib.nullcontext
    leaves = [kw[g] for g in grads]

    def fwd():
        with use_backend(backend), amp_ctx():
            out = spec.call(kw)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    outs = fwd()
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    diff = [i for i, o in enumerate(outs) if isinstance(o, torch.Tensor) and o.requires_grad]
    cots = [torch.randn(outs[i].shape, generator=g, device=device).to(outs[i].dtype) for i in diff]

    def grad_of(o):
        with use_backend(backend):
            return torch.autograd.grad([o[i] for i in diff], leaves, cots, allow_unused=True,
                                       retain_graph=(mode == "bwd"))

    if mode == "fwd":
        return fwd, outs
    if not diff or not leaves:
        raise ValueError(f"{spec.name} has no gradient to time")
    if mode == "bwd":
        return (lambda: grad_of(outs)), outs
    return (lambda: grad_of(fwd())), outs


def cuda_time_ms(fn, budget_ms=40.0, max_reps=100, flush_mib=256):
    """Median per-call time in ms: CUDA events around each call, L2 flushed before each, after
    warm-up calls (which take the compiling and autotuning)."""
    cache = torch.empty(flush_mib * 2 ** 20 // 4, dtype=torch.int32, device="cuda")
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    torch.cuda.synchronize()
    est = start.elapsed_time(end) / 3
    reps = int(max(5, min(max_reps, budget_ms / max(est, 1e-3))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        cache.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    del cache
    return statistics.median(times), min(times), reps


_PARITY = {}


def _parity(model, bench_id, spec, params, dtype, amp, device):
    """compare_case once per (model, op) per session; failing rows fail every benchmark of it."""
    key = (model, bench_id)
    if key not in _PARITY:
        rows = compare_case(spec, params, dtype, device, seed=SEED, autocast=amp)
        _PARITY[key] = rows
    return _PARITY[key]


# ----------------------------------------------------------------------------- the benchmark

@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("op, mode", OP_MODES, ids=[f"{o}-{m}" for o, m in OP_MODES])
def test_op(benchmark, mae_model, mae_batch, op, mode, impl, device, floors, env):
    batch = mae_batch or DEFAULT_BATCH[mae_model]
    lowp = torch.bfloat16 if device == "cuda" else torch.float32
    dims = model_dims(mae_model, batch)
    spec, params, dtype, amp = op_case(op, dims, lowp)

    rows = _parity(mae_model, op, spec, params, dtype, amp, device)
    bad = [r for r in rows if not r.ok]
    assert not bad, "parity failed before timing:\n" + "\n".join(
        f"  {r.quantity}: error {r.error} > limit {r.limit} {r.note}" for r in bad)

    pd = dict(zip(spec.params, params))
    grads = grads_of(spec, params)
    kw = _leaves(spec.build(pd, dtype, device, SEED), grads)  # the very inputs parity checked
    fn, outs = make_call(spec, kw, grads, mode, IMPLS[impl], amp, device)
    nbytes, flops = traffic(spec.name, kw, outs, mode)

    info = benchmark.extra_info
    info.update({
        "suite": "ops", "op": op, "spec": spec.name, "model": mae_model, "batch": batch,
        "mode": mode, "impl": impl, "backend": IMPLS[impl], "shape": spec.describe(params),
        "dtype": DTYPE_NAMES[dtype], "autocast": DTYPE_NAMES[amp] if amp is not None else None,
        "gpu": env["gpu"], "torch": env["torch"], "triton": env["triton"], "env": env,
        "bytes": nbytes, "flops": flops, "floor_note": FLOOR_NOTES.get(spec.name),
        "parity": "pass", "parity_worst": max(
            ((r.error or 0.0) / r.limit for r in rows if r.limit), default=0.0),
    })
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        ms, ms_min, reps = cuda_time_ms(fn)
        secs = ms * 1e-3
        floor_mem = nbytes / floors["copy_bytes_per_s"]
        floor_mm = flops / floors["matmul_flops_per_s"]
        floor = max(floor_mem, floor_mm)
        info.update({
            "gpu_ms": ms, "gpu_ms_min": ms_min, "reps": reps,
            "gbps": nbytes / secs / 1e9, "tflops": flops / secs / 1e12 if flops else None,
            "floor_ms": floor * 1e3, "floor_kind": "matmul" if floor_mm > floor_mem else "memory",
            "frac_floor": floor / secs,
            "peak_mem_mib": peak / 2 ** 20, "peak_extra_mib": (peak - before) / 2 ** 20,
            "floors": floors,
        })

        def timed():
            fn()
            torch.cuda.synchronize()
        benchmark.group = f"{mae_model} {op} {mode}"
        benchmark.pedantic(timed, rounds=10, warmup_rounds=1, iterations=1)
    else:
        info.update({"gpu_ms": None, "note": "CPU smoke run through Triton's interpreter: not a timing"})
        benchmark.group = f"{mae_model} {op} {mode}"
        benchmark.pedantic(fn, rounds=1, warmup_rounds=0, iterations=1)
