"""Compile the Triton kernels of a fastmae training step ahead of it, in parallel processes.

    python -m fastmae.precompile [--model vit_b16] [--batch 256 --batch 32] [--dtype bf16]
                                 [--workers N] [--json PATH]          (a CUDA GPU)

With Triton's cache empty (a fresh machine), the first fastmae training step compiles each
kernel specialization it launches, one after another, and the autotuner each configuration it
times. ``fastmae bench`` on a GPU times both ways of the MLP, the attention backward and the
patch embedding's weight gradient (``_common.keep_faster``; WAYS below), so a ViT-B/16 bf16 step
compiles about 90 kernels. Before the patch embedding had two ways: 89 at batch 16, 55
CPU-seconds one after another on a 2-core CPU (sm_90 target, Triton 3.6); 96 at batches 256 and
32 on an H200 at db16320 (92.5 CPU-seconds, 12 s on 16 processes).

This runs the training step's forward and backward once per way with every Triton compile
recorded instead of done (``compiles_recorded``: no Triton kernel runs, their outputs are left
unset and nothing reads their values but other kernels and torch's float math), then compiles
the distinct recordings in a pool of processes (``compile_requests``) into Triton's on-disk
cache, under the key Triton's own launch looks them up by. The step's compiles then find them
there. ``fastmae bench`` runs it first, in a subprocess, on a GPU (``--no-precompile``: not).
"""
import argparse
import contextlib
import importlib
import inspect
import json
import os
import sys
import time
from collections import namedtuple

# One kernel specialization to compile, picklable for a worker process: the jit function by its
# module and name, and JITFunction._do_compile's signature, constexprs, attrs and options (a dict).
CompileRequest = namedtuple("CompileRequest",
                            "module name signature constexprs attrs options target")

# the kernel-path environment variables keep_faster reads, and the ways each one names
WAYS = {"FASTMAE_MLP": ("fused", "fused_tma", "split"),
        "FASTMAE_ATTN_BWD": ("fused", "fused_q", "split"),
        "FASTMAE_PATCH_WGRAD": ("fused", "split")}


def triton_internals_problem():
    """None if this Triton has the internals that compiles_recorded relies on (unchanged from
    3.6 to 3.9), else what is missing."""
    from triton.runtime import autotuner as at
    from triton.runtime import jit
    from triton.runtime.driver import driver

    missing = []
    do_compile = getattr(jit.JITFunction, "_do_compile", None)
    if do_compile is None or not {"signature", "constexprs", "options", "attrs"} <= set(
            inspect.signature(do_compile).parameters):
        missing.append("JITFunction._do_compile(..., signature, constexprs, options, attrs)")
    if not hasattr(at.Autotuner, "prune_configs"):
        missing.append("Autotuner.prune_configs")
    if not (hasattr(driver, "set_active") and hasattr(driver, "_active")):
        missing.append("driver.set_active / driver._active")
    if not missing:
        return None
    return f"the Triton internals that fastmae.precompile records through have changed: " \
           f"{', '.join(missing)}"


@contextlib.contextmanager
def compiles_recorded(on_compile):
    """Within the block no Triton kernel is compiled or launched: each compile a launch would do
    is handed to ``on_compile(jit_function, arguments, config)`` instead (``arguments``: those of
    JITFunction._do_compile by name -- key, signature, device, constexprs, options, attrs,
    warmup; ``config``: the autotuner's triton.Config it is for, or None), and its
    ``JITFunction.run`` returns without launching. An autotuned launch goes down once per
    configuration the autotuner would time (after its prune_configs_by, and its pre-hook run as
    the autotuner runs it), untimed."""
    from triton.runtime import autotuner as at
    from triton.runtime import jit

    do_compile = inspect.signature(jit.JITFunction._do_compile)
    tuning = [None]

    def record_compile(self, *args, **kwargs):
        arguments = dict(do_compile.bind(self, *args, **kwargs).arguments)
        del arguments["self"]
        on_compile(self, arguments, tuning[0])
        return None  # no kernel: JITFunction.run returns before launching

    def run_every_config(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        configs = self.prune_configs(kwargs) if len(self.configs) > 1 else self.configs
        try:
            for config in configs:
                tuning[0] = config
                if config.pre_hook is not None:  # e.g. a TMA descriptor's block shape
                    config.pre_hook({**self.nargs, **kwargs, **config.all_kwargs()})
                self.fn.run(*args, **kwargs, **config.all_kwargs())
        finally:
            tuning[0] = None
            self.nargs = None

    saved = (jit.JITFunction._do_compile, at.Autotuner.run)
    jit.JITFunction._do_compile = record_compile
    at.Autotuner.run = run_every_config
    try:
        yield
    finally:
        jit.JITFunction._do_compile, at.Autotuner.run = saved


def request_of(fn, arguments, target):
    """The CompileRequest of one recorded compile (``fn`` a module-level jit function,
    ``arguments`` those of its _do_compile)."""
    a = arguments
    return CompileRequest(fn.fn.__module__, fn.__name__, dict(a["signature"]),
                          dict(a["constexprs"]), dict(a["attrs"]), dict(a["options"].__dict__),
                          target)


def request_key(r):
    """A hashable key of a CompileRequest: two requests with one key compile the same kernel."""
    return (r.module, r.name, repr(sorted(r.signature.items())),
            repr(sorted(r.constexprs.items(), key=repr)), repr(sorted(r.attrs.items(), key=repr)),
            repr(sorted(r.options.items(), key=repr)), repr(r.target))


def _ways(tma=True):
    """Every combination of the kernel paths keep_faster chooses between, as environment
    settings; a variable the user has set keeps its one value. tma=False (a device without a
    TMA): without the MLP's "fused_tma" way."""
    combos = [{}]
    for var, names in WAYS.items():
        if os.environ.get(var, "").strip():
            names = (os.environ[var],)
        elif not tma:
            names = tuple(n for n in names if n != "fused_tma")
        combos = [dict(c, **{var: n}) for c in combos for n in names]
    return combos


@contextlib.contextmanager
def forced_environment(values):
    """The environment variables ``values`` (a dict) set meanwhile, each restored after."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def step_every_way(model, batches, amp_dtype, mask_ratio=0.75):
    """Run ``model``'s forward and backward under the "triton" backend (autocast in
    ``amp_dtype`` unless float32) on random images at each batch size, once per way of each
    path keep_faster times; the model's gradients are unset after."""
    import torch

    import fastmae

    device = next(model.parameters()).device
    H, W = model.patch_embed.img_size
    use_amp = amp_dtype != torch.float32
    from fastmae.kernels import gelu_matmul
    tma = device.type == "cuda" and gelu_matmul.tma_applies(device, amp_dtype)  # the MLP's way
    for batch in batches:
        imgs = torch.randn(batch, model.in_chans, H, W, device=device)
        for ways in _ways(tma):
            with forced_environment(ways), fastmae.use_backend("triton"):
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    loss, _, _ = model(imgs, mask_ratio)
                loss.backward()
            model.zero_grad(set_to_none=True)


