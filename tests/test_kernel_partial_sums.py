"""kernels/partial_sums.py: several partial-sum buffers summed over their rows in one launch,
against float64 sums."""
import pytest
import torch

from fastmae.kernels import partial_sums as ps
from fastmae.testing import poisoned_empty


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    monkeypatch.setattr(ps, "_empty", poisoned_empty)


def _buffers(shapes, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).to(device) for s in shapes]


def _check(shapes, device, seed=0):
    buffers = _buffers(shapes, device, seed)
    sums = ps.sum_partials(buffers)
    # each buffer's sections, in order
    want = [w for b in buffers for w in b.double().sum(-2).reshape(-1, b.shape[-1])]
    assert len(sums) == len(want)
    for i, (got, exp) in enumerate(zip(sums, want)):
        assert got.dtype == torch.float32 and got.shape == exp.shape, (i, got.shape)
        assert torch.isfinite(got).all(), f"section {i}: unwritten (poisoned) sums"
        torch.testing.assert_close(got.double().cpu(), exp.cpu(), rtol=1e-6, atol=1e-5,
                                   msg=lambda m, i=i: f"section {i}: {m}")
    return buffers, sums


# a transformer block's four at small widths (the bias + GELU's (P, 4C), the LayerNorm's
# (3, P, C), the attention's (P, 3C), the first LayerNorm's (2, P, C)) and awkward ones
CASES = {
    "block": [(5, 44), (3, 4, 11), (3, 33), (2, 4, 11)],
    "one": [(1, 1)],
    "primes": [(7, 13), (2, 3, 17)],
    "row tails": [(5, 40), (1, 9, 31), (3, 1, 8)],
    "five (two launches)": [(3, 8), (2, 5, 7), (6, 16), (1, 2), (4, 3, 5)],
    "nine (three launches)": [(p, d) for p, d in zip(range(1, 10), range(3, 30, 3))],
}


@pytest.mark.parametrize("case", list(CASES))
def test_sums_match_float64(case, device):
    _check(CASES[case], device, seed=len(case))


def test_no_rows_sum_to_zero(device):
    """A buffer of 0 rows (a launcher given no rows) sums to 0 beside the others."""
    buffers, sums = _check([(0, 12), (4, 12), (2, 0, 5)], device)
    assert len(sums) == 4 and (sums[0] == 0).all() and (sums[2] == 0).all() \
        and (sums[3] == 0).all()


def test_no_columns_and_no_buffers(device):
    assert ps.sum_partials([]) == ()
    sums = ps.sum_partials([torch.randn(3, 0, device=device)])
    assert len(sums) == 1 and sums[0].shape == (0,)


def test_sums_are_views_of_one_buffer_and_bit_identical_run_to_run(device):
    buffers = _buffers(CASES["block"], device, seed=3)
    first = ps.sum_partials(buffers)
    again = ps.sum_partials(buffers)
    storage = {s.untyped_storage().data_ptr() for s in first}
    assert len(storage) == 1
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_bad_buffers_are_refused(device):
    with pytest.raises(ValueError, match=r"buffers\[1\]"):
        ps.sum_partials([torch.randn(2, 3, device=device),
                         torch.randn(3, 2, device=device).t()])
    with pytest.raises(ValueError, match=r"buffers\[0\]"):
        ps.sum_partials([torch.randn(2, 3, device=device, dtype=torch.float64)])


@pytest.mark.parametrize("M", [0, 1, 37])
def test_launchers_unreduced_partials_reduce_to_their_sums(M, device):
    """The backward launchers' reduce=False hands over the per-program partial sums their
    reduce=True sums: the LayerNorm's (2 or 3, programs, D), bias + GELU's and the fused MLP
    backward's (rows, D); with no rows, buffers of 0 rows."""
    from fastmae.kernels import bias_gelu, gelu_matmul, layer_norm
    g = torch.Generator().manual_seed(M)
    D, K = 40, 24

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device)

    x, dy, ds, w, b = randn(M, D), randn(M, D), randn(M, D), randn(D), randn(D)
    _, _, mean, rstd = layer_norm.layer_norm_fwd(x, w, b, 1e-5, torch.float32)
    for bb in (False, True):
        dx, dwb = layer_norm.layer_norm_bwd(dy, x, w, mean, rstd, ds=ds, branch_bias_grad=bb)
        dx2, part = layer_norm.layer_norm_bwd(dy, x, w, mean, rstd, ds=ds, branch_bias_grad=bb,
                                              reduce=False)
        assert part.shape[0] == (3 if bb else 2) and part.shape[2] == D and torch.equal(dx, dx2)
        assert (M > 0) == (part.shape[1] > 0)
        torch.testing.assert_close(torch.stack(ps.sum_partials([part])), dwb, rtol=1e-6,
                                   atol=1e-5)
    db = bias_gelu.bias_gelu_bwd(dy, x, b, torch.float32)[1]
    part = bias_gelu.bias_gelu_bwd(dy, x, b, torch.float32, reduce=False)[1]
    assert part.dim() == 2 and part.shape[1] == D and (M > 0) == (part.shape[0] > 0)
    torch.testing.assert_close(ps.sum_partials([part])[0], db, rtol=1e-6, atol=1e-5)
    dm, w2 = randn(M, K), randn(K, D)
    db = gelu_matmul.matmul_gelu_bwd(dm, w2, x, b, torch.float32)[1]
    part = gelu_matmul.matmul_gelu_bwd(dm, w2, x, b, torch.float32, reduce=False)[1]
    assert part.dim() == 2 and part.shape[1] == D and (M > 0) == (part.shape[0] > 0)
    torch.testing.assert_close(ps.sum_partials([part])[0], db, rtol=1e-6, atol=1e-4)


@pytest.mark.cuda
def test_a_vit_blocks_buffers_on_gpu():
    """The GPU tiling (launch_config) on a ViT-B/16 block's buffers at batch 256 as an H100 /
    H200 sizes them, against float64 sums."""
    shapes = [(200, 3072), (3, 396, 768), (3, 396, 768), (256, 2304), (3, 792, 512), (7, 13)]
    _check(shapes, "cuda", seed=11)


def test_a_buffer_of_one_or_four_dims_is_refused(device):
    with pytest.raises(ValueError, match=r"buffers\[1\] must be \(P, D\) or \(S, P, D\)"):
        ps.sum_partials([torch.randn(2, 3, device=device), torch.randn(4, device=device)])
    with pytest.raises(ValueError, match=r"buffers\[0\] must be \(P, D\) or \(S, P, D\)"):
        ps.sum_partials([torch.randn(1, 2, 3, 4, device=device)])
