"""`fastmae check`: passes on the ops as they are, prints its table, and fails (non-zero exit) on a
deliberately broken op."""
import importlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

from fastmae import check, cli, ops, reference, testing
from fastmae._provenance import git_commit
from fastmae.backend import use_backend

HAS_CUDA = torch.cuda.is_available()


def _check_passes(argv, capsys, tma):
    rc = cli.main(argv)
    out = capsys.readouterr().out
    assert "op" in out and "quantity" in out and "limit" in out and "result" in out
    for name in check.OPS:
        assert name in out, f"{name} missing from the table"
    assert "model" in out and "grads (" in out
    # the model under every way of the kernel paths a GPU chooses by timing (the TMA one where
    # it applies)
    ways = set(re.findall(r"paths (\w+)\s", out))
    assert ways == {"fused", "fused_q", "split"} | ({"fused_tma"} if tma else set()), ways
    assert rc == 0, out
    assert " 0 failed" in out


@pytest.mark.interpreter(covered_by="test_check_passes_on_gpu")
def test_check_passes_and_checks_every_quantity(capsys, tmp_path):
    """The whole CPU grid (seconds), the TMA way through the interpreter too: every op at every
    shape of its grid, and at each one every output and every gradient its OpSpec names
    (patch_embed_visible's imgs gradient only where the case asks for it)."""
    path = tmp_path / "check.json"
    _check_passes(["check", "--json", str(path)], capsys, tma=True)
    rows = json.loads(path.read_text())["rows"]
    for name, spec in check.OPS.items():
        cases = {spec.describe(p) for p in spec.grid_cpu}
        seen = {}
        for r in rows:
            if r["op"] == name:
                seen.setdefault((r["case"], r["dtype"]), set()).add(r["quantity"])
        assert {case for case, _ in seen} == cases, name
        for (case, _), quantities in seen.items():
            grads = [g for g in spec.grads if not (g == "imgs" and "imgs_grad=False" in case)]
            assert quantities == set(spec.outputs) | {f"grad {g}" for g in grads}, (name, case)
    assert any(r["quantity"] == "grad imgs" for r in rows)


@pytest.mark.cuda
def test_check_passes_on_gpu(capsys):
    """`fastmae check --quick --dtypes bf16` on the GPU (bf16 and fp32 under bf16 autocast; the
    model in fp32 too), the TMA way where it applies: on sm_90 and newer, unless FASTMAE_TMA=0
    (which gpu_suite.sh sets where its kernels failed). One dtype of the three: its kernels
    compile inside gpu_suite's per-test limit (200 s), which every dtype's might not."""
    from fastmae.kernels import gelu_matmul
    tma = gelu_matmul.tma_applies(torch.device("cuda", torch.cuda.current_device()),
                                  torch.bfloat16)
    _check_passes(["check", "--quick", "--dtypes", "bf16"], capsys, tma)


def test_check_fails_on_a_broken_op(monkeypatch, capsys):
    real = ops.bias_gelu

    def broken(x, bias):
        return real(x, bias) + 1e-3

    monkeypatch.setattr(ops, "bias_gelu", broken)
    rc = cli.main(["check", "--quick", "--ops", "bias_gelu", "--no-model"])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "FAIL" in out
    assert re.search(r", [1-9]\d* failed", out)


