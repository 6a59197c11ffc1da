"""fastmae's direct launch (``kernels/_common.py``: ``launch``) hands Triton's C launcher the
compiled kernel and the arguments that Triton's own launch path (``JITFunction.run``) would.

Run by ``tests/test_direct_launch.py`` as a script in a subprocess, WITHOUT ``TRITON_INTERPRET``
(then ``@triton.jit`` gives real JITFunctions and the direct path is taken)::

    python tests/_launch_check.py

Nothing is compiled and nothing runs on a GPU: ``fastmae.testing.use_stand_in_kernels`` lets
Triton's Python launch path run up to the C launcher, caching a stand-in kernel per
specialization, whose ``run`` (the C launcher) records its call. Every launch of the scenarios
below is made twice: first through ``fn[grid](...)`` (what Triton does; for an autotuned
kernel, the autotuner's ``tuned[grid](...)``), then through fastmae's direct path, and the two
calls of the C launcher are compared: the same compiled kernel (Triton's
cache entry for that specialization), the same grid, stream, function and metadata, the same
argument objects; the direct call passes no launch metadata and no hooks (Triton's are empty).

Scenarios: a toy kernel whose arguments take every kind the key distinguishes (tensor dtypes and
alignment, ints equal to 1, divisible by 16 or not, past 32 bits, int or float in a float's
place, another option, a None where a tensor was, a callable grid, a launch hook); then tiny MAE
training steps under "triton" (fp32 and bf16 autocast; the fused, fused_tma (TMA descriptor
arguments) and split MLP; the attention backward's fused, fused_q and two-kernel ways; odd
shapes), and the launchers the model does not call on CPU tensors (token gather / scatter,
visible-patch embedding). The third of three identical steps
must launch every kernel directly. Last, an autotuned kernel's direct launch must stop while its
autotuner's cache is cleared or its configurations are replaced.

Prints one JSON line: launches compared, how many were direct, and per kernel.
"""
import collections
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton import knobs  # noqa: E402

from fastmae.testing import use_stand_in_kernels  # noqa: E402

CALLS = []
use_stand_in_kernels(lambda kernel, call_args: CALLS.append((kernel, call_args)))

import fastmae  # noqa: E402
import fastmae.backend  # noqa: E402
from fastmae.kernels import _common, masking, patch_embed  # noqa: E402
from fastmae.model import _factory  # noqa: E402

# the "triton" backend on CPU tensors without the interpreter: nothing is launched anyway
fastmae.backend.interpreter_on = lambda: True

COMPARED = collections.Counter()
DIRECT = collections.Counter()
TUNED_DIRECT = collections.Counter()  # the direct launches that launch_tuned made itself
LAST_TUNED = {}  # kernel name -> the last (_TunedDirect, grid, args, kwargs) launched directly
_direct_call = _common._DirectLaunch.__call__
_tuned_launch = _common._TunedDirect.launch


def _one_call():
    assert len(CALLS) == 1, f"{len(CALLS)} C-launcher calls for one launch"
    kernel, call_args = CALLS.pop()
    return kernel, call_args


def _assert_same_call(name, got_kernel, got, want_kernel, want):
    assert got_kernel is want_kernel, f"{name}: another compiled kernel than Triton's"
    assert got[:6] == want[:6], f"{name}: grid/stream/function/metadata {got[:6]} != {want[:6]}"
    assert got[6:9] == (None, None, None), f"{name}: launch metadata or hooks passed"
    assert not any(_common._hooked(h) for h in want[7:9]), f"{name}: Triton had hooks set"
    assert len(got) == len(want) and all(a is b for a, b in zip(got[9:], want[9:])), (
        f"{name}: other kernel arguments than Triton's")


def _shadowed(self, grid, args, kwargs):
    """Triton's own launch, then the direct one, of the same call: the C launcher's two calls
    compared."""
    CALLS.clear()
    self.fn[grid](*args, **kwargs)
    want_kernel, want = _one_call()
    misses = self.misses
    _direct_call(self, grid, args, kwargs)
    got_kernel, got = _one_call()
    name = self.fn.__name__
    COMPARED[name] += 1
    if self.misses == misses:  # went direct: compare what it passed with Triton's call
        DIRECT[name] += 1
        _assert_same_call(name, got_kernel, got, want_kernel, want)
    else:  # through Triton: the same call as Triton's own
        assert got_kernel is want_kernel and len(got) == len(want), name


def _shadowed_tuned(self, grid, args, kwargs):
    """The same for an autotuned kernel's direct launch (launch_tuned's _TunedDirect), against
    the autotuner's own launch; where it does not go direct, launch_tuned's full path follows
    (its launch compared by _shadowed)."""
    CALLS.clear()
    self.tuned[grid](*args, **kwargs)
    want_kernel, want = _one_call()
    if not _tuned_launch(self, grid, args, kwargs):
        return False
    got_kernel, got = _one_call()
    name = want_kernel.name
    COMPARED[name] += 1
    DIRECT[name] += 1
    TUNED_DIRECT[name] += 1
    LAST_TUNED[name] = (self, grid, args, kwargs)
    _assert_same_call(name, got_kernel, got, want_kernel, want)
    return True


