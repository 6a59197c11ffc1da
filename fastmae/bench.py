"""``fastmae bench``: time a training step of fastmae against the eager reference (and
``torch.compile`` of it, and either captured in a CUDA graph), then check what was timed: parity
of fastmae against the reference on one shared step, and each CUDA graph's replays against the
same steps run eagerly.

    fastmae bench [--model vit_b16|vit_l16|vit_h14|tiny] [--batch N] [--dtype bf16|fp16|fp32]
                  [--compile] [--systems a,b,...] [--steps N] [--warmup N] [--json PATH]
                  [--no-precompile] [--no-profile] [--no-progress]

A step is what a trainer runs: forward + backward + AdamW (fused=True on CUDA; a GradScaler
with fp16), under autocast in ``--dtype``, norm_pix_loss=True, mask ratio 0.75, random images.
The systems are one model class under two backends: "fastmae" is backend "triton" (the fused
kernels); "reference" is backend "torch", the official algorithm step by step with SDPA
attention; "reference + torch.compile" is the reference model wrapped in ``torch.compile``;
"fastmae + CUDA graph" (and "reference + CUDA graph") is the same step captured once by
``fastmae.cuda_graph_step`` and replayed; "fastmae, torch.compile" (``--systems
fastmae_compile``) is the fastmae model wrapped in ``torch.compile``. Default on a GPU:
reference, fastmae, fastmae + CUDA graph, and torch.compile of the reference with ``--compile``.

On a GPU, fastmae's Triton kernels for the steps to come are first compiled in parallel
processes into Triton's cache (``fastmae.precompile``; ``--no-precompile`` leaves it to the
steps, one kernel after another). Timing: warm-up steps first (what compiling and autotuning is
left happens there and is reported as the first step's wall time), then ``--steps`` steps
timed with CUDA events between consecutive steps; their total time over their number gives
ms/step and images/s (what the run sustained: a median would drop a slow step; it is kept beside
it). Peak memory ("peak GiB", defined here only) is ``torch.cuda.max_memory_allocated``
from the end of the eager warm-up on: for an eager system over its timed steps, for a CUDA graph
over its capture (which allocates the graph's memory pool) and its timed replays (its eager
warm-up steps, which ``fastmae.cuda_graph_step`` undoes, come before the reset), so that both
count what a step holds once warm, not what the warm-up's compiling and autotuning held. MFU is
the model's training FLOPs per image (3 x the forward matmul and attention FLOPs, counted from
the model as the official code computes it) times images/s over the bf16 matmul rate measured
on this GPU (for a bf16 or fp16 run; none for fp32, whose matmuls that rate does not bound).
The kernel time of the eager systems and of fastmae's CUDA-graph step is then broken down with
the profiler (fastmae kernels, cuBLAS matmuls, optimizer, other torch kernels); for the graphed
step, its GPU busy time against its step time is what the gaps between its kernels cost.

After the timing, on a GPU, what was timed is checked, at the timed batch so that the kernel
paths fastmae chose by timing and the autotuned configurations are the timed ones: parity, one
shared step of fastmae against the reference (same weights, images and noise; retried at batch
32 if the timed batch runs out of memory, and said so), and each timed CUDA graph's check
(``graph_check``): 3 replays against 3 eager steps of the same step from the same weights,
images and mask noise, each loss and every parameter after them compared (the timed graph
draws its mask noise inside the graph, a fresh mask each replay: tests/test_graphs.py checks
that way against eager steps on a GPU). A failed check makes the exit status 1.

Without a GPU nothing about fastmae's speed can be measured: the command times the reference on
the CPU on a tiny configuration, and checks the triton path's parity through Triton's
interpreter, and says so.
"""
import argparse
import datetime
import functools
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fastmae._provenance import git_commit, triton_version
from fastmae.backend import use_backend
from fastmae.cli import int_at_least, output_file_error

SCHEMA = "fastmae-bench/1"
MASK_RATIO = 0.75

# --model name -> (factory in fastmae.model, default batch on a GPU)
MODELS = {
    "vit_b16": ("mae_vit_base_patch16", 256),
    "vit_l16": ("mae_vit_large_patch16", 256),
    "vit_h14": ("mae_vit_huge_patch14", 128),
    "tiny": ("mae_vit_tiny_patch4", 64),
    "micro": ("micro_mae", 2),     # fastmae.check.micro_mae: 16 px, for interpreter smoke runs
}
MODEL_TITLES = {"vit_b16": "ViT-B/16", "vit_l16": "ViT-L/16", "vit_h14": "ViT-H/14",
                "tiny": "tiny (32 px, patch 4)", "micro": "micro (16 px, patch 4)"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

CPU_MODEL, CPU_BATCH, CPU_STEPS, CPU_WARMUP = "tiny", 8, 3, 1
PARITY_BATCH_GPU = 32
PARITY_BATCH_CPU = 1

SYSTEMS = {
    # key: (label, backend, compiled); a "_graph" system is its base replayed as one CUDA graph
    "fastmae": ("fastmae (triton kernels)", "triton", False),
    "reference": ("reference, eager", "torch", False),
    "reference_compile": ("reference, torch.compile", "torch", True),
    "fastmae_compile": ("fastmae, torch.compile", "triton", True),
    "fastmae_graph": ("fastmae + CUDA graph", "triton", False),
    "reference_graph": ("reference + CUDA graph", "torch", False),
}
GPU_ONLY_SYSTEMS = ("fastmae_graph", "reference_graph")
# the systems whose steps the profiler breaks down (GPU): the graphed step too, where its GPU
# busy time against its step time shows what the gaps between its kernels cost (at 6c02ddb,
# 40.3 ms a step against 38.1 ms of kernels in the eager step's profile)
PROFILED = ("fastmae", "reference", "fastmae_graph")


# ============================================================================ FLOPs

def _block_flops(block, tokens):
    """Forward FLOPs of one transformer block on ``tokens`` tokens: qkv, proj, fc1, fc2 matmuls
    and the two attention products (q k^T, p v)."""
    C = block.attn.qkv.in_features
    hidden = block.mlp.fc1.out_features
    matmuls = 2 * tokens * C * (3 * C) + 2 * tokens * C * C + 2 * 2 * tokens * C * hidden
    attention = 2 * 2 * tokens * tokens * C
    return matmuls + attention


def forward_flops_per_image(model, mask_ratio=MASK_RATIO):
    """Matmul + attention FLOPs of one image's forward pass, counted as the official model
    computes it: the patch embedding over all L patches, the encoder on 1 + keep tokens, the
    decoder and the prediction head on 1 + L tokens. Element-wise work is not counted."""
    L = model.patch_embed.num_patches
    keep = int(L * (1 - mask_ratio))
    proj = model.patch_embed.proj
    K = proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]
    D = proj.out_channels
    flops = 2 * L * K * D
    flops += sum(_block_flops(b, 1 + keep) for b in model.blocks)
    flops += 2 * (1 + keep) * D * model.decoder_embed.out_features
    flops += sum(_block_flops(b, 1 + L) for b in model.decoder_blocks)
    flops += 2 * (1 + L) * model.decoder_pred.in_features * model.decoder_pred.out_features
    return flops


def training_flops_per_image(model, mask_ratio=MASK_RATIO):
    """3 x the forward FLOPs (forward, and backward's two products per matmul)."""
    return 3 * forward_flops_per_image(model, mask_ratio)


def build_model(name, device="cpu", seed=0, **kwargs):
    from fastmae import model as model_lib
    if name == "micro":
        from fastmae.check import micro_mae as factory
    else:
        factory = getattr(model_lib, MODELS[name][0])
    torch.manual_seed(seed)
    kwargs.setdefault("norm_pix_loss", True)
    if str(device) == "meta":
        with torch.device("meta"):
            return factory(**kwargs)
    return factory(**kwargs).to(device)


# ============================================================================ environment

def _driver_version():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def _triton_launch():
    """How fastmae launches its compiled Triton kernels in this process: "direct" (to Triton's C
    launcher, kernels/_common.py) or "triton" (Triton's own launch path,
    FASTMAE_TRITON_LAUNCH=triton)."""
    from fastmae.kernels import _common
    return "direct" if _common.DIRECT_LAUNCH else "triton"


