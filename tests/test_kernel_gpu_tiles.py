"""The tilings a GPU launches the row kernels and the patch embedding with, through the
interpreter: each launcher chooses its tiles as on a GPU (its module's ``interpreting`` answers
False while it chooses; the kernels still run through the interpreter), at MAE's widths with
partial row tiles, and must give the interpreter's own tiling's results: the same bits where a
row's or an element's arithmetic does not depend on the tiling, and within fp32 rounding where
sums run over rows (the weight and bias gradients, the loss). The interpreter's small tiles are
what the other kernel tests run; the GPU's were run only by the CUDA tests before.
(attention and the fused MLP matmuls: test_every_gpu_tiling_through_the_interpreter and
test_every_gpu_configuration_through_the_interpreter in their own files.)"""
import contextlib

import pytest
import torch

from fastmae import testing as T
from fastmae.kernels import bias_gelu as bg
from fastmae.kernels import layer_norm as ln
from fastmae.kernels import mse_loss
from fastmae.kernels import partial_sums
from fastmae.kernels import patch_embed as pe

pytestmark = pytest.mark.interpreter(
    covered_by="each kernel's cuda tests and the parity steps of fastmae check and bench")

ROWS = 19  # a prime: a partial last row tile under any tiling


@contextlib.contextmanager
def _choosing_as_on_a_gpu(module):
    """Within it, ``module``'s launchers choose their tiles as on a GPU (its interpreting()
    answers False); the kernels still run through the interpreter."""
    with pytest.MonkeyPatch.context() as gpu_choices:
        gpu_choices.setattr(module, "interpreting", lambda: False)
        yield


def _both_tilings(monkeypatch, launches, module, run):
    """run() under the interpreter's tiles, then under the GPU's: (theirs, ours), each a tuple
    of outputs; the meta-parameters must differ (the GPU's were taken)."""
    monkeypatch.setattr(module, "_empty", T.poisoned_empty)
    launches.clear()
    interpreter = run()
    interpreter_meta = list(launches)
    launches.clear()
    with _choosing_as_on_a_gpu(module):
        gpu = run()
    assert launches != interpreter_meta, "the GPU's tiling was not taken"
    return gpu, interpreter


def _assert_same(gpu, interpreter, summed=()):
    """Bit-identical outputs, except those at the indices in ``summed`` (sums over rows, which
    the tilings add in other orders): within 1e-5 relative."""
    for i, (a, b) in enumerate(zip(gpu, interpreter)):
        assert a.dtype == b.dtype and a.shape == b.shape, i
        assert not b.isnan().any(), i
        if i in summed:
            assert T.rel_err(a, b.double()) <= 1e-5, i
        else:
            assert torch.equal(a, b), f"output {i}: {(a.float() - b.float()).abs().max().item()}"


@pytest.mark.parametrize("D", [40, 512, 768])
def test_layer_norm(D, monkeypatch, launches):
    """The fused residual add + LayerNorm forward (a row tile of 2048 elements, 4 to 8 warps)
    and its backward (16 elements a thread along the row, 1 warp at 512 columns)."""
    case = T.layer_norm_case(ROWS, D, residual=True, seed=D)
    g = torch.Generator().manual_seed(D)
    branch_bias = torch.randn(D, generator=g)
    dy, ds = torch.randn(ROWS, D, generator=g), torch.randn(ROWS, D, generator=g)

    def run():
        y, s, mean, rstd = ln.layer_norm_fwd(case["x"], case["weight"], case["bias"],
                                             case["eps"], torch.float32,
                                             residual=case["residual"], branch_bias=branch_bias)
        dx, dwb = ln.layer_norm_bwd(dy, s, case["weight"], mean, rstd, ds=ds,
                                    branch_bias_grad=True)
        return y, s, mean, rstd, dx, dwb

    _assert_same(*_both_tilings(monkeypatch, launches, ln, run), summed=(5,))


@pytest.mark.parametrize("D", [40, 3072])
def test_bias_gelu(D, monkeypatch, launches):
    """bias + GELU forward (columns in blocks of up to 1024) and backward (its bias gradient's
    per-program partial sums over the rows of one wave)."""
    g = torch.Generator().manual_seed(D)
    x, bias, dy = (torch.randn(*s, generator=g) for s in ((ROWS, D), (D,), (ROWS, D)))

    def run():
        y = bg.bias_gelu_fwd(x, bias, torch.float32)
        return (y,) + bg.bias_gelu_bwd(dy, x, bias)

    _assert_same(*_both_tilings(monkeypatch, launches, bg, run), summed=(2,))