def record_step(model, batches, amp_dtype, target, mask_ratio=0.75):
    """The distinct CompileRequests (for ``target``) of step_every_way's launches. Nothing is
    compiled or launched."""
    found = {}

    def on_compile(fn, arguments, config):
        r = request_of(fn, arguments, target)
        found.setdefault(request_key(r), r)

    with compiles_recorded(on_compile):
        step_every_way(model, batches, amp_dtype, mask_ratio)
    return list(found.values())


def _jit_function(module, name):
    from triton.runtime.jit import JITFunction
    obj = getattr(importlib.import_module(module), name)
    while not isinstance(obj, JITFunction):
        obj = obj.fn  # an Autotuner or Heuristics wrapping it
    return obj


def compile_request(r):
    """Compile one request into Triton's cache, as JITFunction._do_compile would. Returns
    (seconds, None) or (seconds, the error)."""
    import triton
    from triton.compiler import ASTSource

    t0 = time.perf_counter()
    try:
        src = ASTSource(_jit_function(r.module, r.name), r.signature, r.constexprs, r.attrs)
        triton.compile(src, target=r.target, options=r.options)
    except Exception as exc:  # noqa: BLE001 -- reported; the step compiles it again and raises
        return time.perf_counter() - t0, " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
    return time.perf_counter() - t0, None


def compile_requests(requests, workers):
    """Compile the requests in ``workers`` spawned processes (1: in this one). Returns
    [(seconds, error or None)] in order. Spawned, not forked: the recording process may hold a
    CUDA context, which a forked child must not use (so a script calling this needs the usual
    ``if __name__ == "__main__":`` guard)."""
    if workers <= 1 or len(requests) <= 1:
        return [compile_request(r) for r in requests]
    import concurrent.futures as cf
    import multiprocessing as mp
    with cf.ProcessPoolExecutor(min(workers, len(requests)),
                                mp_context=mp.get_context("spawn")) as pool:
        return list(pool.map(compile_request, requests))


def _parser():
    from fastmae.bench import DTYPES, MODELS
    from fastmae.cli import int_at_least
    p = argparse.ArgumentParser(prog="python -m fastmae.precompile",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=list(MODELS), default="vit_b16")
    p.add_argument("--batch", type=int_at_least(1, "--batch"), action="append",
                   help="a batch size the step runs at (repeatable; default: the model's bench "
                        "batch)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16",
                   help="autocast dtype (fp32 = no autocast)")
    p.add_argument("--workers", type=int_at_least(1, "--workers"), default=None,
                   help="compiler processes (default: one a CPU, at most 16)")
    p.add_argument("--json", metavar="PATH", help="also write the summary as JSON to PATH")
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("fastmae.precompile: no CUDA GPU here; nothing to compile ahead (Triton's "
              "interpreter runs fastmae's kernels on a CPU)", file=sys.stderr)
        return 2
    problem = triton_internals_problem()
    if problem:
        print(f"fastmae.precompile: {problem}", file=sys.stderr)
        return 1
    from triton.runtime.driver import driver

    from fastmae.bench import DTYPES, MODELS, build_model
    batches = args.batch or [MODELS[args.model][1]]
    workers = args.workers or min(os.cpu_count() or 1, 16)
    t0 = time.perf_counter()
    model = build_model(args.model, "cuda")
    requests = record_step(model, batches, DTYPES[args.dtype], driver.active.get_current_target())
    del model
    torch.cuda.empty_cache()
    t1 = time.perf_counter()
    results = compile_requests(requests, workers)
    t2 = time.perf_counter()
    errors = [f"{r.name}: {err}" for r, (_, err) in zip(requests, results) if err]
    summary = {"model": args.model, "batches": batches, "dtype": args.dtype,
               "kernels": len(requests), "workers": workers, "record_s": round(t1 - t0, 2),
               "compile_s": round(t2 - t1, 2),
               "compile_s_summed": round(sum(s for s, _ in results), 2), "errors": errors}
    print(f"precompiled {len(requests) - len(errors)} of {len(requests)} Triton kernels of a "
          f"{args.model} step (batch {', '.join(map(str, batches))}, {args.dtype}, each path "
          f"keep_faster times) in {t2 - t1:.1f} s on {workers} processes "
          f"({summary['compile_s_summed']:.1f} s of compiling; recorded in {t1 - t0:.1f} s)")
    for e in errors:
        print(f"  not compiled: {e}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