def _mlp_tma():
    """The MLP's TMA kernels this process offers on its GPU (kernels/gelu_matmul.py): off, the
    flattened ones, or those and the warp-specialized ones (gpu_suite.sh's stage 0b may
    have turned either off for its run)."""
    from fastmae.kernels import gelu_matmul
    if not gelu_matmul._TMA_ON:
        return "off (FASTMAE_TMA=0)"
    if not gelu_matmul.tma_applies(torch.device("cuda", torch.cuda.current_device()),
                                   torch.bfloat16):
        return "off (before sm_90)"
    if gelu_matmul._warp_specialize_offered():
        return "flattened and warp-specialized"
    why = "FASTMAE_WARP_SPECIALIZE=0" if not gelu_matmul._WARP_SPECIALIZE_ON else \
        f"not warp-specialized under Triton {triton_version()}"
    return f"flattened ({why})"


def _attn_head_tiles():
    """Whether this process offers attention's head tilings (kernels/attention.py: the fused_q
    backward and the forward's 256-row tiles; gpu_suite.sh's stage 0c may have turned them off
    for its run)."""
    from fastmae.kernels import attention
    return "on" if attention._HEAD_TILES else "off (FASTMAE_ATTN_HEAD_TILES=0)"


@functools.lru_cache(maxsize=None)
def env_info():
    """The card, driver and software versions, the commit and the date (queried at call time)."""
    cuda = torch.cuda.is_available()
    info = {
        "device": "cuda" if cuda else "cpu",
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "driver": _driver_version() if cuda else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton_version(),
        "triton_launch": _triton_launch(),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info["gpu_memory_gib"] = round(props.total_memory / 2 ** 30, 1)
        info["mlp_tma"] = _mlp_tma()
        info["attn_head_tiles"] = _attn_head_tiles()
    return info


# ============================================================================ floors

def _cuda_time_ms(fn, reps, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


@functools.lru_cache(maxsize=None)
def measure_floors(matmul_n=8192, copy_mib=1024):
    """The ceilings a kernel is compared with, measured once per process on the current GPU:
    device-to-device copy bandwidth (bytes read + written per second) and the bf16 matmul rate
    of an n x n x n product. None on a machine without a GPU."""
    if not torch.cuda.is_available():
        return None
    def copy_ms():
        src = torch.randn(copy_mib * 2 ** 20 // 4, device="cuda")
        dst = torch.empty_like(src)
        return min(_cuda_time_ms(lambda: dst.copy_(src), reps=10) for _ in range(3))

    def matmul_ms():
        a = torch.randn(matmul_n, matmul_n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(matmul_n, matmul_n, device="cuda", dtype=torch.bfloat16)
        return min(_cuda_time_ms(lambda: torch.mm(a, b), reps=10) for _ in range(3))

    copy_bytes = 2 * copy_mib * 2 ** 20  # read + written
    c_ms, mm_ms = copy_ms(), matmul_ms()
    torch.cuda.empty_cache()
    return {
        "copy_bytes_per_s": copy_bytes / (c_ms * 1e-3),
        "copy_mib": copy_mib,
        "matmul_flops_per_s": 2 * matmul_n ** 3 / (mm_ms * 1e-3),
        "matmul_n": matmul_n,
        "matmul_dtype": "bf16",
    }


# ============================================================================ a training step

def _param_groups(model, weight_decay=0.05):
    """The official recipe's groups: no weight decay on biases and norms (1-D parameters)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_train_step(model, imgs, amp_dtype, compiled=False, mask_ratio=MASK_RATIO, noise=None,
                    compile_backend="inductor", cuda_graph=False, backend=None,
                    before_capture=None):
    """A closure running one training step (forward + backward + AdamW) on ``imgs``: fused AdamW
    on CUDA, a GradScaler under fp16 autocast, no autocast for fp32. ``noise`` fixes the mask
    (default: fresh torch.rand noise each step, as in training). ``compiled`` wraps the model in
    ``torch.compile(backend=compile_backend)``. ``cuda_graph`` (CUDA, bf16/fp32): the whole step
    is captured once into a CUDA graph and each call replays it (``fastmae.cuda_graph_step``);
    ``backend`` is the fastmae backend it is captured under; ``before_capture``, a function
    called after its (undone) warm-up and just before the capture. Returns (step, optimizer,
    the module called)."""
    device = imgs.device
    lr = 1.5e-4 * imgs.shape[0] / 256
    opt_kw = {"fused": True} if device.type == "cuda" else {}
    if cuda_graph:
        if device.type != "cuda" or amp_dtype == torch.float16 or compiled:
            raise ValueError("cuda_graph: a CUDA step in bf16 or fp32, not compiled "
                             "(the fp16 GradScaler reads its overflow flag on the host)")
        opt_kw["capturable"] = True
    opt = torch.optim.AdamW(_param_groups(model), lr=lr, betas=(0.9, 0.95), **opt_kw)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    fwd = torch.compile(model, backend=compile_backend) if compiled else model
    use_amp = amp_dtype != torch.float32

    def step():
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            loss, _, _ = fwd(imgs, mask_ratio=mask_ratio, noise=noise)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    if cuda_graph:
        from fastmae.graphs import cuda_graph_step
        return (cuda_graph_step(step, opt, backend=backend, _before_capture=before_capture),
                opt, fwd)
    return step, opt, fwd


def paths_kept():
    """The kernel paths fastmae chose by timing on this GPU, so far, by shape: the MLP's fused
    matmul epilogues (tiles moved by threads or by TMA) or cuBLAS plus the bias + GELU kernels
    (fastmae.ops._mlp_way), the patch embedding's weight gradient in one kernel or a gather and
    cuBLAS, and the attention backward's one fused kernel (every key, or every query, in one
    program's tile) or two (kernels/attention.py _bwd_strategy); each with the times it was
    chosen on (ms, "failed" for a way that raised), where it was timed."""
    from fastmae import ops

    def name(dtype):
        return str(dtype).replace("torch.", "")

    def kept(env, key, choice):
        common = sys.modules.get("fastmae.kernels._common")
        times = common.TIMINGS.get((env, key)) if common is not None else None
        if not times:
            return choice
        return choice + " (" + ", ".join(f"{way} {'failed' if ms is None else f'{ms:.3f} ms'}"
                                         for way, ms in times.items()) + ")"

    out = {f"mlp {k[0]} M={k[1]} N={k[2]} K={k[3]} {name(k[4])}": kept("FASTMAE_MLP", k, v)
           for k, v in ops._MLP_CHOICE.items()}
    out.update({f"patch embedding weight grad M={k[1]} D={k[2]} K={k[3]} {name(k[4])}":
                kept("FASTMAE_PATCH_WGRAD", k, v) for k, v in ops._PATCH_WGRAD_CHOICE.items()})
    attention = sys.modules.get("fastmae.kernels.attention")
    if attention is not None:
        out.update({f"attention bwd B*H={k[0]} N={k[1]} d={k[2]} {name(k[3])}":
                    kept("FASTMAE_ATTN_BWD", k, v) for k, v in attention._BWD_CHOICE.items()})
    return out


def _config_text(config):
    blocks = " ".join(f"{k}={v}" for k, v in sorted(config.kwargs.items()))
    cap = f", maxnreg={config.maxnreg}" if getattr(config, "maxnreg", None) else ""
    return f"{blocks}, warps={config.num_warps}, stages={config.num_stages}{cap}"


def _mlp_searches():
    """[(label, picked Config, {Config: median ms} or {}), ...] of the fused MLP matmuls'
    autotuners (kernels/gelu_matmul.py: threads' or TMA's)."""
    gelu_matmul = sys.modules.get("fastmae.kernels.gelu_matmul")
    if gelu_matmul is None:
        return []
    from fastmae.kernels import _common
    kernels = (("fc1 fused", gelu_matmul._matmul_bias_gelu_tuned, False),
               ("fc2_dgrad fused", gelu_matmul._matmul_gelu_bwd_tuned, False),
               ("fc1 fused_tma", gelu_matmul._matmul_bias_gelu_tma_tuned, True),
               ("fc2_dgrad fused_tma", gelu_matmul._matmul_gelu_bwd_tma_tuned, True))
    out = []
    for kind, tuned, tma in kernels:
        searches = _common.TUNE_TIMINGS.get(id(tuned), {})
        for key, config in getattr(tuned, "cache", {}).items():
            # the key: next_pow2(M), N, K (and A's element bytes for TMA's), then the dtypes of
            # the tensor arguments (A's first where A is a tensor)
            m_key, n, k = key[:3]
            dtype = f"{8 * key[3]}-bit" if tma else str(key[3]).replace("torch.", "")
            out.append((f"mlp {kind} M<={m_key} N={n} K={k} {dtype}", config,
                        searches.get(key, {})))
    return out


def _attention_searches():
    """[(label, picked Config, {Config: median ms} or {}), ...] of the attention autotuners, then
    the fused MLP matmuls' (_mlp_searches)."""
    attention = sys.modules.get("fastmae.kernels.attention")
    if attention is None:
        return _mlp_searches()
    from fastmae.kernels import _common
    kernels = (("fwd", attention._attn_fwd_tuned), ("bwd fused", attention._attn_bwd_fused_tuned),
               ("bwd fused_q", attention._attn_bwd_fused_q_tuned),
               ("bwd dq", attention._attn_bwd_dq_tuned),
               ("bwd dkdv", attention._attn_bwd_dkdv_tuned))
    out = []
    for kind, tuned in kernels:
        searches = _common.TUNE_TIMINGS.get(id(tuned), {})
        for key, config in getattr(tuned, "cache", {}).items():
            # the key: N, d, (B * H).bit_length() (fused_q's: and HAS_SUMS), then every tensor
            # argument's dtype
            n, d, bh_class = key[:3]
            rest = key[3:]
            sums = rest[0] if rest and isinstance(rest[0], bool) else None
            dtypes = rest[1:] if sums is not None else rest
            dtype = str(dtypes[0]).replace("torch.", "") if dtypes else ""
            grid = f"B*H={2 ** (bh_class - 1)}..{2 ** bh_class - 1}"
            label = f"attention {kind} N={n} d={d} {grid} {dtype}".rstrip()
            # the step's blocks run with the column sums: those keep the label other runs have
            out.append((label + (" without column sums" if sums is False else ""), config,
                        searches.get(key, {})))
    return out + _mlp_searches()


def autotune_timings():
    """Every configuration each attention (and fused MLP matmul) search timed: {label:
    {configuration: median ms}}, fastest first (what autotuned() sums up)."""
    return {label: {_config_text(c): round(ms, 5)
                    for c, ms in sorted(timed.items(), key=lambda kv: kv[1])}
            for label, _, timed in _attention_searches() if timed}


def autotuned():
    """The configuration Triton's autotuner picked for each attention kernel (and fused MLP
    matmul: "mlp fc1 fused_tma M<=65536 N=2048 K=512 16-bit", ...) and shape so far in this
    process, with the median ms it timed it at and how many it timed: {"attention fwd N=197
    d=32 B*H=4096..8191 bfloat16": "BLOCK_M=64 BLOCK_N=64, warps=4, stages=2 (0.195 ms, fastest
    of 7; next 0.201 ms)", ...} (the dtype: the first tensor argument's; nothing under the
    interpreter, whose kernels hold one configuration)."""
    out = {}
    for label, config, timed in _attention_searches():
        text = _config_text(config)
        times = sorted(timed.values())
        if times:
            text += f" ({times[0]:.3f} ms, fastest of {len(times)}" + (
                f"; next {times[1]:.3f} ms)" if len(times) > 1 else ")")
        out[label] = text
    return out


def _error_text(exc):
    """An exception as one line of at most 300 characters, for a result file and the console."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


def _progress(total, desc, enabled):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False, file=sys.stderr, disable=None,
                dynamic_ncols=True)


def time_train_step(step, device, steps, warmup, progress=None, reset_peak=True):
    """Run ``warmup`` steps, then ``steps`` timed ones. Returns a dict of per-step ms (CUDA events
    between consecutive steps on a GPU, wall clock on a CPU), the first step's wall time and the
    peak memory (GPU only; the module docstring defines it): reset after the warm-up, or with
    ``reset_peak=False`` since the caller's last reset (a CUDA graph's, after its eager warm-up
    and before its capture, which allocates its memory)."""
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    sync()
    t0 = time.perf_counter()
    step()
    sync()
    first_s = time.perf_counter() - t0
    if progress:
        progress.update(1)
    for _ in range(max(warmup - 1, 0)):
        step()
        if progress:
            progress.update(1)
    sync()
    if cuda:
        if reset_peak:
            torch.cuda.reset_peak_memory_stats()
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        events[0].record()
        for i in range(steps):
            step()
            events[i + 1].record()
            if progress:
                progress.update(1)
        sync()
        times = [events[i].elapsed_time(events[i + 1]) for i in range(steps)]
        peak = torch.cuda.max_memory_allocated() / 2 ** 30
    else:
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            step()
            times.append((time.perf_counter() - t) * 1e3)
            if progress:
                progress.update(1)
        peak = None
    return {"times_ms": times, "first_step_s": first_s, "peak_mem_gib": peak}


def sustained_ms(times_ms):
    """ms/step of timed steps: their total time over their number (the mean). Consecutive
    events' intervals add up to the run's time, so this is what the run sustained; the median
    would hide a slow step (a host stall, a collection) that the run paid for."""
    return math.fsum(times_ms) / len(times_ms)


def bench_system(key, model_name, batch, amp_dtype, steps, warmup, device, seed=0,
                 progress=True, model_kwargs=None, profile=False, floors=None):
    """Build a fresh model (same seed, so same weights for every system), time it, free it.
    ``profile`` (GPU only): also break two more steps' kernel time down (``profile_train_step``,
    each fastmae kernel against its floor at ``floors``)."""
    label, backend, compiled = SYSTEMS[key]
    model = build_model(model_name, device, seed=seed, **(model_kwargs or {}))
    g = torch.Generator(device=device)
    g.manual_seed(seed + 1)
    H, W = model.patch_embed.img_size
    imgs = torch.randn(batch, model.in_chans, H, W, device=device, generator=g)
    graphed = key in GPU_ONLY_SYSTEMS
    t_make = time.perf_counter()
    # a graph's memory is allocated when it is captured, and held by the graph after: the peak
    # is reset after its eager warm-up, before the capture (as after an eager system's warm-up)
    step, opt, _ = make_train_step(
        model, imgs, amp_dtype, compiled=compiled, cuda_graph=graphed, backend=backend,
        before_capture=torch.cuda.reset_peak_memory_stats if graphed else None)
    t_make = time.perf_counter() - t_make  # a graphed step compiles and captures here
    bar = _progress(warmup + steps, label, progress)
    try:
        with use_backend(backend):
            t = time_train_step(step, torch.device(device), steps, warmup, bar,
                                reset_peak=not graphed)
            breakdown = profile_error = None
            if profile and torch.device(device).type == "cuda":
                try:  # a failed profile costs the breakdown, not the system's timing
                    breakdown = profile_train_step(step, step_ms=sustained_ms(t["times_ms"]),
                                                   floors=floors)
                except Exception as exc:  # noqa: BLE001
                    profile_error = _error_text(exc)
    finally:
        if bar is not None:
            bar.close()
        del step, opt, model, imgs
        if device == "cuda" or str(device).startswith("cuda"):
            torch.cuda.empty_cache()
        if compiled:
            torch._dynamo.reset()
    ms = sustained_ms(t["times_ms"])
    return {
        "system": key, "label": label, "backend": backend, "compiled": compiled,
        "ms_per_step": ms, "ms_mean": ms, "ms_median": statistics.median(t["times_ms"]),
        "ms_min": min(t["times_ms"]), "ms_max": max(t["times_ms"]),
        # each timed step, in order (ViT-L/16 at db16320 ranged 77-94 ms a step: kept to see how)
        "ms_steps": [round(x, 3) for x in t["times_ms"]],
        "images_per_s": batch / (ms * 1e-3), "peak_mem_gib": t["peak_mem_gib"],
        "first_step_s": t["first_step_s"] + t_make, "steps": steps, "warmup": warmup,
        "profile": breakdown,
        **({"profile_error": profile_error} if profile_error else {}),
    }


# ============================================================================ profile

def fastmae_kernel_names():
    """The names fastmae's Triton kernels show in a profile (their @triton.jit functions)."""
    import importlib
    import pkgutil
    import fastmae.kernels as pkg
    from fastmae.kernels._common import kernel_function
    names = set()
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"fastmae.kernels.{info.name}")
        for obj in vars(mod).values():
            fn = kernel_function(obj)  # Autotuner / Heuristics -> JITFunction -> function
            if fn is not obj and callable(fn) and getattr(fn, "__module__", None) == mod.__name__:
                names.add(fn.__name__)
    return names


_CATEGORIES = [
    # (category, name fragments, lower-case); the first match wins. The full name is matched,
    # template arguments included (an elementwise kernel's functor says what it does), so
    # attention comes before matmul (flash kernels' templates name cutlass types), and no bare
    # "cast" (an add of mixed dtypes loads through LoadWithCast)
    ("attention (SDPA)", ("flash", "fmha", "sdpa", "attention")),
    ("matmul (cuBLAS)", ("gemm", "nvjet", "cutlass", "xmma", "gemv", "cublas", "splitk")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("reduction (torch)", ("reduce", "sum")),
    ("copy / cast (torch)", ("memcpy", "memset", "copy", "cat", "index", "scatter", "gather",
                             "fill", "transpose")),
]


def kernel_category(name, fastmae_names):
    if name in fastmae_names:
        return "fastmae kernels"
    if name.startswith("triton_"):  # inductor's kernels, whatever they fused
        return "torch.compile (inductor)"
    low = name.lower()
    for category, fragments in _CATEGORIES:
        if any(f in low for f in fragments):
            return category
    return "other (torch elementwise)"


def work_floor(nbytes, flops, floors):
    """(seconds, "memory" | "matmul"): the time ``nbytes`` take at the copy rate of ``floors``
    (``measure_floors``) or ``flops`` at its matmul rate, whichever is longer; None for matmul
    work without a matmul rate (None: fp32 operands, not timed against the bf16 rate)."""
    rate = floors.get("matmul_flops_per_s")
    if flops and not rate:
        return None
    memory_s, matmul_s = nbytes / floors["copy_bytes_per_s"], flops / rate if flops else 0.0
    return (matmul_s, "matmul") if matmul_s > memory_s else (memory_s, "memory")


def kernel_breakdown(kernels, steps, fastmae_names, step_ms=None, top=15, floors=None):
    """Summarize GPU kernel time from a profile of ``steps`` steps. ``kernels``: (name, us),
    (name, us, launch) or (name, us, launch, work) tuples, one per launch, ``launch`` its grid
    and block (``launch_shape``) or None, ``work`` the (bytes, FLOPs) it had to move and compute
    (``kernels._common.launch_work``) or None. Returns per-step totals: busy ms, launches, per
    category, and the ``top`` kernels by time, and every fastmae kernel by time (each of them,
    however small); where launches carry their shapes, also every fastmae kernel per grid and
    block (``fastmae_launches``: e.g. the encoder's and the decoder's calls of one kernel apart).
    A fastmae row whose every launch carries its work also gets its bytes and FLOPs a step and
    the bandwidth reached, and with ``floors`` (``measure_floors``: the copy rate, and the
    matmul rate or None) its floor: the bytes at the copy rate or the FLOPs at the matmul rate,
    whichever takes longer, and the fraction of it reached (floor time / kernel time)."""
    by_name, by_launch = {}, {}

    def add(table, key, us, work):
        t, n, nbytes, flops = table.get(key, (0.0, 0, 0, 0))
        if work is None or nbytes is None:
            nbytes = flops = None
        else:
            nbytes, flops = nbytes + work[0], flops + work[1]
        table[key] = (t + us, n + 1, nbytes, flops)

    for name, us, *extra in kernels:
        launch = extra[0] if extra else None
        work = extra[1] if len(extra) > 1 else None
        add(by_name, name, us, work)
        if launch is not None and name in fastmae_names:
            add(by_launch, (name, launch), us, work)
    busy_us = sum(t for t, *_ in by_name.values())
    cats = {}
    for name, (t, n, *_) in by_name.items():
        c = kernel_category(name, fastmae_names)
        ct, cn = cats.get(c, (0.0, 0))
        cats[c] = (ct + t, cn + n)

    def row(name, t, n, *_):
        return {"name": name, "ms_per_step": t / 1e3 / steps, "launches_per_step": n / steps,
                "share": t / busy_us if busy_us else 0.0}

    def with_work(r, t, n, nbytes, flops):
        if nbytes is None or not t:
            return r
        r.update(bytes_per_step=nbytes / steps, flops_per_step=flops / steps,
                 gb_per_s=nbytes / (t * 1e-6) / 1e9)
        floor = work_floor(nbytes, flops, floors) if floors else None
        if floor:
            floor_s, bound = floor
            r.update(floor_ms_per_step=floor_s * 1e3 / steps, floor_bound=bound,
                     of_floor=floor_s / (t * 1e-6))
        return r
    by_time = sorted(by_name.items(), key=lambda kv: -kv[1][0])
    out = {
        "steps_profiled": steps,
        "gpu_busy_ms_per_step": busy_us / 1e3 / steps,
        "step_ms": step_ms,
        "launches_per_step": sum(n for _, n, *_ in by_name.values()) / steps,
        "categories": sorted((row(c, t, n) for c, (t, n) in cats.items()),
                             key=lambda r: -r["ms_per_step"]),
        "top_kernels": [dict(row(k, *v), category=kernel_category(k, fastmae_names))
                        for k, v in by_time[:top]],
        "fastmae_kernels": [with_work(row(k, *v), *v) for k, v in by_time if k in fastmae_names],
    }
    if by_launch:
        out["fastmae_launches"] = [
            with_work(dict(row(name, *v), launch=launch), *v)
            for (name, launch), v in sorted(by_launch.items(), key=lambda kv: -kv[1][0])]
    return out


def launch_shape(args):
    """'grid X x Y x Z, block T' (threads a program) from a profiler trace event's args, its
    "grid" and "block" lists; None where it has neither."""
    grid, block = args.get("grid"), args.get("block")
    if not grid or not block:
        return None
    threads = 1
    for b in block:
        threads *= int(b)
    return f"grid {' x '.join(str(int(g)) for g in grid)}, block {threads}"


# a trace's GPU work: kernels, and the copies and fills the copy engines or driver run (a
# same-dtype contiguous copy_ or clone is a cudaMemcpyAsync, not a kernel)
GPU_EVENT_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def _trace_kernels(prof):
    """(name, us, launch shape) of every CUDA kernel, memcpy and memset in a finished
    torch.profiler profile, in the order they ran, read from its Chrome trace, where the
    profiler keeps each kernel's grid and block (None for a copy); None if the trace cannot be
    read."""
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path, encoding="utf-8") as f:
            trace = json.load(f)
        events = trace["traceEvents"] if isinstance(trace, dict) else trace
        kernels = sorted((e for e in events if e.get("cat") in GPU_EVENT_CATEGORIES
                          and e.get("ph") == "X"),
                         key=lambda e: float(e.get("ts", 0)))  # launch order (one stream)
        return [(e["name"], float(e["dur"]), launch_shape(e.get("args") or {})) for e in kernels]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    finally:
        os.unlink(path)


def with_launch_work(kernels, launches, fastmae_names):
    """``kernels`` (name, us, launch shape) of a profile, each fastmae kernel given the
    (bytes, FLOPs) of its launch: ``launches`` (name, bytes, FLOPs), what kernels._common
    reported while the profiled steps ran, in launch order. Paired one to one where the
    profile's fastmae kernels are those launches, name for name, else (a kernel missing from
    the trace, a launch not reported) none is: returns (kernels, paired)."""
    mine = [k for k in kernels if k[0] in fastmae_names]
    if not mine or [k[0] for k in mine] != [name for name, _, _ in launches]:
        return kernels, False
    work = iter(launches)
    out = []
    for k in kernels:
        if k[0] in fastmae_names:
            _, nbytes, flops = next(work)
            k = (k[0], k[1], k[2] if len(k) > 2 else None, (nbytes, flops))
        out.append(k)
    return out, True


def profile_train_step(step, steps=2, step_ms=None, floors=None):
    """Profile ``steps`` training steps on the GPU (after warm-up) and break the kernel time
    down: fastmae kernels, cuBLAS matmuls, optimizer, other torch kernels. Each fastmae launch
    is also set against the work it had to do (``with_launch_work``; ``floors`` as for
    ``kernel_breakdown``)."""
    from torch.profiler import ProfilerActivity, profile

    from fastmae.kernels import _common
    torch.cuda.synchronize()
    launches = []
    _common.OBSERVER = lambda *work: launches.append(work)
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
    finally:
        _common.OBSERVER = None
    kernels = _trace_kernels(prof)
    if not kernels:  # no readable trace: the events, without launch shapes
        kernels = [(e.name, e.time_range.elapsed_us()) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA]
    if not kernels:  # not a step without GPU work: a profiler that did not see it
        raise RuntimeError(f"the profiler recorded no GPU kernel in {steps} steps")
    names = fastmae_kernel_names()
    kernels, paired = with_launch_work(kernels, launches, names)
    out = kernel_breakdown(kernels, steps, names, step_ms=step_ms, floors=floors)
    if launches and not paired:
        out["launch_work"] = (f"not paired: {len(launches)} launches reported, "
                              f"{sum(k[0] in names for k in kernels)} fastmae kernels profiled")
    return out


def format_breakdown(label, b):
    lines = [f"profile of {label}: GPU busy {b['gpu_busy_ms_per_step']:.1f} ms per step"
             + (f" of {b['step_ms']:.1f} ms" if b.get("step_ms") else "")
             + f", {b['launches_per_step']:.0f} kernel launches per step"]
    for r in b["categories"]:
        lines.append(f"  {r['name']:<28} {r['ms_per_step']:8.2f} ms  {100 * r['share']:5.1f}%"
                     f"  {r['launches_per_step']:6.0f} launches")
    for title, rows in (("top kernels", b["top_kernels"]),
                        ("fastmae kernels", b.get("fastmae_kernels", [])),
                        ("fastmae kernels by launch shape", b.get("fastmae_launches", []))):
        if rows:
            lines.append(f"  {title}:")
        for r in rows:
            shape = f"  ({r['launch']})" if r.get("launch") else ""
            lines.append(f"    {r['ms_per_step']:8.2f} ms  {100 * r['share']:5.1f}%  "
                         f"x{r['launches_per_step']:<5.0f} {r['name'][:90]}{shape}"
                         + _work_text(r))
    if b.get("launch_work"):
        lines.append(f"  launch work {b['launch_work']}")
    return "\n".join(lines)


def _work_text(r):
    """', 1.23 GB 3210 GB/s, 75% of its memory floor' for a row that has its work."""
    if r.get("gb_per_s") is None:
        return ""
    text = f", {r['bytes_per_step'] / 1e9:.3f} GB {r['gb_per_s']:.0f} GB/s"
    if r.get("flops_per_step"):
        text += f" {r['flops_per_step'] / 1e9:.1f} GFLOP"
    if r.get("of_floor") is not None:
        text += f", {100 * r['of_floor']:.0f}% of its {r['floor_bound']} floor"
    return text


# ============================================================================ parity

def _shared_step_inputs(model_name, batch, device, seed, data_seed, model_kwargs):
    """(model from ``seed``, random images and distinct mask noise from ``data_seed``): what a
    check's systems all start from."""
    from fastmae import testing
    model = build_model(model_name, device, seed=seed, **(model_kwargs or {}))
    g = torch.Generator(device=device)
    g.manual_seed(data_seed)
    H, W = model.patch_embed.img_size
    imgs = torch.randn(batch, model.in_chans, H, W, device=device, generator=g)
    noise = testing.distinct_noise(batch, model.patch_embed.num_patches, g, device)
    return model, imgs, noise


def step_parity(model_name, batch, amp_dtype, device, seed=0, model_kwargs=None):
    """fastmae against the reference on one shared step: same weights, images and noise.

    Under autocast both run in ``amp_dtype`` and errors are measured against the reference in
    fp32 (float64 for an fp32 run or on a CPU); the eager reference's own error in the same
    precision is the scale of an acceptable one."""
    from fastmae.check import model_parity
    model, imgs, noise = _shared_step_inputs(model_name, batch, device, seed, seed + 2,
                                             model_kwargs)
    amp = None if amp_dtype == torch.float32 else amp_dtype
    exact = torch.float64 if (amp is None or str(device) == "cpu") else torch.float32
    par = model_parity(model, imgs, noise, autocast=amp, exact_dtype=exact)
    del model
    out = dict(vars(par))
    out.update({"batch": batch, "dtype": _dtype_name(amp_dtype),
                "rule": "each error vs the exact reference <= max(1e-4, 2 x the eager reference's "
                        "error on the same quantity + one rounding of the dtype; for the loss, "
                        "an fp32 mean, that rounding over the square root of its terms)"})
    return out


GRAPH_CHECK_STEPS = 3
GRAPH_CHECK_PARAM_TOL = 0.05  # of how far the eager steps moved the parameter
GRAPH_CHECK_LOSS_RTOL = 1e-4
GRAPH_CHECK_RULE = (
    f"each replay's loss within max({GRAPH_CHECK_LOSS_RTOL:g}, 2 x a repeated eager run's) "
    f"relative of the eager step's; each parameter after them: |graph - eager| (L2) <= "
    f"max({GRAPH_CHECK_PARAM_TOL:g} x |eager - initial|, 2 x |repeated eager - eager|) + fp32 "
    f"rounding of its values")


def graph_check(key, model_name, batch, amp_dtype, device="cuda", steps=GRAPH_CHECK_STEPS,
                seed=0, model_kwargs=None):
    """A graphed system (``key``, e.g. "fastmae_graph") checked against the same step run
    eagerly: from the same weights, images and fixed mask noise, ``steps`` eager steps and
    ``steps`` replays of the CUDA graph (whose warm-up ``fastmae.cuda_graph_step`` undoes, so
    replay i is step i), at the batch given (the timed one: the kernel paths and tiles timed).
    Each replay's loss is compared with the eager step's, and every parameter after them: its
    difference from the eager one must be small against how far the eager steps moved it, so a
    graph that skips the update, reads stale state or produces NaN fails. Where the step's
    kernels are not deterministic (atomics), a second eager run's difference from the first is
    the scale of an acceptable one (``GRAPH_CHECK_RULE``). Returns a dict; "passed" says."""
    import copy
    label, backend, _ = SYSTEMS[key]
    if key not in GPU_ONLY_SYSTEMS:
        raise ValueError(f"graph_check: {key!r} is not a CUDA-graph system "
                         f"({', '.join(GPU_ONLY_SYSTEMS)})")
    start, imgs, noise = _shared_step_inputs(model_name, batch, device, seed, seed + 3,
                                             model_kwargs)
    names = [n for n, p in start.named_parameters() if p.requires_grad]

    def run(cuda_graph):
        model = copy.deepcopy(start)
        step, opt, _ = make_train_step(model, imgs, amp_dtype, noise=noise,
                                       cuda_graph=cuda_graph, backend=backend)
        losses = []
        with use_backend(backend):
            for _ in range(steps):
                losses.append(step().detach().item())  # a replay's is overwritten by the next
        params = dict(model.named_parameters())
        out = [params[n].detach().clone() for n in names]
        del step, opt, model, params
        torch.cuda.empty_cache()
        return losses, out

    eager_losses, eager = run(False)
    repeat_losses, repeat = run(False)
    repeat_diff = [(r - e).float().norm().item() for r, e in zip(repeat, eager)]
    del repeat
    graph_losses, graphed = run(True)
    initial = dict(start.named_parameters())

    def rel(a, b):
        return abs(a - b) / max(abs(b), 1e-30)
    loss_errs = [rel(x, e) for x, e in zip(graph_losses, eager_losses)]
    loss_limits = [max(GRAPH_CHECK_LOSS_RTOL, 2 * rel(r, e))
                   for r, e in zip(repeat_losses, eager_losses)]
    losses_ok = all(err <= lim for err, lim in zip(loss_errs, loss_limits))
    failed, worst, worst_ratio = [], None, -1.0
    for n, e, q, noise_diff in zip(names, eager, graphed, repeat_diff):
        moved = (e - initial[n]).float().norm().item()
        diff = (q - e).float().norm().item()
        rounding = torch.finfo(torch.float32).eps * e.float().norm().item()
        limit = max(GRAPH_CHECK_PARAM_TOL * moved, 2 * noise_diff) + rounding
        if not diff <= limit:  # NaN fails too
            failed.append(n)
        ratio = diff / limit if limit > 0 else (0.0 if diff == 0 else math.inf)
        if not ratio <= worst_ratio:  # the first NaN or the largest
            worst_ratio, worst = (math.inf if ratio != ratio else ratio), (n, diff, moved, limit)
    del start, initial, eager, graphed, imgs, noise
    torch.cuda.empty_cache()
    n, diff, moved, limit = worst
    return {
        "system": key, "label": label, "batch": batch, "dtype": _dtype_name(amp_dtype),
        "steps": steps, "mask_noise": "fixed",
        "losses_eager": eager_losses, "losses_graph": graph_losses,
        "losses_eager_repeat": repeat_losses,
        "loss_err": max(loss_errs), "loss_limit": min(loss_limits),
        "param_worst": n, "param_diff": diff, "param_moved": moved, "param_limit": limit,
        "param_diff_of_moved": diff / moved if moved else None,
        "params_failed": failed, "n_params": len(names),
        "rule": GRAPH_CHECK_RULE,
        "passed": bool(losses_ok and not failed),
    }


def graph_check_line(c):
    """One line saying how a graph check went (``graph_check``'s dict, or one with "error")."""
    label = c.get("label", c.get("system"))
    if c.get("error"):
        return f"graph check [FAIL] {label}: {c['error']}"
    losses = " ".join(f"{x:.6f}" for x in c["losses_graph"])
    eager = " ".join(f"{x:.6f}" for x in c["losses_eager"])
    of_moved = c.get("param_diff_of_moved")
    share = f" ({100 * of_moved:.3g}% of it)" if of_moved is not None else ""
    return (f"graph check [{'PASS' if c['passed'] else 'FAIL'}] {label}: {c['steps']} replays "
            f"against {c['steps']} eager steps from the same weights (batch {c['batch']}, "
            f"{c['dtype']}, fixed mask noise): losses {losses} vs {eager} (worst relative error "
            f"{c['loss_err']:.1e}); worst parameter {c['param_worst']}: |graph - eager| "
            f"{c['param_diff']:.2e} where the eager steps moved it {c['param_moved']:.2e}{share}, "
            f"limit {c['param_limit']:.2e}"
            + (f"; over the limit: {_names(c['params_failed'])}" if c["params_failed"] else ""))


def _dtype_name(dt):
    return {v: k for k, v in DTYPES.items()}[dt]


def parity_line(p):
    verdict = "PASS" if p["passed"] else "FAIL"
    return (f"parity [{verdict}] one shared step (batch {p['batch']}, {p['dtype']}, same weights, "
            f"images and noise; errors vs the {p['exact']}): "
            f"loss fastmae {p['loss_fastmae']:.6f} vs reference {p['loss_reference']:.6f} "
            f"(err {p['loss_err']:.1e}, reference's own {p['loss_err_eager']:.1e}); "
            f"pred err {p['pred_err']:.1e} (reference {p['pred_err_eager']:.1e}); "
            f"gradients ({p['n_grads']}): closest to its limit {p['grad_worst']} err "
            f"{p['grad_err']:.1e} (reference's {p['grad_err_eager']:.1e}; reference's worst "
            f"{p['grad_err_eager_max']:.1e}); mask {'identical' if p['mask_equal'] else 'DIFFERS'}"
            + (f"; over the limit: {_names(p['grad_failed'])}" if p["grad_failed"] else "")
            + (f"; missing gradients: {_names(p['missing_grads'])}" if p["missing_grads"] else "")
            + (f"; gradients the reference lacks: {_names(p['unexpected_grads'])}"
               if p.get("unexpected_grads") else "")
            + (f"; dtype differs from the reference's: {_names(p['dtype_differs'])}"
               if p.get("dtype_differs") else "")
            + _parity_batch_note(p))


def _parity_batch_note(p):
    """Where a GPU parity step ran (after the timing): at the timed batch, or, out of memory
    there, at a smaller one; nothing for a parity dict without it (a CPU run, earlier runs)."""
    if p.get("retried"):
        r = p["retried"]
        return (f"; out of memory at the timed batch {r['batch']} ({r['error']}): checked at batch "
                f"{p['batch']} instead, whose kernel paths and tiles are chosen for it, not the "
                f"timed ones")
    timed = p.get("timed_batch")
    if timed is None:
        return ""
    if p.get("batch") == timed:
        return "; after the timing, at the timed batch: the kernel paths and tiles timed"
    return (f"; after the timing, at batch {p.get('batch')} (--parity-batch), not the timed "
            f"batch {timed}")


def _out_of_memory(exc):
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def gpu_parity(model_name, batch, amp_dtype, timed_batch, fallback=PARITY_BATCH_GPU):
    """``step_parity`` on the GPU after the systems were timed, at ``batch`` (by default the
    timed one); if that runs out of memory and ``batch`` > ``fallback``, memory is freed and it
    runs at ``fallback`` instead, the dict's "retried" saying so. Other errors propagate."""
    import gc
    why = None
    try:
        out = step_parity(model_name, batch, amp_dtype, "cuda")
    except Exception as exc:  # noqa: BLE001 - out of memory is retried, the rest raised
        if not (_out_of_memory(exc) and batch > fallback):
            raise
        why = _error_text(exc)
    if why is not None:  # outside the except block: its traceback no longer holds the tensors
        gc.collect()
        torch.cuda.empty_cache()
        out = step_parity(model_name, fallback, amp_dtype, "cuda")
        out["retried"] = {"batch": batch, "error": why}
    out.update(timed_batch=timed_batch, after_timing=True)
    return out


def _names(names, most=5):
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


# ============================================================================ the table

def format_results(results, mfu_available, with_compile):
    head = ["system", "ms/step", "images/s", "MFU", "peak GiB", "first step s", "vs eager"]
    if with_compile:
        head.append("vs compile")
    rows = []
    for r in results:
        if r.get("error"):
            rows.append([r["label"], "-", "-", "-", "-", "-", "-"] + (["-"] if with_compile else [])
                        + [f"FAILED: {r['error']}"])
            continue
        row = [r["label"], f"{r['ms_per_step']:.1f}" if r["ms_per_step"] >= 1 else f"{r['ms_per_step']:.3f}",
               f"{r['images_per_s']:.0f}" if r["images_per_s"] >= 100 else f"{r['images_per_s']:.1f}",
               f"{100 * r['mfu']:.1f}%" if (mfu_available and r.get("mfu") is not None) else "n/a",
               f"{r['peak_mem_gib']:.1f}" if r.get("peak_mem_gib") is not None else "n/a",
               f"{r['first_step_s']:.1f}",
               f"{r['speedup_vs_eager']:.2f}x" if r.get("speedup_vs_eager") else "-"]
        if with_compile:
            row.append(f"{r['speedup_vs_compile']:.2f}x" if r.get("speedup_vs_compile") else "-")
        rows.append(row)
    n = len(head)
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) for i in range(n)]
    fmt = lambda cells: "  ".join(  # noqa: E731
        (c.ljust(w) if i == 0 else c.rjust(w)) for i, (c, w) in enumerate(zip(cells[:n], widths))
    ) + ("  " + cells[n] if len(cells) > n else "")
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def _add_ratios(results, flops_per_image, floors):
    by = {r["system"]: r for r in results if not r.get("error")}
    eager = by.get("reference")
    comp = by.get("reference_compile")
    for r in results:
        if r.get("error"):
            continue
        r["speedup_vs_eager"] = eager["ms_per_step"] / r["ms_per_step"] if eager else None
        r["speedup_vs_compile"] = comp["ms_per_step"] / r["ms_per_step"] if comp else None
        r["achieved_flops_per_s"] = flops_per_image * r["images_per_s"]
        rate = floors.get("matmul_flops_per_s") if floors else None
        r["mfu"] = r["achieved_flops_per_s"] / rate if rate else None


