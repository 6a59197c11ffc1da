"""Check on a CPU, without a GPU, that fastmae.precompile fills Triton's cache with exactly what
a training step's own compiles then look up. Used by ``tests/test_precompile.py``, which runs it
as a script in a subprocess WITHOUT ``TRITON_INTERPRET`` and with a fresh ``TRITON_CACHE_DIR``::

    python tests/_precompile_check.py [--model micro] [--batch 4] [--workers 2]

prints one JSON report. Triton's driver stands in for an sm_90 GPU (fastmae.testing's
StandInDriver), so the launchers take their GPU tiles and nothing runs:

1. ``precompile.record_step`` records the compiles of the model's bf16 autocast step at every way
   of the paths keep_faster times;
2. all of them but one are compiled by ``precompile.compile_requests`` in worker processes;
3. the same step runs again with Triton's own ``JITFunction._do_compile`` (what a launch on a GPU
   calls), its kernel dropped after each compile so that nothing launches, and Triton's
   compilation listener says whether each compile was a cache hit.

The report lists the recorded compiles, the compile errors, and the replayed compiles that
missed the cache, by request key: the held-out one, and only it, should miss.
"""
import argparse
import json
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="micro")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)

    import torch
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    import fastmae.backend
    from fastmae import precompile
    from fastmae.bench import build_model
    from fastmae.testing import StandInDriver

    problem = precompile.triton_internals_problem()
    if problem:
        print(json.dumps({"environment_error": problem}))
        return 0
    target = GPUTarget("cuda", 90, 32)
    driver.set_active(StandInDriver(target))
    fastmae.backend.interpreter_on = lambda: True  # the "triton" backend on CPU tensors
    model = build_model(args.model, "cpu")

    requests = precompile.record_step(model, [args.batch], torch.bfloat16, target)
    held_out = requests[-1]
    t0 = time.perf_counter()
    results = precompile.compile_requests(requests[:-1], args.workers)
    compile_s = time.perf_counter() - t0

    original_do_compile = JITFunction._do_compile
    hits = []  # the listener's cache_hit of the compile in progress
    knobs.compilation.listener = lambda *, cache_hit, **_: hits.append(cache_hit)
    replayed = {}  # request key -> every cache_hit its compiles reported

    def replay(fn, arguments, config):
        hits.clear()
        original_do_compile(fn, **arguments)
        # nothing may launch on the stand-in driver: forget the kernel Triton cached in memory
        fn.device_caches[arguments["device"]][0].pop(arguments["key"], None)
        key = precompile.request_key(precompile.request_of(fn, arguments, target))
        replayed.setdefault(key, []).extend(hits)

    with precompile.compiles_recorded(replay):
        precompile.step_every_way(model, [args.batch], torch.bfloat16)
    recorded = {precompile.request_key(r): r.name for r in requests}
    print(json.dumps({
        "environment_error": None,
        "recorded": len(requests),
        "kernels": sorted(set(recorded.values())),
        "held_out": precompile.request_key(held_out),
        "compile_errors": [f"{r.name}: {err}" for r, (_, err) in zip(requests, results) if err],
        "workers": args.workers,
        "compile_s": round(compile_s, 2),
        "replayed_not_recorded": sorted(set(replayed) - set(recorded)),
        "recorded_not_replayed": sorted(set(recorded) - set(replayed)),
        "listener_silent": sorted(k for k, v in replayed.items() if not v),
        "missed": sorted(k for k, v in replayed.items() if not all(v)),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
