"""kernels/gelu_matmul.py against float64: fc1's matmul with the bias + GELU in its epilogue (f and
g), and fc2's input-gradient matmul with the GELU backward and the bias gradient in its epilogue
(df and dbias)."""
import os
import subprocess
import sys

import pytest
import torch
import triton

from fastmae.kernels import _common
from fastmae.kernels import gelu_matmul as gm
from fastmae.testing import assert_rel_close, poisoned_empty, rel_err

TOL = 1e-5
# (M rows, N = the MLP's hidden width, K = its input width): 1 and primes, K off the tile size
SHAPES = [(1, 8, 8), (7, 40, 13), (37, 97, 64), (33, 64, 40), (100, 33, 5)]


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the launchers allocate (outputs and partial sums) starts as NaN."""
    monkeypatch.setattr(gm, "_empty", poisoned_empty)


def _case(M, N, K, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(M, K, generator=g)
    w1 = torch.randn(N, K, generator=g) / K ** 0.5
    bias = torch.randn(N, generator=g) * 0.5
    dm = torch.randn(M, K, generator=g)  # the gradient of fc2's output (fc2: N -> K)
    w2 = torch.randn(K, N, generator=g) / N ** 0.5
    return [t.to(device=device, dtype=dtype) for t in (a, w1)] + [bias.to(device)] + \
        [t.to(device=device, dtype=dtype) for t in (dm, w2)]


def _gelu_grad64(f, bias, dg):
    z = (f.double() + bias.double()).requires_grad_()
    (dz,) = torch.autograd.grad(torch.nn.functional.gelu(z), z, dg.double())
    return dz


def _check_fwd(a, w1, bias, tol=TOL):
    f, g = gm.matmul_bias_gelu(a, w1, bias, a.dtype)
    assert f.dtype == g.dtype == a.dtype and f.is_contiguous() and g.is_contiguous()
    assert_rel_close(f, a.double() @ w1.double().t(), tol, "f")
    # g is the GELU of the rounded f (what the backward recomputes)
    assert_rel_close(g, torch.nn.functional.gelu(f.double() + bias.double()), tol, "g")
    return f, g


def _check_bwd(dm, w2, f, bias, tol=TOL):
    df, db = gm.matmul_gelu_bwd(dm, w2, f, bias, f.dtype)
    assert df.dtype == f.dtype and db.dtype == torch.float32 and df.is_contiguous()
    exp = _gelu_grad64(f, bias, dm.double() @ w2.double())
    assert_rel_close(df, exp, tol, "df")
    assert_rel_close(db, exp.sum(0), tol, "dbias")
    return df, db


@pytest.mark.parametrize("M,N,K", SHAPES)
def test_matmul_bias_gelu_and_its_backward_match_float64(M, N, K, device):
    a, w1, bias, dm, w2 = _case(M, N, K, device, seed=M * 100 + N)
    f, _ = _check_fwd(a, w1, bias)
    _check_bwd(dm, w2, f, bias)


def _persistent_only(monkeypatch, programs_per_sm=1, flatten=True):
    """Both kernels tuned over one persistent configuration: the _CPU_SMS programs (times
    programs_per_sm) off a GPU each take several of the tests' tiles."""
    config = triton.Config({**gm._CONFIGS[0].kwargs, "PROGRAMS_PER_SM": programs_per_sm,
                            "FLATTEN": flatten}, num_warps=gm._CONFIGS[0].num_warps, num_stages=1)
    for tuned in (gm._matmul_bias_gelu_tuned, gm._matmul_gelu_bwd_tuned):
        monkeypatch.setattr(tuned, "configs", [config])
        monkeypatch.setattr(tuned, "cache", {})


@pytest.mark.parametrize("M,N,K", SHAPES)
def test_persistent_programs_match_float64(M, N, K, device, monkeypatch):
    """A persistent configuration: where there are more tiles than programs, each program loops
    over several; the same checks."""
    _persistent_only(monkeypatch, programs_per_sm=1 + M % 2, flatten=N % 2 == 0)
    a, w1, bias, dm, w2 = _case(M, N, K, device, seed=M * 100 + N + 1)
    f, _ = _check_fwd(a, w1, bias)
    _check_bwd(dm, w2, f, bias)


