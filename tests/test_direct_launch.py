"""fastmae's direct Triton launch (kernels/_common.py: launch) against Triton's own launch path.

The comparison needs real JITFunctions, so it runs tests/_launch_check.py in a subprocess without
TRITON_INTERPRET (see its docstring): every launch of a toy kernel's argument kinds and of tiny
MAE training steps is made both ways (for the autotuned kernels, against the autotuner's own
launch) and the C launcher's two calls compared."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CHECK = Path(__file__).resolve().parent / "_launch_check.py"


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(extra)
    return env


def test_direct_launch_passes_the_c_launcher_what_triton_would():
    out = subprocess.run([sys.executable, str(CHECK)], capture_output=True, text=True,
                         timeout=600, env=_env())
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    kernels = report["kernels"]
    # every kernel module's launches took part, and most launches went direct
    for name in ("_layer_norm_fwd", "_layer_norm_bwd", "_attn_fwd", "_attn_bwd_dkdv",
                 "_attn_bwd_dq", "_matmul_bias_gelu", "_matmul_gelu_bwd", "_bias_gelu_fwd",
                 "_bias_gelu_bwd", "_matmul_bias_gelu_tma", "_matmul_gelu_bwd_tma",
                 "_masking_indices", "_gather_tokens", "_scatter_tokens",
                 "_patch_embed_fwd", "_patch_embed_bwd_weight", "_patch_embed_bwd_imgs",
                 "_unshuffle_fwd", "_unshuffle_bwd", "_masked_mse_fwd", "_scale_kernel"):
        compared, direct = kernels[name]
        assert direct >= 1, f"{name}: none of its {compared} launches went direct"
    assert report["direct"] > report["compared"] // 2
    # the autotuned kernels' launches went direct from launch_tuned itself (the TMA kernels'
    # too: their pre-hook's block shapes kept with the direct entry)
    for name in ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq", "_matmul_bias_gelu",
                 "_matmul_gelu_bwd", "_matmul_bias_gelu_tma", "_matmul_gelu_bwd_tma",
                 "_patch_embed_fwd", "_patch_embed_bwd_weight", "_patch_embed_bwd_imgs"):
        assert report["tuned_direct"].get(name, 0) >= 1, f"{name}: no direct launch_tuned launch"


def test_fastmae_triton_launch_env_turns_the_direct_path_off():
    code = "from fastmae.kernels import _common; print(_common.DIRECT_LAUNCH)"
    for value, expected in (("triton", "False"), ("direct", "True"), ("", "True")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=120, env=_env(FASTMAE_TRITON_LAUNCH=value))
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip() == expected, (value, out.stdout)


@pytest.mark.cuda
def test_direct_launch_on_gpu_equals_tritons_own_launch():
    """On a GPU the direct path runs the real C launcher: the same outputs, bit for bit, as
    Triton's own launch of the same kernel, and a repeated call goes direct."""
    from fastmae.kernels import _common, layer_norm

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(77, 200, device="cuda", generator=g)
    r = torch.randn(77, 200, device="cuda", generator=g)
    w, b = torch.randn(200, device="cuda", generator=g), torch.randn(200, device="cuda",
                                                                    generator=g)
    dy = torch.randn(77, 200, device="cuda", generator=g)

    def run():
        y, s, mean, rstd = layer_norm.layer_norm_fwd(x, w, b, 1e-6, torch.bfloat16, residual=r)
        dx, dwb = layer_norm.layer_norm_bwd(dy, s, w, mean, rstd)
        return y, s, dx, dwb

    saved = _common.DIRECT_LAUNCH
    try:
        _common.DIRECT_LAUNCH = False
        expected = run()
        _common.DIRECT_LAUNCH = True
        run()  # a first direct launch of these keys goes through Triton
        misses = {d.fn.__name__: d.misses for d in _common._DIRECT.values()}
        got = run()
        torch.cuda.synchronize()
    finally:
        _common.DIRECT_LAUNCH = saved
    for name in ("_layer_norm_fwd", "_layer_norm_bwd"):
        direct = next(d for d in _common._DIRECT.values() if d.fn.__name__ == name)
        assert direct.misses == misses[name], f"{name}: a repeated launch went through Triton"
    for a, e in zip(got, expected):
        assert torch.equal(a, e)
