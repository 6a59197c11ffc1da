"""`fastmae bench` and the BENCHMARKS.md writer.

On a machine without a GPU the command runs its tiny CPU configuration: these tests check that
it says so, writes the JSON it documents, and refuses bad flags clearly. The writer is tested on
a FIXTURE: synthetic numbers made up below for the test, not measurements of anything.
"""
import contextlib
import importlib.util
import json
import os
import re
from pathlib import Path

import pytest
import torch

from _bench_script import load as load_bench_script
from fastmae import bench, cli

REPO = Path(__file__).resolve().parent.parent
HAS_CUDA = torch.cuda.is_available()


writer = load_bench_script("write_benchmarks")


# ----------------------------------------------------------------------------- the command

@pytest.mark.skipif(HAS_CUDA, reason="on a GPU `fastmae bench` runs the real configuration")
def test_bench_cpu_runs_tiny_configuration_and_writes_json(tmp_path, capsys):
    out = tmp_path / "sub" / "bench.json"
    rc = cli.main(["bench", "--steps", "2", "--warmup", "1", "--no-progress", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "no CUDA GPU" in text
    assert "Ran the tiny CPU configuration instead of --model vit_b16" in text
    assert "reference, eager" in text
    assert "fastmae's Triton kernels are not timed" in text
    assert "parity of the triton path through Triton's interpreter [PASS]" in text

    data = json.loads(out.read_text())
    assert data["schema"] == bench.SCHEMA
    assert data["tiny_cpu"] is True and data["floors"] is None
    for key in ("gpu", "torch", "triton", "commit", "date"):
        assert key in data["env"]
    assert data["config"]["model"] == "tiny" and data["config"]["steps"] == 2
    assert data["command"].startswith("fastmae bench --steps 2")
    (row,) = data["results"]
    assert row["system"] == "reference" and row["backend"] == "torch"
    assert row["ms_per_step"] > 0 and row["images_per_s"] > 0
    assert len(row["ms_steps"]) == 2 and min(row["ms_steps"]) == pytest.approx(row["ms_min"],
                                                                               abs=1e-3)
    assert row["speedup_vs_eager"] == pytest.approx(1.0)
    assert row["mfu"] is None and row["peak_mem_gib"] is None
    par = data["parity"]
    assert par["passed"] and par["mask_equal"] and not par["missing_grads"]
    assert par["n_grads"] > 0 and par["grad_err"] <= 1e-4

    # a CPU run never becomes a number in BENCHMARKS.md
    res = writer.load([str(out)])
    md = writer.render(res)
    assert "No GPU measurement has been made yet" in md
    assert "bench.json (CPU run" in md


@pytest.mark.parametrize("argv, message", [
    (["--model", "vit_x"], "invalid choice: 'vit_x'"),
    (["--batch", "0"], "--batch must be a positive integer, got 0"),
    (["--steps", "many"], "--steps must be a positive integer, got 'many'"),
    (["--dtype", "int8"], "invalid choice: 'int8'"),
    (["--warmup", "-1"], "--warmup must be an integer >= 0, got -1"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["--systems", "fastmae,turbo"], "--systems: unknown system(s) turbo"),
])
def test_bench_bad_flags(capsys, argv, message):
    rc = cli.main(["bench", *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert "usage: fastmae bench" in err
    assert message in err


@pytest.mark.parametrize("where, message", [
    ("dir", "fastmae bench: error: --json {tmp}: is a directory; give a file path"),
    ("below a file", "--json {tmp}/afile/b.json: {tmp}/afile is not a directory"),
])
def test_bench_bad_json_path_is_refused_before_the_run(tmp_path, capsys, monkeypatch, where,
                                                       message):
    def no_run(args):
        raise AssertionError("the benchmark ran before --json was checked")
    monkeypatch.setattr(bench, "_main_cpu", no_run)
    monkeypatch.setattr(bench, "_main_gpu", no_run)
    path = tmp_path
    if where == "below a file":
        (tmp_path / "afile").write_text("x")
        path = tmp_path / "afile" / "b.json"
    assert cli.main(["bench", "--json", str(path)]) == 2
    err = capsys.readouterr().err
    assert "usage: fastmae bench" in err
    assert message.format(tmp=tmp_path) in err


def test_fastmae_version(capsys):
    import fastmae
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"fastmae {fastmae.__version__}"
    assert "--version" in (cli.main([]), capsys.readouterr().out)[1]


def test_unknown_command_is_a_usage_error(capsys):
    """Exit status 2 (a usage error, as argparse's), the usage on stderr, nothing imported."""
    assert cli.main(["recontsruct", "cat.jpg"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "unknown command 'recontsruct'" in captured.err
    assert all(name in captured.err for name in cli.COMMANDS)


def test_bench_help(capsys):
    assert cli.main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--batch", "--dtype", "--compile", "--steps", "--json"):
        assert flag in out


# ----------------------------------------------------------------------------- FLOPs and tables

@pytest.mark.parametrize("name, giga", [("vit_b16", 58.7), ("vit_l16", 124.5), ("vit_h14", 291.4)])
def test_training_flops_match_the_baseline_count(name, giga):
    """3 x forward matmul + attention FLOPs, as counted for the project's baselines."""
    model = bench.build_model(name, "meta")
    assert bench.training_flops_per_image(model) / 1e9 == pytest.approx(giga, abs=0.05)


def test_format_results_gpu_columns():
    # FIXTURE: synthetic numbers
    results = [
        {"system": "reference", "label": "reference, eager", "ms_per_step": 100.0,
         "images_per_s": 2560.0, "peak_mem_gib": 14.0, "first_step_s": 2.0},
        {"system": "fastmae", "label": "fastmae (triton kernels)", "ms_per_step": 50.0,
         "images_per_s": 5120.0, "peak_mem_gib": 10.0, "first_step_s": 9.0},
        {"system": "reference_compile", "label": "reference, torch.compile", "error": "boom"},
    ]
    bench._add_ratios(results, 1e9, {"matmul_flops_per_s": 1e13})
    table = bench.format_results(results, True, True)
    assert re.search(r"fastmae \(triton kernels\)\s+50\.0\s+5120\s+51\.2%\s+10\.0\s+9\.0\s+2\.00x", table)
    assert "FAILED: boom" in table
    assert results[1]["speedup_vs_eager"] == pytest.approx(2.0)


def test_kernel_breakdown_sums_and_categories():
    """The profile summary: per-step totals, categories by kernel name, fastmae kernels named by
    their @triton.jit functions."""
    names = bench.fastmae_kernel_names()
    assert {"_attn_fwd", "_layer_norm_fwd", "_bias_gelu_bwd", "_masked_mse_fwd"} <= names
    # FIXTURE: made-up kernel durations (us), two profiled steps
    kernels = [("_attn_fwd", 300.0), ("_attn_fwd", 340.0),
               ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", 1000.0),
               ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", 1000.0),
               ("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>", 60.0),
               ("void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add>", 20.0)]
    b = bench.kernel_breakdown(kernels, 2, names, step_ms=2.0)
    assert b["gpu_busy_ms_per_step"] == pytest.approx(1.36)
    assert b["launches_per_step"] == 3
    cats = {c["name"]: c for c in b["categories"]}
    assert cats["matmul (cuBLAS)"]["ms_per_step"] == pytest.approx(1.0)
    assert cats["fastmae kernels"]["ms_per_step"] == pytest.approx(0.32)
    assert cats["optimizer"]["launches_per_step"] == 0.5
    assert cats["other (torch elementwise)"]["share"] == pytest.approx(20 / 2720)
    assert b["categories"][0]["name"] == "matmul (cuBLAS)"
    assert b["top_kernels"][1] == {"name": "_attn_fwd", "ms_per_step": pytest.approx(0.32),
                                   "launches_per_step": 1.0, "share": pytest.approx(640 / 2720),
                                   "category": "fastmae kernels"}
    # every fastmae kernel, however far down the top list (here with top=1)
    b1 = bench.kernel_breakdown(kernels, 2, names, top=1)
    assert [k["name"] for k in b1["top_kernels"]] == ["nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT"]
    assert b1["fastmae_kernels"] == [{"name": "_attn_fwd", "ms_per_step": pytest.approx(0.32),
                                      "launches_per_step": 1.0, "share": pytest.approx(640 / 2720)}]
    text = bench.format_breakdown("fastmae", b1)
    assert "GPU busy 1.4 ms per step" in text and "fastmae kernels:" in text and "_attn_fwd" in text
    text = bench.format_breakdown("fastmae", b)
    assert "GPU busy 1.4 ms per step of 2.0 ms" in text and "_attn_fwd" in text
    assert "fastmae_launches" not in b  # no launch shapes given


@pytest.mark.parametrize("name, category", [
    # names as the profiler gives them (torch 2.11 on an H200, and SDPA's other kernels)
    ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "matmul (cuBLAS)"),
    ("cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x64_4x1x1_kernel0_0",
     "attention (SDPA)"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4, false, "
     "false, cutlass::bfloat16_t, Flash_kernel_traits<64, 128, 64, 4, cutlass::bfloat16_t> >, "
     "false, true, false, false, false, true, false, false>(pytorch_flash::Flash_fwd_params)",
     "attention (SDPA)"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<"
     "cutlass::bfloat16_t, cutlass::arch::Sm80, true, 64, 64, 64, true, true>::Params)",
     "attention (SDPA)"),
    ("void at::native::unrolled_elementwise_kernel<at::native::CUDAFunctor_add<float>, "
     "std::array<char*, 3ul>, 4, TrivialOffsetCalculator<2, unsigned int>, "
     "TrivialOffsetCalculator<1, unsigned int>, at::native::memory::LoadWithCast<2>, "
     "at::native::memory::StoreWithCast<1> >(int, at::native::CUDAFunctor_add<float>, "
     "std::array<char*, 3ul>, TrivialOffsetCalculator<2, unsigned int>, "
     "TrivialOffsetCalculator<1, unsigned int>, at::native::memory::LoadWithCast<2>, "
     "at::native::memory::StoreWithCast<1>)", "other (torch elementwise)"),
    ("void at::native::vectorized_elementwise_kernel<8, at::native::bfloat16_copy_kernel_cuda("
     "at::TensorIteratorBase&)::{lambda(float)#1}, std::array<char*, 2ul> >(int, "
     "at::native::bfloat16_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda(float)#1}, "
     "std::array<char*, 2ul>)", "copy / cast (torch)"),
    ("triton_per_fused__scaled_dot_product_flash_attention_0", "torch.compile (inductor)"),
    ("triton_red_fused_native_layer_norm_backward_3", "torch.compile (inductor)"),
    ("Memcpy DtoD (Device -> Device)", "copy / cast (torch)"),
    ("Memset (Device)", "copy / cast (torch)"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous "
     "namespace)::TensorListMetadata<4>, at::native::(anonymous namespace)::FusedAdamMathFunctor"
     "<float, 4, (at::native::ADAM_MODE)1, false>, float*, double, double, double, double, "
     "double, double, bool, float*, float*>(...)", "optimizer"),
    ("_attn_fwd", "fastmae kernels"),
])
def test_kernel_category_of_real_kernel_names(name, category):
    """Each kernel in its category: attention before matmul (flash kernels' templates name
    cutlass types), inductor's by their own name, an add that loads through LoadWithCast not a
    cast, the trace's memcpy and memset as copies."""
    assert bench.kernel_category(name, {"_attn_fwd"}) == category


def test_kernel_breakdown_by_launch_shape():
    """Launches that carry their grid and block: every fastmae kernel per launch shape (e.g. the
    encoder's and the decoder's calls apart), the totals as without them."""
    names = {"_attn_fwd", "_layer_norm_bwd"}
    enc, dec = "grid 3072 x 1 x 1, block 128", "grid 4096 x 4 x 1, block 128"
    # FIXTURE: made-up kernel durations (us), one profiled step
    kernels = [("_attn_fwd", 10.0, enc), ("_attn_fwd", 12.0, enc), ("_attn_fwd", 50.0, dec),
               ("_layer_norm_bwd", 7.0, "grid 396 x 1 x 1, block 128"),
               ("nvjet_tst_fixture", 100.0, "grid 132 x 1 x 1, block 384"), ("_attn_fwd", 1.0, None)]
    b = bench.kernel_breakdown(kernels, 1, names)
    assert b["gpu_busy_ms_per_step"] == pytest.approx(0.18)
    assert b["fastmae_kernels"][0]["name"] == "_attn_fwd"
    assert b["fastmae_kernels"][0]["launches_per_step"] == 4
    launches = [(r["name"], r["launch"], round(r["ms_per_step"], 6), r["launches_per_step"])
                for r in b["fastmae_launches"]]
    assert launches == [("_attn_fwd", dec, 0.05, 1), ("_attn_fwd", enc, 0.022, 2),
                        ("_layer_norm_bwd", "grid 396 x 1 x 1, block 128", 0.007, 1)]
    text = bench.format_breakdown("fastmae", b)
    assert "fastmae kernels by launch shape:" in text and f"_attn_fwd  ({dec})" in text


def test_kernel_breakdown_sets_each_fastmae_kernel_against_its_floor():
    """Launches that carry their work (bytes, FLOPs): each fastmae kernel's bytes and FLOPs a
    step, bandwidth, and its floor at the given rates -- the bytes at the copy rate or the FLOPs
    at the matmul rate, whichever is longer -- per name and per launch shape; none where a
    launch lacks its work, and no floor for matmul work without a matmul rate."""
    names = {"_attn_fwd", "_layer_norm_bwd", "_bias_gelu_fwd"}
    enc, dec = "grid 3072 x 1 x 1, block 128", "grid 4096 x 4 x 1, block 128"
    floors = {"copy_bytes_per_s": 1e12, "matmul_flops_per_s": 1e14}
    # FIXTURE: made-up durations (us) and work, two profiled steps
    kernels = [("_layer_norm_bwd", 40.0, enc, (20e6, 0)), ("_layer_norm_bwd", 40.0, enc, (20e6, 0)),
               ("_attn_fwd", 100.0, dec, (1e6, 5e9)), ("_attn_fwd", 100.0, dec, (1e6, 5e9)),
               ("_bias_gelu_fwd", 10.0, enc, (5e6, 0)), ("_bias_gelu_fwd", 10.0, enc, None),
               ("nvjet_tst_fixture", 500.0, None, None)]
    b = bench.kernel_breakdown(kernels, 2, names, floors=floors)
    rows = {r["name"]: r for r in b["fastmae_kernels"]}
    ln = rows["_layer_norm_bwd"]
    assert ln["bytes_per_step"] == 20e6 and ln["flops_per_step"] == 0
    assert ln["gb_per_s"] == pytest.approx(500.0)  # 40 MB in 80 us
    assert ln["floor_bound"] == "memory" and ln["floor_ms_per_step"] == pytest.approx(0.02)
    assert ln["of_floor"] == pytest.approx(0.5)
    attn = rows["_attn_fwd"]  # 50 us of matmul work at 1e14 against 10 us of bytes
    assert attn["floor_bound"] == "matmul" and attn["of_floor"] == pytest.approx(0.5)
    assert "gb_per_s" not in rows["_bias_gelu_fwd"]  # one of its launches has no work
    by_launch = {(r["name"], r["launch"]): r for r in b["fastmae_launches"]}
    assert by_launch[("_attn_fwd", dec)]["of_floor"] == pytest.approx(0.5)
    assert "of_floor" not in by_launch[("_bias_gelu_fwd", enc)]
    text = bench.format_breakdown("fastmae", b)
    assert "0.020 GB 500 GB/s, 50% of its memory floor" in text
    assert "0.001 GB 10 GB/s 5.0 GFLOP, 50% of its matmul floor" in text
    # without a matmul rate (fp32 operands): the bytes and FLOPs, a floor only for memory work
    b = bench.kernel_breakdown(kernels, 2, names, floors=dict(floors, matmul_flops_per_s=None))
    rows = {r["name"]: r for r in b["fastmae_kernels"]}
    assert rows["_attn_fwd"]["flops_per_step"] == 5e9 and "of_floor" not in rows["_attn_fwd"]
    assert rows["_layer_norm_bwd"]["of_floor"] == pytest.approx(0.5)
    # without floors: bytes and bandwidth only
    b = bench.kernel_breakdown(kernels, 2, names)
    assert "of_floor" not in b["fastmae_kernels"][0] and "gb_per_s" in b["fastmae_kernels"][0]


def test_launch_work_is_paired_with_the_profiles_kernels_in_order():
    names = {"_attn_fwd", "_layer_norm_fwd"}
    # FIXTURE: a made-up profile and the launches reported while it ran
    kernels = [("_layer_norm_fwd", 5.0, "grid 1 x 1 x 1, block 32"), ("nvjet_fixture", 9.0, None),
               ("_attn_fwd", 7.0, "grid 2 x 1 x 1, block 128"), ("_layer_norm_fwd", 6.0)]
    launches = [("_layer_norm_fwd", 100, 0), ("_attn_fwd", 200, 50), ("_layer_norm_fwd", 300, 0)]
    paired, ok = bench.with_launch_work(kernels, launches, names)
    assert ok and paired == [("_layer_norm_fwd", 5.0, "grid 1 x 1 x 1, block 32", (100, 0)),
                             ("nvjet_fixture", 9.0, None),
                             ("_attn_fwd", 7.0, "grid 2 x 1 x 1, block 128", (200, 50)),
                             ("_layer_norm_fwd", 6.0, None, (300, 0))]
    # one launch more, fewer, or another order: nothing paired
    for other in (launches + [("_attn_fwd", 1, 1)], launches[:2], launches[1::-1] + launches[2:],
                  []):
        assert bench.with_launch_work(kernels, other, names) == (kernels, False)


@pytest.mark.interpreter(covered_by="test_profiled_fastmae_step_pairs_every_launch_with_its_work")
def test_profile_train_step_sets_the_observer_for_the_profiled_steps_only(monkeypatch):
    """On a CPU (the interpreter; the trace made up from the launches a like step made):
    profile_train_step reports each launch's work while its steps run, pairs it with the
    trace's kernels, and unsets the observer after."""
    from fastmae.backend import use_backend
    from fastmae.kernels import _common
    model = bench.build_model("micro", "cpu")
    step, _, _ = bench.make_train_step(model, torch.randn(2, 3, 16, 16), torch.float32)
    seen = []
    with use_backend("triton"):
        monkeypatch.setattr(_common, "OBSERVER", lambda name, nbytes, flops: seen.append(name))
        step()
        monkeypatch.setattr(_common, "OBSERVER", None)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
        monkeypatch.setattr(torch.profiler, "profile", lambda **kw: contextlib.nullcontext())
        # FIXTURE: a made-up trace, 2 us a kernel, in the order the step above launched them
        monkeypatch.setattr(bench, "_trace_kernels",
                            lambda prof: [("nvjet_fixture", 5.0, None)] + [(n, 2.0, None) for n in seen])
        b = bench.profile_train_step(step, steps=1,
                                     floors={"copy_bytes_per_s": 1e12, "matmul_flops_per_s": None})
    assert _common.OBSERVER is None and len(seen) > 20
    assert "launch_work" not in b
    rows = {r["name"]: r for r in b["fastmae_kernels"]}
    assert set(rows) == set(seen) and all(r["bytes_per_step"] > 0 for r in rows.values())
    assert rows["_layer_norm_fwd"]["floor_bound"] == "memory"
    assert rows["_attn_fwd"]["flops_per_step"] > 0 and "of_floor" not in rows["_attn_fwd"]


@pytest.mark.cuda
def test_profiled_fastmae_step_pairs_every_launch_with_its_work():
    """On a GPU, a profiled tiny fastmae step: every fastmae kernel of the trace is paired with
    the work its launch reported, and sits within 0 and 100% of its floor (a count of the
    work above what the kernel moves or computes would pass 100%)."""
    from fastmae.backend import use_backend
    model = bench.build_model("tiny", "cuda")
    imgs = torch.randn(8, 3, *model.patch_embed.img_size, device="cuda")
    step, _, _ = bench.make_train_step(model, imgs, torch.bfloat16, backend="triton")
    with use_backend("triton"):
        for _ in range(3):
            step()
        floors = bench.measure_floors(matmul_n=4096, copy_mib=256)
        b = bench.profile_train_step(step, floors=floors)
    assert "launch_work" not in b
    assert b["fastmae_kernels"] and all(r.get("of_floor") for r in b["fastmae_kernels"])
    assert b.get("fastmae_launches"), "no launch shapes: the profiler's trace was not read"
    assert all(0 < r.get("of_floor", 0) < 1 for r in b["fastmae_launches"])


def test_launch_shapes_come_from_the_profilers_trace(tmp_path):
    """The kernels of a profile, with grid and block, from its exported Chrome trace (CPU
    events and kernels without those fields skipped or given no shape); an unreadable trace
    gives None, and the caller falls back to the profiler's events."""
    assert bench.launch_shape({"grid": [4096, 4, 1], "block": [128, 1, 1]}) == \
        "grid 4096 x 4 x 1, block 128"
    assert bench.launch_shape({"grid": [1, 1, 1]}) is None and bench.launch_shape({}) is None

    class FakeProfile:  # FIXTURE: a made-up trace in the format torch.profiler exports
        def __init__(self, trace):
            self.trace = trace

        def export_chrome_trace(self, path):
            with open(path, "w") as f:
                f.write(self.trace)

    trace = {"traceEvents": [
        {"ph": "X", "cat": "kernel", "name": "_attn_fwd", "dur": 12.5,
         "args": {"grid": [4096, 4, 1], "block": [128, 1, 1], "registers per thread": 90}},
        {"ph": "X", "cat": "kernel", "name": "nvjet_tst_fixture", "dur": 30.0, "args": {}},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "dur": 3.0, "args": {}},
        {"ph": "i", "cat": "kernel", "name": "marker", "args": {}},
        # a same-dtype copy_ and a zero fill: the GPU busy with them too
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoD (Device -> Device)", "dur": 4.0,
         "args": {"bytes": 1024}},
        {"ph": "X", "cat": "gpu_memset", "name": "Memset (Device)", "dur": 2.0, "args": {}},
    ]}
    assert bench._trace_kernels(FakeProfile(json.dumps(trace))) == [
        ("_attn_fwd", 12.5, "grid 4096 x 4 x 1, block 128"), ("nvjet_tst_fixture", 30.0, None),
        ("Memcpy DtoD (Device -> Device)", 4.0, None), ("Memset (Device)", 2.0, None)]
    # in the order they ran, whatever the trace's order
    for event, ts in zip(trace["traceEvents"], (20.0, 10.0, 0.0, 0.0, 30.0, 5.0)):
        event["ts"] = ts
    assert [k[0] for k in bench._trace_kernels(FakeProfile(json.dumps(trace)))] == [
        "Memset (Device)", "nvjet_tst_fixture", "_attn_fwd", "Memcpy DtoD (Device -> Device)"]
    assert bench._trace_kernels(FakeProfile("{not json")) is None


def test_graphed_step_refuses_what_it_cannot_capture():
    model = bench.build_model("micro", "cpu")
    imgs = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="cuda_graph: a CUDA step"):
        bench.make_train_step(model, imgs, torch.float32, cuda_graph=True)


def test_graphed_step_takes_the_before_capture_hook_to_cuda_graph_step(monkeypatch):
    """make_train_step hands ``before_capture`` to cuda_graph_step (the bench resets the peak
    memory there). Nothing runs: imgs only says it is on a GPU."""
    from types import SimpleNamespace
    from fastmae import graphs
    seen = {}
    monkeypatch.setattr(graphs, "cuda_graph_step", lambda step, opt, **kw: seen.update(kw) or step)
    hook = object()
    bench.make_train_step(bench.build_model("micro", "cpu"),
                          SimpleNamespace(device=torch.device("cuda"), shape=(2,)),
                          torch.bfloat16, cuda_graph=True, backend="torch", before_capture=hook)
    assert seen == {"backend": "torch", "_before_capture": hook}


@pytest.mark.parametrize("key", ["fastmae_graph", "reference"])
def test_peak_memory_is_reset_after_the_warm_up_for_graphs_as_for_eager_steps(monkeypatch, key):
    """A graphed system's peak is reset after its eager warm-up and before its capture (whose
    memory it counts), not before the warm-up; an eager one's after its warm-up steps."""
    events = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: events.append("reset"))

    def make(model, imgs, amp_dtype, cuda_graph=False, before_capture=None, **kw):
        if cuda_graph:  # as cuda_graph_step: warm-up, then the hook, then the capture
            events.append("warm-up")
            before_capture()
            events.append("capture")
        return (lambda: None), None, model

    def timed(step, device, steps, warmup, progress=None, reset_peak=True):
        events.append("warm-up and timed steps, peak " + ("reset" if reset_peak else "kept"))
        return {"times_ms": [1.0], "first_step_s": 0.0, "peak_mem_gib": 1.0}
    monkeypatch.setattr(bench, "make_train_step", make)
    monkeypatch.setattr(bench, "time_train_step", timed)
    bench.bench_system(key, "micro", 2, torch.float32, 1, 1, "cpu", progress=False)
    if key == "fastmae_graph":
        assert events == ["warm-up", "reset", "capture", "warm-up and timed steps, peak kept"]
    else:
        assert events == ["warm-up and timed steps, peak reset"]


def _fake_graph(monkeypatch, bug=None):
    """make_train_step whose "CUDA graph" replays the eager step on the CPU, with ``bug``: "no
    update" (the forward only), "warm-up kept" (3 real steps before the first replay, as
    cuda_graph_step's warm-up was), "nan" (a parameter turned NaN)."""
    real = bench.make_train_step

    def make(model, imgs, amp_dtype, cuda_graph=False, **kw):
        step, opt, fwd = real(model, imgs, amp_dtype, **kw)
        if not cuda_graph:
            return step, opt, fwd
        if bug == "warm-up kept":
            for _ in range(3):
                step()

        def replay():
            if bug == "no update":
                with torch.no_grad():
                    return fwd(imgs, noise=kw["noise"])[0]
            loss = step()
            if bug == "nan":
                with torch.no_grad():
                    model.decoder_pred.bias[0] = float("nan")
            return loss
        return replay, opt, fwd
    monkeypatch.setattr(bench, "make_train_step", make)


@pytest.mark.parametrize("bug", [None, "no update", "warm-up kept", "nan"])
def test_graph_check_fails_a_graph_that_does_not_train_as_the_eager_steps(monkeypatch, bug):
    """graph_check on the CPU (the reference's step, its "graph" the eager step replayed):
    passes where the replays are the eager steps, fails a graph that skips the update, trains
    from a state 3 steps on, or produces NaN."""
    _fake_graph(monkeypatch, bug)
    c = bench.graph_check("reference_graph", "micro", 2, torch.float32, "cpu")
    assert c["system"] == "reference_graph" and c["steps"] == 3 and c["batch"] == 2
    assert len(c["losses_graph"]) == len(c["losses_eager"]) == 3
    assert c["n_params"] == sum(p.requires_grad for p in
                                bench.build_model("micro", "cpu").parameters())
    line = bench.graph_check_line(c)
    if bug is None:
        assert c["passed"] and c["param_diff"] == 0 and c["loss_err"] == 0
        assert line.startswith("graph check [PASS] reference + CUDA graph: 3 replays against 3 ")
    else:
        assert not c["passed"] and c["params_failed"], c
        assert line.startswith("graph check [FAIL]") and "over the limit:" in line
    if bug == "nan":
        assert c["param_worst"] == "decoder_pred.bias"
    json.dumps(c)  # goes into the result file


@pytest.mark.cuda
@pytest.mark.parametrize("key", bench.GPU_ONLY_SYSTEMS)
def test_graph_check_passes_the_graphed_steps_on_gpu(key):
    """On a GPU, the real graphs (cuda_graph_step, its warm-up undone): their replays are the
    eager steps, within the check's limits, and the eager steps did move every parameter."""
    c = bench.graph_check(key, "tiny", 8, torch.bfloat16, "cuda")
    assert c["passed"], bench.graph_check_line(c)
    assert c["param_moved"] > 0 and c["loss_err"] <= c["loss_limit"]
    assert c["losses_eager"][0] != c["losses_eager"][-1]  # the steps trained


FIXTURE_PARITY_KEYS = {
    "loss_fastmae": 1.25, "loss_reference": 1.25, "loss_err": 1e-5, "loss_err_eager": 1e-5,
    "pred_err": 1e-3, "pred_err_eager": 1e-3, "grad_err": 3e-3,
    "grad_worst": "blocks.0.norm1.weight",
    "grad_err_eager": 4e-3, "grad_err_eager_max": 5e-3, "grad_failed": [], "n_grads": 10,
    "mask_equal": True, "missing_grads": [], "exact": "reference in fp32", "dtype": "bf16"}


def test_parity_line_names_gradients_the_reference_lacks_and_dtypes_that_differ():
    """A failed parity says why: gradients only fastmae gives and quantities in another dtype
    are named; a run's JSON from before those checks (no such keys) reads as before."""
    old = bench.parity_line(dict(FIXTURE_PARITY_KEYS, batch=8, passed=True))
    assert "reference lacks" not in old and "dtype" not in old
    line = bench.parity_line(dict(FIXTURE_PARITY_KEYS, batch=8, passed=False,
                                  unexpected_grads=["pos_embed"], dtype_differs=["pred"]))
    assert line.startswith("parity [FAIL]")
    assert "gradients the reference lacks: pos_embed" in line
    assert "dtype differs from the reference's: pred" in line


def _fake_gpu_run(monkeypatch, tmp_path, argv, parity=None, graph=None):
    """`fastmae bench` on a "GPU" whose systems, parity step and graph checks are recorders
    (FIXTURE: made-up numbers). ``parity(batch)`` / ``graph(key)``: what they return or raise.
    Returns (exit status, the events in order, the JSON written)."""
    events = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench, "env_info", lambda: dict(FIXTURE_ENV, triton_launch="direct"))
    monkeypatch.setattr(bench, "measure_floors", lambda: FIXTURE_FLOORS)
    monkeypatch.setattr(bench, "precompile", lambda m, batches, dt: events.append(
        ("precompile", batches)) or {})
    for name in ("paths_kept", "autotuned", "autotune_timings"):
        monkeypatch.setattr(bench, name, lambda: {})

    def system(key, model_name, batch, *args, **kw):
        events.append(("time", key, batch))
        label, backend, compiled = bench.SYSTEMS[key]
        return {"system": key, "label": label, "backend": backend, "compiled": compiled,
                "ms_per_step": 10.0, "images_per_s": batch / 0.01, "peak_mem_gib": 1.0,
                "first_step_s": 1.0, "profile": None}

    def step_parity(model_name, batch, amp_dtype, device, **kw):
        events.append(("parity", batch))
        if parity:
            parity(batch)
        return dict(FIXTURE_PARITY_KEYS, batch=batch, passed=True)

    def graph_check(key, model_name, batch, amp_dtype, device="cuda", **kw):
        events.append(("graph check", key, batch))
        passed = graph(key) if graph else True
        return {"system": key, "label": bench.SYSTEMS[key][0], "batch": batch, "dtype": "bf16",
                "steps": 3, "losses_eager": [1.0, 0.9, 0.8], "losses_graph": [1.0, 0.9, 0.8],
                "loss_err": 0.0, "param_worst": "blocks.0.norm1.weight", "param_diff": 0.0,
                "param_moved": 1e-3, "param_diff_of_moved": 0.0, "param_limit": 5e-5,
                "params_failed": [] if passed else ["blocks.0.norm1.weight"], "passed": passed}
    monkeypatch.setattr(bench, "bench_system", system)
    monkeypatch.setattr(bench, "step_parity", step_parity)
    monkeypatch.setattr(bench, "graph_check", graph_check, raising=False)
    out = tmp_path / "run.json"
    rc = cli.main(["bench", "--model", "tiny", "--no-progress", "--json", str(out), *argv])
    return rc, events, json.loads(out.read_text())


