"""benches/sweep_bwd.py (the backward kernels' launch-configuration sweep) on its CPU smoke
shapes: every configuration runs, its outputs are compared with the default's, and a wrong one
is flagged."""
import io

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
