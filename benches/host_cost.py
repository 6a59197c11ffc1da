"""Host (Python and dispatch) time of one eager MAE training step, on any machine, GPU or not.

    python benches/host_cost.py [--steps 30] [--profile-top 0]

An eager step is only as fast as the host enqueues it: on an H200 the eager fastmae ViT-B/16
step was host-bound (79.6 ms per step for 45.2 ms of GPU work, BENCHMARKS.md). This script times
the host side alone, without a GPU: the ViT-B/16 layer structure (12 encoder and 8 decoder
blocks) at a tiny width (32, one head of 32, batch 1, 32x32 images, bf16 CPU autocast, fused
AdamW) so that the CPU tensor math is negligible, with every Triton launch replaced by a no-op
counter (``JITFunction.run``, ``Autotuner.run``, ``Heuristics.run``; the kernels' outputs stay
uninitialized, the values do not matter). What is left is what fastmae's Python layers, autograd
and torch's dispatch cost per step, against the same model under the eager reference. Triton's
own launch (15-28 us per kernel on the H200's host, ``benches/step_overhead.py``) comes on top.

With ``--launch-path triton`` Triton's own Python launch path runs instead of the no-op counter
(the autotuner, argument binding and specialization, the kernel-cache lookup), stopping where a
GPU is needed: compiling (a stand-in kernel) and the C launcher (counted). The difference between
the two is what Triton's Python costs the host per step. ``--launch-path direct`` runs what a GPU
run does: fastmae's direct launch (``kernels/_common.py``: ``launch``), which hands the kernels
Triton compiled straight to the C launcher, Triton's path only on a new key.

``--mlp fused|fused_tma|split`` sets the MLP's way (off a GPU fastmae takes fused): fused_tma
runs the TMA kernels' launchers (their descriptors built, the configuration's block shapes set)
on the CPU tensors, which is the host's part of that way on a GPU.

Timings on a shared machine are noisy; for a deterministic count, run one backend's steps under
callgrind, collecting only inside the timed steps (they run in itertools.starmap's iterator):

    valgrind --tool=callgrind --collect-atstart=no --toggle-collect=starmap_next \
        python benches/host_cost.py --callgrind triton      # or torch; ~4 minutes each
        # (with --launch-path triton or direct as above)

and divide the "Collected" instruction count by the 3 steps it runs.

``--call-costs`` times, call by call, the forms fastmae's launchers and model avoid against
the ones they use: a shape handed to torch as one tuple or torch.Size (torch's argument parser
first tries it as the int of a varargs size, raising and dropping an exception) against separate
ints, a positional dtype to Tensor.to (first tried as its device) against a keyword one, and a
block's parameters read as module attributes (nn.Module.__getattr__'s path) against
Block._fused_args (fastmae.model._member's reads).
"""
import argparse
import cProfile
import collections
import itertools
import os
import pstats
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # the GPU launchers' Python, not the interpreter's

import torch  # noqa: E402
from triton.runtime.autotuner import Autotuner, Heuristics  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

LAUNCHES = collections.Counter()
LAUNCH_PATHS = ("stub", "triton", "direct")


def _no_launch(self, *args, **kwargs):
    fn = self
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    LAUNCHES[fn.__name__] += 1


_TRITON_RUN = (JITFunction.run, Autotuner.run, Heuristics.run)
JITFunction.run = _no_launch
Autotuner.run = _no_launch
Heuristics.run = _no_launch


def use_launch_path(path):
    """``stub``: every Triton launch is the no-op counter above. ``triton``: Triton's own Python
    launch path runs (``fastmae.testing.use_stand_in_kernels``: the autotuner, argument binding
    and specialization, the kernel-cache lookup), stopping where a GPU is needed -- compiling (a
    stand-in kernel is cached instead) and the C launcher (counted). ``direct``: likewise, with
    fastmae's direct launch (kernels/_common.py: launch) in front of it, as on a GPU."""
    from fastmae.kernels import _common
    from fastmae.testing import use_stand_in_kernels

    _common.DIRECT_LAUNCH = path == "direct"
    if path == "stub":
        return
    JITFunction.run, Autotuner.run, Heuristics.run = _TRITON_RUN
    use_stand_in_kernels(lambda kernel, call_args: LAUNCHES.update((kernel.name,)))


def use_mlp_way(way):
    """FASTMAE_MLP=way; for fused_tma the TMA launchers also take CPU tensors (their launches are
    stubbed like every other: what is counted is the host's work of building their descriptors
    and launching)."""
    os.environ["FASTMAE_MLP"] = way
    if way == "fused_tma":
        from fastmae.kernels import gelu_matmul
        gelu_matmul.tma_applies = lambda device, dtype: True


import fastmae  # noqa: E402
import fastmae.backend  # noqa: E402
from fastmae.model import _factory  # noqa: E402

# the "triton" backend on CPU tensors without the interpreter: nothing is launched anyway
fastmae.backend.interpreter_on = lambda: True


