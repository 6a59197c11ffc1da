"""The work a launch must do (kernels/_common.py: launch_work, reported to OBSERVER): bytes every
tensor argument read or written once, each distinct tensor once, gathers at the rows they
touch, and the FLOPs of the kernels that multiply matrices -- counted by hand here at awkward
shapes, under the interpreter. Last, on the direct launch path (no interpreter, stand-in
kernels), one report per launch the C launcher gets, in order."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastmae.kernels import _common, attention, gelu_matmul, layer_norm, masking, patch_embed

F32 = 4
# the counts are made on CPU tensors through the interpreter; a GPU run pairs each launch of a
# profiled step with its count (tests/test_bench_cli.py, cuda)
INTERPRETED = pytest.mark.interpreter(
    covered_by="test_profiled_fastmae_step_pairs_every_launch_with_its_work")


@pytest.fixture
def observed(monkeypatch):
    """The launches reported while a test runs: [(kernel name, bytes, FLOPs)]."""
    records = []
    monkeypatch.setattr(_common, "OBSERVER", lambda *record: records.append(record))
    return records


@pytest.fixture
def allocations(monkeypatch):
    """Shapes the layer norm launcher allocates (its partial-sum buffer's program count)."""
    shapes = []
    real = layer_norm._empty

    def recording(shape, dtype, device):
        shapes.append(tuple(shape))
        return real(shape, dtype, device)
    monkeypatch.setattr(layer_norm, "_empty", recording)
    return shapes


@INTERPRETED
def test_partial_sums_count_each_buffer_and_the_sums_once(observed):
    """The buffers a launch sums (the first passed again for the unused ones) and its sums; six
    buffers take two launches, each reporting its own."""
    from fastmae.kernels import partial_sums
    a, b = torch.randn(3, 5), torch.randn(2, 4, 7)
    partial_sums.sum_partials([a, b])
    assert observed == [("_sum_partials", F32 * (15 + 56 + 5 + 14), 0)]
    observed.clear()
    six = [torch.randn(2, 3) for _ in range(6)]
    partial_sums.sum_partials(six)
    assert observed == [("_sum_partials", F32 * 4 * (6 + 3), 0),
                        ("_sum_partials", F32 * 2 * (6 + 3), 0)]


def test_no_observer_by_default():
    assert _common.OBSERVER is None


@INTERPRETED
def test_layer_norm_forward_counts_a_placeholder_once(observed):
    M, D = 7, 40
    x, w, b = torch.randn(M, D), torch.randn(D), torch.randn(D)
    layer_norm.layer_norm_fwd(x, w, b, 1e-6, torch.float32)
    # x and y, passed again for the unused residual and s; the bias again for the branch bias
    assert observed == [("_layer_norm_fwd", F32 * (2 * M * D + 2 * D + 2 * M), 0)]
    observed.clear()
    r, bb = torch.randn(M, D), torch.randn(D)
    layer_norm.layer_norm_fwd(x, w, b, 1e-6, torch.float32, residual=r, branch_bias=bb)
    assert observed == [("_layer_norm_fwd", F32 * (4 * M * D + 3 * D + 2 * M), 0)]


@INTERPRETED
def test_layer_norm_backward_counts_an_expanded_gradient_by_its_distinct_elements(
        observed, allocations):
    M, D = 13, 40
    x, w = torch.randn(M, D), torch.randn(D)
    mean, rstd = torch.randn(M), torch.rand(M) + 0.5
    dy = torch.randn(D).expand(M, D)  # stride 0 along the rows: D distinct elements
    ds = torch.randn(M, D)
    layer_norm.layer_norm_bwd(dy, x, w, mean, rstd, ds=ds, dx2_dtype=torch.float64,
                              branch_bias_grad=True)
    (n_part, programs, d), = [s for s in allocations if len(s) == 3]
    assert (n_part, d) == (3, D) and programs > 1
    want = (F32 * (D + M * D + D + 2 * M + M * D + M * D) + 8 * M * D  # dy x w mean rstd ds dx dx2
            + F32 * n_part * programs * D)
    assert observed == [("_layer_norm_bwd", want, 0)]


@INTERPRETED
@pytest.mark.parametrize("strategy", ["fused", "fused_q", "split"])
def test_attention_counts_its_products_and_only_the_tensors_it_touches(
        observed, monkeypatch, strategy):
    monkeypatch.setenv("FASTMAE_ATTN_BWD", strategy)
    B, H, N, d = 2, 3, 11, 16
    q, k, v = (torch.randn(B, H, N, d) for _ in range(3))
    o, lse = attention.attention_fwd(q, k, v, 0.25)
    attention.attention_bwd(torch.randn(B, H, N, d), q, k, v, o, lse, 0.25)
    t, row = F32 * B * H * N * d, F32 * B * H * N  # a (B, H, N, d) tensor; lse
    product = 2 * B * H * N * N * d
    want = [("_attn_fwd", 4 * t + row, 2 * product)]  # q k v o, lse
    if strategy == "fused":  # q k v o do dq dk dv, lse (passed again for the unused stats)
        want.append(("_attn_bwd_dkdv", 8 * t + row, 5 * product))
    elif strategy == "fused_q":  # q k v o do dq dk dv, lse (passed again for the unused sums)
        want.append(("_attn_bwd_fused_q", 8 * t + row, 5 * product))
    else:  # dQ: q k v o do dq, lse, the (lse, delta) stats; dK-dV: q k v do dk dv, the stats
        want += [("_attn_bwd_dq", 6 * t + 3 * row, 3 * product),
                 ("_attn_bwd_dkdv", 6 * t + 2 * row, 4 * product)]
    assert observed == want


@INTERPRETED
def test_patch_embedding_reads_the_visible_patches_only(observed):
    N, C, Hi, W, p, D = 2, 3, 24, 16, 8, 40
    L, keep = (Hi // p) * (W // p), 2
    K, M = C * p * p, N * keep
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(N, C, Hi, W, generator=g)
    weight, bias = torch.randn(D, C, p, p, generator=g), torch.randn(D, generator=g)
    pos = torch.randn(1, 1 + L, D, generator=g)
    ids_keep = torch.stack([torch.randperm(L, generator=g)[:keep] for _ in range(N)])
    out = patch_embed.patch_embed_visible_fwd(imgs, weight, bias, pos, ids_keep, torch.float32)
    grad = torch.randn_like(out)
    patch_embed.patch_embed_visible_bwd(grad, imgs, weight, ids_keep, True)
    patches, ids = F32 * M * K, 8 * M
    fwd = patches + F32 * (D * K + D + (1 + L) * D) + ids + F32 * M * D
    assert observed[0] == ("_patch_embed_fwd", fwd, 2 * M * D * K)
    (name, nbytes, flops), = [r for r in observed if r[0] == "_patch_embed_bwd_weight"]
    split = (nbytes - (F32 * M * D + patches + ids)) // (F32 * D * K)  # its (split, D, K) partials
    assert split >= 1 and nbytes == F32 * M * D + patches + ids + split * F32 * D * K
    assert flops == 2 * M * D * K
    # the visible patches' gradient (a product), then the removed ones' zeros (nothing read)
    removed = N * (L - keep)
    assert [r for r in observed if r[0] == "_patch_embed_bwd_imgs"] == [
        ("_patch_embed_bwd_imgs", F32 * M * D + F32 * D * K + ids + patches, 2 * M * D * K),
        ("_patch_embed_bwd_imgs", 8 * removed + F32 * removed * K, 0)]


@INTERPRETED
def test_fused_mlp_matmuls_count_their_products(observed):
    M, N, K = 13, 24, 40
    a, w, bias = torch.randn(M, K), torch.randn(N, K), torch.randn(N)
    f, g = gelu_matmul.matmul_bias_gelu(a, w, bias, torch.float32)
    assert observed == [("_matmul_bias_gelu", F32 * (M * K + N * K + N + 2 * M * N), 2 * M * N * K)]
    observed.clear()
    dm, w2 = torch.randn(M, K), torch.randn(K, N)
    gelu_matmul.matmul_gelu_bwd(dm, w2, f, bias, torch.float32)
    (name, nbytes, flops), = observed
    parts = nbytes - F32 * (M * K + K * N + M * N + N + M * N)  # dm w f bias df, then partials
    assert name == "_matmul_gelu_bwd" and flops == 2 * M * N * K
    assert parts > 0 and parts % (F32 * N) == 0


@INTERPRETED
def test_token_gather_reads_the_kept_rows_only(observed):
    N, L, D, keep = 2, 9, 40, 3
    x = torch.randn(N, L, D)
    ids_keep = torch.stack([torch.randperm(L)[:keep] for _ in range(N)])
    masking.gather_tokens(x, ids_keep)
    assert observed == [("_gather_tokens", F32 * N * keep * D + 8 * N * keep + F32 * N * keep * D, 0)]


CHECK = r"""
import json, os, sys
os.environ.pop("TRITON_INTERPRET", None)
import torch
from fastmae.testing import use_stand_in_kernels
CALLS = []
use_stand_in_kernels(lambda kernel, call_args: CALLS.append(kernel.name))
import fastmae, fastmae.backend
fastmae.backend.interpreter_on = lambda: True  # the "triton" backend on CPU tensors
from fastmae.kernels import _common
from fastmae.model import _factory
OBSERVED = []
_common.OBSERVER = lambda name, nbytes, flops: OBSERVED.append(name)
tuned_direct = []
_launch = _common._TunedDirect.launch
def counted(self, *args):
    went = _launch(self, *args)
    tuned_direct.append(went)
    return went
_common._TunedDirect.launch = counted
for mlp, attn in (("fused", "fused"), ("split", "split")):
    os.environ["FASTMAE_MLP"], os.environ["FASTMAE_ATTN_BWD"] = mlp, attn
    torch.manual_seed(0)
    model = _factory(64, 2, 2, 8, img_size=16, decoder_embed_dim=32, decoder_depth=1,
                     decoder_num_heads=1, norm_pix_loss=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    imgs = torch.randn(3, 3, 16, 16)
    for _ in range(3):  # the third step goes direct throughout
        with fastmae.use_backend("triton"), torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _, _ = model(imgs, 0.75)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
misses = sum(d.misses for d in _common._DIRECT.values())
print(json.dumps({"observed": OBSERVED, "calls": CALLS, "misses": misses,
                  "tuned_direct": sum(tuned_direct)}))
"""


def test_one_report_per_launch_on_the_direct_path():
    """Every launch the C launcher gets -- through Triton's path, fastmae's direct launch or an
    autotuned kernel's direct launch -- is reported once, in launch order."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(report["calls"]) > 100
    assert report["observed"] == report["calls"]
    assert report["misses"] < len(report["calls"]) // 2  # most went direct
    assert report["tuned_direct"] > 0
