"""The "triton" model's glue (model.py): each block's norms, biases, eps and attention scale
reach the fused ops, and the fused path runs only where calling the modules would compute the
same (hooks of every kind, subclasses, bias-free norms, an instance's patchify)."""
from functools import partial

import pytest
import torch
import torch.nn as nn

import fastmae
import fastmae.model
from fastmae.testing import rel_err
from test_model import randomized
from test_model_triton import _inputs, block_backend_gap, run, tiny

pytestmark = pytest.mark.interpreter(
    covered_by="tests/test_model_triton.py's cuda tests (the fused model against the reference "
               "on the GPU)")

# ------------------------------------------------- found by a second mutation audit of model.py

def _randomized(seed, **kw):
    """tiny() with every LayerNorm weight and bias, linear and conv bias, position table and
    token random (defaults of 1 and 0 hide a swapped or dropped argument), each norm with its
    own large eps and two attentions with their own scale."""
    m = randomized(tiny(seed=seed, **kw), seed + 100)
    for i, blk in enumerate(list(m.blocks) + list(m.decoder_blocks)):
        blk.norm1.eps, blk.norm2.eps = 0.05 + 0.1 * i, 0.3 + 0.1 * i
    m.norm.eps, m.decoder_norm.eps = 0.25, 0.4
    m.blocks[-1].attn.scale = 0.7
    if len(m.decoder_blocks):
        m.decoder_blocks[0].attn.scale = 0.2
    return m


def _against_float64_torch(m, imgs, noise, ratio=0.5):
    import copy

    got = run(m, "triton", imgs, noise, ratio)
    want = run(copy.deepcopy(m).double(), "torch", imgs.double(), noise, ratio)
    assert torch.equal(got[2], want[2].to(got[2].dtype))
    assert rel_err(got[0], want[0]) < 1e-5 and rel_err(got[1], want[1]) < 1e-5
    assert got[3].keys() == want[3].keys()
    for name in want[3]:
        assert rel_err(got[3][name], want[3][name]) < 1e-4, name


@pytest.mark.parametrize("decoder_depth", [2, 0], ids=["decoder_depth=2", "decoder_depth=0"])
def test_triton_model_plumbs_each_norm_bias_eps_and_scale(decoder_depth):
    """Random norms, biases and tables, an eps per norm, an attention scale of its own: the
    fused model (each block's parameters, the hand-off between blocks and into the final norm;
    with no decoder block, the final norm alone) equals the float64 "torch" model, loss, pred
    and every gradient; so does one block called on its own (Block.forward)."""
    m = _randomized(21, decoder_depth=decoder_depth, decoder_num_heads=2)
    imgs, noise = _inputs(21)
    _against_float64_torch(m, imgs, noise)
    assert block_backend_gap(m.blocks[-1], seed=22) < 1e-5


class _ShiftedBlock(fastmae.model.Block):
    """A Block subclass with its own forward: the stack must call it. (A shift that differs
    across features: the LayerNorm after the last block would remove an even one.)"""

    def forward(self, x):
        return super().forward(x) + torch.linspace(-1, 1, x.shape[-1])


def _hooked_cases():
    def hook(name, kind):
        def apply(m, fired):
            mod = m.get_submodule(name)
            if kind == "pre":
                mod.register_forward_pre_hook(lambda *a: fired.append(name))
            else:
                mod.register_full_backward_hook(lambda *a: fired.append(name))
        return apply

    def subclass_block(m, fired):
        blk = _ShiftedBlock(32, 2, 2.0, norm_layer=partial(nn.LayerNorm, eps=1e-6))
        blk.load_state_dict(m.decoder_blocks[0].state_dict())
        m.decoder_blocks[0] = blk

    def norm_subclass(m, fired):
        norm = m.blocks[0].norm2
        m.blocks[0].norm2 = _ShiftedNorm(64, eps=norm.eps)
        m.blocks[0].norm2.load_state_dict(norm.state_dict())

    return {"forward pre hook on attn.proj": hook("blocks.0.attn.proj", "pre"),
            "forward pre hook on mlp.fc2": hook("blocks.1.mlp.fc2", "pre"),
            "backward hook on norm2": hook("decoder_blocks.0.norm2", "backward"),
            "forward pre hook on the final norm": hook("decoder_norm", "pre"),
            "Block subclass": subclass_block,
            "LayerNorm subclass as norm2": norm_subclass}


class _ShiftedNorm(nn.LayerNorm):
    def forward(self, x):
        return super().forward(x) - 0.5


