"""fastmae.kernels.masking against the reference: masking indices, the token gather and its
backward (scatter_tokens). Indices and copies are compared exactly (torch.equal)."""
import pytest
import torch

from fastmae import reference as ref
from fastmae.testing import (assert_guards_intact, distinct_noise, guarded_empty, masking_case,
                             poisoned_empty)


@pytest.fixture
def kmask(monkeypatch):
    """The kernel module with its allocator patched to hand out poisoned buffers, so an element
    a kernel forgets to write fails the comparison."""
    from fastmae.kernels import masking

    monkeypatch.setattr(masking, "_empty", poisoned_empty)
    return masking


def _gen(seed, device):
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _assert_indices_equal(got, want):
    for name, a, b in zip(("ids_keep", "mask", "ids_restore"), got, want):
        assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} != {b.dtype}"
        assert a.is_contiguous(), name
        assert torch.equal(a, b), f"{name} differs from the reference"


# (N, L, keeps): batch 1, L = 1, primes, the ViT grid 196, 257 and 1024 once
@pytest.mark.parametrize("N, L, keeps", [
    (1, 1, (0, 1)),
    (2, 7, (0, 1, 3, 6, 7)),
    (3, 49, (12, 48)),
    (2, 196, (49,)),
    (1, 257, (64,)),
    (1, 1024, (256,)),
])
def test_masking_indices_exact(kmask, device, N, L, keeps):
    noise = distinct_noise(N, L, _gen(N * 1000 + L, device), device)
    for keep in keeps:
        got = kmask.masking_indices(noise, keep)
        assert got[0].shape == (N, keep)
        _assert_indices_equal(got, ref.masking_indices(noise, keep))
        again = kmask.masking_indices(noise, keep)
        assert all(torch.equal(a, b) for a, b in zip(got, again))


def test_masking_indices_any_sign_and_strides(kmask, device):
    """Negative and large noise values keep their order; noise may be a strided view."""
    g = _gen(7, device)
    noise = torch.randn(37, 5, generator=g, device=device) * 1e3  # (L, N) storage
    noise = noise.t()  # (5, 37), strides (1, 5)
    got = kmask.masking_indices(noise, 11)
    _assert_indices_equal(got, ref.masking_indices(noise, 11))


def _stable_masking_indices(noise, keep):
    """The reference's masking_indices with a stable argsort: ties broken by index."""
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)
    mask = (ids_restore >= keep).to(torch.float32)
    return ids_shuffle[:, :keep].contiguous(), mask, ids_restore


