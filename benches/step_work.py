"""The work each fastmae kernel must do in one training step, counted on any machine, GPU or not.

    python benches/step_work.py [--model vit_b16] [--batch 256]
    python benches/step_work.py --against benches/results/h200-2026-11-28/step_vit_b16.json

Runs eager training steps of the model under the "triton" backend (bf16 autocast, as
``fastmae bench``) with Triton's C launcher replaced by a stand-in (``fastmae.testing``: nothing
is computed, torch's matmuls run on the CPU) and adds up, per kernel, the bytes and FLOPs its
launches report (``kernels/_common.py``: ``launch_work``, what ``fastmae bench`` sets the
profiler's times against on a GPU). The counts are linear in the batch (but for the rounding of
the partial-sum buffers to whole blocks of rows, under 1%), so they are taken at two small
batches and extended to ``--batch``. Two things differ from a GPU step: the backward
kernels' per-program partial sums are sized for the CPU's 4 programs, not an SM wave (a few MB a
step at ViT-B/16), and the paths a GPU chooses by timing (the MLP's fused matmuls or cuBLAS and
the bias + GELU kernels; the attention backward's one kernel or two) take their CPU defaults
unless FASTMAE_MLP / FASTMAE_ATTN_BWD force them.

With ``--against`` a ``fastmae bench --json`` result of the same model and batch: each kernel's
time in that run's profile of the fastmae step, and its floor at the copy and bf16 matmul rates
that run measured -- the time the kernel would take at those rates -- and the fraction of it
reached. A run of older code times the kernels as they were then: where a kernel has changed
what it reads or writes since, the fraction is that of the old time against today's work.
"""
import argparse
import collections
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # the GPU launchers, not the interpreter

import torch  # noqa: E402

from fastmae.testing import use_stand_in_kernels  # noqa: E402

use_stand_in_kernels(lambda kernel, call_args: None)

import fastmae  # noqa: E402
import fastmae.backend  # noqa: E402
from fastmae.bench import MODELS, build_model, work_floor  # noqa: E402
from fastmae.kernels import _common  # noqa: E402

# the "triton" backend on CPU tensors without the interpreter: the stand-in launches nothing
fastmae.backend.interpreter_on = lambda: True


def count(model_name, batch, seed=0):
    """{kernel: [launches, bytes, FLOPs]} of one training step (after one to warm up)."""
    torch.manual_seed(seed)
    model = build_model(model_name, "cpu", seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    H, W = model.patch_embed.img_size
    imgs = torch.randn(batch, model.in_chans, H, W)

    def step():
        with fastmae.use_backend("triton"), torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _, _ = model(imgs, 0.75)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step()
    work = collections.defaultdict(lambda: [0, 0, 0])

    def observe(name, nbytes, flops):
        w = work[name]
        w[0], w[1], w[2] = w[0] + 1, w[1] + nbytes, w[2] + flops
    _common.OBSERVER = observe
    try:
        step()
    finally:
        _common.OBSERVER = None
    return dict(work)


# Kernels whose work is not linear in the batch: the second reduction of the backwards' partial
# sums reads buffers of one row a program, and the LayerNorm and bias + GELU backwards run a
# wave of programs whatever the batch (here the CPU's 4). Reported as counted at the larger batch.
NOT_LINEAR = ("_sum_partials",)


def extend(small, large, b_small, b_large, batch):
    """Each kernel's counts at ``batch``, from those at two batches (linear in the batch; those
    of NOT_LINEAR as counted at the larger one)."""
    out = {}
    for name in small.keys() | large.keys():
        s, l = small.get(name, [0, 0, 0]), large.get(name, [0, 0, 0])
        if s[0] != l[0]:
            raise RuntimeError(f"{name}: {s[0]} launches at batch {b_small}, {l[0]} at {b_large}")
        if name in NOT_LINEAR:
            out[name] = list(l)
            continue
        out[name] = [s[0]] + [s[i] + (l[i] - s[i]) * (batch - b_small) / (b_large - b_small)
                              for i in (1, 2)]
    return out


def measured(path, model_name, batch):
    """(floors, {kernel: ms a step}) from the fastmae system of a ``fastmae bench --json``."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    config = data["config"]
    if (config["model"], config["batch"]) != (model_name, batch):
        raise SystemExit(f"{path} measured {config['model']} at batch {config['batch']}, not "
                         f"{model_name} at {batch}")
    (r,) = [r for r in data["results"] if r["system"] == "fastmae"]
    b = r["profile"]
    rows = b.get("fastmae_kernels") or [k for k in b["top_kernels"]
                                        if k.get("category") == "fastmae kernels"]
    return data["floors"], data["env"], {k["name"]: k["ms_per_step"] for k in rows}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_b16", choices=sorted(MODELS))
    p.add_argument("--batch", type=int, default=None, help="default: the model's bench batch")
    p.add_argument("--count-batches", default="2,4",
                   help="the two batches counted and extended from (default 2,4)")
    p.add_argument("--against", metavar="STEP_JSON",
                   help="a fastmae bench --json result: its kernel times and floors")
    args = p.parse_args(argv)
    batch = args.batch or MODELS[args.model][1]
    b1, b2 = (int(v) for v in args.count_batches.split(","))
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    work = extend(count(args.model, b1), count(args.model, b2), b1, b2, batch)
    paths = ", ".join(f"{k}={os.environ[k]}" for k in ("FASTMAE_MLP", "FASTMAE_ATTN_BWD")
                      if os.environ.get(k)) or "CPU defaults"
    print(f"work of one {args.model} training step at batch {batch} (bf16 autocast; counted at "
          f"batches {b1} and {b2}; paths chosen by timing: {paths})")
    floors = times = None
    if args.against:
        floors, env, times = measured(args.against, args.model, batch)
        print(f"against {args.against}: {env.get('gpu')}, commit {env.get('commit')}; copy "
              f"{floors['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul "
              f"{floors['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s")
    head = f"  {'kernel':<26} {'launches':>8} {'GB':>8} {'GFLOP':>8}"
    if floors:
        head += f" {'floor ms':>9} {'bound':>7} {'then ms':>8} {'of floor':>8}"
    print(head)
    for name, (n, nbytes, flops) in sorted(work.items(), key=lambda kv: -kv[1][1]):
        line = f"  {name:<26} {n:8d} {nbytes / 1e9:8.3f} {flops / 1e9:8.1f}"
        if floors:
            floor_s, bound = work_floor(nbytes, flops, floors)
            floor_ms = 1e3 * floor_s
            then = times.get(name)
            line += f" {floor_ms:9.3f} {bound:>7} " + (
                f"{then:8.2f} {100 * floor_ms / then:7.0f}%" if then else f"{'-':>8} {'-':>8}")
        print(line)
    for name in NOT_LINEAR:
        if name in work:
            print(f"  ({name}: as counted at batch {b2}, its buffers sized by this machine's "
                  f"program counts, not by a GPU's)")
    total = sum(w[1] for w in work.values())
    print(f"  {'all':<26} {sum(w[0] for w in work.values()):8d} {total / 1e9:8.3f} "
          f"{sum(w[2] for w in work.values()) / 1e9:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
