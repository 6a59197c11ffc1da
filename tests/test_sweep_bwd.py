"""benches/sweep_bwd.py (the backward kernels' launch-configuration sweep) on its CPU smoke
shapes: every configuration runs, its outputs are compared with the default's, and a wrong one
is flagged."""
import contextlib
import io
import re

import pytest
import torch

from _bench_script import load as load_bench_script

sweep_bwd = load_bench_script("sweep_bwd")
pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="the smoke shapes run through the interpreter on CPU")


def test_every_configuration_runs_and_matches_the_default():
    out = io.StringIO()
    results = sweep_bwd.sweep(smoke=True, out=out)
    text = out.getvalue()
    cases = sweep_bwd._cases(256, smoke=True)
    assert set(results) == {label for label, _, _, _ in cases}
    for label, kernel, _, D in cases:
        rows = results[label]
        assert rows[0][0] == sweep_bwd.default_config(kernel, D), "the default comes first"
        for axis in sweep_bwd._axes(kernel, D, smoke=True):
            for change in axis:  # every value of every axis was timed
                assert any(change.items() <= config.items() for config, _, _, _ in rows), change
        for config, us, gbs, err in rows:
            assert us > 0 and gbs > 0
            assert err <= 1e-5, (label, config, err)  # fp32 partial sums in another order
    assert "MISMATCH" not in text and "<- default" in text and "best: " in text


def test_a_wrong_configuration_is_flagged(monkeypatch):
    calls = {"n": 0}
    real = sweep_bwd._call

    def wrong_after_default(kernel, args, low):
        calls["n"] += 1
        out = real(kernel, args, low)
        if calls["n"] > 1:  # the reference call is the first
            out = tuple(t * 1.5 for t in out) if isinstance(out, tuple) else out * 1.5
        return out

    monkeypatch.setattr(sweep_bwd, "_call", wrong_after_default)
    out = io.StringIO()
    sweep_bwd.sweep(smoke=True, out=out)
    assert "MISMATCH" in out.getvalue()


def test_the_search_keeps_the_fastest_matching_configuration(monkeypatch):
    """A made-up case whose timings and errors are set by hand (nothing runs): the search keeps
    the fastest configuration of each axis among those that match the default's outputs,
    starting each axis from the best so far, and prints GB/s and the speed-up fastest first."""
    # FIXTURE: (a, b) -> (us, max rel err); (3, 1) is the fastest but wrong
    timings = {(1, 1): (100.0, 0.0), (2, 1): (50.0, 0.0), (3, 1): (10.0, 0.5),
               (2, 2): (40.0, 0.0), (1, 2): (30.0, 0.0)}
    monkeypatch.setattr(sweep_bwd, "_cases", lambda batch, smoke: [("case", "k", 1, 1)])
    monkeypatch.setattr(sweep_bwd, "_inputs", lambda *a: ({}, 2e6))  # 2e6 bytes moved
    monkeypatch.setattr(sweep_bwd, "_call", lambda kernel, args, low: torch.zeros(1))
    monkeypatch.setattr(sweep_bwd, "default_config", lambda kernel, D: {"a": 1, "b": 1})
    monkeypatch.setattr(sweep_bwd, "_axes", lambda kernel, D, smoke: [
        [{"a": 1}, {"a": 2}, {"a": 3}], [{"b": 1}, {"b": 2}]])
    monkeypatch.setattr(sweep_bwd, "_measure", lambda kernel, config, *a: timings[
        config["a"], config["b"]])
    out = io.StringIO()
    rows = sweep_bwd.sweep(smoke=True, out=out)["case"]
    # timed in order from the default; (1, 2) never: the second axis starts from a=2
    assert [(c["a"], c["b"]) for c, _, _, _ in rows] == [(1, 1), (2, 1), (3, 1), (2, 2)]
    assert [gbs for _, _, gbs, _ in rows] == [20.0, 40.0, 200.0, 50.0]  # 2e6 B / us / 1e3
    printed = re.findall(r"^ +([\d.]+) us +(\d+) GB/s +x *([\d.]+) +err \S+ +(.*)$",
                         out.getvalue(), re.M)
    # fastest first; the speed-up is the default's time over the row's (100 / 40 = 2.50)
    assert printed == [("10.0", "200", "10.00", "a=3, b=1  MISMATCH"),
                       ("40.0", "50", "2.50", "a=2, b=2"), ("50.0", "40", "2.00", "a=2, b=1"),
                       ("100.0", "20", "1.00", "a=1, b=1  <- default")]
    assert out.getvalue().rstrip().endswith("best: a=2, b=2")


def test_a_configuration_is_timed_and_judged_by_its_worst_output(monkeypatch):
    """_measure's error is the largest of its outputs' (one wrong output is enough), each
    relative to the default's largest value; a CPU timing is in microseconds."""
    monkeypatch.setattr(sweep_bwd, "_configured", lambda kernel, config: contextlib.nullcontext())
    # FIXTURE: the first output exact, the second off by 1 where the default's largest is 4
    monkeypatch.setattr(sweep_bwd, "_call", lambda kernel, args, low: (
        torch.tensor([1.0, 2.0]), torch.tensor([4.0, 3.0])))
    clock = iter([2.0, 2.5])  # perf_counter around the timed call: 0.5 s
    monkeypatch.setattr(sweep_bwd.time, "perf_counter", lambda: next(clock))
    expected = [torch.tensor([1.0, 2.0]), torch.tensor([4.0, 2.0])]
    us, err = sweep_bwd._measure("k", {}, {}, expected, torch.float32, "cpu")
    assert err == 0.25 and us == 500000.0  # 1 / 4; 0.5 s in us


def test_the_bytes_each_kernel_must_move():
    """GB/s is set against these: at M=4, D=8 with fp16 (2 bytes) as the low precision."""
    def nbytes(kernel):
        return sweep_bwd._inputs(kernel, 4, 8, "cpu", torch.float16)[1]
    assert nbytes("bias_gelu") == 4 * 8 * 3 * 2  # dy, x read and dx written, fp16
    # dy, dx2 fp16; s, ds, dx fp32
    assert nbytes("layer_norm") == 4 * 8 * (2 * 2 + 3 * 4)
    # fp32 partials: the qkv bias's (M, 3D), a wave of 5 programs' (5, 4D), two (3, 7, D)
    assert nbytes("partial_sums") == 4 * (4 * 24 + 5 * 32 + 2 * 3 * 7 * 8)