@pytest.mark.interpreter(covered_by="test_every_gpu_configuration_at_a_decoder_shape[threads]")
def test_persistent_programs_give_the_one_a_tile_results(device, monkeypatch):
    """Each tile's values do not depend on which program computed it: bit-identical."""
    a, w1, bias, dm, w2 = _case(37, 97, 64, device, seed=9)

    def run():
        f, g = gm.matmul_bias_gelu(a, w1, bias, a.dtype)
        return (f, g) + gm.matmul_gelu_bwd(dm, w2, f, bias, a.dtype)

    one_a_tile = run()
    _persistent_only(monkeypatch)
    tiles = -(-37 // gm._CONFIGS[0].kwargs["BLOCK_M"]) * -(-97 // gm._CONFIGS[0].kwargs["BLOCK_N"])
    assert gm._grid(37, 97, torch.device(device))(gm._matmul_bias_gelu_tuned.configs[0].kwargs) \
        == (gm._CPU_SMS,) and tiles > 2 * gm._CPU_SMS
    for name, x, y in zip(("f", "g", "df", "dbias"), one_a_tile, run()):
        assert torch.equal(x, y), name


def test_strided_operands(device):
    """a transposed, the weights column slices of wider tensors, dm expanded (stride 0, the
    gradient of a sum), f a row slice: the launchers take any strides."""
    M, N, K = 37, 40, 24
    a, w1, bias, dm, w2 = _case(M, N, K, device, seed=3)
    a_t = a.t().contiguous().t()
    w1_wide = torch.randn(N, K + 5, device=device)
    w1_wide[:, 3:3 + K] = w1
    w1_s = w1_wide[:, 3:3 + K]
    assert a_t.stride() == (1, M) and w1_s.stride(0) == K + 5
    f, _ = _check_fwd(a_t, w1_s, bias)
    w2_wide = torch.randn(K, N + 3, device=device)
    w2_wide[:, :N] = w2
    dm_expanded = dm[:1].expand(M, K)
    f_wide = torch.randn(M, N + 9, device=device)
    f_wide[:, 9:] = f
    _check_bwd(dm_expanded, w2_wide[:, :N], f_wide[:, 9:], bias)


def test_wide_range_of_pre_activations(device):
    """Saturated tails and values near 0: bias from -12 to 12 across the columns."""
    M, N, K = 7, 96, 16
    a, w1, _, dm, w2 = _case(M, N, K, device, seed=4)
    bias = torch.linspace(-12, 12, N, device=device)
    f, _ = _check_fwd(a, w1, bias)
    _check_bwd(dm, w2, f, bias)


def test_partial_sums_over_rows_finer_than_the_tile(device, monkeypatch):
    """With partial rows of fewer rows than a tile, each tile writes its sums to its first
    partial row and zeros to the others (the NaN-poisoned buffer shows any row left out)."""
    block_m = min(c.kwargs["BLOCK_M"] for c in gm._CONFIGS)
    monkeypatch.setattr(gm, "_SUM_ROWS", block_m // 4)
    M, N, K = 3 * block_m + 5, 40, 16
    a, w1, bias, dm, w2 = _case(M, N, K, device, seed=5)
    f, _ = gm.matmul_bias_gelu(a, w1, bias, a.dtype)
    _check_bwd(dm, w2, f, bias)


def test_two_runs_are_bit_identical(device):
    a, w1, bias, dm, w2 = _case(37, 97, 64, device, seed=6)

    def run():
        f, g = gm.matmul_bias_gelu(a, w1, bias, a.dtype)
        return (f, g) + gm.matmul_gelu_bwd(dm, w2, f, bias, a.dtype)

    for name, x, y in zip(("f", "g", "df", "dbias"), run(), run()):
        assert torch.equal(x, y), name


def test_half_precision_operands(device):
    """fp16 operands (the interpreter's dots read fp16 correctly; bf16 is checked on GPUs):
    f, g and df within fp16's rounding of the float64 values."""
    a, w1, bias, dm, w2 = _case(33, 64, 40, device, dtype=torch.float16, seed=7)
    f, _ = _check_fwd(a, w1, bias, tol=2e-3)
    _check_bwd(dm, w2, f, bias, tol=2e-3)


def test_launch_reuses_the_autotuners_choice(device, monkeypatch):
    """Once the autotuner holds a configuration for (next_pow2(M), N, K) and the dtypes, both
    launchers run the kernel with it directly (_common.launch_tuned), with the same result."""
    from triton.runtime.autotuner import Autotuner
    two = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "PROGRAMS_PER_SM": 0,
                          "FLATTEN": False}, num_warps=1, num_stages=1),
           triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "PROGRAMS_PER_SM": 1,
                          "FLATTEN": True}, num_warps=1, num_stages=1)]
    tuned = (gm._matmul_bias_gelu_tuned, gm._matmul_gelu_bwd_tuned)
    for t in tuned:
        monkeypatch.setattr(t, "configs", two)
        monkeypatch.setattr(t, "cache", {})
        monkeypatch.setattr(t, "_bench", lambda *args, config, **kw: [float(config.kwargs["BLOCK_N"])] * 3)
    monkeypatch.setattr(gm, "_SUM_ROWS", 16)
    through_autotuner = []
    real_run = Autotuner.run

    def tuner_run(self, *args, **kwargs):
        through_autotuner.append(tuned.index(self))
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(Autotuner, "run", tuner_run)
    a, w1, bias, dm, w2 = _case(37, 40, 24, device, seed=8)

    def run():
        f, g = gm.matmul_bias_gelu(a, w1, bias, a.dtype)
        return (f, g) + gm.matmul_gelu_bwd(dm, w2, f, bias, a.dtype)

    first = run()
    assert through_autotuner == [0, 1] and all(len(t.cache) == 1 for t in tuned)
    second = run()
    assert through_autotuner == [0, 1], "the cached configurations are launched directly"
    for x, y in zip(first, second):
        assert torch.equal(x, y)
    _check_bwd(dm, w2, first[0], bias)


