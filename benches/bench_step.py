"""The whole MAE training step: fastmae (backend "triton"), the eager reference (backend "torch":
the official algorithm with SDPA attention) and ``torch.compile`` of the reference.

A step is forward + backward + AdamW (fused=True on CUDA), bf16 autocast on a GPU,
norm_pix_loss=True, mask ratio 0.75, random 224 px images (the model's own size), one fixed
noise tensor (so the compiled reference is checked and timed on one graph). Before timing,
parity on one shared step: fastmae against the reference (``fastmae.check.model_parity``) and
the compiled reference against the eager one, with the same weights, images and noise; on a GPU
each CUDA-graph system's replays against as many eager steps (``fastmae.bench.graph_check``).
A record's "parity" is "pass" for the systems so checked and "not checked" for the others
(the eager reference is the specification; "fastmae, torch.compile" is compiled and timed under
the "triton" backend, while the compiled check runs under "torch").

On a GPU the step is timed with CUDA events between consecutive steps after warm-up (the
compiling one included), and extra_info holds ms/step (their total time over their number),
images/s, MFU against the measured bf16 matmul rate, and peak memory. Without a GPU: the micro
model at batch 2, fp32, once, fastmae through Triton's interpreter and the compiled reference
with the "aot_eager" backend (a smoke test of the tracing, not of inductor). ``fastmae bench``
is the command-line version of this.
"""
import contextlib
import copy
import functools

import pytest
import torch

from fastmae import testing
from fastmae.backend import use_backend
from fastmae.bench import (GPU_ONLY_SYSTEMS, MODELS, SYSTEMS, build_model, graph_check,
                           make_train_step, step_parity, sustained_ms, time_train_step,
                           training_flops_per_image)
from fastmae.check import model_step_grads, parity_limit

PARITY_BATCH = 32
STEPS, WARMUP = 10, 3


def _amp(device):
    return torch.bfloat16 if device == "cuda" else torch.float32


def _inputs(model, batch, device, seed=3):
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    H, W = model.patch_embed.img_size
    imgs = torch.randn(batch, model.in_chans, H, W, device=device, generator=g)
    noise = testing.distinct_noise(batch, model.patch_embed.num_patches, g, device)
    return imgs, noise


@functools.lru_cache(maxsize=None)
def _fastmae_parity(model_name, batch, device):
    return step_parity(model_name, batch, _amp(device), device)


def _compiled_parity(model, compiled, imgs, noise, amp):
    """The compiled reference against the eager one on one step (same weights, images, noise),
    both measured against the reference without autocast (float64 on a CPU, fp32 on a GPU)."""
    exact_dtype = torch.float64 if imgs.device.type == "cpu" else torch.float32
    exact = copy.deepcopy(model).to(exact_dtype)
    lx, px, _, gx = model_step_grads(exact, imgs.to(exact_dtype), noise, "torch")
    del exact
    autocast = amp if amp != torch.float32 else None
    le, pe, _, ge = model_step_grads(model, imgs, noise, "torch", autocast=autocast)
    model.zero_grad(set_to_none=True)
    ctx = torch.autocast(imgs.device.type, dtype=amp) if autocast else contextlib.nullcontext()
    with use_backend("torch"):
        with ctx:
            lc, pc, _ = compiled(imgs, mask_ratio=0.75, noise=noise)
        lc.backward()
    gc = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    def limit(e):
        return parity_limit(e, amp)
    problems = []
    for name, got, eager, want in [("loss", lc, le, lx), ("pred", pc, pe, px)] + [
            (f"grad {n}", gc.get(n), ge.get(n), g) for n, g in gx.items()]:
        if got is None:
            problems.append(f"{name}: missing")
            continue
        err, err_e = testing.rel_err(got.detach(), want), testing.rel_err(eager, want)
        if err > limit(err_e):
            problems.append(f"{name}: error {err:.2e} > {limit(err_e):.2e}")
    return problems