def test_check_fails_when_an_op_raises(monkeypatch, capsys):
    def raises(x, weight, bias, eps):
        raise ImportError("no kernel yet")

    monkeypatch.setattr(ops, "layer_norm", raises)
    rc = cli.main(["check", "--quick", "--ops", "layer_norm", "--no-model"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "ImportError: no kernel yet" in out


def test_check_json(tmp_path, capsys):
    path = tmp_path / "check.json"
    rc = cli.main(["check", "--quick", "--ops", "masking_indices,unshuffle", "--no-model",
                   "--json", str(path)])
    header = capsys.readouterr().out.splitlines()[0]
    assert rc == 0
    data = json.loads(path.read_text())
    assert data["passed"] is True
    # what was checked: the versions and the fastmae commit, in the header and the JSON
    assert data["env"] == {"torch": torch.__version__, "triton": triton.__version__,
                           "commit": git_commit()}
    assert f"torch {torch.__version__} | triton {triton.__version__} | fastmae {git_commit()}" \
        in header
    assert {r["op"] for r in data["rows"]} == {"masking_indices", "unshuffle"}
    assert any(r["quantity"] == "grad mask_token" for r in data["rows"])


@pytest.mark.parametrize("argv, message", [
    (["--ops", "nope"], "unknown op(s) nope"),
    (["--dtypes", "int8"], "unknown dtype(s) int8"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_check_bad_flags(capsys, argv, message):
    assert cli.main(["check", *argv]) == 2
    err = capsys.readouterr().err
    assert "usage: fastmae check" in err and message in err


@pytest.mark.skipif(HAS_CUDA, reason="checks the in-process switch to the interpreter (CPU only)")
@pytest.mark.parametrize("interpret", [None, "false"])
def test_check_console_script_turns_the_interpreter_on(tmp_path, interpret):
    """TRITON_INTERPRET unset, or off in one of Triton's words: the check switches the
    interpreter on itself ("false" was read as on, set too late: a traceback)."""
    exe = shutil.which("fastmae") or str(Path(sys.executable).parent / "fastmae")
    if not os.path.exists(exe):
        pytest.skip("the fastmae console script is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret is not None:
        env["TRITON_INTERPRET"] = interpret
    proc = subprocess.run([exe, "check", "--quick", "--ops", "layer_norm,masking_indices", "--no-model"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "switched on in-process" in proc.stdout
    assert "0 failed" in proc.stdout


@pytest.mark.parametrize("where, message", [
    ("dir", "--json {tmp}: is a directory; give a file path"),
    ("below a file", "--json {tmp}/afile/c.json: {tmp}/afile is not a directory"),
])
def test_check_bad_json_path_is_refused_before_the_checks(tmp_path, capsys, monkeypatch, where,
                                                          message):
    def no_checks(*a, **k):
        raise AssertionError("the checks ran before --json was checked")
    monkeypatch.setattr(check, "run_checks", no_checks)
    path = tmp_path
    if where == "below a file":
        (tmp_path / "afile").write_text("x")
        path = tmp_path / "afile" / "c.json"
    assert cli.main(["check", "--quick", "--no-model", "--json", str(path)]) == 2
    err = capsys.readouterr().err
    assert "usage: fastmae check" in err
    assert f"fastmae check: error: {message.format(tmp=tmp_path)}" in err


def test_check_json_makes_missing_parent_folders(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(check, "run_checks", lambda *a, **k: [])
    path = tmp_path / "sub" / "deeper" / "check.json"
    assert cli.main(["check", "--quick", "--no-model", "--json", str(path)]) == 0
    assert json.loads(path.read_text())["rows"] == []


@pytest.mark.parametrize("fastmae_err, passed", [(1.5e-3, True), (3e-3, False)])
def test_model_parity_holds_the_loss_to_twice_the_eager_error(monkeypatch, fastmae_err, passed):
    """The loss, an fp32 mean of 32 terms here, is allowed 2x the eager reference's error in
    bf16 plus a bf16 rounding (2**-8) over sqrt(32): 2.69e-3 where the eager loss is 1e-3 off,
    so 3e-3 fails (a whole rounding on top let it pass up to 5.9e-3). Pred, mask and gradients
    equal here."""
    # FIXTURE: made-up step results; only the losses differ between the runs
    gen = torch.Generator().manual_seed(3)
    pred, grad = torch.randn(2, 4, 8, generator=gen), torch.randn(8, 4, generator=gen)
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0]])  # 4 removed x 8 values

    def step(model, imgs, noise, backend, mask_ratio=0.75, autocast=None):
        dtype = next(model.parameters()).dtype
        loss = {"exact": 1.0, "torch": 1.0 + 1e-3, "triton": 1.0 + fastmae_err}[
            "exact" if dtype == torch.float64 else backend]
        return (torch.tensor(loss, dtype=torch.float64), pred.to(dtype), mask,
                {"weight": grad.to(dtype)})
    monkeypatch.setattr(check, "model_step_grads", step)
    par = check.model_parity(torch.nn.Linear(4, 8), torch.randn(2, 3), None,
                             autocast=torch.bfloat16)
    assert par.loss_err == pytest.approx(fastmae_err) and par.passed is passed
    (loss_row,) = [r for r in par.rows("case", "bf16") if r.quantity == "loss"]
    assert loss_row.limit == pytest.approx(2e-3 + 2 ** -8 / 32 ** 0.5) and loss_row.ok is passed


class _OffGrad(torch.autograd.Function):
    """Identity forward; the backward scales the incoming gradient by 1 + 1e-3."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return g * (1 + 1e-3)


def _one_ulp_up(t):
    """t one float step up, element-wise; differentiable (the step is a constant)."""
    d = t.detach()
    return t + (torch.nextafter(d, torch.full_like(d, math.inf)) - d)


def _y_grad_off(real):
    def broken(x, residual, weight, bias, eps):
        s, y = real(x, residual, weight, bias, eps)
        return s, _OffGrad.apply(y)
    return broken


def _ids_restore_rolled(real):
    def broken(noise, len_keep):
        ids_keep, mask, ids_restore = real(noise, len_keep)
        ids_restore = ids_restore.clone()
        ids_restore[0] = ids_restore[0].roll(1)
        return ids_keep, mask, ids_restore
    return broken


def _mask_flipped(real):
    def broken(noise, len_keep):
        ids_keep, mask, ids_restore = real(noise, len_keep)
        mask = mask.clone()
        mask[-1, -1] = 1 - mask[-1, -1]
        return ids_keep, mask, ids_restore
    return broken


def _x_masked_one_ulp(real):
    def broken(x, mask_ratio, noise):
        x_masked, mask, ids_restore = real(x, mask_ratio, noise)
        return _one_ulp_up(x_masked), mask, ids_restore
    return broken


@pytest.mark.parametrize("op, breaks, failing", [
    # a gradient alone wrong (the output right): the gradient's row fails, no other
    ("bias_gelu", lambda real: lambda x, bias: real(_OffGrad.apply(x), bias), {"grad x"}),
    # the op's second output's gradient wrong: every gradient through it fails
    ("add_layer_norm", _y_grad_off, {"grad x", "grad residual", "grad weight", "grad bias"}),
    # no gradient at all for an input
    ("bias_gelu", lambda real: lambda x, bias: real(x, bias.detach()), {"grad bias"}),
    # exact outputs: one index, one mask entry, one float a step off
    ("masking_indices", _ids_restore_rolled, {"ids_restore"}),
    ("masking_indices", _mask_flipped, {"mask"}),
    ("random_masking", _x_masked_one_ulp, {"x_masked"}),
], ids=["grad-only", "second-output-grad", "missing-grad", "ids", "mask", "gather-one-ulp"])
def test_check_fails_on_a_wrong_output_or_gradient(monkeypatch, capsys, tmp_path, op, breaks,
                                                   failing):
    monkeypatch.setattr(ops, op, breaks(getattr(ops, op)))
    path = tmp_path / "check.json"
    rc = cli.main(["check", "--quick", "--ops", op, "--no-model", "--json", str(path)])
    out = capsys.readouterr().out
    rows = json.loads(path.read_text())["rows"]
    assert rc == 1, out
    assert {r["quantity"] for r in rows if not r["ok"]} == failing, out
    assert re.search(rf", {len(failing)} failed", out)


def test_check_fails_on_a_broken_kernel(monkeypatch, capsys):
    """A kernel wrong below the op (not the op's Python wrapper): the check runs fastmae's
    "triton" backend, which is not the default for CPU tensors."""
    kernels = importlib.import_module("fastmae.kernels.bias_gelu")
    real = kernels.bias_gelu_fwd
    monkeypatch.setattr(kernels, "bias_gelu_fwd", lambda *a, **k: real(*a, **k) + 1e-3)
    rc = cli.main(["check", "--quick", "--ops", "bias_gelu", "--no-model"])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert re.search(r"^bias_gelu .* y .*FAIL", out, re.M), out


@pytest.mark.parametrize("op, scale", [("bias_gelu", 1 + 5e-5), ("attention", 1 + 5e-4)])
def test_check_holds_fp32_to_the_op_tolerance(monkeypatch, capsys, op, scale):
    """fp32 outputs 5x the op's tolerance off (1e-5; 1e-4 for a matmul) fail."""
    real = getattr(ops, op)
    monkeypatch.setattr(ops, op, lambda *a: real(*a) * scale)
    rc = cli.main(["check", "--quick", "--ops", op, "--no-model"])
    assert rc == 1, capsys.readouterr().out


def test_check_rows_measure_against_float64():
    """A row's error is the kernel's output against the reference computed in float64 from the
    same inputs, its eager error the fp32 reference's own (non-zero) error against it, and the
    fp32 limit max(tolerance, 2 x eager error)."""
    spec = check.OPS["layer_norm"]
    p = (3, 100)
    rows = {r.quantity: r for r in check.compare_case(spec, p, torch.float32, "cpu", seed=11)}
    kw = spec.build(dict(zip(spec.params, p)), torch.float32, "cpu", 11)
    x, w, b, eps = kw["x"], kw["weight"], kw["bias"], kw["eps"]
    y64 = reference.layer_norm(x.double(), w.double(), b.double(), eps)
    assert y64.dtype == torch.float64
    with use_backend("triton"):
        y = ops.layer_norm(x, w, b, eps)
    eager = reference.layer_norm(x, w, b, eps)
    row = rows["y"]
    assert row.error == pytest.approx(testing.rel_err(y, y64), rel=1e-9, abs=0)
    assert row.eager_error == pytest.approx(testing.rel_err(eager, y64), rel=1e-9, abs=0)
    assert row.eager_error > 0
    assert row.limit == max(check.TOL_FP32, 2 * row.eager_error) and row.ok


def test_rel_err_is_the_largest_difference_over_the_largest_expected():
    """The error every row reports: the largest absolute difference (one element off, either
    way, counts whole) over the largest expected magnitude; inf for a non-finite result."""
    gen = torch.Generator().manual_seed(5)
    e = torch.randn(6, 9, generator=gen, dtype=torch.float64)
    a = e.clone()
    a[2, 7] -= 0.25  # one element off, downwards
    assert testing.rel_err(a, e) == pytest.approx(0.25 / e.abs().max().item())
    assert testing.rel_err(e, a) == pytest.approx(0.25 / a.abs().max().item())
    a[0, 0] = float("nan")
    assert testing.rel_err(a, e) == math.inf
    assert testing.rel_err(e[:0], e[:0]) == 0.0
    with pytest.raises(AssertionError, match="shape"):
        testing.rel_err(e[:, :1], e)


def _fake_step(pred, grads, mask, differs):
    """model_step_grads' stand-in (FIXTURE: made-up step results): the exact and "torch" runs
    agree; the "triton" run differs from them in ``differs``."""
    def step(model, imgs, noise, backend, mask_ratio=0.75, autocast=None):
        dtype = next(model.parameters()).dtype
        p, g, m = pred.to(dtype), {n: t.to(dtype) for n, t in grads.items()}, mask
        loss = torch.tensor(1.0, dtype=torch.float64)
        if backend == "triton" and dtype != torch.float64:
            if differs == "pred":
                p = p * (1 + 1e-3)
            elif differs == "grad":
                g["b"] = g["b"] * (1 + 1e-3)
            elif differs == "missing grad":
                del g["b"]
            elif differs == "unexpected grad":
                g["frozen"] = g["a"].clone()
            elif differs == "mask":
                m = m.flip(1)
            # the same values in another dtype: only the dtype check can fail them
            elif differs == "loss dtype":
                loss = loss.float()
            elif differs == "pred dtype":
                p = p.double()
            elif differs == "grad dtype":
                g["b"] = g["b"].double()
        return loss, p, m, g
    return step


@pytest.mark.parametrize("differs, bad_row", [
    ("pred", "pred"), ("grad", "grads"), ("missing grad", "grads"), ("unexpected grad", "grads"),
    ("mask", "mask"), ("loss dtype", "loss"), ("pred dtype", "pred"), ("grad dtype", "grads")])
def test_model_parity_fails_on_a_triton_step_that_differs(monkeypatch, differs, bad_row):
    """The model row fails, on exactly its row, where fastmae's step differs from the
    reference's in pred, in one gradient, by a missing gradient or one the reference lacks, in
    the mask, or in the dtype of the loss, pred or a gradient (same values)."""
    gen = torch.Generator().manual_seed(4)
    pred = torch.randn(2, 4, 8, generator=gen)
    grads = {n: torch.randn(8, 4, generator=gen) for n in ("a", "b", "c")}
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0]])
    monkeypatch.setattr(check, "model_step_grads", _fake_step(pred, grads, mask, differs))
    par = check.model_parity(torch.nn.Linear(4, 8), torch.randn(2, 3), None)
    assert par.passed is False
    assert par.n_grads == 3
    if differs == "grad":
        assert par.grad_failed == ["b"] and par.grad_worst == "b"
    if differs == "missing grad":
        assert par.missing_grads == ["b"]
    if differs == "unexpected grad":
        assert par.unexpected_grads == ["frozen"] and par.missing_grads == []
    if differs.endswith("dtype"):
        assert par.dtype_differs == [differs.split()[0].replace("grad", "b")]
    else:
        assert par.dtype_differs == []
    rows = par.rows("case", "fp32")
    assert [r.quantity.split()[0] for r in rows if not r.ok] == [bad_row]


def test_check_fails_when_the_model_row_raises(monkeypatch, capsys):
    """A model step that raises is a failed row with its error, not a skipped one."""
    def raises(*a, **k):
        raise RuntimeError("no model step")
    monkeypatch.setattr(check, "model_parity", raises)
    rc = cli.main(["check", "--quick", "--ops", "masking_indices"])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "RuntimeError: no model step" in out
    assert re.search(r"^model .*FAIL", out, re.M)


def test_check_fails_on_an_op_that_drops_an_output(monkeypatch, capsys):
    """An op returning fewer outputs than the reference: the missing one is a failed row (zip
    over the outputs had left it out: '2 checks, 2 passed')."""
    real = ops.masking_indices
    monkeypatch.setattr(ops, "masking_indices", lambda noise, len_keep: real(noise, len_keep)[:2])
    rc = cli.main(["check", "--quick", "--ops", "masking_indices", "--no-model"])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "ids_restore" in out


@pytest.mark.parametrize("wrong", ["past the first patch", "for 7-pixel patches"])
def test_check_grid_catches_a_patch_embedding_wrong_past_one_patch(monkeypatch, capsys, wrong):
    """The CPU grid's patch embeddings keep more than one patch an image somewhere, and its
    7-pixel-patch case keeps some (at mask ratio 0.75 a 2-patch image keeps none)."""
    real = ops.patch_embed_visible

    def broken(imgs, weight, bias, pos_embed, ids_keep):
        out = real(imgs, weight, bias, pos_embed, ids_keep)
        if wrong == "past the first patch":
            return torch.cat([out[:, :1], out[:, 1:] * 1.01], 1)
        return out * 1.01 if weight.shape[-1] == 7 else out

    monkeypatch.setattr(ops, "patch_embed_visible", broken)
    rc = cli.main(["check", "--ops", "patch_embed_visible", "--no-model"])
    assert rc == 1, capsys.readouterr().out


@pytest.mark.interpreter(covered_by="test_check_passes_on_gpu")
@pytest.mark.parametrize("name, p, seed, dtype, autocast", [
    ("bias_gelu", (7, 16), 24, torch.float16, None),
    ("bias_gelu", (3, 100), 30, torch.bfloat16, None),
    ("layer_norm", (7, 16), 14, torch.float32, torch.bfloat16),
    ("layer_norm", (3, 100), 30, torch.float32, torch.float16),
    ("add_layer_norm", (7, 16), 31, torch.bfloat16, None),
    ("add_layer_norm", (7, 16), 29, torch.float32, torch.bfloat16),
])
def test_check_gives_each_run_the_same_cotangents(name, p, seed, dtype, autocast,
                                                  interpreter_bf16):
    """fastmae writes a LayerNorm's and a bias + GELU's output in the low precision where the
    reference's is fp32 (under autocast, or from a low-precision x beside fp32 parameters). The
    cotangent, cast to each output's dtype, was then rounded for fastmae's run alone, and its
    parameter gradients (sums over a few rows) failed the rule on these inputs: errors of
    4.1e-3 to 4.8e-3 where bf16's limit is 3.9e-3, 5.0e-4 to 5.1e-4 where fp16's is 4.9e-4,
    the eager reference's own ~1e-7. Drawn in the low precision, the cotangent is the same for
    every run, and every row passes."""
    rows = check.compare_case(check.OPS[name], p, dtype, "cpu", seed=seed, autocast=autocast)
    assert rows and all(r.ok for r in rows), [r for r in rows if not r.ok]


@pytest.mark.interpreter(covered_by="test_check_passes_on_gpu")
def test_check_rows_in_bf16_and_fp16_pass_through_the_interpreter(interpreter_bf16):
    """Every op over its CPU grid in the settings a GPU check runs for bf16 and fp16: inputs in
    that dtype, and fp32 inputs under autocast to it (the CLI checks fp32 only on a CPU: the
    interpreter does not support bf16; these tests mend it). Every row passes."""
    rows = check.run_checks("cpu", list(check.OPS), ["bf16", "fp16"], model=False)
    assert {r.dtype for r in rows} == {"fp32", "bf16", "fp16", "fp32+amp-bf16", "fp32+amp-fp16"}
    assert all(r.ok for r in rows), [r for r in rows if not r.ok]


@pytest.mark.interpreter(covered_by="test_check_passes_on_gpu")
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
def test_check_model_rows_under_autocast_pass_through_the_interpreter(amp, interpreter_bf16):
    """The model rows a GPU check adds (fp32 under autocast, every way of the kernel paths), on
    the CPU check's micro MAE: each within the check's model rule."""
    torch.manual_seed(0)
    model = check.micro_mae()
    gen = testing._gen(1234, "cpu")
    H, W = model.patch_embed.img_size
    imgs = torch.randn(2, model.in_chans, H, W, generator=gen)
    noise = testing.distinct_noise(2, model.patch_embed.num_patches, gen, "cpu")
    for paths in check.KERNEL_PATHS:
        with check._forced_paths(paths):
            rows = check.model_parity(model, imgs, noise, autocast=amp).rows(paths, str(amp))
        assert rows and all(r.ok for r in rows), [r for r in rows if not r.ok]
