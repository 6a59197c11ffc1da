"""Where the host (CPU) time of an eager training step goes, on a GPU.

    python benches/step_overhead.py [--model vit_b16] [--batch 256] [--profile-top 25]

An eager step is fast only while the host enqueues kernels faster than the GPU runs them. This
prints, measured now on this machine:
1. the host cost of one launch: a torch op, Triton kernels with 1, 4 and 12 pointer arguments
   (Triton's launcher queries the driver once per pointer) launched by Triton and by fastmae's
   direct launch (``kernels/_common.py``), a no-op ``torch.library`` custom op, and fastmae's
   LayerNorm op launched both ways;
2. per system (fastmae, the eager reference): the host time to enqueue one step, the GPU time of
   one step (CUDA events) and of one replay of the step captured as a CUDA graph; and the host
   time to enqueue a fastmae step with every launch through Triton's own launch path;
3. the host-device synchronizations in one eager step, per system (each one stalls the host
   until the GPU has caught up: the step then costs host time + GPU time);
4. the Python functions that take the host time of one fastmae step (cProfile, by own time).
"""
import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
import warnings

import torch
import triton
import triton.language as tl

from fastmae.backend import use_backend
from fastmae.bench import MODELS, build_model, make_train_step, _cuda_time_ms as cuda_time_ms


@triton.jit
def _touch1(a):
    tl.store(a, tl.load(a) + 1.0)


@triton.jit
def _touch4(a, b, c, d):
    tl.store(a, tl.load(a) + tl.load(b) + tl.load(c) + tl.load(d))


@triton.jit
def _touch12(a, b, c, d, e, f, g, h, i, j, k, m, n_rows, stride_a, stride_b, eps):
    tl.store(a, tl.load(a) + tl.load(b) + tl.load(c) + tl.load(d) + tl.load(e) + tl.load(f)
             + tl.load(g) + tl.load(h) + tl.load(i) + tl.load(j) + tl.load(k) + tl.load(m) + eps)


