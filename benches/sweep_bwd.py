"""Launch configurations of the LayerNorm and bias + GELU backward kernels, and of the partial
sums' second reduction (kernels/partial_sums.py), timed on this GPU.

    python benches/sweep_bwd.py [--batch 256]
    python benches/sweep_bwd.py --smoke        # CPU: tiny shapes through Triton's interpreter

Both backwards walk their rows in a loop inside one wave of programs (their weight / bias
gradients are per-program partial sums, reduced afterwards: deterministic), so how many bytes
an SM keeps in flight depends on the loads prefetched ahead of the loop (stages), the tile
(rows x columns), the warps of a program and how many programs share an SM. On the H200 (at
017ac2e, no prefetch) they reached about 45% (LayerNorm) and 60% (bias + GELU) of the copy
bandwidth in a training step, where the one-tile-per-program forwards come close to it.

The partial sums' reduction (on the H200 at db16320 about 0.32 ms a ViT-B/16 step over 20
launches, 21-34% of its memory floor: each program walks its 32 columns down ~10^3 rows) is
swept on one decoder block's four buffers: columns a program, rows a tile and warps, then stages.

For each kernel at the ViT-B/16 step's shapes and dtypes (bf16 autocast: encoder D=768 and the
decoder's D=512 for the fused residual-add LayerNorm backward with its fp32 residual gradient,
bf16 branch gradient and branch-bias column sums; the MLP widths 3072 and 2048 for bias + GELU)
this searches the configurations one axis at a time from the launcher's default -- stages,
then tile (rows, warps) together with warps per SM, then columns a program (bias + GELU), then
warps per SM again -- keeping the fastest of each axis. Each configuration is timed with CUDA
events and its outputs checked against the default's (the partial-sum order differs, so within
a tolerance, not bitwise). It prints microseconds and GB/s (bytes the kernel must move /
time; the partials' traffic not counted), the default marked, the fastest first. Nothing here
changes the launchers' defaults: a configuration worth keeping goes into the kernel module by
hand, its registers and shared memory checked against its one-wave grid by
tests/test_gpu_compile.py.
"""
import argparse
import contextlib
import os
import sys
import time

import torch

ENCODER, DECODER = 768, 512  # ViT-B/16 widths; tokens: 1 + 49 visible, 1 + 196 all
MLP_ENCODER, MLP_DECODER = 3072, 2048
# outputs against the default configuration's, relative to their largest value: a few ulps of
# the bf16 branch gradient pass, a wrong result does not
MAX_REL_ERR = 2e-2


def _cases(batch, smoke):
    """(label, kernel, M, D) of the sweep."""
    if smoke:
        return [("add_layer_norm_bwd small", "layer_norm", 37, 40),
                ("bias_gelu_bwd small", "bias_gelu", 37, 72),
                ("sum_partials small", "partial_sums", 37, 40)]
    # the most GPU time of a step first (a run cut short keeps those); for sum_partials M is
    # the qkv bias partials' rows: (batch, query blocks of 64)
    return [("add_layer_norm_bwd decoder", "layer_norm", batch * 197, DECODER),
            ("bias_gelu_bwd decoder", "bias_gelu", batch * 197, MLP_DECODER),
            ("add_layer_norm_bwd encoder", "layer_norm", batch * 50, ENCODER),
            ("bias_gelu_bwd encoder", "bias_gelu", batch * 50, MLP_ENCODER),
            ("sum_partials decoder block", "partial_sums", batch * 4, DECODER)]


def default_config(kernel, D):
    """The launcher's own configuration for width D on this machine (GPU or interpreter)."""
    from fastmae.kernels import bias_gelu as bg
    from fastmae.kernels import layer_norm as ln
    from fastmae.kernels import partial_sums as ps
    from fastmae.kernels._common import next_pow2
    if kernel == "partial_sums":
        return dict(zip(("block_c", "rows", "warps", "stages"), ps.launch_config()))
    if kernel == "layer_norm":
        block_d = next_pow2(D)
        rows, warps = ln._bwd_launch_config(block_d)
        return {"stages": ln.bwd_stages(block_d), "rows": rows, "warps": warps,
                "warps_per_sm": ln.bwd_warps_per_sm(block_d)}
    rows, block_n, warps = bg._bwd_tile(D)
    return {"stages": bg.BWD_STAGES, "rows": rows, "warps": warps, "block_n": block_n,
            "warps_per_sm": bg.BWD_WARPS_PER_SM}