@pytest.mark.parametrize("norm_pix", [True, False])
def test_masked_mse_loss(norm_pix, monkeypatch, launches):
    """The loss at MAE's patch size 16 with 3 channels (4 patches a program on a GPU)."""
    g = torch.Generator().manual_seed(5)
    N, C, H, W, p = 3, 3, 48, 80, 16  # a 3 x 5 grid: 45 patches, not a multiple of 4
    imgs = torch.randn(N, C, H, W, generator=g)
    pred = torch.randn(N, 15, p * p * C, generator=g)
    mask = (torch.rand(N, 15, generator=g) < 0.75).float()

    def run():
        loss, grad = mse_loss.masked_mse_fwd(imgs, pred, mask, p, norm_pix, True)
        return loss.reshape(1), grad

    _assert_same(*_both_tilings(monkeypatch, launches, mse_loss, run), summed=(0,))


def test_partial_sums(monkeypatch, launches):
    """The one-launch reduction of a block's partial-sum buffers (32 x 64 tiles on a GPU)."""
    g = torch.Generator().manual_seed(6)
    buffers = [torch.randn(*s, generator=g) for s in ((ROWS, 768), (3, 11, 40), (5, 3072))]

    def run():
        return torch.cat(partial_sums.sum_partials(buffers)),

    gpu, interpreter = _both_tilings(monkeypatch, launches, partial_sums, run)
    _assert_same(gpu, interpreter, summed=(0,))
    want = torch.cat([buffers[0].double().sum(0), *buffers[1].double().sum(1),
                      buffers[2].double().sum(0)])
    assert T.rel_err(gpu[0], want) <= 1e-6


def _pe_gpu_configs():
    """The patch embedding's three autotuned kernels' GPU configurations, by kernel."""
    with _choosing_as_on_a_gpu(pe):
        return {pe._patch_embed_fwd: pe._fwd_configs(),
                pe._patch_embed_bwd_weight: pe._bwd_w_configs(),
                pe._patch_embed_bwd_imgs: pe._bwd_x_configs()}


@pytest.mark.parametrize("kernel", ["_patch_embed_fwd", "_patch_embed_bwd_weight",
                                    "_patch_embed_bwd_imgs"])
def test_patch_embed(kernel, monkeypatch, launches):
    """Each GPU configuration of one of the visible-patch embedding's kernels in turn (128 x 128
    tiles and smaller), with the GPU's weight-gradient split and patch gather tiles, at p = 16,
    C = 3 (K = 768), D = 136: the interpreter's results, the matmuls within fp32 rounding
    (their K steps add in other orders), the gathered patches (a copy) the same bits."""
    tuned = getattr(pe, kernel)
    case = T.patch_embed_case(3, 3, 48, 80, 16, 136, seed=8)
    ids_keep = case["ids_keep"]
    grad_out = torch.randn(3, ids_keep.shape[1], 136, generator=torch.Generator().manual_seed(10))

    def run():
        if kernel == "_patch_embed_fwd":
            return (pe.patch_embed_visible_fwd(case["imgs"], case["weight"], case["bias"],
                                               case["pos_embed"], ids_keep, torch.float32),
                    pe.gather_visible_patches(case["imgs"], ids_keep, 16, torch.float32))
        grads = pe.patch_embed_visible_bwd(
            grad_out, case["imgs"], case["weight"], ids_keep,
            need_imgs_grad=kernel == "_patch_embed_bwd_imgs",
            need_weight_grad=kernel == "_patch_embed_bwd_weight")
        return tuple(g for g in grads if g is not None)

    monkeypatch.setattr(pe, "_empty", T.poisoned_empty)
    interpreter = run()  # the interpreter's configuration, split and gather tiles
    for config in _pe_gpu_configs()[tuned]:
        monkeypatch.setattr(tuned, "configs", [config])
        monkeypatch.setattr(tuned, "cache", {})
        launches.clear()
        with _choosing_as_on_a_gpu(pe):
            gpu = run()
        name = f"{kernel} {config}"
        assert config.kwargs.items() <= launches[0][1].items(), name
        for i, (a, b) in enumerate(zip(gpu, interpreter)):
            assert not b.isnan().any() and a.shape == b.shape, (name, i)
            bound = 0 if kernel == "_patch_embed_fwd" and i == 1 else 1e-5
            assert T.rel_err(a, b.double()) <= bound, (name, i)