@torch.library.custom_op("fastmae_bench::noop", mutates_args=())
def _noop(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@_noop.register_fake
def _(x):
    return torch.empty_like(x)


def host_us(fn, n=300):
    """Host microseconds per call of ``fn`` (tiny work: the GPU keeps up, the host is timed)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return host


def launch_costs():
    from fastmae import ops
    from fastmae.kernels import _common
    x = torch.ones(16, device="cuda")
    bufs = [torch.ones(16, device="cuda") for _ in range(12)]
    ln_x = torch.randn(64, 768, device="cuda")
    ln_w, ln_b = torch.ones(768, device="cuda"), torch.zeros(768, device="cuda")
    # 12 pointers into a different allocation on every call, as in a training step (the driver
    # may answer a repeated pointer query from a cache)
    pool = [[torch.ones(16 + i, device="cuda") for _ in range(12)] for i in range(64)]
    turn = iter(range(10 ** 9))
    rows = [
        ("torch: x.add_(1)", lambda: x.add_(1.0)),
        ("triton: 1 pointer", lambda: _touch1[(1,)](x)),
        ("triton: 4 pointers", lambda: _touch4[(1,)](*bufs[:4])),
        ("triton: 12 pointers + 3 ints + 1 float", lambda: _touch12[(1,)](*bufs, 16, 1, 1, 0.5)),
        ("triton: the same, fresh buffers each call",
         lambda: _touch12[(1,)](*pool[next(turn) % 64], 16, 1, 1, 0.5)),
        ("fastmae direct launch: 1 pointer", lambda: _common.launch(_touch1, (1,), x)),
        ("fastmae direct launch: 12 pointers + ...",
         lambda: _common.launch(_touch12, (1,), *bufs, 16, 1, 1, 0.5)),
        ("fastmae direct launch: the same, fresh buffers",
         lambda: _common.launch(_touch12, (1,), *pool[next(turn) % 64], 16, 1, 1, 0.5)),
        ("torch.library custom op (no kernel)", lambda: _noop(x)),
    ]
    with use_backend("triton"):
        rows.append(("fastmae ops.layer_norm (64 x 768)",
                     lambda: ops.layer_norm(ln_x, ln_w, ln_b, 1e-6)))
        out = [(name, host_us(fn)) for name, fn in rows]
        saved, _common.DIRECT_LAUNCH = _common.DIRECT_LAUNCH, False  # Triton's own launch path
        try:
            out.append(("  the same, Triton's own launch path",
                        host_us(lambda: ops.layer_norm(ln_x, ln_w, ln_b, 1e-6))))
        finally:
            _common.DIRECT_LAUNCH = saved
    print("host cost of one call (us), tiny tensors:")
    for name, us in out:
        print(f"  {name:<42} {us:8.1f}")
    return out


def _eager_step(model_name, batch):
    """A fresh model's eager bf16 training step on random images, and the images."""
    model = build_model(model_name, "cuda")
    g = torch.Generator(device="cuda").manual_seed(1)
    H, W = model.patch_embed.img_size
    imgs = torch.randn(batch, 3, H, W, device="cuda", generator=g)
    step, _, _ = make_train_step(model, imgs, torch.bfloat16)
    return step, imgs


def _enqueue_ms(step, warmup=3, reps=5):
    """Host ms to enqueue one call of ``step`` (the median of ``reps``, each started on an idle
    GPU), after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    host = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        host.append((time.perf_counter() - t) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(host)


def step_costs(model_name, batch, backend):
    step, imgs = _eager_step(model_name, batch)
    with use_backend(backend):
        host = _enqueue_ms(step)
        eager_ms = cuda_time_ms(step, reps=5, warmup=0)
        syncs = sync_points(step)
        prof = None
        if backend == "triton":
            prof = cProfile.Profile()
            # the backward on this thread, so that cProfile sees it too
            with torch.autograd.set_multithreading_enabled(False):
                prof.enable()
                step()
                prof.disable()
            torch.cuda.synchronize()
    del step
    torch.cuda.empty_cache()
    # the same step captured as one CUDA graph (fresh model and optimizer)
    model = build_model(model_name, "cuda")
    try:
        gstep, _, _ = make_train_step(model, imgs, torch.bfloat16, cuda_graph=True, backend=backend)
        graph_ms = cuda_time_ms(gstep, reps=10, warmup=1)
        del gstep
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        graph_ms = f"capture failed: {type(exc).__name__}: {str(exc)[:200]}"
    torch.cuda.empty_cache()
    return host, eager_ms, graph_ms, prof, syncs


def enqueue_ms(model_name, batch, backend):
    """Host ms to enqueue one eager step, nothing else."""
    step, _ = _eager_step(model_name, batch)
    with use_backend(backend):
        host = _enqueue_ms(step)
    del step
    torch.cuda.empty_cache()
    return host


def sync_points(step):
    """Where one call of ``step`` synchronizes the host with the GPU: (message, "file:line")
    pairs from torch's sync debug mode (torch.cuda.set_sync_debug_mode)."""
    torch.cuda.synchronize()
    before = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(before)
    torch.cuda.synchronize()
    return sync_warnings(caught)


def sync_warnings(caught):
    """The (message, "file:line") of each synchronizing call among ``caught`` warnings: torch's
    "called a synchronizing CUDA operation", not the notice that the sync debug mode is a
    prototype (torch warns that once, on the first switch to it: at db16320 it was counted as
    one sync of the first system measured)."""
    return [(str(w.message).splitlines()[0][:120], f"{w.filename}:{w.lineno}") for w in caught
            if "synchronizing cuda operation" in str(w.message).lower()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=list(MODELS), default="vit_b16")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--profile-top", type=int, default=25)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("step_overhead: needs a CUDA GPU")
        return 2
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    launch_costs()
    print(f"\n{args.model}, batch {args.batch}, bf16 autocast, fused AdamW:")
    print(f"  {'system':<30} {'host ms to enqueue':>19} {'eager ms/step':>14} "
          f"{'CUDA graph ms/step':>19}")
    prof, syncs = None, {}
    for backend, label in (("triton", "fastmae"), ("torch", "reference")):
        host, eager, graph, p_, syncs[label] = step_costs(args.model, args.batch, backend)
        prof = prof or p_
        graph_s = f"{graph:19.1f}" if isinstance(graph, float) else "  " + graph
        print(f"  {label:<30} {host:19.1f} {eager:14.1f} {graph_s}", flush=True)
    from fastmae.kernels import _common
    saved, _common.DIRECT_LAUNCH = _common.DIRECT_LAUNCH, False
    try:
        host = enqueue_ms(args.model, args.batch, "triton")
    finally:
        _common.DIRECT_LAUNCH = saved
    print(f"  {'fastmae, Triton launch path':<30} {host:19.1f} {'-':>14} {'-':>19}", flush=True)
    for label, found in syncs.items():
        print(f"\nhost-device synchronizations in one eager {label} step: {len(found)}")
        for message, where in found[:10]:
            print(f"  {where}: {message}")
    from fastmae.bench import paths_kept
    print("\nkernel paths kept by timing:\n" + "\n".join(f"  {k} -> {v}" for k, v in paths_kept().items()))
    if prof is not None:
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.profile_top)
        print("\nhost time of one eager fastmae step, by function (cProfile, own time):")
        print("\n".join(line for line in out.getvalue().splitlines()
                        if line.strip() and not line.startswith(("   Ordered", "         "))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