def test_empty_rows(device):
    a, w1, bias, dm, w2 = _case(1, 8, 8, device)
    f, g = gm.matmul_bias_gelu(a[:0], w1, bias, a.dtype)
    assert f.shape == g.shape == (0, 8)
    df, db = gm.matmul_gelu_bwd(dm[:0], w2, f, bias, a.dtype)
    assert df.shape == (0, 8) and torch.equal(db, torch.zeros(8, device=device))


# ----------------------------------------------------------------------------- low precision

@pytest.mark.cuda
@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 4e-3), (torch.float16, 5e-4)])
@pytest.mark.parametrize("M,N,K", [(256 * 50, 3072, 768), (256 * 197, 2048, 512),
                                   (1000, 100, 40), (33, 8, 8)])
def test_low_precision_against_cublas_and_the_bias_gelu_kernel(M, N, K, dtype, atol, monkeypatch):
    # two configurations (an 8-warp and a 4-warp tile): fewer compiles in the GPU test run; the
    # CPU check compiles every one for sm_90 (tests/test_gpu_compile.py)
    for tuned in (gm._matmul_bias_gelu_tuned, gm._matmul_gelu_bwd_tuned):
        monkeypatch.setattr(tuned, "configs", [c for c in tuned.configs if
                                               (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps)
                                               in ((128, 128, 8), (64, 128, 4))])
        monkeypatch.setattr(tuned, "cache", {})
    _check_low_precision(M, N, K, dtype, atol, "cuda")


@pytest.mark.interpreter(covered_by="test_low_precision_against_cublas_and_the_bias_gelu_kernel")
@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 4e-3), (torch.float16, 5e-4)])
@pytest.mark.parametrize("M,N,K", [(100, 96, 40), (33, 8, 8)])
def test_low_precision_interpreted(M, N, K, dtype, atol, interpreter_bf16):
    """The GPU test's rule at small shapes, bf16 with the interpreter's bf16 mended."""
    _check_low_precision(M, N, K, dtype, atol, "cpu")


def _check_low_precision(M, N, K, dtype, atol, device):
    """In dtype: f, g, df and dbias against fp32 math on the same inputs, with
    at most 2x the error of the unfused path (cuBLAS in dtype, then kernels/bias_gelu.py) + atol;
    two runs bit-identical."""
    from fastmae.kernels import bias_gelu as bg
    a, w1, bias, dm, w2 = _case(M, N, K, device, dtype=dtype, seed=N)
    f, g = gm.matmul_bias_gelu(a, w1, bias, dtype)
    f_split = a @ w1.t()
    g_split = bg.bias_gelu_fwd(f_split, bias, dtype)
    f32 = a.float() @ w1.float().t()
    assert_rel_close(f, f32, 2 * rel_err(f_split, f32) + atol, "f")
    g32 = torch.nn.functional.gelu(f32 + bias)
    assert_rel_close(g, g32, 2 * rel_err(g_split, g32) + atol, "g")
    df, db = gm.matmul_gelu_bwd(dm, w2, f, bias, dtype)
    df_split, db_split = bg.bias_gelu_bwd(dm @ w2, f, bias, dtype)
    z = (f.float() + bias).requires_grad_()
    (df32,) = torch.autograd.grad(torch.nn.functional.gelu(z), z, dm.float() @ w2.float())
    assert_rel_close(df, df32, 2 * rel_err(df_split, df32) + atol, "df")
    assert_rel_close(db, df32.sum(0), 2 * rel_err(db_split, df32.sum(0)) + atol, "dbias")
    df2, db2 = gm.matmul_gelu_bwd(dm, w2, f, bias, dtype)
    assert torch.equal(df, df2) and torch.equal(db, db2)