# ============================================================================ the command

def _parser():
    p = argparse.ArgumentParser(
        prog="fastmae bench",
        description="Time an MAE training step (forward + backward + fused AdamW, autocast, "
                    "norm_pix_loss, mask ratio 0.75, random 224 px images) with fastmae's kernels "
                    "against the eager reference (and torch.compile of it), then check parity "
                    "on one shared step and each CUDA graph's replays against eager steps. "
                    "Without a GPU it runs a tiny CPU configuration instead and says so.")
    p.add_argument("--model", choices=list(MODELS), default="vit_b16",
                   help="model size (default vit_b16); 'tiny' (32 px) and 'micro' (16 px) are for quick runs. "
                        "Without a GPU the tiny CPU configuration runs whatever this says")
    p.add_argument("--batch", type=int_at_least(1, "--batch"), default=None,
                   help=f"images per step (default 256; 128 for vit_h14; {CPU_BATCH} on a CPU)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16",
                   help="autocast dtype (default bf16; fp32 = no autocast)")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile of the reference (compiling takes a minute or more)")
    p.add_argument("--steps", type=int_at_least(1, "--steps"), default=None,
                   help=f"timed steps per system (default 20; {CPU_STEPS} on a CPU)")
    p.add_argument("--warmup", type=int_at_least(0, "--warmup"), default=None,
                   help=f"untimed steps first, the compiling one included (default 5; {CPU_WARMUP} on a CPU)")
    p.add_argument("--parity-batch", type=int_at_least(0, "--parity-batch"), default=None,
                   help="batch of the parity step, which on a GPU runs after the systems are "
                        "timed (default: the timed batch, so that it checks the kernel paths "
                        "and tiles chosen for it; if that runs out of memory, "
                        f"{PARITY_BATCH_GPU}, and it says so; a larger N: the timed batch); "
                        f"{PARITY_BATCH_CPU} on a CPU; 0 skips it")
    p.add_argument("--systems", type=_systems_list, default=None,
                   help="comma-separated systems to time on a GPU, of " + ",".join(SYSTEMS)
                        + " (default: reference,fastmae,fastmae_graph, and reference_compile "
                          "with --compile; fastmae_compile is torch.compile of the fastmae model)")
    p.add_argument("--no-precompile", action="store_true",
                   help="on a GPU, let the first steps compile fastmae's Triton kernels one by "
                        "one instead of compiling them first in parallel processes "
                        "(fastmae.precompile)")
    p.add_argument("--no-profile", action="store_true",
                   help="skip the profiler's kernel-time breakdown of the fastmae and eager steps (GPU)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _systems_list(text):
    keys = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in keys if k not in SYSTEMS]
    if bad or not keys:
        raise argparse.ArgumentTypeError(
            f"--systems: unknown system(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(SYSTEMS)}")
    return keys


