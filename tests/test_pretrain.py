"""``fastmae pretrain`` on the CPU: outputs, learning, exact resume, crash-safe checkpoints,
torchrun (DDP and FSDP2 on gloo) against one process, and clear errors for bad input.

Runs are tiny (16x16 images, batches of 4-8, 2-3 iterations per epoch) and in-process
where they can be, so the file stays fast on a two-core machine.
"""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import triton
from PIL import Image

import fastmae
from fastmae import pretrain
from fastmae._provenance import git_commit
from fastmae.data import ImageFolderImages, build_dataset, synthetic_image

REPO = Path(__file__).resolve().parents[1]

# A small run: fp32 on the CPU (bitwise-reproducible), no warmup so the loss moves from the
# first step, and a base lr that gives lr ~3e-4 at these batch sizes.
TINY = ["--model", "mae_vit_tiny_patch4", "--device", "cpu", "--dtype", "fp32", "--num-workers", "0",
        "--warmup-epochs", "0", "--blr", "2e-2"]


@pytest.fixture(autouse=True)
def _eager_reference_one_thread(monkeypatch):
    # the reference ops, whatever FASTMAE_BACKEND the environment sets: the interpreter would
    # make these runs minutes long, and the kernels are tested elsewhere. One intra-op thread:
    # these matmuls are too small to share, and spinning threads crawl on a busy machine.
    monkeypatch.setenv("FASTMAE_BACKEND", "torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _log(out):
    with open(Path(out) / pretrain.LOG, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _step_losses(out):
    return [loss for record in _log(out) for _, loss in record["loss_curve"]]


def _checkpoint(out):
    return torch.load(Path(out) / pretrain.CHECKPOINT, map_location="cpu", weights_only=True)


def _write_image_folder(root, n=12):
    """n small images of mixed sizes and formats in three class folders."""
    sizes = [(40, 28), (28, 36), (33, 33), (48, 40)]
    for i in range(n):
        folder = root / f"class{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        w, h = sizes[i % len(sizes)]
        pixels = (synthetic_image(123, i, max(w, h))[:, :h, :w] * 255).round().byte()
        image = Image.fromarray(pixels.permute(1, 2, 0).numpy())
        image.save(folder / f"img{i}.{'png' if i % 2 else 'jpg'}")
    return root


def _assert_outputs(out, epochs):
    names = {p.name for p in Path(out).iterdir()}
    expected = {pretrain.CHECKPOINT, pretrain.LOG, pretrain.LOSS_CURVE, pretrain.RECONSTRUCTION}
    expected |= {f"reconstruction-epoch{e:04d}.png" for e in range(epochs)}
    assert expected <= names, f"missing {expected - names}"
    assert not [n for n in names if n.endswith(".tmp")], names
    for name in names:
        if name.endswith(".png"):
            with Image.open(Path(out) / name) as im:
                im.verify()
    assert [r["epoch"] for r in _log(out)] == list(range(epochs))
    ckpt = _checkpoint(out)
    assert ckpt["epoch"] == epochs - 1
    assert {"model", "optimizer", "scaler", "epoch", "step", "rng", "args", "software"} <= set(ckpt)
    # what trained it: the fastmae commit and the torch and Triton versions
    assert ckpt["software"] == {"fastmae": git_commit(), "torch": torch.__version__,
                                "triton": triton.__version__}
    # official keys: the weights load into a fresh model (and into the official code) as they are
    model = fastmae.mae_vit_tiny_patch4(img_size=ckpt["args"]["img_size"])
    model.load_state_dict(ckpt["model"], strict=True)


def _assert_learns(losses):
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < 0.8 * first, f"loss did not decrease: {losses}"


# --------------------------------------------------------------------------- runs and outputs

def test_synthetic_run_writes_everything_and_learns(tmp_path, capsys):
    out = tmp_path / "out"
    rc = pretrain.main(TINY + ["--data", "synthetic", "--img-size", "16", "--epochs", "2",
                               "--batch-size", "8", "--steps-per-epoch", "3", "--output-dir", str(out)])
    assert rc == 0
    assert (f"  fastmae {git_commit()} | torch {torch.__version__} | triton {triton.__version__}"
            in capsys.readouterr().out.splitlines())
    _assert_outputs(out, epochs=2)
    _assert_learns(_step_losses(out))
    with Image.open(out / pretrain.RECONSTRUCTION) as im:
        # four images, four panels each, 16 px with 2 px gaps
        assert im.size == (4 * 16 + 3 * 2, 4 * 16 + 3 * 2)


def test_image_folder_run_writes_everything_and_learns(tmp_path):
    data = _write_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    rc = pretrain.main(TINY + ["--data", str(data), "--img-size", "16", "--epochs", "2",
                               "--batch-size", "4", "--output-dir", str(out)])
    assert rc == 0
    _assert_outputs(out, epochs=2)
    assert _log(out)[0]["iterations"] == 3  # 12 images / batch 4
    _assert_learns(_step_losses(out))


def test_image_folder_augmentation_is_seeded_per_sample_and_epoch(tmp_path):
    data = _write_image_folder(tmp_path / "data", n=3)
    ds = ImageFolderImages(str(data), 16, seed=7)
    a, b = ds.image(1, epoch=0), ds.image(1, epoch=0)
    assert a.shape == (3, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, b)                          # same (seed, epoch, index): same crop
    assert not torch.equal(a, ds.image(1, epoch=1))   # a new epoch: a new crop
    state = torch.get_rng_state()
    ds.image(2, epoch=3)
    assert torch.equal(state, torch.get_rng_state())  # the global generator is left alone


def test_imagenet_layout_reads_train_only(tmp_path):
    _write_image_folder(tmp_path / "imagenet" / "train", n=3)
    _write_image_folder(tmp_path / "imagenet" / "val", n=2)
    ds = build_dataset(str(tmp_path / "imagenet"), 16)
    assert len(ds) == 3 and all(os.sep + "train" + os.sep in p for p in ds.paths)


def test_loss_curve_chart_draws_any_points():
    for points in ([], [(0.5, 1.0)], [(0.5, 1.0), (1.0, 1.0)], [(0.1, 3.2), (0.2, 2.5), (2.0, 0.7)]):
        im = pretrain.draw_loss_curve(points)
        assert im.size == (800, 480)


# --------------------------------------------------------------------------- resume

class _Interrupted(Exception):
    pass


def _interrupt_after_checkpoints(monkeypatch, count):
    """Make the run stop (as if killed) right after its ``count``-th checkpoint is written."""
    real, written = pretrain._atomic_write, []

    def write(path, *args, **kwargs):
        real(path, *args, **kwargs)
        if os.path.basename(path) == pretrain.CHECKPOINT:
            written.append(path)
            if len(written) == count:
                raise _Interrupted
    monkeypatch.setattr(pretrain, "_atomic_write", write)


@pytest.mark.parametrize("fsdp", [False, True], ids=["plain", "fsdp"])
def test_interrupted_and_resumed_run_equals_a_straight_run(tmp_path, monkeypatch, fsdp):
    run = TINY + ["--data", "synthetic", "--img-size", "16", "--epochs", "3", "--batch-size", "4",
                  "--steps-per-epoch", "2", "--warmup-epochs", "1"] + (["--fsdp"] if fsdp else [])
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert pretrain.main(run + ["--output-dir", str(straight)]) == 0

    with monkeypatch.context() as m:
        _interrupt_after_checkpoints(m, 2)
        with pytest.raises(_Interrupted):
            pretrain.main(run + ["--output-dir", str(resumed)])
    assert _checkpoint(resumed)["epoch"] == 1
    assert pretrain.main(run + ["--output-dir", str(resumed), "--resume", "auto"]) == 0

    a, b = _checkpoint(straight), _checkpoint(resumed)
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"] == 6
    assert _step_losses(straight) == _step_losses(resumed)          # bitwise
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for name, state in a["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(v, b["optimizer"]["state"][name][k]), (name, k)


def test_kill_during_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "out"
    run = TINY + ["--data", "synthetic", "--img-size", "16", "--epochs", "3", "--batch-size", "4",
                  "--steps-per-epoch", "2", "--output-dir", str(out)]
    with monkeypatch.context() as m:
        _interrupt_after_checkpoints(m, 1)
        with pytest.raises(_Interrupted):
            pretrain.main(run)
    assert _checkpoint(out)["epoch"] == 0

    # resume in a child process that stalls between writing epoch 1's temporary file and renaming
    # it; kill -9 it there
    env = dict(os.environ, PYTHONPATH=str(REPO), FASTMAE_BACKEND="torch", OMP_NUM_THREADS="1",
               **{pretrain._CHECKPOINT_PAUSE_ENV: "300"})
    child = subprocess.Popen([sys.executable, "-m", "fastmae.cli", "pretrain", *run, "--resume", "auto"],
                             env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 150
        while not list(out.glob(f".{pretrain.CHECKPOINT}.*.tmp")):
            assert child.poll() is None, child.stderr.read().decode()
            assert time.monotonic() < deadline, "the child never started writing a checkpoint"
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL

    ckpt = _checkpoint(out)                           # still the complete epoch-0 checkpoint
    assert ckpt["epoch"] == 0 and ckpt["step"] == 2
    # and the run carries on from it, clearing the dead process's temporary file
    assert pretrain.main(run + ["--resume", "auto"]) == 0
    assert _checkpoint(out)["epoch"] == 2
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    assert [r["epoch"] for r in _log(out)] == [0, 1, 2]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "out"
    run = TINY + ["--data", "synthetic", "--img-size", "16", "--batch-size", "4",
                  "--steps-per-epoch", "3", "--output-dir", str(out)]
    assert pretrain.main(run + ["--epochs", "1"]) == 0
    capsys.readouterr()
    # an absurd lr: the first update blows the weights up, the next loss is not finite
    rc = pretrain.main(run + ["--epochs", "2", "--resume", "auto", "--lr", "1e30"])
    err = capsys.readouterr().err
    assert rc == 1
    assert ("loss is nan at iteration 2/3 of epoch 2/2" in err
            or "loss is inf at iteration 2/3 of epoch 2/2" in err), err
    assert f"{pretrain.CHECKPOINT} (after epoch 1)" in err, err
    assert _checkpoint(out)["epoch"] == 0


# --------------------------------------------------------------------------- --cuda-graph

@pytest.fixture
def cpu_cuda_graph(monkeypatch):
    """--cuda-graph on the CPU: torch.cuda's stream calls stubbed, and graphs.capture replaced by
    one that records nothing and re-runs the step on every replay, writing its loss into the one
    tensor the capture returned (what a replay of a real capture does, on a GPU). Returns the
    log of captures and replays."""
    log = []

    class Stream:
        def wait_stream(self, other):
            pass

    def capture(step, optimizer, context=contextlib.nullcontext, capture_error_mode="global"):
        log.append(f"capture {capture_error_mode}")
        optimizer.zero_grad(set_to_none=True)
        loss = torch.full((), float("nan"))
        # a real graph reads the lr tensors it captured: they must stay, updated in place
        captured_lrs = [(group, group["lr"]) for group in optimizer.param_groups]
        assert all(isinstance(lr, torch.Tensor) for _, lr in captured_lrs)

        class Graph:
            def replay(self):
                log.append("replay")
                assert all(group["lr"] is lr for group, lr in captured_lrs)
                with context():
                    loss.copy_(step())
        return Graph(), loss

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(pretrain.graphs, "capture", capture)
    monkeypatch.setattr(pretrain, "_CUDA_GRAPH_DEVICES", ("cuda", "cpu"))
    return log


GRAPHED = TINY + ["--data", "synthetic", "--img-size", "16", "--batch-size", "4",
                  "--steps-per-epoch", "4", "--warmup-epochs", "1"]


def _assert_same_training(a, b, rel=1e-5, atol=1e-6):
    """Two runs' per-iteration losses, lr records and final weights (eager AdamW against the
    fused one --cuda-graph uses: equal up to rounding)."""
    assert _step_losses(b) == pytest.approx(_step_losses(a), rel=rel)
    assert [r["train_lr"] for r in _log(b)] == [r["train_lr"] for r in _log(a)]
    ca, cb = _checkpoint(a), _checkpoint(b)
    assert ca["step"] == cb["step"]
    _assert_weights_close(ca["model"], cb["model"], ca["args"]["lr"], ca["step"], atol)


def test_cuda_graph_run_equals_an_eager_run(tmp_path, cpu_cuda_graph):
    """3 eager iterations, one capture, then a replay an iteration (8 iterations over 2 epochs),
    the lr schedule set on the GPU copy of each group's lr: the losses, lrs and weights of an
    eager run, a checkpoint with plain-number lrs that an eager run resumes from."""
    eager, graphed = tmp_path / "eager", tmp_path / "graphed"
    assert pretrain.main(GRAPHED + ["--epochs", "2", "--output-dir", str(eager)]) == 0
    assert pretrain.main(GRAPHED + ["--epochs", "2", "--cuda-graph", "--output-dir", str(graphed)]) == 0
    assert cpu_cuda_graph == ["capture thread_local"] + ["replay"] * 5
    _assert_outputs(graphed, epochs=2)
    _assert_same_training(eager, graphed)
    ckpt = _checkpoint(graphed)
    for group in ckpt["optimizer"]["param_groups"]:
        assert type(group["lr"]) is float and group["fused"] and group["capturable"]
    # an eager run resumes from it with the official AdamW flags
    assert pretrain.main(GRAPHED + ["--epochs", "3", "--resume", "auto", "--output-dir", str(graphed)]) == 0
    groups = _checkpoint(graphed)["optimizer"]["param_groups"]
    assert all(not g["fused"] and not g["capturable"] for g in groups)


def test_cuda_graph_run_resumes_an_eager_checkpoint(tmp_path, cpu_cuda_graph):
    """An eager epoch, then --cuda-graph resuming from its checkpoint (fused, capturable AdamW
    flags kept, lr tensors re-made on the device): the run an eager one continues to."""
    straight, switched = tmp_path / "straight", tmp_path / "switched"
    assert pretrain.main(GRAPHED + ["--epochs", "2", "--output-dir", str(straight)]) == 0
    assert pretrain.main(GRAPHED + ["--epochs", "1", "--output-dir", str(switched)]) == 0
    assert pretrain.main(GRAPHED + ["--epochs", "2", "--cuda-graph", "--resume", "auto",
                                    "--output-dir", str(switched)]) == 0
    assert cpu_cuda_graph == ["capture thread_local", "replay"]
    _assert_same_training(straight, switched)


def test_cuda_graph_non_finite_loss_names_its_iteration(tmp_path, cpu_cuda_graph, capsys):
    """A loss is read one iteration late under --cuda-graph; the stop still names the iteration
    whose loss was not finite, and keeps the last checkpoint."""
    out = tmp_path / "out"
    run = GRAPHED + ["--warmup-epochs", "0", "--output-dir", str(out)]
    assert pretrain.main(run + ["--epochs", "1"]) == 0
    capsys.readouterr()
    rc = pretrain.main(run + ["--epochs", "2", "--resume", "auto", "--lr", "1e30", "--cuda-graph"])
    err = capsys.readouterr().err
    assert rc == 1
    assert ("loss is nan at iteration 2/4 of epoch 2/2 (global step 5)" in err
            or "loss is inf at iteration 2/4 of epoch 2/2 (global step 5)" in err), err
    assert _checkpoint(out)["epoch"] == 0


@pytest.mark.parametrize("extra, expected", [
    (["--accum-iter", "2"], "needs --accum-iter 1, got 2"),
    (["--dtype", "fp16"], "takes --dtype bf16 or fp32"),
    (["--compile"], "does not go with --compile"),
    (["--fsdp"], "runs on one process without --fsdp"),
])
def test_cuda_graph_refuses_what_it_cannot_capture(tmp_path, capsys, cpu_cuda_graph, extra, expected):
    rc = pretrain.main(GRAPHED + ["--epochs", "1", "--cuda-graph", "--output-dir", str(tmp_path)] + extra)
    assert rc == 2
    assert f"--cuda-graph {expected}" in capsys.readouterr().err


def test_cuda_graph_needs_a_gpu(tmp_path, capsys):
    rc = pretrain.main(GRAPHED + ["--epochs", "1", "--cuda-graph", "--output-dir", str(tmp_path)])
    assert rc == 2
    assert "--cuda-graph needs a CUDA device" in capsys.readouterr().err


@pytest.mark.cuda
def test_cuda_graph_run_equals_an_eager_run_on_gpu(tmp_path, monkeypatch):
    """For real, on a GPU (fp32, the fastmae kernels): the replays continue the eager iterations,
    losses and weights as an eager run's up to the two AdamW implementations' rounding."""
    monkeypatch.setenv("FASTMAE_BACKEND", "triton")
    run = ["--model", "mae_vit_tiny_patch4", "--device", "cuda", "--dtype", "fp32", "--num-workers",
           "0", "--warmup-epochs", "1", "--blr", "2e-2", "--data", "synthetic", "--img-size", "32",
           "--batch-size", "8", "--steps-per-epoch", "5", "--epochs", "2"]
    eager, graphed = tmp_path / "eager", tmp_path / "graphed"
    assert pretrain.main(run + ["--output-dir", str(eager)]) == 0
    assert pretrain.main(run + ["--cuda-graph", "--output-dir", str(graphed)]) == 0
    _assert_same_training(eager, graphed, rel=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- torchrun

SHARED = TINY + ["--data", "synthetic", "--synthetic-size", "64", "--img-size", "16", "--epochs", "2",
                 "--steps-per-epoch", "2"]


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    """One process, batch 8: the reference for two ranks x batch 4 (global batch 8)."""
    out = tmp_path_factory.mktemp("single")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as m:
            m.setenv("FASTMAE_BACKEND", "torch")
            assert pretrain.main(SHARED + ["--batch-size", "8", "--output-dir", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def _key_bias_rows(name, value):
    """The key third of a qkv bias. Its gradient is zero up to rounding (softmax ignores a shift
    shared by all keys), and Adam divides a gradient by its own size, so rounding noise there moves
    it by up to lr a step: it is compared with that bound, everything else tightly."""
    if name.endswith("attn.qkv.bias"):
        third = value.shape[0] // 3
        return slice(third, 2 * third)
    return None


def _assert_weights_close(a, b, lr, steps, atol):
    """Two state dicts within ``atol``, the qkv biases' key thirds within 2 lr a step."""
    assert a.keys() == b.keys()
    for name, value in a.items():
        diff = (value - b[name]).abs()
        rows = _key_bias_rows(name, value)
        if rows is not None:
            assert diff[rows].max() <= 2 * steps * lr, name
            diff[rows] = 0
        assert diff.max() <= atol, (name, diff.max().item())


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_two_ranks_equal_one_process(tmp_path, mode, single_process_run):
    out = tmp_path / mode
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fastmae.cli", "pretrain", *SHARED, "--batch-size", "4", "--output-dir", str(out)]
    if mode == "fsdp":
        cmd.append("--fsdp")
    env = dict(os.environ, PYTHONPATH=str(REPO), FASTMAE_BACKEND="torch", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert ("FSDP2" if mode == "fsdp" else "DDP") in proc.stdout
    _assert_outputs(out, epochs=2)

    ref, got = _step_losses(single_process_run), _step_losses(out)
    assert len(got) == len(ref) == 4
    assert got == pytest.approx(ref, rel=1e-5)
    _assert_weights_close(_checkpoint(single_process_run)["model"], _checkpoint(out)["model"],
                          _checkpoint(out)["args"]["lr"], 4, 1e-5)


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("case", ["empty folder", "unreadable image", "too few images", "unknown model",
                                  "batch size 0"])
def test_bad_input_is_a_clear_error(tmp_path, capsys, case):
    args = TINY + ["--epochs", "1", "--batch-size", "4", "--img-size", "16",
                   "--output-dir", str(tmp_path / "out")]
    if case == "empty folder":
        (tmp_path / "empty" / "class0").mkdir(parents=True)
        (tmp_path / "empty" / "notes.txt").write_text("no images here")
        args += ["--data", str(tmp_path / "empty")]
        expected = ["no images found", "empty"]
    elif case == "unreadable image":
        data = _write_image_folder(tmp_path / "data", n=3)
        (data / "class0" / "broken.jpg").write_bytes(b"this is not a JPEG")
        args += ["--data", str(data)]
        expected = ["cannot read image", "broken.jpg"]
    elif case == "too few images":
        args += ["--data", str(_write_image_folder(tmp_path / "data", n=3))]
        expected = ["3 images", "fewer than one global batch of 4"]
    elif case == "unknown model":
        args += ["--model", "mae_vit_gigantic_patch1"]
        expected = ["--model", "mae_vit_gigantic_patch1"]
    else:
        args += ["--batch-size", "0"]
        expected = ["--batch-size", "positive integer"]
    rc = pretrain.main(args)
    err = capsys.readouterr().err
    assert rc == 2
    for text in expected:
        assert text in err, err
    assert not (tmp_path / "out" / pretrain.CHECKPOINT).exists()