GRAPHED = ["--systems", "reference,fastmae,fastmae_graph,reference_graph"]


def test_gpu_run_checks_what_it_timed_after_timing_it(monkeypatch, tmp_path, capsys):
    """Parity after the systems are timed, at the timed batch (the kernel paths and tiles fastmae
    chose by timing are the ones checked), then each timed CUDA graph's replays against eager
    steps; both recorded in the JSON and said."""
    rc, events, data = _fake_gpu_run(monkeypatch, tmp_path, GRAPHED)
    text = capsys.readouterr().out
    assert rc == 0, text
    assert events == [("precompile", [64]), ("time", "reference", 64), ("time", "fastmae", 64),
                      ("time", "fastmae_graph", 64), ("time", "reference_graph", 64),
                      ("parity", 64), ("graph check", "fastmae_graph", 64),
                      ("graph check", "reference_graph", 64)]
    par = data["parity"]
    assert par["batch"] == 64 and par["timed_batch"] == 64 and par["after_timing"] is True
    assert "after the timing, at the timed batch: the kernel paths and tiles timed" in text
    rows = {r["system"]: r for r in data["results"]}
    assert rows["fastmae_graph"]["graph_check"]["passed"] is True
    assert rows["reference_graph"]["graph_check"]["batch"] == 64
    assert "graph_check" not in rows["fastmae"] and "graph_check" not in rows["reference"]
    assert "graph check [PASS] fastmae + CUDA graph: 3 replays" in text
    assert "graph check [PASS] reference + CUDA graph" in text