def _parse(argv):
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        # before the run, not after it: a bad --json path would otherwise waste it
        why = args.json and output_file_error("--json", args.json)
        if why:
            parser.error(why)
        return args, 0
    except SystemExit as e:
        return None, (e.code if isinstance(e.code, int) else 2)


def _write_json(path, data):
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    # written whole, then renamed over the old: a run killed mid-write keeps the last save
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args, code = _parse(argv)
    if args is None:
        return code
    args.command = shlex.join(["fastmae", "bench", *argv])
    if torch.cuda.is_available():
        return _main_gpu(args)
    return _main_cpu(args)


PRECOMPILE_TIMEOUT_S = 300


def precompile(model_name, batches, dtype):
    """Compile the Triton kernels of the fastmae steps to come in parallel processes first
    (``python -m fastmae.precompile``, in a subprocess so that its recording leaves this process
    untouched). Returns its summary, or {"error": why}: then the steps compile them themselves."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "precompile.json")
        cmd = [sys.executable, "-m", "fastmae.precompile", "--model", model_name, "--dtype", dtype,
               "--json", path] + [a for b in batches for a in ("--batch", str(b))]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  timeout=PRECOMPILE_TIMEOUT_S)
            if proc.returncode == 0:
                print(proc.stdout.strip(), flush=True)
                with open(path, encoding="utf-8") as f:
                    return json.load(f)
            why = f"exit {proc.returncode}: " + " ".join((proc.stderr or proc.stdout).split()[-60:])
        except subprocess.TimeoutExpired:
            why = f"took over {PRECOMPILE_TIMEOUT_S} s"
        except OSError as exc:
            why = f"{type(exc).__name__}: {exc}"
    why = why[:400]
    print(f"precompile failed ({why}); the first steps compile the kernels instead", flush=True)
    return {"error": why}


def _main_gpu(args):
    model_name = args.model
    batch = args.batch or MODELS[model_name][1]
    steps = args.steps or 20
    warmup = 5 if args.warmup is None else max(args.warmup, 1)
    amp_dtype = DTYPES[args.dtype]
    progress = not args.no_progress
    env = env_info()
    meta = build_model(model_name, "meta")
    fwd_flops = forward_flops_per_image(meta)
    train_flops = 3 * fwd_flops
    img = meta.patch_embed.img_size
    del meta
    print(f"fastmae bench: {MODEL_TITLES[model_name]} ({MODELS[model_name][0]}), batch {batch}, "
          f"{img[0]}x{img[1]} px random images, mask ratio {MASK_RATIO}, norm_pix_loss, "
          f"{args.dtype} {'autocast' if args.dtype != 'fp32' else '(no autocast)'}, fused AdamW"
          f"{', GradScaler' if args.dtype == 'fp16' else ''}")
    print(f"device: {env['gpu']} (driver {env['driver']}, CUDA {env['cuda']}) | torch {env['torch']} | "
          f"triton {env['triton']} ({env['triton_launch']} launch) | commit {env['commit']} | "
          f"{env['date']}")
    order = args.systems or (["reference", "fastmae", "fastmae_graph"]
                             + (["reference_compile"] if args.compile else []))
    # parity after the timing, at the timed batch by default: the kernel paths and autotuned
    # tiles it checks are the timed ones
    pb = batch if args.parity_batch is None else min(batch, args.parity_batch)
    precompiled = None
    if not args.no_precompile and (pb > 0 or any(SYSTEMS[k][1] == "triton" for k in order)):
        precompiled = precompile(model_name, [batch] + ([pb] if 0 < pb != batch else []),
                                 args.dtype)
    floors = measure_floors()
    print(f"floors measured now: device copy {floors['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 "
          f"{floors['matmul_n']}^3 matmul {floors['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s; "
          f"training FLOPs per image {train_flops / 1e9:.1f} G "
          f"(compute floor {floors['matmul_flops_per_s'] / train_flops:.0f} images/s)")
    # a kernel's FLOPs are set against the bf16 matmul rate only where its operands are half
    profile_floors = dict(floors, matmul_flops_per_s=floors["matmul_flops_per_s"]
                          if amp_dtype in (torch.bfloat16, torch.float16) else None)
    print(f"timing: {warmup} warm-up steps (compiling/autotuning included, not timed), then "
          f"{steps} steps timed with CUDA events; ms/step is their total time over {steps}")
    checks = [f"parity of fastmae against the reference on one shared step at batch {pb}"
              + (" (the timed batch)" if pb == batch else "")] if pb > 0 else []
    if any(k in GPU_ONLY_SYSTEMS for k in order):
        checks.append(f"each CUDA graph's {GRAPH_CHECK_STEPS} replays against as many eager "
                      f"steps at batch {batch}")
    print("then checked: " + ("; ".join(checks) if checks else "nothing (--parity-batch 0)"))
    print()
    config = {"model": model_name, "title": MODEL_TITLES[model_name],
              "factory": MODELS[model_name][0], "batch": batch, "dtype": args.dtype,
              "img_size": list(img), "mask_ratio": MASK_RATIO, "norm_pix_loss": True,
              "optimizer": "AdamW(fused=True)", "steps": steps, "warmup": warmup,
              "compile": any(SYSTEMS[k][2] for k in order), "systems": order}
    results, parity = [], None

    def save():  # after every system, so a run stopped part-way keeps what it measured
        if not args.json:
            return
        _add_ratios(results, train_flops, profile_floors)  # MFU: 16-bit runs only
        _write_json(args.json, {
            "schema": SCHEMA, "kind": "train_step", "tiny_cpu": False,
            "env": env, "floors": floors, "config": config,
            "flops": {"forward_per_image": fwd_flops, "training_per_image": train_flops},
            "results": results, "parity": parity, "precompile": precompiled,
            "what_ran": "GPU: every system timed on the GPU",
            "command": args.command,
        })

    save()
    for key in order:
        try:
            results.append(bench_system(key, model_name, batch, amp_dtype, steps, warmup, "cuda",
                                        progress=progress,
                                        profile=not args.no_profile and key in PROFILED,
                                        floors=profile_floors))
        except Exception as exc:  # noqa: BLE001 - one failing system is reported, not fatal
            label = SYSTEMS[key][0]
            msg = _error_text(exc)
            results.append({"system": key, "label": label, "backend": SYSTEMS[key][1],
                            "compiled": SYSTEMS[key][2], "error": msg})
            torch.cuda.empty_cache()
            torch._dynamo.reset()
        r = results[-1]
        print(f"{r['label']}: " + (f"FAILED: {r['error']}" if r.get("error") else
                                   f"{r['ms_per_step']:.1f} ms/step, {r['images_per_s']:.0f} images/s"),
              flush=True)
        if SYSTEMS[key][1] == "triton" and not r.get("error"):
            r["paths_kept"] = paths_kept()
            print("  paths kept by timing: " + "; ".join(f"{k} -> {v}" for k, v in r["paths_kept"].items()))
            r["autotuned"] = autotuned()
            r["autotune_timings"] = autotune_timings()
            print("  autotuned: " + "; ".join(f"{k} -> {v}" for k, v in r["autotuned"].items()))
        save()
    print()
    if pb > 0:
        try:
            parity = gpu_parity(model_name, pb, amp_dtype, batch)
            print(parity_line(parity))
        except Exception as exc:  # noqa: BLE001
            msg = _error_text(exc)
            parity = {"passed": False, "error": msg, "batch": pb, "timed_batch": batch,
                      "after_timing": True}
            print(f"parity [FAIL] (batch {pb}): {msg}")
        torch.cuda.empty_cache()
        save()
    for r in results:  # each timed CUDA graph's replays against eager steps
        if r["system"] not in GPU_ONLY_SYSTEMS or r.get("error"):
            continue
        try:
            r["graph_check"] = graph_check(r["system"], model_name, batch, amp_dtype, "cuda")
        except Exception as exc:  # noqa: BLE001
            r["graph_check"] = {"system": r["system"], "label": r["label"], "batch": batch,
                                "passed": False, "error": _error_text(exc)}
        print(graph_check_line(r["graph_check"]), flush=True)
        torch.cuda.empty_cache()
        save()
    print()
    _add_ratios(results, train_flops, profile_floors)
    print(format_results(results, True, "reference_compile" in order))
    for r in results:
        if r.get("profile"):
            print()
            print(format_breakdown(r["label"], r["profile"]))
        elif r.get("profile_error"):
            print(f"\nprofile of {r['label']} failed: {r['profile_error']}")
    print()
    save()
    if args.json:
        print(f"wrote {args.json}")
    return 1 if run_failed(results, parity) else 0


def run_failed(results, parity):
    """A system that failed, a failed parity step or a failed graph check."""
    return (any(r.get("error") for r in results)
            or (parity is not None and not parity.get("passed"))
            or any(r.get("graph_check") and not r["graph_check"].get("passed") for r in results))


def _main_cpu(args):
    from fastmae.check import kernel_device
    t_start = time.perf_counter()
    # first, before anything imports triton: the parity check needs the interpreter
    pb = PARITY_BATCH_CPU if args.parity_batch is None else min(args.parity_batch, args.batch or CPU_BATCH)
    device, where = kernel_device() if pb > 0 else (None, "skipped (--parity-batch 0)")
    requested = (f"--model {args.model}" + (f" --batch {args.batch}" if args.batch else "")
                 + f" --dtype {args.dtype}")
    batch = args.batch or CPU_BATCH
    steps = args.steps or CPU_STEPS
    warmup = CPU_WARMUP if args.warmup is None else args.warmup
    model_name = CPU_MODEL
    env = env_info()
    meta = build_model(model_name, "meta")
    fwd_flops = forward_flops_per_image(meta)
    img = meta.patch_embed.img_size
    del meta
    print("fastmae bench: no CUDA GPU on this machine, so nothing about fastmae's speed can be "
          "measured here.")
    print(f"Ran the tiny CPU configuration instead of {requested}: {MODEL_TITLES[model_name]} "
          f"({MODELS[model_name][0]}), batch {batch}, fp32 (no autocast), {steps} timed steps "
          f"after {warmup} warm-up, AdamW, norm_pix_loss, mask ratio {MASK_RATIO}.")
    print(f"CPU: {env['cpu']}, {torch.get_num_threads()} threads | torch {env['torch']} | "
          f"triton {env['triton']} | commit {env['commit']} | {env['date']}")
    print("Rows: 'reference, eager' is fastmae's model under the \"torch\" backend (the official "
          "algorithm with SDPA attention) timed on the CPU"
          + ("; 'reference, torch.compile' is the same model compiled by inductor for the CPU"
             if args.compile else "")
          + ". fastmae's Triton kernels are not timed: on a CPU they run only through Triton's "
            "interpreter. MFU and peak memory are GPU measurements: n/a here.")
    print()
    order = ["reference"] + (["reference_compile"] if args.compile else [])
    results = []
    for key in order:
        try:
            results.append(bench_system(key, model_name, batch, torch.float32, steps, warmup,
                                        "cpu", progress=not args.no_progress))
        except Exception as exc:  # noqa: BLE001
            msg = _error_text(exc)
            results.append({"system": key, "label": SYSTEMS[key][0], "backend": "torch",
                            "compiled": SYSTEMS[key][2], "error": msg})
    _add_ratios(results, 3 * fwd_flops, None)
    print(format_results(results, False, args.compile))

    parity = None
    if pb > 0:
        if device is None:
            print(f"parity of the triton path: not checked ({where})")
        else:
            try:
                parity = step_parity(model_name, pb, torch.float32, "cpu")
                print(parity_line(parity).replace(
                    "parity [", "parity of the triton path through Triton's interpreter [", 1))
            except Exception as exc:  # noqa: BLE001
                msg = _error_text(exc)
                parity = {"passed": False, "error": msg}
                print(f"parity of the triton path through Triton's interpreter [FAIL]: {msg}")
    secs = time.perf_counter() - t_start
    print(f"tiny CPU configuration done in {secs:.1f} s; run `fastmae bench` on a machine with a "
          f"CUDA GPU for the real measurement")
    data = {
        "schema": SCHEMA, "kind": "train_step", "tiny_cpu": True,
        "env": env, "floors": None,
        "config": {"model": model_name, "title": MODEL_TITLES[model_name],
                   "factory": MODELS[model_name][0], "batch": batch, "dtype": "fp32",
                   "requested": requested, "img_size": list(img), "mask_ratio": MASK_RATIO,
                   "norm_pix_loss": True, "optimizer": "AdamW", "steps": steps, "warmup": warmup,
                   "compile": args.compile},
        "flops": {"forward_per_image": fwd_flops, "training_per_image": 3 * fwd_flops},
        "results": results, "parity": parity,
        "what_ran": ("CPU, no GPU: the reference timed on the CPU on the tiny configuration; "
                     "fastmae's kernels not timed; parity of the triton path through Triton's "
                     "interpreter" + ("" if parity is not None else f" not checked ({where})")),
        "seconds": secs, "command": args.command,
    }
    if args.json:
        _write_json(args.json, data)
        print(f"wrote {args.json}")
    return 1 if run_failed(results, parity) else 0


if __name__ == "__main__":
    sys.exit(main())