_common._DirectLaunch.__call__ = _shadowed
_common._TunedDirect.launch = _shadowed_tuned


# ----------------------------------------------------------------------------- a toy kernel

@triton.jit
def _toy(X,  # (n,) any dtype
         Y,  # (n,) out, X's dtype
         n, alpha, BLOCK: tl.constexpr, SQUARE: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n)
    if SQUARE:
        x = x * x
    tl.store(Y + offs, x * alpha, mask=offs < n)


def _toy_cases():
    """Each call twice: the first specializes (through Triton), the second must go direct to
    the kernel Triton chose for it."""
    base = torch.randn(64)
    halves = torch.randn(64, dtype=torch.bfloat16)
    out = torch.empty(64)
    shifted, shifted_out = torch.randn(65)[1:], torch.empty(65)[1:]  # 64 each, 4-byte aligned
    cases = [
        ((base, out, 64, 0.5), dict(BLOCK=64, SQUARE=False)),
        ((base[1:], out[1:], 63, 0.5), dict(BLOCK=64, SQUARE=False)),  # 4-byte aligned, n odd
        ((shifted, shifted_out, 64, 0.5), dict(BLOCK=64, SQUARE=False)),  # only the alignment
        ((base, out, 1, 0.5), dict(BLOCK=64, SQUARE=False)),  # n == 1: Triton's constexpr
        ((base, out, 48, 2), dict(BLOCK=64, SQUARE=False)),  # an int in the float's place
        ((base, out, 48, 1), dict(BLOCK=64, SQUARE=False)),  # ... equal to 1: a constexpr
        ((base, out, 64, 0.25), dict(BLOCK=64, SQUARE=False)),  # another float: no new key
        ((base, out, 2**31 + 16, 0.5), dict(BLOCK=64, SQUARE=False)),  # a 64-bit int
        ((halves, halves, 64, 0.5), dict(BLOCK=64, SQUARE=True)),  # another dtype, constexpr
        ((base, out, 64, 0.5), dict(BLOCK=64, SQUARE=True)),
        ((base, out, 64, 0.5), dict(BLOCK=64, SQUARE=1)),  # an int where a bool was
    ]
    for args, kwargs in cases:
        for _ in range(2):
            _common.launch(_toy, (1,), *args, **kwargs)
    direct = _common._DIRECT[id(_toy)]
    keys = len(cases) - 1  # the two floats share one
    assert direct.misses == keys, f"toy: {direct.misses} misses for {keys} keys"
    compiled = {id(run.__self__) for run, _, _ in direct.kernels.values()}
    assert len(compiled) >= 6, f"toy: only {len(compiled)} distinct compiled kernels"

    # other patterns than the first call's go through Triton, each time
    misses = direct.misses
    _common.launch(_toy, (1,), base, None, 64, 0.5, BLOCK=64, SQUARE=False)  # None, not a tensor
    _common.launch(_toy, (1,), base, out, 64, base, BLOCK=64, SQUARE=False)  # a tensor, not a value
    _common.launch(_toy, (1,), base, out, 64, base, BLOCK=64, SQUARE=False)
    _common.launch(_toy, (1,), base, out, 64, 0.5, BLOCK=64, SQUARE=False, num_warps=2)  # option
    _common.launch(_toy, lambda meta: (1,), base, out, 64, 0.5, BLOCK=64, SQUARE=False)
    assert direct.misses == misses + 5, "another argument pattern went direct"
    assert len(direct.kernels) == keys, "a key holding a tensor was kept"

    seen = []
    knobs.runtime.launch_enter_hook.add(seen.append)
    try:
        _common.launch(_toy, (1,), base, out, 64, 0.5, BLOCK=64, SQUARE=False)
    finally:
        knobs.runtime.launch_enter_hook.remove(seen.append)
    assert direct.misses == misses + 6, "a launch with a launch hook set went direct"
    # each launch ran twice (Triton's, then the path under test): the hook saw both
    assert len(seen) == 2, f"the launch hook was called {len(seen)} times"
    _common.launch(_toy, (1,), base, out, 64, 0.5, BLOCK=64, SQUARE=False)
    assert direct.misses == misses + 6, "a launch after the hook was removed did not go direct"


# ----------------------------------------------------------------------------- model steps

