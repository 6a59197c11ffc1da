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


# ------------------------------------------------------------------------- tl.dot precision
# Triton's tl.dot takes fp32 operands as TF32 by default on a GPU, which the float64-checked
# results cannot meet; the interpreter ignores input_precision, so no CPU result shows it. These
# check what the GPU will be asked for: every dot of fp32 operands says IEEE.

def _dot_calls():
    """(file:line, call) for every tl.dot(...) call in kernels/."""
    import ast
    import pathlib

    root = pathlib.Path(_common.__file__).parent
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "dot" and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "tl"):
                yield f"{path.name}:{node.lineno}", node


def _cast_to_16_bits(operand):
    """Whether an operand expression is x.to(tl.bfloat16) or x.to(tl.float16)."""
    import ast

    return (isinstance(operand, ast.Call) and isinstance(operand.func, ast.Attribute)
            and operand.func.attr == "to" and len(operand.args) == 1
            and ast.unparse(operand.args[0]) in ("tl.bfloat16", "tl.float16"))


def test_every_dot_names_its_precision():
    """Each tl.dot passes input_precision -- the launcher's DOT_PRECISION or "ieee" -- unless
    both operands are cast to 16 bits there (TF32 does not apply to them)."""
    import ast

    calls = list(_dot_calls())
    assert len(calls) >= 20  # the attention, gelu_matmul and patch_embed dots were found
    bad = []
    for where, call in calls:
        precision = {k.arg: k.value for k in call.keywords}.get("input_precision")
        if precision is None:
            if not all(_cast_to_16_bits(a) for a in call.args[:2]):
                bad.append(where)
        elif not (isinstance(precision, ast.Name) and precision.id == "DOT_PRECISION"
                  or isinstance(precision, ast.Constant) and precision.value == "ieee"):
            bad.append(f"{where}: input_precision={ast.unparse(precision)}")
    assert not bad, f"tl.dot calls that fp32 operands would run as TF32: {bad}"


def test_dot_precision_is_ieee_for_fp32_only():
    assert _common.dot_precision(torch.float32) == "ieee"
    for dtype in (torch.bfloat16, torch.float16):
        assert _common.dot_precision(dtype) == "tf32"  # ignored by 16-bit dots


def test_fp32_launches_ask_for_ieee_dots(device, monkeypatch, launches):
    """Every launch that takes DOT_PRECISION -- attention forward and each backward way, the
    fused MLP matmuls (pointer and TMA tiles where they apply) -- is given "ieee" for fp32
    operands."""
    from fastmae.kernels import attention as attn
    from fastmae.kernels import gelu_matmul as gm

    g = torch.Generator().manual_seed(3)
    q, k, v, do = (torch.randn(1, 2, 50, 32, generator=g).to(device) for _ in range(4))
    o, lse = attn.attention_fwd(q, k, v, 32 ** -0.5)
    for way in ("fused", "fused_q", "split"):
        monkeypatch.setenv("FASTMAE_ATTN_BWD", way)
        attn.attention_bwd(do, q, k, v, o, lse, 32 ** -0.5)
    a, w1, bias, dm, w2 = (torch.randn(*s, generator=g).to(device)
                           for s in ((7, 16), (40, 16), (40,), (7, 16), (16, 40)))
    ways = (False, True) if gm.tma_applies(a.device, a.dtype) else (False,)
    for tma in ways:
        f, _ = gm.matmul_bias_gelu(a, w1, bias, torch.float32, tma=tma)
        gm.matmul_gelu_bwd(dm, w2, f, bias, torch.float32, tma=tma)
    asked = [(name, meta["DOT_PRECISION"]) for name, meta in launches
             if "DOT_PRECISION" in meta]
    want = {"_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_fused_q", "_attn_bwd_dq",
            "_matmul_bias_gelu", "_matmul_gelu_bwd"}
    if True in ways:
        want |= {"_matmul_bias_gelu_tma", "_matmul_gelu_bwd_tma"}
    assert {name for name, _ in asked} == want
    assert {precision for _, precision in asked} == {"ieee"}, asked
