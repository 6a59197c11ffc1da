"""Every Triton kernel of ``fastmae.kernels`` compiles for an H100 / H200 (CUDA sm_90), checked
on a CPU-only machine.

What it proves: for each kernel module, every launch its public launchers make -- at MAE's real
shapes (ViT-B/L/H encoders, the 512-wide decoder, 224 x 224 images, mask ratio 0.75) and a few
odd small ones, in fp32 and in autocast's bf16 / fp16, with the tile sizes, num_warps and
num_stages the launchers pick on a GPU, and for an autotuned kernel the configurations its
autotuner would try -- gets through Triton's compiler for ``GPUTarget("cuda", 90, 32)`` down to
PTX and a cubin (Triton's bundled ptxas), specialized exactly as ``JITFunction.run`` specializes
real arguments (argument dtypes, 16-divisibility of pointers and ints, ints equal to 1), and fits
an sm_90 block's shared memory; and that a kernel whose launcher sizes its grid as one wave
(``ONE_WAVE_WARPS_PER_SM`` in its module: the LayerNorm and bias + GELU backwards) uses no more
registers a thread (``cuobjdump -res-usage`` on the cubin) and shared memory than lets that wave
fit on the SMs at once (every variant at every tiling of such a kernel is compiled, in quick
mode too).

What it does not prove: that the kernels compute the right numbers on a GPU (the interpreter
tests check the math on CPU, the GPU runs check the rest), that they are fast, that they do not
spill registers, that the other kernels load and launch (grid limits, registers per block), or
that they compile for other GPUs (sm_80, sm_100, AMD). Launch choices that depend on the device (a
launcher sizing its grid by the SM count) are approximated by the scenarios' shapes.

How (details in ``tests/_kernel_capture.py``): a subprocess WITHOUT ``TRITON_INTERPRET`` imports
the module (real ``JITFunction`` objects, the GPU autotuning configurations), swaps Triton's
driver for a stub that only names the sm_90 target, and calls the launchers on uninitialized CPU
tensors with launch recording switched on: nothing runs, each ``kernel[grid](...)`` is recorded
with Triton's own specialization, and each unique launch is compiled with ``triton.compile``.

By default (CI: 2 cores) the ``quick`` selection is compiled: per kernel every variant
(argument dtypes, flag constexprs) and every tiling of a non-autotuned kernel, and for an
autotuned kernel one of its configurations per variant, spread over its configuration list,
and a one-wave kernel at every variant and tiling (``select_quick``): about 300 of the 760
unique launches, ~330 CPU-seconds with triton 3.9 (most in attention, patch_embed and
layer_norm). ``FASTMAE_GPU_COMPILE=full`` compiles all of them, every autotuning configuration
included (the longest mode; ``FASTMAE_GPU_COMPILE_JOBS=N`` compiles on N processes). Either way every launch is recorded, and the test also fails when a jit
kernel of a module is never launched, or a bool constexpr only ever gets one value: the
scenarios in ``tests/_kernel_capture.py`` then need a case for the new code path.

The test fails -- it never skips -- when this environment cannot compile for sm_90 (no ptxas,
say) or the Triton internals the recording uses have changed; it skips only on a machine with a
CUDA GPU, where the kernel tests compile and run the kernels for real.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CAPTURE = Path(__file__).with_name("_kernel_capture.py")
MODE = os.environ.get("FASTMAE_GPU_COMPILE", "quick")
JOBS = int(os.environ.get("FASTMAE_GPU_COMPILE_JOBS", "1"))
TIMEOUT_S = 900 if MODE == "quick" else 6 * 3600
ERROR_CHARS = 1500  # of each distinct compiler error in the failure message
LISTED = 12  # launches listed per distinct error


def _kernel_modules():
    """Every kernel module (kernels/*.py, not _private): a new one fails until it has scenarios."""
    spec = importlib.util.find_spec("fastmae.kernels")
    folder = Path(next(iter(spec.submodule_search_locations)))
    return sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))


def _run_capture(module, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, every run
    cmd = [sys.executable, str(CAPTURE), module, "--mode", MODE, "--jobs", str(JOBS)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"compiling fastmae.kernels.{module} for sm_90 took over {TIMEOUT_S} s "
                    f"(a compiler hang?)\n{(e.stderr or '')[-3000:]}")
    reports = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not reports:
        pytest.fail(f"the compile check of fastmae.kernels.{module} crashed "
                    f"(exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(reports[-1])


def _describe(entry):
    consts = ", ".join(f"{k}={v}" for k, v in entry["constexprs"].items())
    return (f"{entry['kernel']}[{consts}; num_warps={entry['num_warps']}, "
            f"num_stages={entry['num_stages']}]\n      args: {entry['args']}\n"
            f"      recorded by: {entry['recorded_by']}")


def _failure_message(report):
    module, version = f"fastmae.kernels.{report['module']}", report["triton"]
    lines = []
    for err in report["call_errors"]:
        lines.append(f"launcher call failed while recording: {err['call']}\n{err['error']}")
    if report["unlaunched"]:
        lines.append(f"jit kernels that no capture scenario launches: {report['unlaunched']} "
                     f"(add their launchers to _scenarios in tests/_kernel_capture.py)")
    if report["one_sided_flags"]:
        lines.append(f"bool constexprs recorded with one value only: {report['one_sided_flags']} "
                     f"(add a scenario reaching the other value to _scenarios in "
                     f"tests/_kernel_capture.py, or list the flag in ONE_SIDED_FLAGS there)")
    failures = report["failures"]
    if failures:
        lines.append(f"{len(failures)} of {report['compiled']} launches do not compile for "
                     f"sm_90 with triton {version}:")
        by_error = {}
        for entry in failures:
            by_error.setdefault(entry["error"], []).append(entry)
        for error, entries in by_error.items():
            lines.extend(f"  - {_describe(e)}" for e in entries[:LISTED])
            if len(entries) > LISTED:
                lines.append(f"  - ... and {len(entries) - LISTED} more launches of "
                             f"{sorted({e['kernel'] for e in entries[LISTED:]})}")
            text = error if len(error) <= ERROR_CHARS else error[:ERROR_CHARS] + " [...]"
            lines.append("    error: " + text.replace("\n", "\n      "))
    return f"{module} (triton {version}, {report['mode']} mode):\n" + "\n".join(lines)


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="a CUDA GPU is present: the kernel tests compile and run the kernels")
@pytest.mark.parametrize("module", _kernel_modules())
def test_kernels_compile_for_sm90(module, tmp_path):
    report = _run_capture(module, tmp_path)
    if report["environment_error"]:
        pytest.fail(f"cannot check fastmae.kernels.{module} with triton {report['triton']}: "
                    f"{report['environment_error']}")
    if any(report[k] for k in ("call_errors", "unlaunched", "one_sided_flags", "failures")):
        pytest.fail(_failure_message(report), pytrace=False)
    assert report["compiled"] > 0, f"no launch of fastmae.kernels.{module} was recorded"


def test_resident_warps_follow_the_sm90_limits():
    """The occupancy the verbose report gives a launch, checked against sm_90's allocation rules
    (the attention kernels at the decoder's shape, as compiled by Triton 3.6, for the numbers)."""
    from _kernel_capture import resident_warps
    assert resident_warps(124, 25088, 4) == 16  # 124 -> 128 a thread: 4 blocks of 4 warps
    assert resident_warps(76, 24576, 8) == 24  # 76 -> 80: 3 blocks of 8 warps
    assert resident_warps(74, 20480, 4) == 24  # 74 -> 80: 6 blocks of 4 warps
    assert resident_warps(32, 0, 4) == 64  # the SM's 64 warps, not the registers, bind
    assert resident_warps(16, 0, 1) == 32  # at most 32 blocks an SM
    assert resident_warps(40, 100 * 1024, 4) == 8  # two blocks' shared memory


@pytest.mark.skipif(torch.cuda.is_available(), reason="records on CPU tensors")
def test_capture_selects_only_the_kernels_named():
    """--kernels NAME,...: only those kernels' launches are selected (recorded here, not
    compiled), the whole module still captured for the unlaunched-kernel check."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(CAPTURE), "attention", "--mode", "capture",
           "--kernels", "_attn_bwd_fused_q,_attn_fwd"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    report = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert set(report["kernels"]) == {"_attn_bwd_fused_q", "_attn_fwd"}, report["kernels"]
    assert report["unlaunched"] == [] and report["compiled"] == 0