@pytest.mark.parametrize("argv, batch", [(["--parity-batch", "0"], None),
                                         (["--parity-batch", "16"], 16),
                                         (["--parity-batch", "1000"], 64)])
def test_gpu_parity_batch_flag(monkeypatch, tmp_path, capsys, argv, batch):
    rc, events, data = _fake_gpu_run(monkeypatch, tmp_path, GRAPHED + argv)
    text = capsys.readouterr().out
    assert rc == 0
    parities = [e for e in events if e[0] == "parity"]
    if batch is None:
        assert parities == [] and data["parity"] is None
        return
    assert parities == [("parity", batch)]
    assert events.index(parities[0]) > events.index(("time", "reference_graph", 64))
    if batch != 64:
        assert "after the timing, at batch 16 (--parity-batch), not the timed batch 64" in text


def test_gpu_parity_out_of_memory_at_the_timed_batch_retries_smaller(monkeypatch, tmp_path,
                                                                       capsys):
    def parity(batch):
        if batch > bench.PARITY_BATCH_GPU:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB")
    rc, events, data = _fake_gpu_run(monkeypatch, tmp_path, GRAPHED, parity=parity)
    text = capsys.readouterr().out
    assert rc == 0
    assert [e for e in events if e[0] == "parity"] == [("parity", 64), ("parity", 32)]
    par = data["parity"]
    assert par["passed"] and par["batch"] == 32 and par["timed_batch"] == 64
    assert par["retried"]["batch"] == 64 and "out of memory" in par["retried"]["error"]
    assert ("out of memory at the timed batch 64 (OutOfMemoryError: CUDA out of memory. Tried "
            "to allocate 9 GiB): checked at batch 32 instead") in text


def test_gpu_parity_error_other_than_memory_fails_the_run(monkeypatch, tmp_path, capsys):
    def parity(batch):
        raise RuntimeError("illegal memory access")
    rc, events, data = _fake_gpu_run(monkeypatch, tmp_path, GRAPHED, parity=parity)
    assert rc == 1 and [e for e in events if e[0] == "parity"] == [("parity", 64)]
    assert data["parity"]["passed"] is False and "illegal memory access" in data["parity"]["error"]
    text = capsys.readouterr().out
    assert "parity [FAIL] (batch 64): RuntimeError: illegal memory access" in text


