"""The launchers' host-side helpers: integer helpers that agree with Triton's own (which cost
~3 us a call), and keep_faster, which times the ways of a computation once per key on a GPU."""

import pytest
import torch
import triton

from fastmae.kernels import _common
from fastmae.kernels._common import cdiv, next_pow2


def test_cdiv_matches_triton():
    for a in (0, 1, 2, 7, 16, 17, 255, 256, 257, 12800, 50432, 2**31 + 3):
        for b in (1, 2, 3, 16, 64, 128, 1000):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)


def test_next_pow2_matches_triton():
    for n in list(range(1, 300)) + [768, 1023, 1024, 1025, 1280, 3072, 2**31 - 1, 2**31]:
        assert next_pow2(n) == triton.next_power_of_2(n), n
    assert next_pow2(0) == 1 and next_pow2(-3) == 1  # the launchers' max(n, 1)


@pytest.fixture
def on_a_gpu(monkeypatch):
    """keep_faster as on a GPU, off the interpreter and outside graph capture, with do_bench
    replaced by a table of made-up times (ms) per run name; returns the list of timed runs."""
    import triton.testing
    times, timed = {"fused": 1.0, "split": 2.0}, []
    monkeypatch.setattr(_common, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)

    def do_bench(fn, warmup, rep):
        timed.append(fn())
        return times[timed[-1]]

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    monkeypatch.delenv("FASTMAE_TEST_PATH", raising=False)
    monkeypatch.setattr(_common, "TIMINGS", {})
    return times, timed


CUDA_KEY = ("shape", 3, torch.device("cuda", 0))  # a device object only: nothing runs on it
RUNS = {"fused": lambda: "fused", "split": lambda: "split"}


def test_keep_faster_times_once_per_key_and_keeps_the_faster(on_a_gpu):
    times, timed = on_a_gpu
    choices = {}
    assert _common.keep_faster(choices, CUDA_KEY, "FASTMAE_TEST_PATH", RUNS, "split") == "fused"
    assert timed == ["fused", "split"] and choices == {CUDA_KEY: "fused"}
    assert _common.TIMINGS[("FASTMAE_TEST_PATH", CUDA_KEY)] == {"fused": 1.0, "split": 2.0}
    times["fused"] = 3.0  # kept: not timed again
    assert _common.keep_faster(choices, CUDA_KEY, "FASTMAE_TEST_PATH", RUNS, "split") == "fused"
    assert len(timed) == 2
    other = ("shape", 4, CUDA_KEY[-1])
    assert _common.keep_faster(choices, other, "FASTMAE_TEST_PATH", RUNS, "fused") == "split"


def test_keep_faster_forced_by_the_environment(on_a_gpu, monkeypatch):
    _, timed = on_a_gpu
    choices = {CUDA_KEY: "fused"}
    monkeypatch.setenv("FASTMAE_TEST_PATH", " Split ")
    assert _common.keep_faster(choices, CUDA_KEY, "FASTMAE_TEST_PATH", RUNS, "fused") == "split"
    monkeypatch.setenv("FASTMAE_TEST_PATH", "fastest")
    with pytest.raises(ValueError, match="FASTMAE_TEST_PATH must be one of"):
        _common.keep_faster(choices, CUDA_KEY, "FASTMAE_TEST_PATH", RUNS, "fused")
    assert timed == []


def test_keep_faster_times_only_the_ways_asked(on_a_gpu, monkeypatch):
    """A way outside ``timed`` is neither timed nor kept, however fast; forced, it runs."""
    times, timed = on_a_gpu
    times["quick"] = 0.5
    runs = dict(RUNS, quick=lambda: "quick")
    choices = {}
    assert _common.keep_faster(choices, CUDA_KEY, "FASTMAE_TEST_PATH", runs, "split",
                               timed=("fused", "split")) == "fused"
    assert timed == ["fused", "split"]
    assert _common.TIMINGS[("FASTMAE_TEST_PATH", CUDA_KEY)] == {"fused": 1.0, "split": 2.0}
    assert _common.keep_faster({}, CUDA_KEY, "FASTMAE_TEST_PATH", runs, "split") == "quick"
    monkeypatch.setenv("FASTMAE_TEST_PATH", "quick")
    assert _common.keep_faster(choices, CUDA_KEY, "FASTMAE_TEST_PATH", runs, "split",
                               timed=("fused", "split")) == "quick"


def test_keep_faster_takes_the_default_without_timing(on_a_gpu, monkeypatch):
    """On a CPU device, and during CUDA-graph capture (nothing may be timed then), nothing is
    timed or kept."""
    _, timed = on_a_gpu
    choices = {}
    cpu_key = ("shape", 3, torch.device("cpu"))
    assert _common.keep_faster(choices, cpu_key, "FASTMAE_TEST_PATH", RUNS, "split") == "split"
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert _common.keep_faster(choices, CUDA_KEY, "FASTMAE_TEST_PATH", RUNS, "split") == "split"
    assert timed == [] and choices == {}


def test_keep_faster_keeps_the_way_that_runs(on_a_gpu):
    """A way that raises while it is timed (say, no configuration of a kernel fits this card) is
    not kept, with a warning; if none runs, its error is raised."""
    _, timed = on_a_gpu

    def broken():
        raise RuntimeError("out of resources")

    choices = {}
    with pytest.warns(UserWarning, match="'fused' way failed"):
        assert _common.keep_faster(choices, CUDA_KEY, "FASTMAE_TEST_PATH",
                                   {"fused": broken, "split": RUNS["split"]}, "fused") == "split"
    assert choices == {CUDA_KEY: "split"}
    with pytest.raises(RuntimeError, match="out of resources"):
        _common.keep_faster({}, CUDA_KEY, "FASTMAE_TEST_PATH", {"fused": broken, "split": broken},
                            "fused")