@pytest.mark.parametrize("L", [2, 13, 16, 37])
def test_masking_indices_signed_zeros_tie_as_torch_sorts_them(kmask, device, L):
    """-0.0 and +0.0 are equal to torch's sort (a tie, broken by index): the kernel's key must
    not order -0.0 first. Rows mix both zeros with other duplicated values, negatives and
    random ones; every keep is checked exactly against a stable argsort, and for L <= 16 (where
    torch's CPU sort is stable) against the reference itself."""
    g = _gen(L, device)
    pool = torch.tensor([0.0, -0.0, 0.0, -0.0, 0.25, -0.5], device=device)
    N = 4
    noise = pool[torch.randint(0, len(pool), (N, L), generator=g, device=device)]
    noise[0] = torch.where(torch.arange(L, device=device) % 2 == 0, -0.0, 0.0)  # -0, +0, ...
    noise[1, :2] = torch.tensor([0.0, -0.0], device=device)
    noise[3] = torch.where(torch.rand(L, generator=g, device=device) < 0.5, noise[3],
                           torch.rand(L, generator=g, device=device))
    assert (noise.signbit() & (noise == 0)).any() and (~noise.signbit() & (noise == 0)).any()
    for keep in sorted({1, L // 2, L - 1, L}):
        got = kmask.masking_indices(noise, keep)
        _assert_indices_equal(got, _stable_masking_indices(noise, keep))
        if L <= 16 and noise.device.type == "cpu":
            _assert_indices_equal(got, ref.masking_indices(noise, keep))


@pytest.mark.parametrize("L", [3, 13, 37])
def test_masking_indices_nans_sort_last_as_torch_sorts_them(kmask, device, L):
    """NaN noise of either sign (x86's 0/0 has the sign bit set) sorts after +inf, the NaNs tied
    (broken by index), as torch's sort orders them: a sign-set NaN was kept, ahead of -inf."""
    g = _gen(L + 100, device)
    nan = torch.tensor(float("nan"), device=device)
    pool = torch.stack([nan, -nan, torch.tensor(float("inf"), device=device),
                        torch.tensor(-float("inf"), device=device)])
    N = 3
    noise = torch.rand(N, L, generator=g, device=device)
    pick = torch.randint(0, 6, (N, L), generator=g, device=device)  # 4, 5: a random value
    noise = torch.where(pick < 4, pool[pick.clamp(max=3)], noise)
    noise[0, 0], noise[0, -1] = -nan, nan
    assert (noise.isnan() & noise.signbit()).any() and (noise.isnan() & ~noise.signbit()).any()
    for keep in sorted({1, L // 2, L - 1, L}):
        got = kmask.masking_indices(noise, keep)
        _assert_indices_equal(got, _stable_masking_indices(noise, keep))


@pytest.mark.parametrize("N, L, D, ratio", [
    (1, 1, 8, 0.0),
    (2, 7, 40, 0.75),
    (3, 49, 100, 0.75),
    (2, 16, 1280, 0.5),
    (3, 47, 8, 0.25),  # 105 kept rows: two row tiles of 64, the second partial
])
def test_gather_tokens_exact(kmask, device, N, L, D, ratio):
    case = masking_case(N, L, D, ratio, device=device, seed=L + D)
    x, noise = case["x"], case["noise"]
    keep = ref.keep_count(L, ratio)
    ids_keep, _, _ = kmask.masking_indices(noise, keep)
    out = kmask.gather_tokens(x, ids_keep)
    assert out.shape == (N, keep, D) and out.is_contiguous() and out.dtype == x.dtype
    assert torch.equal(out, ref.gather_tokens(x, ids_keep))
    assert torch.equal(out, kmask.gather_tokens(x, ids_keep))


def test_gather_tokens_strided_inputs(kmask, device):
    """x a transposed view and a column slice, ids_keep a slice of ids_shuffle (as official) and
    a transposed copy (stride N along keep: a kernel stepping 1 along it read other images')."""
    N, L, D, keep = 3, 13, 24, 5
    g = _gen(3, device)
    x_t = torch.randn(N, D, L, generator=g, device=device).transpose(1, 2)  # stride 1 along L
    x_s = torch.randn(N, L, D + 9, generator=g, device=device)[:, :, 4:4 + D]
    ids_shuffle = torch.argsort(distinct_noise(N, L, g, device), dim=1)
    ids_keep = ids_shuffle[:, :keep]
    assert not ids_keep.is_contiguous()
    ids_t = ids_keep.t().contiguous().t()
    assert ids_t.stride() == (1, N)
    for x in (x_t, x_s):
        for ids in (ids_keep, ids_t):
            assert torch.equal(kmask.gather_tokens(x, ids), ref.gather_tokens(x, ids_keep))


def test_masking_and_gather_store_nothing_outside_their_buffers(device, monkeypatch):
    """ids_keep, mask, ids_restore and the gathered and scattered tokens inside sentinels: the
    row tails (keep = 9 of L = 37 in a block of 64 lanes; 3 x 9 = 27 token rows in tiles) store
    nothing past their ends (an off-by-one there crashed the interpreter at best)."""
    from fastmae.kernels import masking

    buffers = []
    monkeypatch.setattr(masking, "_empty", guarded_empty(buffers))
    N, L, D, keep = 3, 37, 24, 9
    g = _gen(29, device)
    noise = distinct_noise(N, L, g, device)
    x = torch.randn(N, L, D, generator=g, device=device)
    got = masking.masking_indices(noise, keep)
    _assert_indices_equal(got, ref.masking_indices(noise, keep))
    ids_keep, _, ids_restore = got
    assert torch.equal(masking.gather_tokens(x, ids_keep), ref.gather_tokens(x, ids_keep))
    grad = torch.randn(N, keep, D, generator=g, device=device)
    back = masking.scatter_tokens(grad, ids_restore, keep)
    assert torch.equal(back.double(), _gather_grad_float64(N, L, D, ids_keep, grad))
    assert len(buffers) == 5
    assert_guards_intact(buffers)


def _gather_grad_float64(N, L, D, ids_keep, grad):
    x = torch.randn(N, L, D, dtype=torch.float64, device=grad.device, requires_grad=True)
    ref.gather_tokens(x, ids_keep).backward(grad.double())
    return x.grad


@pytest.mark.parametrize("N, L, D, ratio", [
    (1, 1, 8, 0.0),
    (2, 7, 40, 0.75),
    (3, 49, 100, 0.75),
    (1, 10, 8, 1.0),  # nothing kept: all zeros
])
def test_scatter_tokens_is_gather_backward(kmask, device, N, L, D, ratio):
    keep = ref.keep_count(L, ratio)
    g = _gen(L * 7 + D, device)
    ids_keep, _, ids_restore = kmask.masking_indices(distinct_noise(N, L, g, device), keep)
    grad = torch.randn(N, keep, D, generator=g, device=device) + 0.5
    out = kmask.scatter_tokens(grad, ids_restore, keep)
    assert out.shape == (N, L, D) and out.is_contiguous() and out.dtype == grad.dtype
    assert torch.equal(out.double(), _gather_grad_float64(N, L, D, ids_keep, grad))
    assert torch.equal(out, kmask.scatter_tokens(grad, ids_restore, keep))


def test_scatter_tokens_strided_grad(kmask, device):
    """An expanded (stride-0) and a sliced incoming gradient; ids_restore contiguous and a
    transposed copy (stride N along L)."""
    N, L, D, keep = 2, 11, 40, 4
    g = _gen(11, device)
    ids_keep, _, ids_restore = kmask.masking_indices(distinct_noise(N, L, g, device), keep)
    ids_t = ids_restore.t().contiguous().t()
    assert ids_t.stride() == (1, N)
    expanded = torch.randn(N, 1, D, generator=g, device=device).expand(N, keep, D)
    sliced = torch.randn(N, keep + 3, D, generator=g, device=device)[:, 1:1 + keep]
    for grad in (expanded, sliced):
        for ids in (ids_restore, ids_t):
            out = kmask.scatter_tokens(grad, ids, keep)
            assert torch.equal(out.double(), _gather_grad_float64(N, L, D, ids_keep, grad))


# ----------------------------------------------------------------------------- every dtype

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N, L, D", [(256, 196, 768), (5, 257, 1280), (3, 1024, 100)])
def test_masking_gather_scatter_cuda(kmask, dtype, N, L, D):
    """At the model's shapes."""
    _check_gather_scatter(kmask, dtype, N, L, D, "cuda")


@pytest.mark.interpreter(covered_by="test_masking_gather_scatter_cuda")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N, L, D", [(3, 49, 100), (1, 13, 40)])
def test_masking_gather_scatter_half_interpreted(kmask, dtype, N, L, D, interpreter_bf16):
    """fp16 and bf16 (the interpreter's bf16 mended) at small shapes."""
    _check_gather_scatter(kmask, dtype, N, L, D, "cpu")


def _check_gather_scatter(kmask, dtype, N, L, D, device):
    """The mask's indices, the kept tokens and their gradient's scatter: bit-exact in dtype."""
    case = masking_case(N, L, D, 0.75, dtype=dtype, device=device, seed=N + L)
    x, noise = case["x"], case["noise"]
    keep = ref.keep_count(L, 0.75)
    got = kmask.masking_indices(noise, keep)
    _assert_indices_equal(got, ref.masking_indices(noise, keep))
    ids_keep, _, ids_restore = got
    out = kmask.gather_tokens(x, ids_keep)
    assert out.dtype == dtype and torch.equal(out, ref.gather_tokens(x, ids_keep))
    grad = torch.randn(N, keep, D, generator=torch.Generator().manual_seed(L)).to(device, dtype)
    x_ = torch.zeros(N, L, D, device=device, dtype=dtype, requires_grad=True)
    ref.gather_tokens(x_, ids_keep).backward(grad)
    back = kmask.scatter_tokens(grad, ids_restore, keep)
    assert back.dtype == dtype and torch.equal(back, x_.grad)