def build(seed=0):
    torch.manual_seed(seed)
    model = _factory(32, 12, 1, 16, img_size=32, decoder_embed_dim=32, decoder_depth=8,
                     decoder_num_heads=1, norm_pix_loss=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    return model, opt


def make_step(model, opt, backend):
    imgs = torch.randn(1, 3, 32, 32)

    def step():
        with fastmae.use_backend(backend):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss, _, _ = model(imgs, 0.75)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step


def host_ms(steps_by_name, steps, warmup=3, repeats=7):
    """Host ms per step of each named step function: the 10th percentile of ``repeats`` rounds
    of ``steps`` single-step timings, the systems taking turns round by round (a shared, noisy
    CPU: the low percentile is the least disturbed measurement of the same work)."""
    for step in steps_by_name.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps_by_name}
    for _ in range(repeats):
        for name, step in steps_by_name.items():
            for _ in range(steps):
                t0 = time.perf_counter()
                step()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: sorted(t)[len(t) // 10] for name, t in times.items()}


def call_costs(number=20000, repeat=9):
    """[(what, avoided form ns, used form ns)] a call, each the best of ``repeat`` timings."""
    import timeit

    from fastmae.kernels._common import empty
    x, xb = torch.randn(5, 32), torch.randn(5, 32, dtype=torch.bfloat16)
    flat, size, cpu = torch.randn(5 * 32), x.shape, torch.device("cpu")
    block = build()[0].blocks[0]

    def block_args_plain():  # the attribute reads forward_fused made before _member
        attn, mlp = block.attn, block.mlp
        return ((block.norm1.weight, block.norm1.bias, attn.qkv.weight, attn.qkv.bias,
                 attn.proj.weight, attn.proj.bias, block.norm2.weight, block.norm2.bias,
                 mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias),
                attn.num_heads, attn.scale, (block.norm1.eps, block.norm2.eps))

    assert block_args_plain() == block._fused_args()
    pairs = [
        ("torch.empty((5, 32)) / kernels._common.empty",
         lambda: torch.empty((5, 32), dtype=torch.float32, device=cpu),
         lambda: empty((5, 32), torch.float32, cpu)),
        ("y.view(x.shape) / y.view_as(x)", lambda: flat.view(size), lambda: flat.view_as(x)),
        ("x.to(bf16) / x.to(dtype=bf16)",
         lambda: x.to(torch.bfloat16), lambda: x.to(dtype=torch.bfloat16)),
        ("xb.to(fp32) / xb.to(dtype=fp32)",
         lambda: xb.to(torch.float32), lambda: xb.to(dtype=torch.float32)),
        ("a block's arguments: attributes / Block._fused_args", block_args_plain,
         block._fused_args),
    ]

    def best_ns(*fns):  # the two forms take turns, round by round (a shared, noisy CPU)
        rounds = [[timeit.timeit(fn, number=number) for fn in fns] for _ in range(repeat)]
        return [min(times) / number * 1e9 for times in zip(*rounds)]

    return [(what, *best_ns(avoided, used)) for what, avoided, used in pairs]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--profile-top", type=int, default=0,
                   help="also print the N Python functions with the most own time in a fastmae step")
    p.add_argument("--callgrind", choices=("torch", "triton"),
                   help="run 2 warm-up steps, then 3 steps of this backend inside "
                        "itertools.starmap (see the module docstring), and exit")
    p.add_argument("--launch-path", choices=LAUNCH_PATHS, default="stub",
                   help="stub: each Triton launch is a no-op counter (default); triton: Triton's "
                        "own Python launch path runs, up to its C launcher; direct: fastmae's "
                        "direct launch, then Triton's C launcher (stubbed), as on a GPU")
    p.add_argument("--call-costs", action="store_true",
                   help="time the call forms fastmae avoids against the ones it uses, and exit")
    p.add_argument("--mlp", choices=("fused", "fused_tma", "split"),
                   help="the MLP's way (FASTMAE_MLP; off a GPU fastmae takes fused); fused_tma: "
                        "the TMA kernels' launchers (descriptors built, the configuration's "
                        "pre-hook applied) on these CPU tensors, which no TMA would describe")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.mlp:
        use_mlp_way(args.mlp)
    if args.call_costs:
        print(f"host cost a call, avoided form / used form | torch {torch.__version__} | "
              f"{os.cpu_count()} CPUs")
        for what, avoided, used in call_costs():
            print(f"  {what:48s} {avoided / 1e3:6.2f} / {used / 1e3:6.2f} us")
        return
    use_launch_path(args.launch_path)
    if args.callgrind:
        model, opt = build()
        step = make_step(model, opt, args.callgrind)
        for _ in range(2):
            step()
        list(itertools.starmap(step, [()] * 3))
        return
    what = {"stub": "Triton launches stubbed out",
            "triton": "Triton's Python launch path run, its C launcher stubbed",
            "direct": "fastmae's direct launch run, Triton's C launcher stubbed"}[args.launch_path]
    print(f"host time of one eager training step, {what} | torch {torch.__version__} | "
          f"{os.cpu_count()} CPUs")
    systems = {}
    for backend in ("torch", "triton"):
        model, opt = build()
        systems[backend] = make_step(model, opt, backend)
    systems["triton"]()
    LAUNCHES.clear()
    systems["triton"]()
    launches = sum(LAUNCHES.values())
    mlp = {k: n for k, n in sorted(LAUNCHES.items()) if "gelu" in k}  # of that one step
    results = host_ms(systems, args.steps)
    print(f"  reference (torch)  {results['torch']:7.2f} ms/step host")
    print(f"  fastmae (triton)   {results['triton']:7.2f} ms/step host, {launches} Triton launches "
          f"per step (not timed)")
    print(f"  fastmae / reference: {results['triton'] / results['torch']:.2f}x the host time")
    print("  the MLP's kernels a step: " + ", ".join(f"{k} x{n}" for k, n in mlp.items()))
    if args.profile_top:
        model, opt = build()
        step = make_step(model, opt, "triton")
        step()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.steps):
            step()
        prof.disable()
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(args.profile_top)


if __name__ == "__main__":
    main()
