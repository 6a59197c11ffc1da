"""benches/bench_ops.py's and benches/bench_step.py's own arithmetic and checks, without
timing anything: the bytes and FLOPs an op must move / do (counted by hand at small shapes),
the parity check that must stop a benchmark before it is timed, and what a record says was
checked."""
import types

import pytest
import torch

from _bench_script import load as load_bench_script

bench_ops = load_bench_script("bench_ops")
bench_step = load_bench_script("bench_step")

BF16, F32 = 2, 4  # bytes an element


def _t(*shape, dtype=torch.float32):
    """A tensor for its shape and dtype alone: traffic() counts bytes, it reads no value."""
    return torch.empty(*shape, dtype=dtype)


def _traffic(spec, kw, outs):
    return {mode: bench_ops.traffic(spec, kw, outs, mode) for mode in bench_ops.MODES}


def test_attention_traffic_and_flops():
    """(B, H, N, d) = (2, 3, 5, 4) in bf16: S = 2*3*5*4 * 2 = 240 bytes a tensor, the LSE
    2*3*5 * 4 = 120; fwd q, k, v read and o written (4 S), bwd 8 S; FLOPs 4 and 10 N^2 d a head."""
    q, o = _t(2, 3, 5, 4, dtype=torch.bfloat16), _t(2, 3, 5, 4, dtype=torch.bfloat16)
    nn_d = 2 * 3 * 5 * 5 * 4  # B H N^2 d = 600
    assert _traffic("attention", {"q": q}, (o,)) == {
        "fwd": (4 * 240 + 120, 4 * nn_d), "bwd": (8 * 240 + 120, 10 * nn_d),
        "fwdbwd": (12 * 240 + 240, 14 * nn_d)}
    # packed: o (B, N, H d) with num_heads: the same sizes
    packed = _traffic("packed_attention", {"num_heads": 3}, (_t(2, 5, 12, dtype=torch.bfloat16),))
    assert packed["fwd"] == (1080, 2400) and packed["bwd"] == (2040, 6000)


def test_elementwise_ops_traffic():
    """Bytes of the loss, LayerNorm and bias + GELU, every tensor counted by hand."""
    imgs, pred, mask = _t(2, 3, 4, 4), _t(2, 4, 12), _t(2, 4)  # 384, 384 and 32 bytes
    assert _traffic("masked_mse_loss", {"imgs": imgs, "pred": pred, "mask": mask}, ()) == {
        "fwd": (800, 0), "bwd": (2 * 384, 0), "fwdbwd": (800 + 384, 0)}
    # x, y (6, 8) fp32: 192 bytes each; weight + bias 2 * 32; mean and rstd 6 rows * 8 bytes
    ln = _traffic("layer_norm", {"x": _t(6, 8), "weight": _t(8), "bias": _t(8)}, (_t(6, 8),))
    assert ln["fwd"] == (192 + 192 + 64 + 48, 0)
    assert ln["bwd"] == (192 + 2 * 192 + 48 + 64, 0)  # dy read, x read, dx written
    # x, y (6, 8) bf16: 96 bytes each; bias (8,) fp32: 32
    bg = _traffic("bias_gelu", {"x": _t(6, 8, dtype=torch.bfloat16), "bias": _t(8)},
                  (_t(6, 8, dtype=torch.bfloat16),))
    assert bg == {"fwd": (96 + 96 + 32, 0), "bwd": (96 + 2 * 96 + 32, 0),
                  "fwdbwd": (224 + 320, 0)}


def _row(error, limit, ok=True):
    return types.SimpleNamespace(ok=ok, quantity="out", error=error, limit=limit, note="")


class _Benchmark:
    """A stand-in for pytest-benchmark's fixture: records, times nothing."""
    def __init__(self):
        self.extra_info, self.group = {}, None

    def pedantic(self, fn, **kwargs):
        pass


ENV = {"gpu": None, "torch": "t", "triton": "t"}


def test_a_failed_op_parity_stops_the_benchmark(monkeypatch):
    monkeypatch.setattr(bench_ops, "_parity", lambda *a: [_row(0.5, 0.01, ok=False)])
    with pytest.raises(AssertionError, match="parity failed before timing"):
        bench_ops.test_op(None, "micro", None, "bias_gelu_enc", "fwd", "eager", "cpu", None, ENV)


def test_the_records_worst_parity_is_the_largest_error_over_its_limit(monkeypatch):
    # FIXTURE: errors 0.001 and 0.005 against a limit of 0.01, one compared exactly (no limit)
    rows = [_row(1e-3, 1e-2), _row(5e-3, 1e-2), _row(None, None)]
    monkeypatch.setattr(bench_ops, "_parity", lambda *a: rows)
    benchmark = _Benchmark()
    bench_ops.test_op(benchmark, "micro", None, "bias_gelu_enc", "fwd", "eager", "cpu", None, ENV)
    assert benchmark.extra_info["parity"] == "pass"
    assert benchmark.extra_info["parity_worst"] == pytest.approx(0.5)  # 0.005 / 0.01


def test_op_parity_is_checked_once_per_model_and_op(monkeypatch):
    calls = []
    monkeypatch.setattr(bench_ops, "_PARITY", {})
    monkeypatch.setattr(bench_ops, "compare_case", lambda spec, *a, **k: calls.append(spec) or
                        [spec])
    assert bench_ops._parity("micro", "attention_enc", "enc", 0, 0, None, "cpu") == ["enc"]
    assert bench_ops._parity("micro", "attention_dec", "dec", 0, 0, None, "cpu") == ["dec"]
    assert bench_ops._parity("micro", "attention_enc", "enc", 0, 0, None, "cpu") == ["enc"]
    assert calls == ["enc", "dec"]


def test_a_failed_step_parity_stops_the_benchmark(monkeypatch):
    monkeypatch.setattr(bench_step, "_fastmae_parity", lambda *a: {"passed": False})
    with pytest.raises(AssertionError, match="parity failed before timing"):
        bench_step.test_train_step(None, "micro", None, "fastmae", "cpu", None, ENV)


def test_a_compiled_step_that_differs_from_the_eager_one_is_found():
    torch.manual_seed(0)
    model = bench_step.build_model("micro", "cpu", seed=0)
    imgs, noise = bench_step._inputs(model, 2, "cpu")
    assert bench_step._compiled_parity(model, model, imgs, noise, torch.float32) == []

    def doubled(imgs, mask_ratio, noise):  # FIXTURE: a "compiled" step off by a factor 2
        loss, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
        return 2 * loss, pred, mask
    problems = bench_step._compiled_parity(model, doubled, imgs, noise, torch.float32)
    assert problems and problems[0].startswith("loss: error")


@pytest.mark.parametrize("system,parity", [
    ("reference_compile", "the compiled reference against the eager one on one shared step"),
    ("fastmae_compile", None)])  # compiled under "triton", checked under "torch": not checked
def test_a_compiled_systems_record_says_what_was_checked(monkeypatch, system, parity):
    monkeypatch.setattr(bench_step, "make_train_step", lambda model, *a, **k: (
        lambda: None, None, model))
    monkeypatch.setattr(bench_step, "_compiled_parity", lambda *a: [])
    benchmark = _Benchmark()
    bench_step.test_train_step(benchmark, "micro", None, system, "cpu", None, ENV)
    info = benchmark.extra_info
    assert info["parity"] == ("pass" if parity else "not checked")
    assert info.get("parity_checked") == parity