def _gpu_configuration_pairs(kind):
    """(forward, backward) configuration pairs of one kind: the threads' kernels', the TMA
    kernels' flattened ones, or their warp-specialized ones."""
    if kind == "threads":
        return list(zip(gm._gpu_configs(), gm._gpu_configs()))
    ws = kind == "tma_warp_specialized"
    fwd, bwd = ([c for c in configs if c.kwargs["WARP_SPECIALIZE"] == ws]
                for configs in (gm._TMA_FWD_CONFIGS, gm._TMA_BWD_CONFIGS))
    assert len(fwd) == len(bwd), "one of each kernel a pair"
    return list(zip(fwd, bwd))


def _gpu_pairs_any_triton(kind):
    """_gpu_configuration_pairs as a GPU under Triton 3.6 builds them (the warp-specialized
    ones included), from here."""
    if kind == "threads":
        return list(zip(gm._gpu_configs(), gm._gpu_configs()))
    ws = kind == "tma_warp_specialized"
    configs = []
    for backward in (False, True):
        hook = gm._tma_blocks("mk", "kn" if backward else "nk")
        configs.append([triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "PROGRAMS_PER_SM": p, "SUBTILE": sub,
             "WARP_SPECIALIZE": w_s}, num_warps=w, num_stages=s, pre_hook=hook)
            for bm, bn, bk, w, s, p, sub, w_s in gm._tma_gpu_shapes(backward) if w_s == ws])
    assert len(configs[0]) == len(configs[1]) > 0
    return list(zip(*configs))