def parity_record(checked):
    """A record's parity fields: "pass" (and what was compared) only for a system whose check
    ran and passed before timing (a failed one stops the test), "not checked" otherwise."""
    if checked is None:
        return {"parity": "not checked"}
    return {"parity": "pass", "parity_checked": checked}


@pytest.mark.parametrize("system", list(SYSTEMS))
def test_train_step(benchmark, mae_model, mae_batch, system, device, floors, env):
    batch = mae_batch or (MODELS[mae_model][1] if device == "cuda" else 2)
    amp = _amp(device)
    label, backend, compiled = SYSTEMS[system]
    if system in GPU_ONLY_SYSTEMS and device != "cuda":
        pytest.skip(f"{label}: CUDA graphs need a GPU")

    checked = None  # what this system's parity check compared, where it has one
    if system == "fastmae":
        par = _fastmae_parity(mae_model, min(batch, PARITY_BATCH), device)
        assert par["passed"], f"parity failed before timing: {par}"
        checked = "fastmae against the reference on one shared step"
    graphed = system in GPU_ONLY_SYSTEMS
    if graphed:
        gc = graph_check(system, mae_model, batch, amp, device)
        assert gc["passed"], f"graph check failed before timing: {gc}"
        checked = "the graph's replays against as many eager steps"

    model = build_model(mae_model, device, seed=0)
    imgs, noise = _inputs(model, batch, device)
    compile_backend = "inductor" if device == "cuda" else "aot_eager"
    # peak memory as fastmae.bench defines it: a graph's reset after its warm-up, before the
    # capture that allocates its memory
    step, _, fwd = make_train_step(
        model, imgs, amp, compiled=compiled, noise=noise, compile_backend=compile_backend,
        cuda_graph=graphed, backend=backend,
        before_capture=torch.cuda.reset_peak_memory_stats if graphed else None)
    if compiled:
        # the full batch: the graph checked is the graph timed (a smaller one would recompile)
        problems = _compiled_parity(model, fwd, imgs, noise, amp)
        assert not problems, "compiled reference differs from the eager one:\n" + "\n".join(problems)
        if backend == "torch":  # checked under "torch": what is timed only for the reference
            checked = "the compiled reference against the eager one on one shared step"

    flops = training_flops_per_image(model)
    info = benchmark.extra_info
    info.update({
        "suite": "step", "model": mae_model, "system": system, "label": label, "backend": backend,
        "compiled": compiled, "compile_backend": compile_backend if compiled else None,
        "batch": batch, "dtype": "bf16" if amp == torch.bfloat16 else "fp32",
        "shape": f"{batch}x{model.in_chans}x{model.patch_embed.img_size[0]}x"
                 f"{model.patch_embed.img_size[1]}",
        "gpu": env["gpu"], "torch": env["torch"], "triton": env["triton"], "env": env,
        "training_flops_per_image": flops, **parity_record(checked),
    })
    with use_backend(backend):
        if device == "cuda":
            t = time_train_step(step, torch.device("cuda"), STEPS, WARMUP, reset_peak=not graphed)
            ms = sustained_ms(t["times_ms"])
            ips = batch / (ms * 1e-3)
            info.update({
                "ms_per_step": ms, "images_per_s": ips, "first_step_s": t["first_step_s"],
                "peak_mem_gib": t["peak_mem_gib"], "mfu": flops * ips / floors["matmul_flops_per_s"],
                "floors": floors,
            })

            def timed():
                step()
                torch.cuda.synchronize()
            benchmark.group = f"{mae_model} train step"
            benchmark.pedantic(timed, rounds=5, warmup_rounds=0, iterations=1)
        else:
            info.update({"ms_per_step": None,
                         "note": "CPU smoke run (fastmae through Triton's interpreter): not a timing"})
            benchmark.group = f"{mae_model} train step"
            benchmark.pedantic(step, rounds=1, warmup_rounds=0, iterations=1)
    step = model = fwd = None  # free before the next system is built
    if device == "cuda":
        torch.cuda.empty_cache()
    if compiled:
        torch._dynamo.reset()
