"""fastmae.precompile: a training step's Triton kernels compiled ahead of it, in parallel
processes, into the cache entries the step's own compiles look up.

On a CPU (no GPU needed) ``tests/_precompile_check.py`` runs in a subprocess without the
interpreter: it records a micro model's step, compiles all but one of its kernels for sm_90 in
two worker processes, and replays the step through Triton's own compile, whose listener must
report a cache hit for every kernel but the held-out one. On a GPU the CLI precompiles a tiny
model's step and a fresh process running that step must compile nothing.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmae import bench, precompile

CHECK = Path(__file__).with_name("_precompile_check.py")
TIMEOUT_S = 900


def _env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # empty: everything compiles
    return env


def test_precompiled_kernels_are_what_the_steps_own_compiles_find(tmp_path):
    proc = subprocess.run([sys.executable, str(CHECK), "--workers", "2"], env=_env(tmp_path),
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    reports = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and reports, proc.stderr[-4000:]
    report = json.loads(reports[-1])
    assert report["environment_error"] is None, report["environment_error"]
    assert report["compile_errors"] == []
    # both ways of each path keep_faster times were recorded: the MLP's fused matmul and its
    # split bias + GELU kernel, the patch embedding's weight-gradient kernel and its gather
    assert {"_matmul_bias_gelu", "_bias_gelu_fwd", "_layer_norm_bwd", "_attn_fwd",
            "_patch_embed_bwd_weight", "_gather_patches"} <= set(report["kernels"]), \
        report["kernels"]
    assert report["recorded"] >= 20
    # the replayed step compiled the same set, and the listener spoke for every compile
    assert report["replayed_not_recorded"] == [] and report["recorded_not_replayed"] == []
    assert report["listener_silent"] == []
    # every precompiled kernel was a cache hit; the one held out of the precompile missed
    assert report["missed"] == [report["held_out"]]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_cli_without_a_gpu_says_so():
    proc = subprocess.run([sys.executable, "-m", "fastmae.precompile", "--model", "micro"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "no CUDA GPU" in proc.stderr


@pytest.mark.parametrize("flag", ["--batch", "--workers"])
def test_cli_refuses_a_count_below_one(capsys, flag):
    with pytest.raises(SystemExit) as exit_info:
        precompile.main([flag, "0"])
    assert exit_info.value.code == 2
    assert f"{flag} must be a positive integer, got 0" in capsys.readouterr().err


def test_ways_cover_each_path_unless_forced(monkeypatch):
    names = ("FASTMAE_MLP", "FASTMAE_ATTN_BWD", "FASTMAE_PATCH_WGRAD")
    assert tuple(precompile.WAYS) == names
    for name in names:
        monkeypatch.delenv(name, raising=False)
    ways = precompile._ways()
    both = ("fused", "split")
    mlp = ("fused", "fused_tma", "split")
    attn = ("fused", "fused_q", "split")
    assert sorted(tuple(w[n] for n in names) for w in ways) == [
        (a, b, c) for a in mlp for b in attn for c in both]
    assert sorted(tuple(w[n] for n in names) for w in precompile._ways(tma=False)) == [
        (a, b, c) for a in both for b in attn for c in both]
    monkeypatch.setenv("FASTMAE_MLP", "split")
    assert sorted(tuple(w[n] for n in names) for w in precompile._ways()) == [
        ("split", b, c) for b in attn for c in both]


def test_environment_is_restored(monkeypatch):
    monkeypatch.setenv("FASTMAE_MLP", "fused")
    monkeypatch.delenv("FASTMAE_ATTN_BWD", raising=False)
    with precompile.forced_environment({"FASTMAE_MLP": "split", "FASTMAE_ATTN_BWD": "split"}):
        assert os.environ["FASTMAE_MLP"] == os.environ["FASTMAE_ATTN_BWD"] == "split"
    assert os.environ["FASTMAE_MLP"] == "fused" and "FASTMAE_ATTN_BWD" not in os.environ


class _Done:
    def __init__(self, returncode, stdout="", stderr=""):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def test_bench_reads_the_precompile_summary(monkeypatch, capsys):
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        with open(cmd[cmd.index("--json") + 1], "w", encoding="utf-8") as f:
            json.dump({"kernels": 7, "errors": []}, f)
        return _Done(0, stdout="precompiled 7 of 7 Triton kernels\n")

    monkeypatch.setattr(bench.subprocess, "run", run)
    assert bench.precompile("vit_b16", [256, 32], "bf16") == {"kernels": 7, "errors": []}
    cmd = calls[0]
    assert cmd[:3] == [sys.executable, "-m", "fastmae.precompile"]
    assert cmd[cmd.index("--model") + 1] == "vit_b16" and cmd[cmd.index("--dtype") + 1] == "bf16"
    assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "--batch"] == ["256", "32"]
    assert "precompiled 7 of 7" in capsys.readouterr().out


@pytest.mark.parametrize("outcome", ["exit", "timeout"])
def test_bench_goes_on_when_the_precompile_fails(monkeypatch, capsys, outcome):
    def run(cmd, **kwargs):
        if outcome == "timeout":
            raise subprocess.TimeoutExpired(cmd, kwargs["timeout"])
        return _Done(1, stderr="Traceback ...\nRuntimeError: no luck")

    monkeypatch.setattr(bench.subprocess, "run", run)
    got = bench.precompile("tiny", [64], "bf16")
    why = "no luck" if outcome == "exit" else f"over {bench.PRECOMPILE_TIMEOUT_S} s"
    assert why in got["error"]
    out = capsys.readouterr().out
    assert "precompile failed" in out and why in out


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_precompiled_step_compiles_nothing_on_gpu(tmp_path):
    env = _env(tmp_path)
    summary_path = tmp_path / "precompile.json"
    proc = subprocess.run([sys.executable, "-m", "fastmae.precompile", "--model", "tiny",
                           "--batch", "8", "--workers", "4", "--json", str(summary_path)],
                          env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(summary_path.read_text())
    assert summary["errors"] == [] and summary["kernels"] > 0
    # a fresh process runs the same step for real (kernels launched, autotuners timing each
    # configuration) and counts what its compiles found in the cache
    script = (
        "import torch, json\n"
        "from triton import knobs\n"
        "from fastmae import bench, precompile\n"
        "hits = []\n"
        "knobs.compilation.listener = lambda *, cache_hit, **_: hits.append(cache_hit)\n"
        "model = bench.build_model('tiny', 'cuda')\n"
        "precompile.step_every_way(model, [8], torch.bfloat16)\n"
        "torch.cuda.synchronize()\n"
        "print(json.dumps({'compiles': len(hits), 'misses': hits.count(False)}))\n")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert counts["compiles"] >= summary["kernels"]
    assert counts["misses"] == 0, counts


def _requests(names, target):
    return [precompile.CompileRequest(module, name, {}, {}, {}, {}, target)
            for module, name in names]


def test_compile_errors_are_reported_in_order_from_spawned_workers(monkeypatch):
    """compile_request says why a request did not compile (the step then compiles it itself and
    raises); compile_requests runs them in a pool of spawned processes, at most one a request,
    and gives the results in request order."""
    import concurrent.futures as cf

    from triton.backends.compiler import GPUTarget
    bad = _requests([(f"fastmae.kernels.no_such_module_{i}", "_kernel") for i in range(3)],
                    GPUTarget("cuda", 90, 32))
    seconds, error = precompile.compile_request(bad[0])
    assert seconds >= 0 and error.startswith("ModuleNotFoundError") and "no_such_module_0" in error

    pools = []

    class Pool(cf.ProcessPoolExecutor):
        def __init__(self, max_workers=None, mp_context=None, **kwargs):
            pools.append((max_workers, mp_context.get_start_method()))
            super().__init__(max_workers, mp_context=mp_context, **kwargs)

    monkeypatch.setattr(cf, "ProcessPoolExecutor", Pool)
    results = precompile.compile_requests(bad, workers=2)
    assert pools == [(2, "spawn")]
    assert all(f"no_such_module_{i}" in (err or "") for i, (_, err) in enumerate(results))
    assert len(results) == 3


def test_main_reports_the_kernels_that_did_not_compile(monkeypatch, tmp_path, capsys):
    """The summary (printed, and the JSON fastmae bench reads) names each request whose compile
    failed, and counts only the others as precompiled. Recording and compiling stand in: no GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    from fastmae.testing import StandInDriver
    target = GPUTarget("cuda", 90, 32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(driver, "_active", StandInDriver(target))
    monkeypatch.setattr(bench, "build_model", lambda name, device: object())
    n = int(torch.randint(3, 9, ()))
    failed = int(torch.randint(0, n, ()))
    requests = _requests([("fastmae.kernels.fake", f"_k{i}") for i in range(n)], target)
    recorded = {}

    def record_step(model, batches, amp_dtype, tgt, mask_ratio=0.75):
        recorded.update(batches=batches, dtype=amp_dtype, target=tgt)
        return requests

    def compile_requests(reqs, workers):
        assert reqs == requests and workers == 3
        return [(0.5, "CompilationError: out of resources" if i == failed else None)
                for i in range(len(reqs))]

    monkeypatch.setattr(precompile, "record_step", record_step)
    monkeypatch.setattr(precompile, "compile_requests", compile_requests)
    out = tmp_path / "precompile.json"
    assert precompile.main(["--model", "tiny", "--batch", "8", "--batch", "2", "--workers", "3",
                            "--json", str(out)]) == 0
    assert recorded == {"batches": [8, 2], "dtype": torch.bfloat16, "target": target}
    summary = json.loads(out.read_text())
    assert summary["kernels"] == n and summary["workers"] == 3
    assert summary["errors"] == [f"_k{failed}: CompilationError: out of resources"]
    assert summary["compile_s_summed"] == pytest.approx(0.5 * n)
    text = capsys.readouterr().out
    assert f"precompiled {n - 1} of {n} Triton kernels" in text
    assert f"not compiled: _k{failed}: CompilationError" in text