@pytest.mark.interpreter(covered_by="test_every_gpu_configuration_at_a_decoder_shape")
@pytest.mark.parametrize("kind", ["threads", "tma", "tma_warp_specialized"])
def test_every_gpu_configuration_through_the_interpreter(kind, monkeypatch):
    """The GPU's own tilings (128 x 256 to 64 x 128, one a tile and persistent, flattened or
    not, epilogues in one or two pieces, the backward's warp-specialized transposed tiles),
    with the GPU's bias-gradient partial rows (64: a 128-row tile writes two), forced in turn
    at a shape with partial tiles in M, N and K: fp16 within rounding of float64. Their
    indexing is checked here, where a GPU is not needed; the interpreter's own configuration
    (16 x 32 tiles) reaches none of these tile shapes."""
    monkeypatch.setattr(triton, "__version__", "3.6.0")  # the warp-specialized ones offered
    pairs = _gpu_pairs_any_triton(kind)
    monkeypatch.setattr(gm, "_SUM_ROWS", min(c.kwargs["BLOCK_M"] for pair in
                                             _gpu_pairs_any_triton("threads") + pairs
                                             for c in pair))
    assert gm._SUM_ROWS == 64
    tma = kind != "threads"
    tuned = ((gm._matmul_bias_gelu_tma_tuned, gm._matmul_gelu_bwd_tma_tuned) if tma
             else (gm._matmul_bias_gelu_tuned, gm._matmul_gelu_bwd_tuned))
    M, N, K = 200, 296, 72
    a, w1, bias, dm, w2 = _case(M, N, K, "cpu", dtype=torch.float16, seed=13)
    for configs in pairs:
        for t, config in zip(tuned, configs):
            monkeypatch.setattr(t, "configs", [config])
            monkeypatch.setattr(t, "cache", {})
        name = f"{kind} {configs[0]} / {configs[1]}"
        f, g = gm.matmul_bias_gelu(a, w1, bias, a.dtype, tma=tma)
        assert_rel_close(f, a.double() @ w1.double().t(), 2e-3, f"f {name}")
        assert_rel_close(g, torch.nn.functional.gelu(f.double() + bias.double()), 2e-3,
                         f"g {name}")
        df, db = gm.matmul_gelu_bwd(dm, w2, f, bias, f.dtype, reduce=False, tma=tma)
        assert db.shape == (-(-M // 64), N), name
        exp = _gelu_grad64(f, bias, dm.double() @ w2.double())
        assert_rel_close(df, exp, 2e-3, f"df {name}")
        assert_rel_close(db.sum(0), exp.sum(0), 2e-3, f"dbias {name}")


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["threads", "tma", "tma_warp_specialized"])
def test_every_gpu_configuration_at_a_decoder_shape(kind, monkeypatch):
    """Each configuration the autotuners may pick of one kind (one a tile and persistent,
    flattened or not; the TMA kernels' on sm_90 and newer, warp-specialized or not), forced in
    turn, at the decoder's MLP widths, bf16: within the same bounds as the autotuner's pick
    above. M = 400 ends in a partial 128-row tile and is 16-divisible like the step's 256 x 197
    rows, so the kernels compiled here serve the benchmark from Triton's cache and back.
    benches/gpu_suite.sh runs the TMA kinds first on a GPU, each on its own, and leaves out of
    its run a kind that fails (FASTMAE_TMA=0, FASTMAE_WARP_SPECIALIZE=0)."""
    from fastmae.kernels import bias_gelu as bg
    M, N, K, dtype, atol = 400, 2048, 512, torch.bfloat16, 4e-3
    a, w1, bias, dm, w2 = _case(M, N, K, "cuda", dtype=dtype, seed=11)
    tma = kind != "threads"
    if tma and not gm.tma_ok(a.device, dtype, N, a=a, w=w1, dm=dm, w2=w2):
        pytest.skip("the TMA kernels are for sm_90 and newer GPUs (and not with FASTMAE_TMA=0)")
    pairs = _gpu_configuration_pairs(kind)
    if not pairs:
        pytest.skip(f"no {kind} configurations under Triton {triton.__version__} here")
    if kind == "threads":
        assert any(c.kwargs["PROGRAMS_PER_SM"] for c, _ in pairs)
        tuned = (gm._matmul_bias_gelu_tuned, gm._matmul_gelu_bwd_tuned)
    else:
        tuned = (gm._matmul_bias_gelu_tma_tuned, gm._matmul_gelu_bwd_tma_tuned)
    f32 = a.float() @ w1.float().t()
    f_split = a @ w1.t()
    g_split = bg.bias_gelu_fwd(f_split, bias, dtype)
    g32 = torch.nn.functional.gelu(f32 + bias)
    for configs in pairs:
        for t, config in zip(tuned, configs):
            monkeypatch.setattr(t, "configs", [config])
            monkeypatch.setattr(t, "cache", {})
        name = f"{kind} {configs[0]}"
        f, g = gm.matmul_bias_gelu(a, w1, bias, dtype, tma=tma)
        assert_rel_close(f, f32, 2 * rel_err(f_split, f32) + atol, f"f {name}")
        assert_rel_close(g, g32, 2 * rel_err(g_split, g32) + atol, f"g {name}")
        df, db = gm.matmul_gelu_bwd(dm, w2, f, bias, dtype, tma=tma)
        df_split, db_split = bg.bias_gelu_bwd(dm @ w2, f, bias, dtype)
        z = (f.float() + bias).requires_grad_()
        (df32,) = torch.autograd.grad(torch.nn.functional.gelu(z), z, dm.float() @ w2.float())
        assert_rel_close(df, df32, 2 * rel_err(df_split, df32) + atol, f"df {name}")
        assert_rel_close(db, df32.sum(0), 2 * rel_err(db_split, df32.sum(0)) + atol,
                         f"dbias {name}")
        # a second call launches the kept kernel straight through Triton's C launcher (the
        # step's way from its second call of a shape on), descriptors included: the same bits
        went = []
        real_launch = _common._TunedDirect.launch

        def counted(self, grid, args, kwargs):
            went.append((self.tuned, real_launch(self, grid, args, kwargs)))
            return went[-1][1]

        monkeypatch.setattr(_common._TunedDirect, "launch", counted)
        f2, g2 = gm.matmul_bias_gelu(a, w1, bias, dtype, tma=tma)
        df2, db2 = gm.matmul_gelu_bwd(dm, w2, f, bias, dtype, tma=tma)
        monkeypatch.setattr(_common._TunedDirect, "launch", real_launch)
        if _common.DIRECT_LAUNCH:
            assert all((t, True) in went for t in tuned), f"direct launch of {name}"
        for what, x, y in (("f", f, f2), ("g", g, g2), ("df", df, df2), ("dbias", db, db2)):
            assert torch.equal(x, y), f"{what} of the direct launch, {name}"


def test_configuration_kinds_partition_the_gpu_configurations(monkeypatch):
    """The CUDA test's three kinds take every GPU configuration of both kernels once (as a GPU
    under Triton 3.6 has them): the threads' and, between the two TMA kinds, the TMA ones."""
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(gm, "interpreting", lambda: False)
    for name, backward in (("_TMA_FWD_CONFIGS", False), ("_TMA_BWD_CONFIGS", True)):
        monkeypatch.setattr(gm, name, gm._tma_configs(None, backward))
    assert len(_gpu_configuration_pairs("tma_warp_specialized")) == 2
    threads = _gpu_configuration_pairs("threads")
    assert [c for c, _ in threads] == gm._gpu_configs()
    tma = _gpu_configuration_pairs("tma") + _gpu_configuration_pairs("tma_warp_specialized")
    assert sorted(map(str, (c for c, _ in tma))) == sorted(map(str, gm._TMA_FWD_CONFIGS))
    assert sorted(map(str, (b for _, b in tma))) == sorted(map(str, gm._TMA_BWD_CONFIGS))


# ----------------------------------------------------------------------------- TMA kernels

# (M, N, K) whose fp32 rows are whole 16-byte units (what a TMA descriptor needs): 1 and primes
# in M, N and K off the tile sizes
TMA_SHAPES = [(1, 8, 8), (7, 40, 12), (37, 96, 64), (33, 64, 40), (100, 36, 4)]


def _tma_config(monkeypatch, subtile, warp_specialize=False, device="cpu"):
    """The TMA kernels' first interpreter configuration with its epilogue in `subtile` pieces,
    their tile loops warp-specialized or not (then pointer-store epilogues, the backward's on
    transposed tiles). Through the interpreter only: a GPU's TMA path takes 16-bit operands and
    its own configurations (per Triton version), each of which
    test_every_gpu_configuration_at_a_decoder_shape[tma*] checks there."""
    if device == "cuda":
        pytest.skip("the TMA kernels' interpreter configuration (on a GPU: "
                    "test_every_gpu_configuration_at_a_decoder_shape[tma*])")
    for tuned in (gm._matmul_bias_gelu_tma_tuned, gm._matmul_gelu_bwd_tma_tuned):
        config = tuned.configs[0]
        kwargs = {**config.kwargs, "SUBTILE": subtile}
        if "WARP_SPECIALIZE" in kwargs:
            kwargs["WARP_SPECIALIZE"] = warp_specialize
        monkeypatch.setattr(tuned, "configs", [triton.Config(
            kwargs, num_warps=config.num_warps, num_stages=config.num_stages,
            pre_hook=config.pre_hook)])
        monkeypatch.setattr(tuned, "cache", {})


@pytest.mark.parametrize("version,offered", [("3.6.0", True), ("3.9.0", False)])
def test_warp_specialized_configurations_only_where_triton_compiles_them(version, offered,
                                                                          monkeypatch):
    """A GPU's TMA configurations include warp-specialized ones under Triton 3.6, not under 3.9
    (whose sm_90 partitioning fails on those loops)."""
    monkeypatch.setattr(triton, "__version__", version)
    for backward in (False, True):
        shapes = gm._tma_gpu_shapes(backward)
        assert any(ws for *_, ws in shapes) == offered
        for _, _, _, warps, _, programs, pieces, ws in shapes:
            if ws:  # 4 warps and the partitions' 8 more: one program an SM; the epilogue whole
                assert (warps, programs, pieces) == (4, 1, 1)


@pytest.mark.parametrize("subtile,warp_specialize", [(1, False), (2, False), (1, True)])
@pytest.mark.parametrize("M,N,K", TMA_SHAPES)
def test_tma_kernels_match_float64_and_the_pointer_kernels(M, N, K, subtile, warp_specialize,
                                                           device, monkeypatch):
    """The TMA path (persistent, fewer programs than tiles where there are more; the epilogue
    whole or in two pieces; the loops warp-specialized or not, the backward's then on
    transposed tiles) against float64, and bit-identical to the pointer kernels."""
    _tma_config(monkeypatch, subtile, warp_specialize, device)
    a, w1, bias, dm, w2 = _case(M, N, K, device, seed=M * 10 + N + K)
    assert gm.tma_ok(a.device, a.dtype, N, a=a, w=w1)
    f, g = gm.matmul_bias_gelu(a, w1, bias, a.dtype, tma=True)
    assert f.is_contiguous() and g.is_contiguous()
    assert_rel_close(f, a.double() @ w1.double().t(), TOL, "f")
    assert_rel_close(g, torch.nn.functional.gelu(f.double() + bias.double()), TOL, "g")
    df, db = gm.matmul_gelu_bwd(dm, w2, f, bias, f.dtype, tma=True)
    exp = _gelu_grad64(f, bias, dm.double() @ w2.double())
    assert_rel_close(df, exp, TOL, "df")
    assert_rel_close(db, exp.sum(0), TOL, "dbias")
    f0, g0 = gm.matmul_bias_gelu(a, w1, bias, a.dtype)
    df0, db0 = gm.matmul_gelu_bwd(dm, w2, f, bias, f.dtype)
    # the warp-specialized backward sums its transposed tiles' rows: the same terms, another
    # order of adding them (so the bias gradient only to the float64 bound above)
    pairs = zip(("f", "g", "df", "dbias"), (f, g, df, db), (f0, g0, df0, db0))
    for name, x, y in list(pairs)[:3 if warp_specialize else 4]:
        assert torch.equal(x, y), name


@pytest.mark.parametrize("warp_specialize", [False, True])
def test_tma_half_precision_and_partial_rows_finer_than_the_tile(warp_specialize, device,
                                                                 monkeypatch):
    """fp16 operands through the TMA path (its loops warp-specialized or not), with partial sum
    rows of a quarter tile (the zeros of the rows a tile covers past its first: the poisoned
    buffer shows any left out)."""
    _tma_config(monkeypatch, 1, warp_specialize, device)
    block_m = gm._TMA_BWD_CONFIGS[0].kwargs["BLOCK_M"]
    monkeypatch.setattr(gm, "_SUM_ROWS", block_m // 4)
    M, N, K = 3 * block_m + 5, 40, 24
    a, w1, bias, dm, w2 = _case(M, N, K, device, dtype=torch.float16, seed=12)
    f, g = gm.matmul_bias_gelu(a, w1, bias, a.dtype, tma=True)
    assert_rel_close(f, a.double() @ w1.double().t(), 2e-3, "f")
    df, db = gm.matmul_gelu_bwd(dm, w2, f, bias, f.dtype, reduce=False, tma=True)
    assert db.shape == (-(-M // (block_m // 4)), N)
    exp = _gelu_grad64(f, bias, dm.double() @ w2.double())
    assert_rel_close(df, exp, 2e-3, "df")
    assert_rel_close(db.sum(0), exp.sum(0), 2e-3, "dbias")


def test_descriptors_built_fast_equal_the_dataclasss_own(device, monkeypatch):
    """_descriptor skips TensorDescriptor's checks (made by _check_tma) but not its fields:
    equal to the dataclass's own construction, every default field included (this Triton's
    set); and where a field has no default, it constructs through the dataclass."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    t = torch.randn(24, 40, device=device)
    fast = gm._descriptor(t)
    assert fast == TensorDescriptor(t, [24, 40], [40, 1], [16, 16])
    assert set(vars(fast)) == {f.name for f in gm._FIELDS}
    monkeypatch.setattr(gm, "_DESCRIPTOR_DEFAULTS", None)
    assert gm._descriptor(t) == fast


def test_tma_path_refuses_what_a_descriptor_cannot_describe(device):
    """Rows of 13 fp32 (52 bytes), a transposed operand or an expanded one (row stride 0):
    tma_ok says no, and tma=True raises naming the operand."""
    a, w1, bias, dm, w2 = _case(9, 16, 13, device, seed=13)
    assert not gm.tma_ok(a.device, a.dtype, 16, a=a, w=w1)
    # describable operands: fp32 through the interpreter, 16-bit on a GPU (its TMA path's only)
    half = torch.bfloat16 if device == "cuda" else torch.float32
    if not gm.tma_applies(a.device, half):
        pytest.skip("no TMA path on this GPU (sm_90 and newer, and not with FASTMAE_TMA=0)")
    a16, w16 = (t.to(half) for t in _case(9, 16, 16, device, seed=13)[:2])
    assert gm.tma_ok(a16.device, a16.dtype, 16, a=a16, w=w16)
    assert not gm.tma_ok(a16.device, a16.dtype, 16, a=a16[:1].expand(9, 16), w=w16)
    with pytest.raises(ValueError, match="tma=True: a must be"):
        gm.matmul_bias_gelu(a, w1, bias, a.dtype, tma=True)
    a, w1, bias, dm, w2 = _case(9, 16, 16, device, seed=13)
    f, _ = gm.matmul_bias_gelu(a, w1, bias, a.dtype)
    with pytest.raises(ValueError, match="tma=True: w must be"):
        gm.matmul_gelu_bwd(dm, w2.t().contiguous().t(), f, bias, f.dtype, tma=True)
    with pytest.raises(ValueError, match=f"16-byte output rows; got {device}"):  # 10 x 2 bytes
        gm.matmul_bias_gelu(a16, torch.randn(10, 16, device=device).to(half), bias[:10], half,
                            tma=True)


@pytest.mark.parametrize("env,tma_on,ws_on", [({}, True, True),
                                              ({"FASTMAE_TMA": "0"}, False, True),
                                              ({"FASTMAE_WARP_SPECIALIZE": "0"}, True, False)])
def test_the_environment_leaves_out_the_tma_kernels_or_their_warp_specialization(
        env, tma_on, ws_on, monkeypatch):
    """FASTMAE_TMA=0 and FASTMAE_WARP_SPECIALIZE=0, read at import (a fresh process here),
    leave out the TMA way on a GPU and the warp-specialized configurations."""
    code = ("from fastmae.kernels import gelu_matmul as gm; "
            "print(gm._TMA_ON, gm._WARP_SPECIALIZE_ON)")
    environ = {k: v for k, v in os.environ.items()
               if k not in ("TRITON_INTERPRET", "FASTMAE_TMA", "FASTMAE_WARP_SPECIALIZE")}
    out = subprocess.run([sys.executable, "-c", code], env={**environ, **env},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(tma_on), str(ws_on)]
    # what each switch does, on a stand-in sm_90 device
    monkeypatch.setattr(gm, "_tma_device", lambda index: True)
    monkeypatch.setattr(gm, "_TMA_ON", tma_on)
    monkeypatch.setattr(gm, "_WARP_SPECIALIZE_ON", ws_on)
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    assert gm.tma_applies(torch.device("cuda", 0), torch.bfloat16) == tma_on
    assert any(ws for *_, ws in gm._tma_gpu_shapes(backward=False)) == ws_on


def _half_case_near(M, N, K, center, device, seed):
    """fp16 a (M, K) and w1 (N, K) whose products are center (from column 0) plus terms ~1, and
    an fp32 bias of about -center: z = f + bias is ~1 where fp16's f is center's ulp apart."""
    a, w1, _, _, _ = _case(M, N, K, device, seed=seed)
    a, w1 = a.clone(), w1.clone()
    a[:, 0], w1[:, 0] = center ** 0.5, center ** 0.5
    g = torch.Generator().manual_seed(seed + 1)
    bias = (torch.randn(N, generator=g) * 0.5 - center).to(device)
    return a.half(), w1.half(), bias


@pytest.mark.parametrize("way", ["pointer", "tma", "tma_warp_specialized"])
def test_gelu_of_the_rounded_f(way, device, monkeypatch):
    """g = gelu(f + bias) of the f stored in fp16 (what the backward recomputes), not of the fp32
    accumulator: f ~ 100 (0.0625 apart in fp16) and bias ~ -100, so the two differ by ~1e-2 in
    g where gelu(f + bias) in fp16 is within 1e-3."""
    if way != "pointer":
        _tma_config(monkeypatch, 1, way == "tma_warp_specialized", device)
    M, N, K = 37, 40, 24
    a, w1, bias = _half_case_near(M, N, K, 100.0, device, seed=14)
    f, g = gm.matmul_bias_gelu(a, w1, bias, torch.float16, tma=way != "pointer")
    assert_rel_close(f, a.double() @ w1.double().t(), 2e-3, "f")
    assert_rel_close(g, torch.nn.functional.gelu(f.double() + bias.double()), 2e-3, "g")


def test_products_accumulate_in_fp32(device):
    """fp16 operands whose products cancel across K steps (+256 in the first, -256 in the
    second): an fp16 accumulator loses the other terms' digits (256 is 0.25 apart in fp16), the
    fp32 one keeps them, for f and for the backward's dg alike."""
    M, N, K = 37, 40, 40
    a, w1, bias, dm, w2 = _case(M, N, K, device, seed=15)
    a, w1, dm, w2 = (t.clone() for t in (a, w1, dm, w2))
    a[:, 0], w1[:, 0], a[:, 20], w1[:, 20] = 16.0, 16.0, 16.0, -16.0
    dm[:, 0], w2[0], dm[:, 20], w2[20] = 16.0, 16.0, 16.0, -16.0
    a, w1, dm, w2 = (t.half() for t in (a, w1, dm, w2))
    f, _ = _check_fwd(a, w1, bias, tol=2e-3)
    _check_bwd(dm, w2, f, bias, tol=2e-3)


def test_output_dtypes_are_the_requested_ones(device):
    """f and g in out_dtype (fp32 here, from fp16 operands) and df in dx_dtype (fp32 here, from an
    fp16 f), each to its dtype's accuracy."""
    M, N, K = 37, 40, 24
    a, w1, bias, dm, w2 = _case(M, N, K, device, seed=16)
    a16, w16 = a.half(), w1.half()
    f, g = gm.matmul_bias_gelu(a16, w16, bias, torch.float32)
    assert f.dtype == g.dtype == torch.float32
    assert_rel_close(f, a16.double() @ w16.double().t(), TOL, "f")
    assert_rel_close(g, torch.nn.functional.gelu(f.double() + bias.double()), TOL, "g")
    f16 = f.half()
    df, db = gm.matmul_gelu_bwd(dm, w2, f16, bias, torch.float32)
    assert df.dtype == db.dtype == torch.float32
    exp = _gelu_grad64(f16, bias, dm.double() @ w2.double())
    assert_rel_close(df, exp, TOL, "df")
    assert_rel_close(db, exp.sum(0), TOL, "dbias")