def _axes(kernel, D, smoke):
    """The search: each axis a list of partial configurations, tried in turn with the rest of
    the configuration at the best found so far (a coordinate search from the default: a few
    dozen timings, and about a dozen compiles, per case instead of a full grid's hundreds).
    A tile is tried at every warps-per-SM count: its registers and shared memory decide how
    many of its programs an SM holds, so a tile judged at another tile's count could lose for
    the wrong reason; the count sizes the grid only, so those timings need no compile."""
    from fastmae.kernels._common import next_pow2
    if kernel == "partial_sums":
        if smoke:
            return [[{"stages": s} for s in (1, 2)], [{"rows": r} for r in (4, 8)]]
        # columns a program by rows a tile by warps (at 8 to 32 elements a thread), then how
        # many tiles a program has in flight
        return [[{"block_c": c, "rows": r, "warps": w}
                 for c in (16, 32, 64) for r in (32, 64, 128) for w in (2, 4, 8)
                 if 8 <= c * r // (32 * w) <= 32],
                [{"stages": s} for s in (1, 2, 3, 4)]]
    if smoke:
        return [[{"stages": s} for s in (1, 2)],
                [{"rows": r, "warps_per_sm": n} for r in (1, 4) for n in (8, 16)]]
    width = next_pow2(D) if kernel == "layer_norm" else 1024
    warps_per_sm = (8, 12, 16, 24, 32)
    # and programs of 1 or 2 warps at 16 elements a thread: each warp spans a row, so that a
    # tile's column sums stay within a thread and fewer warps meet at its row sums' barriers
    tiles = [{"rows": r, "warps": w, "warps_per_sm": n}
             for r in (1, 2, 4, 8) for w in (1, 2, 4, 8)
             if 1024 <= r * width <= 8192 and w >= 4 or w < 4 and r * width == 512 * w
             for n in warps_per_sm]
    axes = [[{"stages": s} for s in (1, 2, 3, 4)], tiles]
    if kernel == "bias_gelu":
        axes.append([{"block_n": n} for n in (512, 1024)])
    axes.append([{"warps_per_sm": n} for n in warps_per_sm])
    return axes


@contextlib.contextmanager
def _configured(kernel, config):
    """The kernel module's launcher with ``config`` in place of its defaults."""
    from fastmae.kernels import bias_gelu as bg
    from fastmae.kernels import layer_norm as ln
    from fastmae.kernels import partial_sums as ps
    if kernel == "partial_sums":
        saved = (ps.launch_config, dict(ps._PLANS))
        ps.launch_config = lambda: (config["block_c"], config["rows"], config["warps"],
                                    config["stages"])
        ps._PLANS.clear()  # a plan holds the columns a program
        try:
            yield
        finally:
            ps.launch_config = saved[0]
            ps._PLANS.clear()
            ps._PLANS.update(saved[1])
    elif kernel == "layer_norm":
        saved = (ln._bwd_launch_config, ln.bwd_warps_per_sm, ln.bwd_stages)
        ln._bwd_launch_config = lambda block_d: (config["rows"], config["warps"])
        ln.bwd_warps_per_sm = lambda block_d: config["warps_per_sm"]
        ln.bwd_stages = lambda block_d: config["stages"]
        try:
            yield
        finally:
            ln._bwd_launch_config, ln.bwd_warps_per_sm, ln.bwd_stages = saved
    else:
        saved = (bg._bwd_tile, bg.BWD_WARPS_PER_SM, bg.BWD_STAGES)
        bg._bwd_tile = lambda D: (config["rows"], config["block_n"], config["warps"])
        bg.BWD_WARPS_PER_SM = config["warps_per_sm"]
        bg.BWD_STAGES = config["stages"]
        try:
            yield
        finally:
            bg._bwd_tile, bg.BWD_WARPS_PER_SM, bg.BWD_STAGES = saved


def _inputs(kernel, M, D, device, low):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, dtype=torch.float32, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    if kernel == "partial_sums":
        # one decoder block's backward: the qkv bias's (M, 3D) partials, fc1's bias's (one
        # wave of bias + GELU programs, 4D) and the two LayerNorms' (weight, bias and branch
        # bias sums over a wave of programs, D); the waves as an H200's 132 SMs give them
        waves = (5, 7) if M < 64 else (132, 792)
        buffers = [rand(M, 3 * D), rand(waves[0], 4 * D), rand(3, waves[1], D),
                   rand(3, waves[1], D)]
        nbytes = sum(b.numel() for b in buffers) * 4  # the partials read (the sums negligible)
        return {"buffers": buffers}, nbytes
    if kernel == "layer_norm":
        from fastmae.kernels import layer_norm as ln
        x, r = rand(M, D, dtype=low), rand(M, D)
        w, b, bb = rand(D, scale=0.1) + 1, rand(D, scale=0.1), rand(D, scale=0.1)
        _, s, mean, rstd = ln.layer_norm_fwd(x, w, b, 1e-6, low, residual=r,
                                             residual_dtype=torch.float32, branch_bias=bb)
        args = dict(dy=rand(M, D, dtype=low), s=s, w=w, mean=mean, rstd=rstd, ds=rand(M, D))
        # dy (low), s, ds, dx (fp32), dx2 (low) read / written once; mean, rstd negligible
        nbytes = M * D * (2 * low.itemsize + 3 * 4)
    else:
        args = dict(dy=rand(M, D, dtype=low), x=rand(M, D, dtype=low), bias=rand(D, scale=0.1))
        nbytes = M * D * 3 * low.itemsize  # dy, x read; dx written
    return args, nbytes


def _call(kernel, args, low):
    if kernel == "partial_sums":
        from fastmae.kernels import partial_sums as ps
        return ps.sum_partials(args["buffers"])
    if kernel == "layer_norm":
        from fastmae.kernels import layer_norm as ln
        return ln.layer_norm_bwd(args["dy"], args["s"], args["w"], args["mean"], args["rstd"],
                                 ds=args["ds"], dx_dtype=torch.float32, dx2_dtype=low,
                                 branch_bias_grad=True)
    from fastmae.kernels import bias_gelu as bg
    return bg.bias_gelu_bwd(args["dy"], args["x"], args["bias"], low)


def _flat(outputs):
    return [t.float() for t in (outputs if isinstance(outputs, tuple) else (outputs,))]


def _time_us(fn, device, reps):
    if device == "cpu":
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6
    from fastmae.bench import _cuda_time_ms
    return _cuda_time_ms(fn, reps=reps, warmup=2) * 1e3


def _measure(kernel, config, args, expected, low, device):
    """(us, max relative error against the default's outputs) of one configuration."""
    with _configured(kernel, config):
        got = _flat(_call(kernel, args, low))
        err = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
                  for a, b in zip(got, expected))
        return _time_us(lambda: _call(kernel, args, low), device, reps=20), err