def _model_steps(dtype, img_size, mlp, attn_bwd):
    os.environ["FASTMAE_MLP"], os.environ["FASTMAE_ATTN_BWD"] = mlp, attn_bwd
    torch.manual_seed(0)
    model = _factory(64, 2, 2, 8, img_size=img_size, decoder_embed_dim=32, decoder_depth=1,
                     decoder_num_heads=1, norm_pix_loss=True)  # head dims 32: the kernels
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    imgs = torch.randn(3, 3, img_size, img_size)
    direct_before = sum(DIRECT.values())
    compared_before = sum(COMPARED.values())
    for step in range(3):  # 1: the autotuners choose, 2: their choices' first direct launches
        if step == 2:
            direct_before = sum(DIRECT.values())
            compared_before = sum(COMPARED.values())
        with fastmae.use_backend("triton"), torch.autocast("cpu", dtype=dtype,
                                                            enabled=dtype != torch.float32):
            loss, _, _ = model(imgs, 0.75)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    launched = sum(COMPARED.values()) - compared_before
    went_direct = sum(DIRECT.values()) - direct_before
    assert launched > 10, f"{dtype} {mlp} {attn_bwd}: only {launched} launches in a step"
    assert went_direct == launched, (
        f"{dtype} {img_size} {mlp} {attn_bwd}: {launched - went_direct} of {launched} launches "
        f"of a repeated step went through Triton")


def _other_launchers():
    """Launchers the model does not reach on CPU tensors, called three times each."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 40, generator=g)
    ids_keep = torch.stack([torch.randperm(9, generator=g)[:3] for _ in range(2)])
    ids_restore = torch.stack([torch.randperm(9, generator=g) for _ in range(2)])
    imgs = torch.randn(2, 3, 24, 24, generator=g)
    weight, bias = torch.randn(40, 3, 8, 8, generator=g), torch.randn(40, generator=g)
    pos_embed = torch.randn(1, 10, 40, generator=g)
    for _ in range(3):
        masking.gather_tokens(x, ids_keep)
        masking.scatter_tokens(x[:, :3].contiguous(), ids_restore, 3)
        out = patch_embed.patch_embed_visible_fwd(imgs, weight, bias, pos_embed, ids_keep,
                                                  torch.float32)
        patch_embed.patch_embed_visible_bwd(torch.randn_like(out), imgs, weight, ids_keep, True)
    for name in ("_gather_tokens", "_scatter_tokens", "_patch_embed_fwd",
                 "_patch_embed_bwd_weight", "_patch_embed_bwd_imgs"):
        assert DIRECT[name] >= 1, f"{name} never went direct"


def _autotuner_reset():
    """A tuned kernel's direct launch stops when its autotuner forgets its choice or is given
    other configurations (as tests do), and resumes once it holds that choice again."""
    from fastmae.kernels import attention
    q, k, v = (torch.randn(2, 2, 13, 32) for _ in range(3))
    for _ in range(3):
        attention.attention_fwd(q, k, v, 0.25)
    direct, grid, args, kwargs = LAST_TUNED["_attn_fwd"]  # that call, without its shadow
    tuned = direct.tuned

    def goes_direct():
        CALLS.clear()
        went = _tuned_launch(direct, grid, args, kwargs)
        assert len(CALLS) == int(went)
        return went

    assert goes_direct(), "no direct launch of a tuned kernel"
    saved_cache, saved_configs = dict(tuned.cache), tuned.configs
    tuned.cache.clear()
    assert not goes_direct(), "launched directly after the autotuner's cache was cleared"
    tuned.cache.update(saved_cache)
    assert goes_direct(), "no direct launch with the autotuner's choice back"
    tuned.configs = [saved_configs[-1]]
    try:
        assert not goes_direct(), "launched directly on other configurations"
    finally:
        tuned.configs = saved_configs
    assert goes_direct(), "no direct launch with the configurations back"


def main():
    _toy_cases()
    for dtype in (torch.float32, torch.bfloat16):
        for mlp, attn_bwd in (("fused", "fused"), ("split", "split")):
            _model_steps(dtype, 32, mlp, attn_bwd)
    # the MLP's TMA kernels (descriptor arguments; their autotuner's pre-hook sets the block
    # shapes): tma_ok's device check (an sm_90 GPU) is what CPU tensors cannot pass, so it is
    # skipped here, the operands' layout still checked
    from fastmae.kernels import gelu_matmul
    gelu_matmul.tma_ok = lambda device, out_dtype, N, **operands: all(
        map(gelu_matmul._describable, operands.values()))
    _model_steps(torch.bfloat16, 32, "fused_tma", "split")
    _model_steps(torch.bfloat16, 40, "split", "fused")  # 25 patches, 6 kept: odd row counts
    _model_steps(torch.float32, 32, "fused", "fused_q")
    _other_launchers()
    _autotuner_reset()
    print(json.dumps({"compared": sum(COMPARED.values()), "direct": sum(DIRECT.values()),
                      "tuned_direct": dict(TUNED_DIRECT),
                      "kernels": {name: [COMPARED[name], DIRECT[name]] for name in COMPARED}}))


if __name__ == "__main__":
    sys.exit(main())