@pytest.mark.parametrize("case", list(_hooked_cases()))
def test_fused_path_calls_each_hooked_or_subclassed_module(case):
    """A hook of any kind (forward pre, full backward) on any submodule a fused block reads,
    or a subclass of Block or LayerNorm, makes the stack call the modules: "triton" gives the
    "torch" backend's result and fires the same hooks."""
    imgs, noise = _inputs(23)
    fired = {}
    out = {}
    for backend in ("triton", "torch"):
        m = _randomized(23)
        fired[backend] = []
        _hooked_cases()[case](m, fired[backend])
        out[backend] = run(m, backend, imgs, noise)
    assert fired["triton"] == fired["torch"]
    a, b = out["triton"], out["torch"]
    assert rel_err(a[0], b[0]) < 1e-5 and rel_err(a[1], b[1]) < 1e-5
    for name in b[3]:
        assert rel_err(a[3][name], b[3][name]) < 1e-4, name


@pytest.mark.parametrize("kind", ["forward_pre", "forward"])
def test_global_hooks_fire_on_every_module_under_triton(kind):
    """A global module hook (register_module_forward_pre_hook / _forward_hook) fires for every
    module under "triton" as under "torch", the Linear layers of each Mlp included."""
    from collections import Counter

    imgs, noise = _inputs(24)
    register = getattr(torch.nn.modules.module, f"register_module_{kind}_hook")
    counts = {}
    for backend in ("triton", "torch"):
        fired = []
        handle = register(lambda mod, *a: fired.append(type(mod).__name__))
        try:
            run(_randomized(24), backend, imgs, noise)
        finally:
            handle.remove()
        counts[backend] = Counter(fired)
    assert counts["triton"] == counts["torch"]


def test_layer_norm_without_bias_runs_under_triton():
    """A block norm without a bias (nn.LayerNorm(bias=False), swapped in after init, which, as
    official's, sets every LayerNorm's bias) cannot run fused: the model calls it."""
    if "bias" not in nn.LayerNorm.__init__.__code__.co_varnames:
        pytest.skip("nn.LayerNorm has no bias argument in this torch")
    m = _randomized(25)
    norm = m.blocks[0].norm2
    m.blocks[0].norm2 = nn.LayerNorm(64, eps=norm.eps, bias=False)
    m.blocks[0].norm2.weight.data.copy_(norm.weight.data)
    imgs, noise = _inputs(25)
    a, b = run(m, "triton", imgs, noise), run(m, "torch", imgs, noise)
    assert rel_err(a[0], b[0]) < 1e-5
    for name in b[3]:
        assert rel_err(a[3][name], b[3][name]) < 1e-4, name


def test_forward_loss_takes_its_target_from_an_instance_patchify():
    """model.patchify set on the instance makes the target, as a subclass's does."""
    imgs, noise = _inputs(26)
    m = tiny(seed=26)
    with fastmae.use_backend("triton"):
        plain = m(imgs, noise=noise)[0]
    official = m.patchify
    m.patchify = lambda x: official(x).flip(-1)
    with fastmae.use_backend("triton"):
        loss, pred, mask = m(imgs, noise=noise)
    assert rel_err(loss, fastmae.ops.patch_mse_loss(m.patchify(imgs), pred, mask, True)) < 1e-6
    assert rel_err(loss, plain) > 1e-3


# The model's fused-path ops: under "torch" none may run (each would dispatch to the reference's
# composition, which agrees with the modules to rounding, so only the calls show it)
_FUSED_PATH_OPS = ("masking_indices", "patch_embed_visible", "cast_block_weights",
                   "transformer_block", "layer_norm", "add_layer_norm", "bias_gelu")


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "fp16_autocast"])
def test_torch_backend_runs_the_modules_not_the_fused_path(autocast, monkeypatch):
    """Under "torch" the model runs the official algorithm module by module: no fused-path op
    is called, by the model or by a block or an MLP called on its own. Under "triton" each is
    but the plain LayerNorm (the final norm's way only with no block before it), so the count
    sees the model's calls."""
    import fastmae.ops as ops

    calls = []
    for name in _FUSED_PATH_OPS:
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, _name=name, **k:
                            calls.append(_name) or _real(*a, **k))
    m = tiny(seed=31)
    imgs, noise = _inputs(31)
    x = torch.randn(2, 5, 64)
    for backend in ("torch", "triton"):
        calls.clear()
        with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
            run(m, backend, imgs, noise)
            with fastmae.use_backend(backend):
                m.blocks[0](x).sum().backward()
                m.blocks[0].mlp(x).sum().backward()
        if backend == "torch":
            assert calls == [], calls
        else:
            assert set(calls) == set(_FUSED_PATH_OPS) - {"layer_norm"}, calls