def _name(config):
    return ", ".join(f"{k}={v}" for k, v in config.items())


def sweep(batch=256, smoke=False, out=sys.stdout):
    """Run the search; returns {case label: [(config, us, GB/s, max rel err), ...]} in the
    order timed, the default configuration first."""
    device = "cpu" if smoke else "cuda"
    low = torch.float16 if smoke else torch.bfloat16  # the interpreter's dots are not used here
    results = {}
    for label, kernel, M, D in _cases(batch, smoke):
        args, nbytes = _inputs(kernel, M, D, device, low)
        expected = _flat(_call(kernel, args, low))
        default = default_config(kernel, D)
        timed = {}

        def measure(config):
            key = tuple(sorted(config.items()))
            if key not in timed:
                try:
                    us, err = _measure(kernel, config, args, expected, low, device)
                except Exception as exc:  # noqa: BLE001 -- a configuration that cannot run
                    print(f"  {label} {_name(config)}: {type(exc).__name__}: "
                          f"{str(exc)[:160]}", file=out)
                    us, err = float("inf"), float("nan")
                timed[key] = (dict(config), us, nbytes / us / 1e3, err)
            return timed[key]

        print(f"\n{label}: M={M} D={D}, {nbytes / 2 ** 20:.0f} MiB moved", file=out, flush=True)
        best = measure(default)
        default_us = best[1]
        for axis in _axes(kernel, D, smoke):
            for change in axis:
                row = measure({**best[0], **change})
                if row[1] < best[1] and row[3] <= MAX_REL_ERR:
                    best = row
        rows = list(timed.values())
        results[label] = rows
        for config, us, gbs, err in sorted(rows, key=lambda r: r[1]):
            flag = "" if err <= MAX_REL_ERR else "  MISMATCH"
            mark = "  <- default" if config == default else ""
            print(f"  {us:9.1f} us {gbs:8.0f} GB/s  x{default_us / us:5.2f}  err {err:.1e}  "
                  f"{_name(config)}{mark}{flag}", file=out, flush=True)
        print(f"  best: {_name(best[0])}", file=out, flush=True)
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on the CPU through Triton's interpreter (a test of this script)")
    args = p.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        print("sweep_bwd: needs a CUDA GPU (or --smoke)")
        return 2
    else:
        import triton
        print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | "
              f"triton {triton.__version__}")
    sweep(args.batch, args.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(main())