def test_gpu_run_fails_when_a_graph_check_fails(monkeypatch, tmp_path, capsys):
    def graph(key):
        if key == "reference_graph":
            raise RuntimeError("capture failed")
        return False
    rc, _, data = _fake_gpu_run(monkeypatch, tmp_path, GRAPHED, graph=graph)
    text = capsys.readouterr().out
    assert rc == 1
    rows = {r["system"]: r for r in data["results"]}
    assert rows["fastmae_graph"]["graph_check"]["passed"] is False
    assert rows["reference_graph"]["graph_check"] == {
        "system": "reference_graph", "label": "reference + CUDA graph", "batch": 64,
        "passed": False, "error": "RuntimeError: capture failed"}
    assert "graph check [FAIL] fastmae + CUDA graph" in text
    assert "over the limit: blocks.0.norm1.weight" in text
    assert "graph check [FAIL] reference + CUDA graph: RuntimeError: capture failed" in text


@pytest.mark.skipif(HAS_CUDA, reason="the CPU smoke run of bench_step.py")
def test_bench_step_records_parity_only_for_the_systems_it_checked(tmp_path):
    """benches/bench_step.py's records: "pass" for fastmae (checked against the reference before
    timing), "not checked" for the eager reference (the specification, never checked)."""
    import subprocess
    import sys
    out = tmp_path / "step.json"
    ids = [f"benches/bench_step.py::test_train_step[micro-{s}]" for s in ("fastmae", "reference")]
    # not as an xdist worker (the suite's -n 2 sets these), where pytest-benchmark disables itself
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    proc = subprocess.run([sys.executable, "-m", "pytest", *ids, "-q", "-p", "no:cacheprovider",
                           f"--benchmark-json={out}"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert out.exists(), proc.stdout + proc.stderr
    info = {b["extra_info"]["system"]: b["extra_info"] for b in json.loads(out.read_text())[
        "benchmarks"]}
    assert info["fastmae"]["parity"] == "pass"
    assert info["fastmae"]["parity_checked"] == "fastmae against the reference on one shared step"
    assert info["reference"]["parity"] == "not checked"
    assert "parity_checked" not in info["reference"]


# ----------------------------------------------------------------------------- BENCHMARKS.md writer

FIXTURE_ENV = {"device": "cuda", "gpu": "FIXTURE-GPU-A", "driver": "0.0-fixture", "cuda": "0.0",
               "torch": "0.0+fixture", "triton": "0.0+fixture", "commit": "fixture00000",
               "date": "2000-01-01 00:00 UTC"}
FIXTURE_FLOORS = {"copy_bytes_per_s": 1.0e12, "matmul_flops_per_s": 1.0e14, "matmul_n": 8192,
                  "copy_mib": 1024, "matmul_dtype": "bf16"}


def _fixture_step(card="FIXTURE-GPU-A", ms=(111.0, 55.5, 88.8)):
    """FIXTURE: a made-up `fastmae bench --json` result (no number in it was measured)."""
    env = dict(FIXTURE_ENV, gpu=card)

    def row(system, label, m):
        return {"system": system, "label": label, "ms_per_step": m, "ms_median": m - 0.5,
                "images_per_s": 256 / (m / 1e3), "peak_mem_gib": 12.5, "first_step_s": 1.0,
                "mfu": 0.3}
    rows = [row("reference", "reference, eager", ms[0]),
            row("fastmae", "fastmae (triton kernels)", ms[1]),
            row("reference_compile", "reference, torch.compile", ms[2])]
    rows[1]["paths_kept"] = {"mlp fc1 M=12800 N=3072 K=768 bfloat16": "fused (fused 0.100 ms, split 0.200 ms)"}
    rows[1]["autotuned"] = {
        "attention fwd N=197 d=32 bfloat16": "BLOCK_M=64 BLOCK_N=64, warps=4, stages=2"}
    rows[1]["profile"] = bench.kernel_breakdown(
        [("_attn_fwd", 4321.0, "grid 4096 x 4 x 1, block 128"), ("nvjet_tst_fixture", 30000.0, None)],
        1, {"_attn_fwd"}, step_ms=ms[1])
    return {
        "schema": "fastmae-bench/1", "kind": "train_step", "tiny_cpu": False, "env": env,
        "floors": FIXTURE_FLOORS,
        "config": {"model": "vit_b16", "batch": 256, "dtype": "bf16"},
        "results": rows,
        "parity": {"passed": True, "batch": 32, "dtype": "bf16", "exact": "reference in fp32",
                   "loss_fastmae": 1.25, "loss_reference": 1.25, "grad_err": 3e-3,
                   "grad_worst": "blocks.0.norm1.weight", "grad_err_eager": 4e-3, "mask_equal": True},
        "command": "fastmae bench --model vit_b16 --compile --json fixture.json",
    }


def _fixture_ops(card="FIXTURE-GPU-A"):
    """FIXTURE: a made-up pytest-benchmark JSON of bench_ops.py."""
    env = dict(FIXTURE_ENV, gpu=card)
    benchmarks = []
    for impl, ms in (("fastmae", 0.0123), ("eager", 0.0492)):
        benchmarks.append({"name": f"test_op[vit_b16-bias_gelu_enc-fwd-{impl}]", "extra_info": {
            "suite": "ops", "op": "bias_gelu_enc", "spec": "bias_gelu", "model": "vit_b16",
            "batch": 256, "mode": "fwd", "impl": impl, "shape": "M=12800 D=3072", "dtype": "bf16",
            "autocast": "bf16", "gpu": card, "env": env, "floors": FIXTURE_FLOORS,
            "gpu_ms": ms, "bytes": 1.0e7, "flops": 0, "gbps": 1.0e7 / (ms * 1e-3) / 1e9,
            "tflops": None, "floor_ms": 0.01, "floor_kind": "memory", "frac_floor": 0.01 / ms}})
    return {"machine_info": {}, "commit_info": {}, "benchmarks": benchmarks}


def _write(tmp_path, name, data):
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return str(p)


def test_writer_rederives_a_median_runs_rows_from_their_step_times(tmp_path):
    """A file written when ms/step was the median step (no ms_median in its rows) is shown as
    the steps' total time over their number, from its own step times: images/s, MFU, the
    speed-ups and the profile's step time with it, the median beside it."""
    step = _fixture_step()
    for r in step["results"]:
        del r["ms_median"]
    fastmae_row = step["results"][1]  # FIXTURE: a slow step among fast ones, median 55.5
    fastmae_row.update(ms_steps=[55.5, 55.5, 55.5, 166.5], ms_mean=83.25)
    md = writer.render(writer.load([_write(tmp_path, "step.json", step)]),
                       str(tmp_path / "chart.png"), str(tmp_path))
    # 256 images in 83.25 ms: 3075 images/s, MFU 0.3 x 55.5 / 83.25 = 20%, 111 / 83.25 = 1.33x
    assert re.search(r"\| fastmae \(triton kernels\) \| 83\.2 \| 55\.5 \| 3075 \| 20% \| "
                     r"12\.5 \| 1\.33x \| 1\.07x \|", md)
    assert "GPU busy 34.3 ms per step of a 83.2 ms step" in md
    # rows with neither their step times nor their mean are left as they were (no median)
    assert re.search(r"\| reference, eager \| 111\.0 \| - \| 2306 \| 30% \|", md)
    # the first runs recorded the mean but not the steps: rederived from it
    step["results"][2].update(ms_mean=96.0)  # FIXTURE: torch.compile's median 88.8
    md = writer.render(writer.load([_write(tmp_path, "mean.json", step)]),
                       str(tmp_path / "chart.png"), str(tmp_path))
    assert re.search(r"\| reference, torch\.compile \| 96\.0 \| 88\.8 \| 2667 \|", md)


def test_bench_system_reports_the_steps_total_time_over_their_number(monkeypatch):
    """ms/step, images/s (and the profile's step time) from the timed steps' total time, which
    a slow step counts in; the median kept beside it."""
    def timed(step, device, steps, warmup, progress=None, reset_peak=True):
        return {"times_ms": [10.0, 10.0, 10.0, 50.0], "first_step_s": 0.0, "peak_mem_gib": 1.0}
    monkeypatch.setattr(bench, "make_train_step", lambda model, imgs, amp, **kw: (None, None, model))
    monkeypatch.setattr(bench, "time_train_step", timed)
    r = bench.bench_system("reference", "micro", 2, torch.float32, 4, 1, "cpu", progress=False)
    assert r["ms_per_step"] == r["ms_mean"] == 20.0 and r["ms_median"] == 10.0
    assert r["images_per_s"] == pytest.approx(100.0)


def test_mfu_only_against_a_matmul_rate_of_the_runs_precision():
    """MFU sets the FLOPs against the bf16 matmul rate: none for an fp32 run (its floors carry
    no matmul rate), as its kernels get no matmul floor."""
    results = [{"system": "reference", "label": "reference, eager", "ms_per_step": 100.0,
                "images_per_s": 2560.0}]
    bench._add_ratios(results, 1e9, dict(FIXTURE_FLOORS, matmul_flops_per_s=None))
    assert results[0]["mfu"] is None and results[0]["speedup_vs_eager"] == 1.0
    bench._add_ratios(results, 1e9, FIXTURE_FLOORS)
    assert results[0]["mfu"] == pytest.approx(2560e9 / 1e14)


def test_writer_lists_notes_and_corrections_added_after_the_run(tmp_path):
    step = _fixture_step()
    step["notes"] = ["fastmae (triton kernels): host-bound on this machine"]
    step["corrections"] = ["env.commit: set to fixture00000"]
    md = writer.render(writer.load([_write(tmp_path, "step.json", step)]))
    assert ("Notes added to the result files after the run (no measured value changed):\n\n"
            "- ViT-B/16: fastmae (triton kernels): host-bound on this machine") in md
    assert ("Corrections made to the raw result files after the run (the files say so too):\n\n"
            "- ViT-B/16: env.commit: set to fixture00000") in md
    assert "Notes added" not in writer.render(writer.load([_write(tmp_path, "plain.json",
                                                                  _fixture_step())]))


def test_writer_on_fixture(tmp_path):
    files = [_write(tmp_path, "step.json", _fixture_step()), _write(tmp_path, "ops.json", _fixture_ops())]
    chart = tmp_path / "benches" / "images_per_s.png"
    md = writer.render(writer.load(files), str(chart), str(tmp_path))
    # header: card, driver, torch, triton, commit, date
    for text in ("## FIXTURE-GPU-A", "0.0-fixture", "0.0+fixture", "fixture00000", "2000-01-01"):
        assert text in md
    assert "bash benches/gpu_suite.sh" in md
    assert "fastmae bench --model vit_b16 --compile --json fixture.json" in md
    # model table: ms/step, the median step, images/s, MFU, peak, speed-ups over eager and
    # over torch.compile
    assert re.search(r"\| ViT-B/16, 256, bf16 \| fastmae \(triton kernels\) \| 55\.5 \| 55\.0 \| "
                     r"4613 \| 30% \| 12\.5 \| 2\.00x \| 1\.60x \|", md)
    assert "parity passed" in md
    assert "- ViT-B/16, mlp fc1 M=12800 N=3072 K=768 bfloat16: fused (fused 0.100 ms, split 0.200 ms)" in md
    assert ("- ViT-B/16, attention fwd N=197 d=32 bfloat16: BLOCK_M=64 BLOCK_N=64, warps=4, "
            "stages=2") in md
    # profile: the fastmae step's kernel time by category and by kernel
    assert "#### ViT-B/16, batch 256, fastmae (triton kernels)" in md
    assert "GPU busy 34.3 ms per step of a 55.5 ms step" in md
    # 34.3 of 55.5 ms busy (62%): flagged under the table as host-bound
    assert ("- ViT-B/16, fastmae (triton kernels): GPU busy 34.3 ms per step of a 55.5 ms step "
            "(62%)") in md
    assert re.search(r"\| `_attn_fwd` \| fastmae kernels \| 4\.32 \| 13% \| 1 \|", md)
    assert "Every fastmae kernel:" in md and re.search(r"\| `_attn_fwd` \| 4\.32 \| 13% \| 1 \|", md)
    assert "Every fastmae kernel by launch shape" in md and re.search(
        r"\| `_attn_fwd` \| grid 4096 x 4 x 1, block 128 \| 4\.32 \| 13% \| 1 \|", md)
    # op table: time, speed-up, GB/s, fraction of floor
    assert re.search(r"\| bias_gelu_enc \| fwd \| M=12800 D=3072 \| bf16 \(amp bf16\) \| 12\.3 \| 49\.2 \| "
                     r"4\.00x \| 813 GB/s \| 10\.0 \| 81% \| 20% \|", md)
    if importlib.util.find_spec("matplotlib"):
        assert chart.exists() and chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "](benches/images_per_s.png)" in md
    summary = writer.summary(writer.load(files))
    assert "FIXTURE-GPU-A" in summary and "2.00x vs eager" in summary


def _graphed_fixture(ref_graph_ms=50.0, graph_ms=40.0, graph_check_passed=True):
    """FIXTURE: _fixture_step with both graphed systems, each with its graph check, and a parity
    step that ran after the timing, at the timed batch."""
    step = _fixture_step()

    def row(system, label, ms, passed):
        return {"system": system, "label": label, "ms_per_step": ms,
                "images_per_s": 256 / (ms / 1e3), "peak_mem_gib": 12.0, "first_step_s": 1.0,
                "mfu": 0.4, "graph_check": {
                    "system": system, "label": label, "batch": 256, "dtype": "bf16", "steps": 3,
                    "losses_eager": [1.0, 0.9, 0.8], "losses_graph": [1.0, 0.9, 0.8],
                    "loss_err": 0.0, "param_worst": "blocks.0.norm1.weight",
                    "param_diff": 0.0 if passed else 2e-3, "param_moved": 2e-3,
                    "param_diff_of_moved": 0.0 if passed else 1.0, "param_limit": 1e-4,
                    "params_failed": [] if passed else ["blocks.0.norm1.weight"],
                    "passed": passed}}
    step["results"] += [row("fastmae_graph", "fastmae + CUDA graph", graph_ms, graph_check_passed),
                        row("reference_graph", "reference + CUDA graph", ref_graph_ms, True)]
    step["parity"].update(batch=256, timed_batch=256, after_timing=True)
    return step


def test_writer_sets_fastmae_graphed_against_the_graphed_reference(tmp_path):
    """A run that timed the reference in a CUDA graph too: its row, a "vs reference + CUDA
    graph" column (fastmae + CUDA graph's speed-up over it), the graph checks and where the
    parity step ran; a run without it keeps its columns."""
    files = [_write(tmp_path, "step.json", _graphed_fixture())]
    md = writer.render(writer.load(files), None, str(tmp_path))
    assert ("| model, batch, dtype | system | ms/step | median ms | images/s | MFU | peak GiB | "
            "vs eager | vs torch.compile | vs reference + CUDA graph |") in md
    # 111.0 / 40.0, 88.8 / 40.0, 50.0 / 40.0
    assert "| ViT-B/16, 256, bf16 | fastmae + CUDA graph | 40.0 | - | 6400 | 40% | 12.0 | " \
           "2.77x | 2.22x | 1.25x |" in md
    assert "| ViT-B/16, 256, bf16 | reference + CUDA graph | 50.0 | - | 5120 | 40% | 12.0 | " \
           "2.22x | 1.78x | 1.00x |" in md
    assert "against the reference captured and replayed the same way" in md
    assert ("- ViT-B/16, fastmae + CUDA graph: graph check passed: 3 replays against 3 eager "
            "steps from the same weights (batch 256, bf16, fixed mask noise)") in md
    assert "parity passed on one shared step (batch 256, the timed batch, after the timing, " \
           "bf16;" in md
    assert "kept by timing both ways on the first call of each shape:\n" in md
    text = writer.summary(writer.load(files))
    assert re.search(r"fastmae \+ CUDA graph .* 2\.77x vs eager\s+1\.25x vs reference \+ CUDA "
                     r"graph", text)
    assert "fastmae + CUDA graph: graph check passed" in text
    plain = writer.render(writer.load([_write(tmp_path, "plain.json", _fixture_step())]), None,
                          str(tmp_path))
    assert "vs reference + CUDA graph" not in plain and "graph check" not in plain
    assert "(the parity step's batch included):" in plain  # before the timing, at batch 32


def test_writer_marks_the_speedups_of_rows_whose_checks_failed(tmp_path):
    """A failed parity step marks every fastmae row's speed-ups, a failed graph check its row's:
    in the table (not only in a footnote) and in the summary; the reference's rows stay."""
    step = _graphed_fixture(graph_check_passed=False)
    step["parity"]["passed"] = False
    files = [_write(tmp_path, "step.json", step)]
    md = writer.render(writer.load(files), None, str(tmp_path))
    assert "| fastmae (triton kernels) | 55.5 | 55.0 | 4613 | 30% | 12.5 | 2.00x (parity " \
           "FAILED) | 1.60x (parity FAILED) | 0.90x (parity FAILED) |" in md
    assert "| fastmae + CUDA graph | 40.0 | - | 6400 | 40% | 12.0 | 2.77x (parity FAILED, graph " \
           "check FAILED) |" in md
    assert "| reference, eager | 111.0 | 110.5 | 2306 | 30% | 12.5 | 1.00x | 0.80x | 0.45x |" in md
    assert "A speed-up marked FAILED is one whose run's check of that row failed" in md
    assert "- ViT-B/16, fastmae + CUDA graph: graph check FAILED:" in md
    assert "over the limit: blocks.0.norm1.weight." in md
    text = writer.summary(writer.load(files))
    assert "vs reference + CUDA graph  (parity FAILED, graph check FAILED)" in text
    assert re.search(r"reference, eager .* vs reference \+ CUDA graph\n", text)
    # a parity step that raised: failed too
    step = _fixture_step()
    step["parity"] = {"passed": False, "error": "RuntimeError: boom"}
    md = writer.render(writer.load([_write(tmp_path, "err.json", step)]), None, str(tmp_path))
    assert "| 2.00x (parity FAILED) | 1.60x (parity FAILED) |" in md
    assert "- ViT-B/16: parity FAILED: RuntimeError: boom" in md
    assert "A speed-up marked FAILED" not in writer.render(
        writer.load([_write(tmp_path, "ok.json", _fixture_step())]), None, str(tmp_path))


def test_writer_headings_follow_what_the_run_recorded(tmp_path):
    """A run before the MLP's third way: "both ways" and "Attention configurations"; one with
    it and the MLP matmuls' picks: "each way" and "Attention and fused MLP matmul
    configurations"."""
    def render(step):
        files = [_write(tmp_path, "step.json", step)]
        return writer.render(writer.load(files), str(tmp_path / "chart.png"), str(tmp_path))

    md = render(_fixture_step())
    assert "kept by timing both ways" in md and "\nAttention configurations Triton's" in md
    step = _fixture_step()
    fastmae_row = step["results"][1]
    fastmae_row["paths_kept"] = {"mlp fc1 M=12800 N=3072 K=768 bfloat16":
                                 "fused_tma (fused 0.150 ms, fused_tma 0.100 ms, split 0.200 ms)"}
    fastmae_row["autotuned"]["mlp fc1 fused_tma M<=16384 N=3072 K=768 16-bit"] = (
        "BLOCK_K=64 BLOCK_M=128 BLOCK_N=256 PROGRAMS_PER_SM=1 SUBTILE=2, warps=8, stages=3")
    md = render(step)
    assert "kept by timing each way" in md
    assert "Attention and fused MLP matmul configurations Triton's autotuner picked" in md
    assert "- ViT-B/16, mlp fc1 fused_tma M<=16384 N=3072 K=768 16-bit: BLOCK_K=64" in md


def test_header_names_the_mlps_tma_kernels_where_the_run_recorded_them(tmp_path):
    """A run that recorded which MLP TMA kernels it offered gets a header row saying so; one
    from before (no "mlp_tma") gets none."""
    def render(step):
        files = [_write(tmp_path, "step.json", step)]
        return writer.render(writer.load(files), str(tmp_path / "chart.png"), str(tmp_path))

    assert "MLP's TMA kernels" not in render(_fixture_step())
    step = _fixture_step()
    step["env"]["mlp_tma"] = "flattened (FASTMAE_WARP_SPECIALIZE=0)"
    assert "| MLP's TMA kernels | flattened (FASTMAE_WARP_SPECIALIZE=0) |" in render(step)
    assert "head tilings" not in render(step)
    step["env"]["attn_head_tiles"] = "off (FASTMAE_ATTN_HEAD_TILES=0)"
    assert "| attention's head tilings | off (FASTMAE_ATTN_HEAD_TILES=0) |" in render(step)


@pytest.mark.parametrize("on,expected", [(True, "on"), (False, "off (FASTMAE_ATTN_HEAD_TILES=0)")])
def test_env_says_whether_the_run_offered_attentions_head_tilings(on, expected, monkeypatch):
    from fastmae.kernels import attention
    monkeypatch.setattr(attention, "_HEAD_TILES", on)
    assert bench._attn_head_tiles() == expected


@pytest.mark.parametrize("tma_on,applies,ws_on,version,expected", [
    (False, True, True, "3.6.0", "off (FASTMAE_TMA=0)"),
    (True, False, True, "3.6.0", "off (before sm_90)"),
    (True, True, True, "3.6.0", "flattened and warp-specialized"),
    (True, True, False, "3.6.0", "flattened (FASTMAE_WARP_SPECIALIZE=0)"),
    (True, True, True, "3.9.0", "flattened (not warp-specialized under Triton 3.9.0)")])
def test_env_says_which_mlp_tma_kernels_the_run_offered(tma_on, applies, ws_on, version,
                                                        expected, monkeypatch):
    import triton
    from fastmae.kernels import gelu_matmul
    monkeypatch.setattr(gelu_matmul, "_TMA_ON", tma_on)
    monkeypatch.setattr(gelu_matmul, "_WARP_SPECIALIZE_ON", ws_on)
    monkeypatch.setattr(gelu_matmul, "tma_applies", lambda device, dtype: applies)
    monkeypatch.setattr(triton, "__version__", version)
    monkeypatch.setattr(bench, "triton_version", lambda: version)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert bench._mlp_tma() == expected


def test_writer_sets_fastmae_kernels_against_their_floors(tmp_path):
    """A profile whose fastmae launches carry their work: both fastmae tables get its bytes,
    bandwidth, FLOPs, floor and fraction of floor, and the note saying what they are; one
    without (earlier results, as the committed one) keeps its columns."""
    data = _fixture_step()
    # FIXTURE: made-up durations (us) and work for one profiled step
    data["results"][1]["profile"] = bench.kernel_breakdown(
        [("_layer_norm_bwd", 200.0, "grid 396 x 1 x 1, block 128", (4.0e8, 0)),
         ("_attn_fwd", 100.0, "grid 4096 x 4 x 1, block 128", (1.0e7, 5.0e9)),
         ("_bias_gelu_fwd", 50.0, "grid 10 x 1 x 1, block 128"), ("nvjet_tst_fixture", 300.0, None)],
        1, {"_layer_norm_bwd", "_attn_fwd", "_bias_gelu_fwd"}, step_ms=55.5, floors=FIXTURE_FLOORS)
    md = writer.render(writer.load([_write(tmp_path, "step.json", data)]), None, str(tmp_path))
    assert "| kernel | ms/step | share | launches | GB/step | GB/s | GFLOP/step | floor ms | of floor |" in md
    # 0.4 GB in 0.2 ms at 1e12 B/s: a 0.4 ms floor, 200%; 5 GFLOP at 1e14 FLOP/s: 0.05 ms, 50%
    assert re.search(r"\| `_layer_norm_bwd` \| 0\.20 \| 31% \| 1 \| 0\.400 \| 2000 \| - \| "
                     r"0\.400 \(memory\) \| 200% \|", md)
    assert re.search(r"\| `_attn_fwd` \| grid 4096 x 4 x 1, block 128 \| 0\.10 \| 15% \| 1 \| "
                     r"0\.010 \| 100 \| 5\.0 \| 0\.050 \(matmul\) \| 50% \|", md)
    assert re.search(r"\| `_bias_gelu_fwd` \| 0\.05 \| 8% \| 1 \| - \| - \| - \| - \| - \|", md)
    assert writer.WORK_NOTE in md
    # the run's summary: a headline only where every fastmae kernel has its floor
    assert "floor" not in writer.summary(writer.load([_write(tmp_path, "step.json", data)]))
    del data["results"][1]["profile"]["fastmae_kernels"][-1]  # _bias_gelu_fwd, without its work
    text = writer.summary(writer.load([_write(tmp_path, "step.json", data)]))
    assert ("fastmae kernels 0.30 ms a step, their floor 0.45 ms (150%); most time above it: "
            "_attn_fwd 0.05 ms (50%), _layer_norm_bwd -0.20 ms (200%)") in text
    plain = writer.render(writer.load([_write(tmp_path, "plain.json", _fixture_step())]), None,
                          str(tmp_path))
    assert "GB/step" not in plain and writer.WORK_NOTE not in plain


def test_writer_keeps_cards_apart(tmp_path):
    files = [_write(tmp_path, "a.json", _fixture_step("FIXTURE-GPU-A", (111.0, 55.5, 88.8))),
             _write(tmp_path, "b.json", _fixture_step("FIXTURE-GPU-B", (222.0, 77.7, 99.9)))]
    md = writer.render(writer.load(files), str(tmp_path / "chart.png"), str(tmp_path))
    a, b = md.split("## FIXTURE-GPU-A")[1].split("## FIXTURE-GPU-B")
    assert "55.5" in a and "77.7" not in a and "222.0" not in a
    assert "77.7" in b and "55.5" not in b and "111.0" not in b
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "chart-fixture_gpu_a.png").exists()
        assert (tmp_path / "chart-fixture_gpu_b.png").exists()


def _fixture_run(card, commit, date, ms, kernels, full_list=True):
    """FIXTURE: a made-up step result of one run (commit, date), its fastmae step profiled with
    ``kernels`` = {name: us}; full_list=False drops the every-fastmae-kernel list, as results
    before b0325d1 lack it (their top kernels only)."""
    data = _fixture_step(card, ms)
    data["env"] = dict(data["env"], commit=commit, date=date)
    profile = bench.kernel_breakdown([(k, us, None) for k, us in kernels.items()]
                                     + [("nvjet_tst_fixture", 30000.0, None)], 1, set(kernels),
                                     step_ms=ms[1])
    if not full_list:
        profile.pop("fastmae_kernels")
        profile["top_kernels"] = profile["top_kernels"][:2]  # nvjet, then the longest fastmae one
    data["results"][1]["profile"] = profile
    return data


def test_comparison_sets_a_run_against_the_latest_earlier_one_of_its_card(tmp_path, capsys):
    older = _fixture_run("FIXTURE-GPU-A", "fixture00000", "2000-01-01 00:00 UTC", (111.0, 80.0, 88.8),
                         {"_attn_fwd": 9000.0, "_layer_norm_bwd": 4000.0})
    earlier = _fixture_run("FIXTURE-GPU-A", "fixture11111", "2000-01-02 00:00 UTC",
                           (111.0, 60.0, 88.8), {"_attn_fwd": 6000.0, "_layer_norm_bwd": 2000.0})
    other_card = _fixture_run("FIXTURE-GPU-B", "fixture22222", "2000-01-02 00:00 UTC",
                              (1.0, 1.0, 1.0), {"_attn_fwd": 1.0})
    now = _fixture_run("FIXTURE-GPU-A", "fixture33333", "2000-01-03 00:00 UTC", (111.0, 50.0, 88.8),
                       {"_attn_fwd": 5000.0, "_layer_norm_bwd": 1500.0, "_scale_kernel": 250.0})
    files = [_write(tmp_path, n, d) for n, d in (("earlier.json", earlier), ("older.json", older),
                                                 ("b.json", other_card))]
    text = writer.comparison(writer.load(files), writer.load([_write(tmp_path, "now.json", now)]))
    assert "FIXTURE-GPU-A: this run against the latest earlier one" in text
    assert "ViT-B/16 (earlier: fixture11111, 2000-01-02 00:00 UTC)" in text
    assert re.search(r"fastmae \(triton kernels\)\s+60\.0 ->\s+50\.0  \(1\.20x\)", text)
    assert re.search(r"_attn_fwd\s+6\.00 ->\s+5\.00 ms", text)
    assert re.search(r"_layer_norm_bwd\s+2\.00 ->\s+1\.50 ms", text)
    assert re.search(r"_scale_kernel\s+- ->\s+0\.25 ms", text)  # new since: "-", not "?"
    assert "80.0" not in text and "FIXTURE-GPU-B" not in text and "1.00 ->" not in text

    # an earlier run that kept its top kernels only: what it did not list is unknown, not absent
    earlier_top = _fixture_run("FIXTURE-GPU-A", "fixture11111", "2000-01-02 00:00 UTC",
                               (111.0, 60.0, 88.8), {"_attn_fwd": 6000.0, "_layer_norm_bwd": 2000.0},
                               full_list=False)
    text = writer.comparison(writer.load([_write(tmp_path, "top.json", earlier_top)]),
                             writer.load([_write(tmp_path, "now.json", now)]))
    assert re.search(r"_attn_fwd\s+6\.00 ->\s+5\.00 ms", text)
    assert re.search(r"_layer_norm_bwd\s+\? ->\s+1\.50 ms", text)
    assert "not among the earlier run's top kernels" in text

    # no earlier run of the card, or only this very run: nothing compared
    for earlier_files in ([_write(tmp_path, "b.json", other_card)], [_write(tmp_path, "now.json", now)]):
        text = writer.comparison(writer.load(earlier_files),
                                 writer.load([_write(tmp_path, "now.json", now)]))
        assert text == "FIXTURE-GPU-A: no earlier run of this card to compare with"

    # the command: the comparison, then the short table last; never into BENCHMARKS.md
    now_file, earlier_file = _write(tmp_path, "now.json", now), _write(tmp_path, "e.json", earlier)
    assert writer.main([now_file, "--summary", "--against", earlier_file]) == 0
    out = capsys.readouterr().out
    assert out.index("this run against") < out.index("vs eager")
    assert out.rstrip().endswith("parity passed")
    with pytest.raises(SystemExit) as exit_info:
        writer.main([now_file, "--against", earlier_file])
    assert exit_info.value.code == 2 and "--against goes with --summary" in capsys.readouterr().err


def test_writer_uses_the_newest_of_several_runs_of_a_card_and_model(tmp_path):
    """Files of two runs of one card, in either order, the same file name in two folders: the
    tables show the newer run's numbers only and name the earlier file as left out."""
    (tmp_path / "run1").mkdir()
    (tmp_path / "run2").mkdir()
    old = _write(tmp_path / "run1", "step.json", _fixture_run(
        "FIXTURE-GPU-A", "fixture00000", "2000-01-01 00:00 UTC", (111.0, 77.7, 88.8),
        {"_attn_fwd": 1.0}))
    new = _write(tmp_path / "run2", "step.json", _fixture_run(
        "FIXTURE-GPU-A", "fixture11111", "2000-01-02 00:00 UTC", (111.0, 55.5, 88.8),
        {"_attn_fwd": 1.0}))
    other_card = _write(tmp_path / "run1", "b.json", _fixture_step("FIXTURE-GPU-B"))
    old_ops = _fixture_ops()
    new_ops = _fixture_ops()
    for data, commit, date, ms in ((old_ops, "fixture00000", "2000-01-01 00:00 UTC", 0.0999),
                                   (new_ops, "fixture11111", "2000-01-02 00:00 UTC", 0.0123)):
        for b in data["benchmarks"]:
            b["extra_info"]["env"] = dict(FIXTURE_ENV, commit=commit, date=date)
        data["benchmarks"][0]["extra_info"]["gpu_ms"] = ms
    ops_files = [_write(tmp_path / "run1", "ops.json", old_ops),
                 _write(tmp_path / "run2", "ops.json", new_ops)]
    for files in ([old, new, other_card] + ops_files, [new, other_card, old] + ops_files[::-1]):
        res = writer.load(files)
        md = writer.render(res, None, str(tmp_path))
        section = md.split("## FIXTURE-GPU-A")[1].split("## FIXTURE-GPU-B")[0]
        assert "| 55.5 |" in section and "77.7" not in section
        assert "fixture11111" in section and "fixture00000" not in section
        assert "| 12.3 |" in section and "99.9" not in section
        assert sorted(res.ignored) == [
            ("ops.json", "an earlier run of the same card and model than run2/ops.json"),
            ("step.json", "an earlier run of the same card and model than run2/step.json")]
        assert "## FIXTURE-GPU-B" in md  # another card's run is not an earlier run of this one


def test_writer_without_gpu_results_writes_no_numbers():
    md = writer.render(writer.load([]))
    assert "No GPU measurement has been made yet" in md
    assert "bash benches/gpu_suite.sh" in md
    assert not re.search(r"\d+(\.\d+)? ?(ms|images/s|img/s|GB/s|TFLOP/s|GiB)", md)


def _measured_date(path):
    """The date a result file records its measurement at ("" if none)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    envs = [data.get("env")] + [(b.get("extra_info") or {}).get("env")
                                for b in data.get("benchmarks") or []]
    return max((env.get("date") or "" for env in envs if env), default="")


def newest_run(results):
    """The folder of ``results`` (benches/results: a folder a GPU run) whose files record the
    latest measurement, or None. BENCHMARKS.md shows that one run; the earlier folders stay for
    `write_benchmarks.py --summary --against`."""
    folders = [d for d in Path(results).iterdir() if d.is_dir() and any(d.glob("*.json"))]
    return max(folders, key=lambda d: max(_measured_date(p) for p in d.glob("*.json")),
               default=None)


def test_newest_run_is_the_folder_with_the_latest_measurement(tmp_path):
    for folder, commit, date in (("z-first", "fixture00000", "2000-01-01 00:00 UTC"),
                                 ("a-second", "fixture11111", "2000-01-02 00:00 UTC")):
        (tmp_path / folder).mkdir()
        _write(tmp_path / folder, "step.json", _fixture_run(
            "FIXTURE-GPU-A", commit, date, (111.0, 55.5, 88.8), {"_attn_fwd": 1.0}))
    ops = _fixture_ops()
    ops["benchmarks"][0]["extra_info"]["env"] = dict(FIXTURE_ENV, date="2000-01-03 00:00 UTC")
    assert newest_run(tmp_path).name == "a-second"
    (tmp_path / "m-ops-only").mkdir()
    _write(tmp_path / "m-ops-only", "ops.json", ops)
    assert newest_run(tmp_path).name == "m-ops-only"
    (tmp_path / "empty").mkdir()
    assert newest_run(tmp_path / "empty") is None


def test_committed_benchmarks_md_is_rendered_from_the_committed_results(monkeypatch):
    """A measured BENCHMARKS.md is exactly what the writer makes of the result files of the
    newest run kept in benches/results (no number edited by hand, no two runs mixed)."""
    text = (REPO / "BENCHMARKS.md").read_text(encoding="utf-8")
    if "No GPU measurement has been made yet" in text:
        pytest.skip("no measurement committed")
    run = newest_run(REPO / "benches" / "results")
    assert run, "BENCHMARKS.md holds numbers but benches/results holds no result file"
    files = sorted(str(p) for p in run.glob("*.json"))
    command = text.split("```bash\n", 1)[1].split("\n", 1)[0]
    monkeypatch.setattr(writer, "write_chart", lambda card, res, path: True)  # the PNG is committed
    rendered = writer.render(writer.load(files), str(REPO / "benches" / "images_per_s.png"),
                             str(REPO), command)
    assert rendered == text


def test_committed_benchmarks_md_is_the_writers():
    """BENCHMARKS.md is either the writer's no-measurement page or a page it wrote from a run."""
    text = (REPO / "BENCHMARKS.md").read_text(encoding="utf-8")
    if "No GPU measurement has been made yet" in text:
        assert text == writer.render(writer.load([]))
    else:
        assert "Written by `benches/write_benchmarks.py`" in text
        for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
            assert (REPO / link).exists(), f"BENCHMARKS.md shows {link}, which is not in the repo"


def test_autotuned_names_each_attention_kernels_pick(monkeypatch):
    """The attention configurations the autotuner picked, one line per kernel and shape (its
    cache key: N, d, (B * H).bit_length(), fused_q's HAS_SUMS, then every tensor argument's
    dtype; a fused_q search without the column sums says so)."""
    import triton
    from fastmae.kernels import attention
    picks = {"_attn_fwd_tuned": {(197, 32, 13, "torch.bfloat16", "torch.bfloat16"): triton.Config(
                 {"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2)},
             "_attn_bwd_fused_tuned": {(50, 64, 9, "torch.float16"): triton.Config(
                 {"BLOCK_M": 32}, num_warps=8, num_stages=1)},
             "_attn_bwd_fused_q_tuned": {
                 (197, 32, 13, True, "torch.bfloat16"): triton.Config(
                     {"BLOCK_N": 64}, num_warps=16, num_stages=2),
                 (197, 32, 13, False, "torch.bfloat16"): triton.Config(
                     {"BLOCK_N": 64}, num_warps=8, num_stages=2)},
             "_attn_bwd_dq_tuned": {},
             "_attn_bwd_dkdv_tuned": {(197, 32, 13, "torch.bfloat16"): triton.Config(
                 {"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3, maxnreg=128)}}
    for name, cache in picks.items():
        monkeypatch.setattr(getattr(attention, name), "cache", cache)
    from fastmae.kernels import _common, gelu_matmul
    for name in ("_matmul_bias_gelu_tuned", "_matmul_gelu_bwd_tuned", "_matmul_bias_gelu_tma_tuned",
                 "_matmul_gelu_bwd_tma_tuned"):
        monkeypatch.setattr(getattr(gelu_matmul, name), "cache", {})  # no MLP picks here
    fwd = attention._attn_fwd_tuned
    (key, best), = picks["_attn_fwd_tuned"].items()
    slower = triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=2)
    monkeypatch.setattr(_common, "TUNE_TIMINGS", {id(fwd): {key: {slower: 0.25, best: 0.2}}})
    assert bench.autotuned() == {
        "attention fwd N=197 d=32 B*H=4096..8191 bfloat16":
            "BLOCK_M=64 BLOCK_N=64, warps=4, stages=2 (0.200 ms, fastest of 2; next 0.250 ms)",
        "attention bwd fused N=50 d=64 B*H=256..511 float16": "BLOCK_M=32, warps=8, stages=1",
        "attention bwd fused_q N=197 d=32 B*H=4096..8191 bfloat16": "BLOCK_N=64, warps=16, stages=2",
        "attention bwd fused_q N=197 d=32 B*H=4096..8191 bfloat16 without column sums":
            "BLOCK_N=64, warps=8, stages=2",
        "attention bwd dkdv N=197 d=32 B*H=4096..8191 bfloat16":
            "BLOCK_M=64 BLOCK_N=64, warps=4, stages=3, maxnreg=128",  # a capped configuration
    }


def test_autotuned_names_each_mlp_matmuls_pick(monkeypatch):
    """The fused MLP matmuls' picks too: the threads' kernels keyed by (next_pow2(M), N, K, the
    tensor dtypes), the TMA kernels by (next_pow2(M), N, K, A's element bytes, ...)."""
    import triton
    from fastmae.kernels import _common, attention, gelu_matmul
    for name in ("_attn_fwd_tuned", "_attn_bwd_fused_tuned", "_attn_bwd_fused_q_tuned",
                 "_attn_bwd_dq_tuned", "_attn_bwd_dkdv_tuned", "_matmul_gelu_bwd_tuned",
                 "_matmul_gelu_bwd_tma_tuned"):
        module = attention if name.startswith("_attn") else gelu_matmul
        monkeypatch.setattr(getattr(module, name), "cache", {})
    persistent = triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64,
                                "PROGRAMS_PER_SM": 2, "FLATTEN": True}, num_warps=4, num_stages=4)
    tma = triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "PROGRAMS_PER_SM": 1,
                         "SUBTILE": 2}, num_warps=8, num_stages=3)
    key = (65536, 2048, 512, "torch.bfloat16", "torch.bfloat16", "torch.float32")
    tma_key = (65536, 2048, 512, 2, "torch.float32")
    monkeypatch.setattr(gelu_matmul._matmul_bias_gelu_tuned, "cache", {key: persistent})
    monkeypatch.setattr(gelu_matmul._matmul_bias_gelu_tma_tuned, "cache", {tma_key: tma})
    monkeypatch.setattr(_common, "TUNE_TIMINGS",
                        {id(gelu_matmul._matmul_bias_gelu_tma_tuned): {tma_key: {tma: 0.2}}})
    assert bench.autotuned() == {
        "mlp fc1 fused M<=65536 N=2048 K=512 bfloat16":
            "BLOCK_K=64 BLOCK_M=128 BLOCK_N=64 FLATTEN=True PROGRAMS_PER_SM=2, warps=4, stages=4",
        "mlp fc1 fused_tma M<=65536 N=2048 K=512 16-bit":
            "BLOCK_K=64 BLOCK_M=128 BLOCK_N=256 PROGRAMS_PER_SM=1 SUBTILE=2, warps=8, stages=3 "
            "(0.200 ms, fastest of 1)"}
    assert bench.autotune_timings() == {"mlp fc1 fused_tma M<=65536 N=2048 K=512 16-bit": {
        "BLOCK_K=64 BLOCK_M=128 BLOCK_N=256 PROGRAMS_PER_SM=1 SUBTILE=2, warps=8, stages=3": 0.2}}


def test_paths_kept_names_each_timed_choice(monkeypatch):
    """What the GPU run reports of the paths fastmae chose by timing: one line per shape."""
    from fastmae import ops
    from fastmae.kernels import attention
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(ops, "_MLP_CHOICE", {("fc1", 12800, 3072, 768, torch.bfloat16, True, cuda): "fused",
                                             ("fc2_dgrad", 50432, 2048, 512, torch.bfloat16, True, cuda): "split"})
    monkeypatch.setattr(attention, "_BWD_CHOICE", {(4096, 197, 32, torch.bfloat16, cuda): "split"})
    monkeypatch.setattr(ops, "_PATCH_WGRAD_CHOICE",
                        {("patch_embed wgrad", 12544, 768, 768, torch.bfloat16, cuda): "split"})
    from fastmae.kernels import _common
    monkeypatch.setattr(_common, "TIMINGS", {
        ("FASTMAE_MLP", ("fc1", 12800, 3072, 768, torch.bfloat16, True, cuda)): {"fused": 0.1234, "split": 0.2},
        ("FASTMAE_ATTN_BWD", (4096, 197, 32, torch.bfloat16, cuda)): {"fused": None, "split": 1.5}})
    assert bench.paths_kept() == {
        "mlp fc1 M=12800 N=3072 K=768 bfloat16": "fused (fused 0.123 ms, split 0.200 ms)",
        "mlp fc2_dgrad M=50432 N=2048 K=512 bfloat16": "split",
        "attention bwd B*H=4096 N=197 d=32 bfloat16": "split (fused failed, split 1.500 ms)",
        "patch embedding weight grad M=12544 D=768 K=768 bfloat16": "split",
    }


def test_host_bound_rows_are_those_whose_gpu_idled_a_tenth_of_the_step():
    def rec(busy, step):
        return {"profile": {"gpu_busy_ms_per_step": busy, "step_ms": step}}
    by_model = {"vit_b16": {"fastmae": rec(38.1, 67.9), "reference": rec(70.5, 72.5),
                            "fastmae_graph": {"profile": None}}}
    assert writer._host_bound_lines(by_model) == [
        "- ViT-B/16, fastmae (triton kernels): GPU busy 38.1 ms per step of a 67.9 ms step (56%)"]
    # a graphed step has no host in it: a GPU idle between its kernels is not host-bound
    by_model["vit_b16"]["fastmae_graph"] = rec(30.0, 40.3)
    assert len(writer._host_bound_lines(by_model)) == 1


def test_a_failed_profile_is_said_where_its_breakdown_would_be():
    res = writer.Results()
    res.steps["NVIDIA H200"] = [{
        "config": {"model": "vit_b16", "batch": 256},
        "results": [{"system": "fastmae_graph", "profile": None,
                     "profile_error": "RuntimeError: no kernels in the trace"}]}]
    text = writer.profile_section("NVIDIA H200", res)
    assert "#### ViT-B/16, batch 256, fastmae + CUDA graph" in text
    assert "The profiler's breakdown failed: RuntimeError: no kernels in the trace" in text


def test_a_profile_that_saw_no_kernel_is_an_error_not_an_idle_gpu(monkeypatch):
    """(A CUDA-graph step whose replays the profiler did not see would otherwise read as a GPU
    busy 0 ms a step.)"""
    class Blind(contextlib.nullcontext):
        def __enter__(self):
            return self

        def events(self):
            return []

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.profiler, "profile", lambda **kw: Blind())
    monkeypatch.setattr(bench, "_trace_kernels", lambda prof: [])
    with pytest.raises(RuntimeError, match="no GPU kernel in 2 steps"):
        bench.profile_train_step(lambda: None, steps=2)


def test_a_result_file_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """fastmae bench saves its JSON after each system: a save stopped part-way (a killed run)
    leaves the previous save, not half a file."""
    path = tmp_path / "step.json"
    bench._write_json(path, {"results": [1]})

    def dies_midway(data, f, **kw):
        f.write('{"results": [1, 2')
        raise KeyboardInterrupt
    monkeypatch.setattr(bench.json, "dump", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        bench._write_json(path, {"results": [1, 2]})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"results": [1]}


GRAPHED = ["--systems", "reference,fastmae,fastmae_graph,reference_graph"]


# ----------------------------------------------------------------------------- the command

@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_gpu_run_json_is_a_measurement_with_its_flops_floors_and_mfu(monkeypatch, tmp_path,
                                                                     capsys, dtype):
    """A GPU run's JSON (systems, parity and graph checks faked: FIXTURE numbers) is one the
    writer takes as its card's measurement, and records the floors measured, the training FLOPs
    per image as counted for the baselines (3 x forward), and each row's MFU = those FLOPs x
    images/s / the bf16 matmul rate: for a 16-bit run only, none for fp32."""
    rc, _, data = _fake_gpu_run(monkeypatch, tmp_path, GRAPHED + ["--dtype", dtype])
    capsys.readouterr()
    assert rc == 0
    assert data["tiny_cpu"] is False and data["floors"] == FIXTURE_FLOORS
    flops = bench.training_flops_per_image(bench.build_model("tiny", "meta"))
    assert data["flops"] == {"forward_per_image": flops // 3, "training_per_image": flops}
    for r in data["results"]:
        assert r["images_per_s"] == 6400.0  # FIXTURE: batch 64 in 10 ms
        assert r["achieved_flops_per_s"] == pytest.approx(flops * 6400.0)
        assert r["mfu"] == (pytest.approx(flops * 6400.0 / FIXTURE_FLOORS["matmul_flops_per_s"])
                            if dtype == "bf16" else None)
    res = writer.load([str(tmp_path / "run.json")])
    assert res.cards() == ["FIXTURE-GPU-A"] and res.ignored == []
    assert res.floors["FIXTURE-GPU-A"] == [("run.json", FIXTURE_FLOORS)]


def test_gpu_run_sets_kernels_against_the_matmul_rate_of_16_bit_runs_only(monkeypatch, tmp_path,
                                                                           capsys):
    """The floors each system's profile gets: the copy rate, and the bf16 matmul rate only in a
    bf16 or fp16 run (an fp32 kernel's FLOPs are not bounded by it)."""
    _fake_gpu_run(monkeypatch, tmp_path, ["--systems", "fastmae", "--parity-batch", "0"])
    recorder, got = bench.bench_system, {}  # the fake GPU's system, as _fake_gpu_run set it

    def system(key, model_name, batch, amp_dtype, *args, floors=None, **kw):
        got[amp_dtype] = floors
        return recorder(key, model_name, batch, amp_dtype, *args, **kw)
    monkeypatch.setattr(bench, "bench_system", system)
    for dtype in ("bf16", "fp16", "fp32"):
        assert cli.main(["bench", "--model", "tiny", "--no-progress", "--systems", "fastmae",
                         "--dtype", dtype, "--parity-batch", "0"]) == 0
    capsys.readouterr()
    assert got[torch.bfloat16] == got[torch.float16] == FIXTURE_FLOORS
    assert got[torch.float32] == dict(FIXTURE_FLOORS, matmul_flops_per_s=None)


def test_speedups_are_each_base_systems_time_over_the_rows():
    # FIXTURE: synthetic numbers
    results = [{"system": s, "label": s, "ms_per_step": ms, "images_per_s": 256e3 / ms,
                "first_step_s": 1.0}
               for s, ms in (("reference", 100.0), ("reference_compile", 80.0), ("fastmae", 50.0))]
    bench._add_ratios(results, 1e9, FIXTURE_FLOORS)
    by = {r["system"]: r for r in results}
    assert by["fastmae"]["speedup_vs_eager"] == pytest.approx(2.0)
    assert by["fastmae"]["speedup_vs_compile"] == pytest.approx(1.6)
    assert by["reference"]["speedup_vs_compile"] == pytest.approx(0.8)
    table = bench.format_results(results, True, True)
    assert re.search(r"fastmae\s+50\.0\s+5120\s+\S+\s+n/a\s+\S+\s+2\.00x\s+1\.60x$", table, re.M)
    bench._add_ratios(results[::2], 1e9, FIXTURE_FLOORS)  # no torch.compile timed
    assert by["fastmae"]["speedup_vs_compile"] is None


def test_profiled_step_time_is_the_steps_total_time_over_their_number(monkeypatch):
    """On a "GPU" (the model and images on the CPU; no step runs): the step time a profile is
    set against -- the host-bound flag's denominator -- is the sustained ms/step (20 ms),
    not the median step (10 ms)."""
    real_build, real_generator, real_randn = bench.build_model, torch.Generator, torch.randn
    monkeypatch.setattr(bench, "build_model",
                        lambda name, device, **kw: real_build(name, "cpu", **kw))
    monkeypatch.setattr(torch, "Generator", lambda device=None: real_generator())
    monkeypatch.setattr(torch, "randn", lambda *shape, device=None, **kw: real_randn(*shape, **kw))
    monkeypatch.setattr(bench, "make_train_step",
                        lambda model, imgs, amp, **kw: (None, None, model))
    monkeypatch.setattr(bench, "time_train_step", lambda *a, **kw: {
        "times_ms": [10.0, 10.0, 10.0, 50.0], "first_step_s": 0.0, "peak_mem_gib": 1.0})
    seen = {}
    monkeypatch.setattr(bench, "profile_train_step",
                        lambda step, step_ms=None, floors=None: seen.update(step_ms=step_ms) or {})
    r = bench.bench_system("fastmae", "micro", 2, torch.bfloat16, 4, 1, "cuda", progress=False,
                           profile=True, floors=FIXTURE_FLOORS)
    assert seen == {"step_ms": 20.0}
    assert r["ms_per_step"] == 20.0 and r["ms_median"] == 10.0 and r["images_per_s"] == 100.0


def test_gpu_steps_are_timed_between_consecutive_events(monkeypatch):
    """time_train_step on a "GPU" (CUDA events and memory stats faked on a made-up clock): each
    timed step is the time between its event and the one before, not since the first; the peak
    is reset after the warm-up and read after the timed steps."""
    clock, calls = [0.0], []

    class Event:  # FIXTURE: an event that records the made-up clock
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = clock[0]

        def elapsed_time(self, end):
            return end.t - self.t

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated",
                        lambda: calls.append("peak") or 3 * 2 ** 30)
    durations = iter([100.0, 100.0, 4.0, 5.0, 6.0])  # 2 warm-up steps, then 3 timed (ms)

    def step():
        calls.append("step")
        clock[0] += next(durations)
    t = bench.time_train_step(step, torch.device("cuda"), steps=3, warmup=2)
    assert t["times_ms"] == [4.0, 5.0, 6.0] and t["peak_mem_gib"] == 3.0
    assert bench.sustained_ms(t["times_ms"]) == 5.0
    assert calls == ["step", "step", "reset", "step", "step", "step", "peak"]


# ----------------------------------------------------------------------------- verdicts

def test_graph_check_fails_replays_whose_loss_is_not_the_eager_steps(monkeypatch):
    """A graph whose parameters train as the eager steps but one of whose replays returns a wrong
    loss (FIXTURE bug: the second replay's loss read doubled) fails the check on its losses
    alone: every replay's loss must match, not one."""
    _fake_graph(monkeypatch)
    real = bench.make_train_step

    def make(model, imgs, amp_dtype, cuda_graph=False, **kw):
        step, opt, fwd = real(model, imgs, amp_dtype, cuda_graph=cuda_graph, **kw)
        if not cuda_graph:
            return step, opt, fwd
        n = [0]

        def replay():
            n[0] += 1
            loss = step()
            return loss * 2 if n[0] == 2 else loss
        return replay, opt, fwd
    monkeypatch.setattr(bench, "make_train_step", make)
    c = bench.graph_check("reference_graph", "micro", 2, torch.float32, "cpu")
    assert c["params_failed"] == [] and c["param_diff"] == 0  # the parameters are right
    assert c["loss_err"] == pytest.approx(1.0) and not c["passed"]
    assert bench.graph_check_line(c).startswith("graph check [FAIL]")
    assert bench.run_failed([{"system": "reference_graph", "graph_check": c}], None)


def test_graph_check_fails_a_graph_that_moves_the_parameters_a_fifth_short(monkeypatch):
    """A graph whose replays train, but with the update a fifth short of the eager steps' (FIXTURE
    bug: captured with 0.8 x the learning rate): every trained parameter is off the eager one by
    about 20% of how far the steps moved it, over the 5% the check allows."""
    _fake_graph(monkeypatch)
    fake = bench.make_train_step

    def make(model, imgs, amp_dtype, cuda_graph=False, **kw):
        step, opt, fwd = fake(model, imgs, amp_dtype, cuda_graph=cuda_graph, **kw)
        if cuda_graph:
            for group in opt.param_groups:
                group["lr"] *= 0.8
        return step, opt, fwd
    monkeypatch.setattr(bench, "make_train_step", make)
    c = bench.graph_check("reference_graph", "micro", 2, torch.float32, "cpu")
    assert not c["passed"] and len(c["params_failed"]) > c["n_params"] // 2
    assert c["param_diff_of_moved"] == pytest.approx(0.2, abs=0.05)
    assert c["param_diff"] > c["param_limit"]


def test_run_fails_on_any_failed_system_parity_step_or_graph_check():
    """The exit status: 1 for a system that raised, a parity step that failed (an error, or no
    error and "passed": False) and a graph check that failed (an error, or its limits)."""
    ok = {"system": "fastmae", "ms_per_step": 1.0}
    graph_ok = {"system": "fastmae_graph", "ms_per_step": 1.0, "graph_check": {"passed": True}}
    assert not bench.run_failed([ok, graph_ok], {"passed": True})
    assert not bench.run_failed([ok], None)  # --parity-batch 0
    assert bench.run_failed([ok, {"system": "reference", "error": "RuntimeError: boom"}], None)
    assert bench.run_failed([ok], {"passed": False, "grad_failed": ["blocks.0.norm1.weight"]})
    assert bench.run_failed([ok], {"passed": False, "error": "RuntimeError: boom"})
    assert bench.run_failed([ok, dict(graph_ok, graph_check={
        "passed": False, "params_failed": ["blocks.0.norm1.weight"]})], None)
    assert bench.run_failed([ok, dict(graph_ok, graph_check={"passed": False, "error": "x"})], None)


def test_gpu_run_fails_when_a_graph_check_fails_its_limits(monkeypatch, tmp_path, capsys):
    rc, _, data = _fake_gpu_run(monkeypatch, tmp_path, GRAPHED,
                                graph=lambda key: key != "fastmae_graph")
    assert rc == 1 and "graph check [FAIL] fastmae + CUDA graph" in capsys.readouterr().out
    rows = {r["system"]: r for r in data["results"]}
    assert rows["fastmae_graph"]["graph_check"]["passed"] is False
    assert "error" not in rows["fastmae_graph"]["graph_check"]


# ----------------------------------------------------------------------------- BENCHMARKS.md writer

def test_writer_keeps_a_sustained_runs_rows_as_recorded(tmp_path):
    """A file written since ms/step is the steps' total time over their number (its rows have
    ms_median beside their step times) is not rederived: its median column is the median step,
    not its ms/step again."""
    step = _fixture_step()
    fastmae_row = step["results"][1]  # FIXTURE: a slow step among fast ones
    fastmae_row.update(ms_steps=[55.5, 55.5, 55.5, 166.5], ms_per_step=83.25, ms_mean=83.25,
                       ms_median=55.5, images_per_s=256 / 83.25e-3)
    md = writer.render(writer.load([_write(tmp_path, "step.json", step)]), None, str(tmp_path))
    assert re.search(r"\| fastmae \(triton kernels\) \| 83\.2 \| 55\.5 \| 3075 \| 30% \|", md)


def test_host_bound_threshold_is_nine_tenths_of_the_step():
    def rec(busy, step):
        return {"profile": {"gpu_busy_ms_per_step": busy, "step_ms": step}}
    # FIXTURE: made-up busy and step times
    by_model = {"vit_b16": {"fastmae": rec(89.0, 100.0), "reference": rec(92.0, 100.0),
                            "reference_compile": rec(91.0, 100.0)}}
    assert writer._host_bound_lines(by_model) == [
        "- ViT-B/16, fastmae (triton kernels): GPU busy 89.0 ms per step of a 100.0 ms step (89%)"]


def test_against_ignores_a_copy_of_this_run_among_the_earlier_files(tmp_path, capsys):
    """`--summary --against` given the earlier run and a copy of this very run (as when the
    results folder is passed whole): compared with the earlier run, not "no earlier run"."""
    (tmp_path / "copy").mkdir()
    earlier = _fixture_run("FIXTURE-GPU-A", "fixture11111", "2000-01-02 00:00 UTC",
                           (111.0, 60.0, 88.8), {"_attn_fwd": 6000.0})
    now = _fixture_run("FIXTURE-GPU-A", "fixture33333", "2000-01-03 00:00 UTC",
                       (111.0, 50.0, 88.8), {"_attn_fwd": 5000.0})
    now_file = _write(tmp_path, "now.json", now)
    files = [_write(tmp_path, "earlier.json", earlier), _write(tmp_path / "copy", "now.json", now)]
    assert writer.main([now_file, "--summary", "--against", *files]) == 0
    out = capsys.readouterr().out
    assert "ViT-B/16 (earlier: fixture11111, 2000-01-02 00:00 UTC)" in out
    assert re.search(r"fastmae \(triton kernels\)\s+60\.0 ->\s+50\.0  \(1\.20x\)", out)
    assert "no earlier run" not in out


def test_chart_bars_are_each_systems_images_per_s(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.axes
    bars = {}
    real_barh = matplotlib.axes.Axes.barh

    def barh(ax, y, width, *args, label=None, **kw):
        bars[label] = list(width)
        return real_barh(ax, y, width, *args, label=label, **kw)
    monkeypatch.setattr(matplotlib.axes.Axes, "barh", barh)
    # FIXTURE: made-up step times (ms) of one run: reference, fastmae, torch.compile
    step = _fixture_run("FIXTURE-GPU-A", "fixture00000", "2000-01-01 00:00 UTC",
                        (100.0, 50.0, 80.0), {"_attn_fwd": 1.0})
    res = writer.load([_write(tmp_path, "step.json", step)])
    assert writer.write_chart("FIXTURE-GPU-A", res, str(tmp_path / "chart.png"))
    assert bars == {"fastmae (triton kernels)": [pytest.approx(5120.0)],
                    "reference, eager": [pytest.approx(2560.0)],
                    "reference, torch.compile": [pytest.approx(3200.0)]}
