"""``fastmae pretrain`` on the CPU: outputs, learning, exact resume, crash-safe checkpoints,
torchrun (DDP and FSDP2 on gloo) against one process, and clear errors for bad input.

Runs are tiny (16x16 images, batches of 4-8, 2-3 iterations per epoch) and in-process
where they can be, so the file stays fast on a two-core machine.
"""
import argparse
import contextlib
import functools
import importlib.util
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import triton
from PIL import Image

import fastmae
from fastmae import pretrain
from fastmae._provenance import git_commit
from fastmae import data as fastmae_data
from fastmae.data import (ImageFolderImages, SyntheticImages, _RandomResizedCropFlip, build_dataset,
                          synthetic_image)

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


def _hook_the_runs_model(monkeypatch, hook, before=False):
    """The tiny model a run builds gets ``hook`` (with kwargs): a forward hook, or with
    ``before`` a forward pre-hook."""
    build = pretrain.MODELS["mae_vit_tiny_patch4"]

    def build_hooked(**kwargs):
        model = build(**kwargs)
        register = model.register_forward_pre_hook if before else model.register_forward_hook
        register(hook, with_kwargs=True)
        return model

    monkeypatch.setitem(pretrain.MODELS, "mae_vit_tiny_patch4", build_hooked)


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
    assert {"model", "optimizer", "epoch", "step", "rng", "args", "software"} <= set(ckpt)
    # these runs have no GradScaler, so no 'scaler' entry: official load_model loads one if there
    assert "scaler" not in ckpt
    # what trained it: the fastmae commit and the torch and Triton versions
    assert ckpt["software"] == {"fastmae": git_commit(), "torch": torch.__version__,
                                "triton": triton.__version__}
    # official keys: the weights load into a fresh model (and into the official code) as they are
    model = fastmae.mae_vit_tiny_patch4(img_size=ckpt["args"]["img_size"])
    model.load_state_dict(ckpt["model"], strict=True)


def test_no_progress_leaves_out_the_bar_only(tmp_path, capsys):
    """--no-progress: no tqdm bar on stderr; the run and its epoch lines are the same."""
    outs = {}
    for flag in ([], ["--no-progress"]):
        out = tmp_path / ("bar" if not flag else "quiet")
        rc = pretrain.main(TINY + ["--data", "synthetic", "--img-size", "16", "--epochs", "1",
                                   "--warmup-epochs", "0", "--batch-size", "8",
                                   "--steps-per-epoch", "2", "--output-dir", str(out)] + flag)
        assert rc == 0
        outs[bool(flag)] = capsys.readouterr()
    assert "epoch 1/1" in outs[False].err and "epoch 1/1" not in outs[True].err
    assert _log(tmp_path / "bar")[0]["train_loss"] == _log(tmp_path / "quiet")[0]["train_loss"]


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


@pytest.mark.parametrize("sibling", ["val", "test", None])
def test_a_train_folder_is_all_that_is_read(tmp_path, capsys, sibling):
    """DIR/train whenever DIR holds train/, whatever lies beside it (official: always
    --data_path/train), through --data_path; the images of test/ or val/ are never trained on."""
    root = tmp_path / "data"
    n_train = random.randint(4, 6)
    _write_image_folder(root / "train", n=n_train)
    if sibling is not None:
        _write_image_folder(root / sibling, n=3)
    ds = build_dataset(str(root), 16)
    assert len(ds) == n_train
    assert all(p.startswith(str(root / "train") + os.sep) for p in ds.paths)
    out = tmp_path / "out"
    assert pretrain.main(TINY + ["--data_path", str(root), "--img-size", "16", "--epochs", "1",
                                 "--batch-size", "4", "--output-dir", str(out)]) == 0
    assert f"{n_train} images from {root / 'train'}" in capsys.readouterr().out
    assert _log(out)[0]["iterations"] == 1


def test_a_folder_without_train_is_read_whole(tmp_path):
    """No train/: every image under DIR, class subfolders or flat (the documented feature)."""
    root = _write_image_folder(tmp_path / "classes", n=5)
    for i in range(2):  # and flat files beside the class folders
        Image.new("RGB", (20, 24), (i * 90, 30, 200)).save(root / f"flat{i}.png")
    ds = build_dataset(str(root), 16)
    assert ds.root == str(root) and len(ds) == 7


def _torchvision_get_params(width, height, scale, ratio):
    """torchvision.transforms.RandomResizedCrop.get_params (torchvision 0.28), transcribed from
    its source for a ``width`` x ``height`` image."""
    area = height * width

    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()

        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))

        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,)).item()
            j = torch.randint(0, width - w + 1, size=(1,)).item()
            return i, j, h, w

    # Fallback to central crop
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:  # whole image
        w = width
        h = height
    i = (height - h) // 2
    j = (width - w) // 2
    return i, j, h, w


def test_fallback_crop_box_is_torchvisions():
    """The Pillow + torch fallback draws torchvision's crop box from the same seed and leaves the
    generator in the same state: over fresh random seeds and image sizes, squat, tall and tiny
    ones (whose ten tries all miss: the central-crop branch), and the two seeds of 200k at which
    float64 log/exp once came out a pixel off (500x375: seeds 115555, 159071)."""
    crop = _RandomResizedCropFlip(16)
    rng = random.Random()
    sizes = [(500, 375), (375, 500), (40, 28), (33, 33), (1, 1), (2, 3), (200, 10), (10, 200),
             (7, 300), (300, 7)] + [(rng.randint(1, 600), rng.randint(1, 600)) for _ in range(10)]
    cases = [(500, 375, 115555), (500, 375, 159071)]
    cases += [(w, h, rng.randrange(2 ** 63)) for w, h in sizes for _ in range(100)]
    with torch.random.fork_rng(devices=[]):
        for w, h, seed in cases:
            torch.manual_seed(seed)
            want = _torchvision_get_params(w, h, crop.scale, crop.ratio)
            after_want = torch.get_rng_state()
            torch.manual_seed(seed)
            assert crop._crop_box(w, h) == want, (w, h, seed)
            assert torch.equal(torch.get_rng_state(), after_want), (w, h, seed)
            i, j, ch, cw = want
            assert 0 <= i <= h - ch and 0 <= j <= w - cw and ch >= 1 and cw >= 1
        # the fallback branch, by hand: 200x10 is too flat for any try (h >= 17 > 10), so the
        # box is the central 13x10 (ratio 4/3 of its height)
        torch.manual_seed(rng.randrange(2 ** 63))
        assert crop._crop_box(200, 10) == (0, (200 - 13) // 2, 10, 13)
        torch.manual_seed(rng.randrange(2 ** 63))
        assert crop._crop_box(10, 200) == ((200 - 13) // 2, 0, 13, 10)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                    reason="torchvision is not installed")
def test_fallback_transform_equals_torchvisions_pixels(tmp_path, monkeypatch):
    """Where torchvision is installed: an image folder read with the fallback gives torchvision's
    tensors exactly (crop, bicubic resize, flip, normalization), sample by sample and epoch by
    epoch."""
    data = _write_image_folder(tmp_path / "data", n=8)
    seed = random.randrange(2 ** 31)
    with_torchvision = ImageFolderImages(str(data), 16, seed=seed)
    assert not isinstance(with_torchvision.transform, _RandomResizedCropFlip)
    monkeypatch.setattr(fastmae_data, "_torchvision_transforms", lambda: None)
    without = ImageFolderImages(str(data), 16, seed=seed)
    assert isinstance(without.transform, _RandomResizedCropFlip)
    for epoch in range(3):
        for index in range(len(without)):
            assert torch.equal(without.image(index, epoch), with_torchvision.image(index, epoch)), \
                (index, epoch)


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


def _straight_and_resumed(tmp_path, monkeypatch, run, stop_after):
    """``run`` straight through, and again stopped after its ``stop_after``-th checkpoint (epoch
    stop_after - 1) and resumed: the two output folders."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert pretrain.main(run + ["--output-dir", str(straight)]) == 0
    with monkeypatch.context() as m:
        _interrupt_after_checkpoints(m, stop_after)
        with pytest.raises(_Interrupted):
            pretrain.main(run + ["--output-dir", str(resumed)])
    assert _checkpoint(resumed)["epoch"] == stop_after - 1
    assert pretrain.main(run + ["--output-dir", str(resumed), "--resume", "auto"]) == 0
    return straight, resumed


@pytest.mark.parametrize("fsdp", [False, True], ids=["plain", "fsdp"])
def test_interrupted_and_resumed_run_equals_a_straight_run(tmp_path, monkeypatch, fsdp):
    run = TINY + ["--data", "synthetic", "--img-size", "16", "--epochs", "3", "--batch-size", "4",
                  "--steps-per-epoch", "2", "--warmup-epochs", "1"] + (["--fsdp"] if fsdp else [])
    straight, resumed = _straight_and_resumed(tmp_path, monkeypatch, run, stop_after=2)
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


# --------------------------------------------------------------------------- the log's lr

@pytest.mark.parametrize("accum_iter", [1, 2])
def test_logged_lr_is_the_mean_of_the_epochs_iteration_lrs(tmp_path, accum_iter):
    """Official train_one_epoch logs its lr meter's global_avg: param_groups[0]["lr"] averaged
    over the epoch's iterations (set every accum_iter iterations from the fractional epoch), not
    the last iteration's lr. Epoch 1 warms up, epoch 2 is the cosine."""
    steps, batch, epochs = 2 * random.randint(2, 3), 4, 2
    blr = random.uniform(5e-3, 3e-2)
    out = tmp_path / "out"
    assert pretrain.main(TINY + ["--data", "synthetic", "--img-size", "16", "--epochs", str(epochs),
                                 "--warmup-epochs", "1", "--blr", repr(blr), "--batch-size",
                                 str(batch), "--accum-iter", str(accum_iter), "--steps-per-epoch",
                                 str(steps), "--output-dir", str(out)]) == 0
    peak = blr * batch * accum_iter / 256

    def schedule(e):  # util/lr_sched.py with warmup 1, min_lr 0
        return peak * e if e < 1 else peak * 0.5 * (1 + math.cos(math.pi * (e - 1) / (epochs - 1)))

    for record in _log(out):
        epoch = record["epoch"]
        lrs = [schedule(epoch + (it - it % accum_iter) / steps) for it in range(steps)]
        assert record["iterations"] == steps
        assert record["train_lr"] == pytest.approx(sum(lrs) / steps, rel=1e-12, abs=0)
        assert record["train_lr"] != pytest.approx(lrs[-1], rel=1e-3)  # not the last lr


# --------------------------------------------------------------------------- the recipe

def _official_adjust_learning_rate(optimizer, epoch, args):
    """util/lr_sched.py's adjust_learning_rate (facebookresearch/mae), transcribed."""
    if epoch < args.warmup_epochs:
        lr = args.lr * epoch / args.warmup_epochs
    else:
        lr = args.min_lr + (args.lr - args.min_lr) * 0.5 * \
            (1. + math.cos(math.pi * (epoch - args.warmup_epochs)
                           / (args.epochs - args.warmup_epochs)))
    for param_group in optimizer.param_groups:
        if "lr_scale" in param_group:
            param_group["lr"] = lr * param_group["lr_scale"]
        else:
            param_group["lr"] = lr
    return lr


def _timm_add_weight_decay(model, weight_decay=1e-5, skip_list=()):
    """timm 0.3.2's optim_factory.add_weight_decay, transcribed: main_pretrain.py's groups."""
    decay = []
    no_decay = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue  # frozen weights
        if len(param.shape) == 1 or name.endswith(".bias") or name in skip_list:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {'params': no_decay, 'weight_decay': 0.},
        {'params': decay, 'weight_decay': weight_decay}]


def _three_group_optimizer(lr_scale):
    """An AdamW with a plain group, one carrying ``lr_scale`` and one whose lr is a tensor (as
    --cuda-graph's are)."""
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(3)]
    optimizer = torch.optim.AdamW([{"params": [params[0]]},
                                   {"params": [params[1]], "lr_scale": lr_scale},
                                   {"params": [params[2]]}], lr=1.0)
    optimizer.param_groups[2]["lr"] = torch.tensor(1.0)
    return optimizer


def test_adjust_learning_rate_is_lr_scheds():
    """At epoch 0, mid-warmup, the warmup's end, mid-cosine, near and at the end: the lr of
    util/lr_sched.py (min_lr > 0), the lr_scale group scaled, a tensor lr filled in place."""
    warmup = random.randint(2, 10)
    args = argparse.Namespace(lr=random.uniform(1e-4, 5e-3), min_lr=random.uniform(1e-7, 1e-5),
                                       warmup_epochs=warmup, epochs=warmup + random.randint(10, 50))
    lr_scale = random.uniform(0.1, 0.9)
    ours, official = _three_group_optimizer(lr_scale), _three_group_optimizer(lr_scale)
    tensor_lr = ours.param_groups[2]["lr"]
    mid_cosine = (args.warmup_epochs + args.epochs) / 2 + random.random()
    for epoch in (0.0, random.uniform(0.5, warmup - 0.5), float(warmup), mid_cosine,
                  args.epochs - 0.25, float(args.epochs)):
        want = _official_adjust_learning_rate(official, epoch, args)
        got = pretrain.adjust_learning_rate(ours, epoch, args)
        assert got == pytest.approx(want, rel=1e-12, abs=0), epoch
        assert ours.param_groups[0]["lr"] == got
        assert ours.param_groups[1]["lr"] == pytest.approx(got * lr_scale, rel=1e-15)
        assert ours.param_groups[1]["lr"] == pytest.approx(official.param_groups[1]["lr"],
                                                           rel=1e-12)
        assert ours.param_groups[2]["lr"] is tensor_lr  # a captured graph's lr stays that tensor
        assert tensor_lr.item() == pytest.approx(got, rel=1e-6)
    # the schedule's anchors, without the transcription
    lr_at = functools.partial(pretrain.adjust_learning_rate, ours, args=args)
    assert lr_at(0.0) == 0.0
    assert lr_at(warmup / 2) == pytest.approx(args.lr / 2, rel=1e-15)
    assert lr_at(warmup) == pytest.approx(args.lr, rel=1e-15)
    assert lr_at(args.epochs) == pytest.approx(args.min_lr, rel=1e-9)


def _tiny_job(tmp_path, *extra):
    args = pretrain.build_parser().parse_args(
        TINY + ["--data", "synthetic", "--synthetic-size", "8", "--img-size", "16",
                "--batch-size", "4", "--output-dir", str(tmp_path), *extra])
    return pretrain._Job(args, pretrain._Runtime(args))


def test_optimizer_groups_are_timms_add_weight_decay(tmp_path):
    """No decay for biases, norms and other 1-D parameters, decay for the rest (cls_token and
    mask_token too), frozen position tables in no group: timm's rule applied independently;
    AdamW betas (0.9, 0.95)."""
    weight_decay = random.uniform(0.01, 0.3)
    job = _tiny_job(tmp_path, "--weight-decay", repr(weight_decay))
    name_of = {id(p): n for n, p in job.model.named_parameters()}
    groups = [[name_of[id(p)] for p in g["params"]] for g in job.optimizer.param_groups]
    want = [[name_of[id(p)] for p in g["params"]]
            for g in _timm_add_weight_decay(job.model, weight_decay)]
    assert groups == want
    no_decay, decay = groups
    assert [g["weight_decay"] for g in job.optimizer.param_groups] == [0.0, weight_decay]
    assert all(g["betas"] == (0.9, 0.95) for g in job.optimizer.param_groups)
    assert {"cls_token", "mask_token", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight",
            "decoder_blocks.0.mlp.fc2.weight", "decoder_pred.weight"} <= set(decay)
    assert {"patch_embed.proj.bias", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias",
            "norm.weight", "norm.bias", "decoder_norm.weight", "decoder_pred.bias"} <= set(no_decay)
    assert all(not n.endswith(".bias") for n in decay)
    trainable = [n for n, p in job.model.named_parameters() if p.requires_grad]
    assert sorted(no_decay + decay) == sorted(trainable)  # each once
    assert not {"pos_embed", "decoder_pos_embed"} & set(no_decay + decay)


def test_lr_is_blr_times_effective_batch_over_256():
    """lr = blr x batch x accum_iter x world size / 256 (main_pretrain.py), unless --lr is
    given."""
    blr, batch, accum, world = random.uniform(1e-4, 1e-2), random.randint(1, 64), \
        random.randint(1, 8), random.randint(1, 16)
    rt = types.SimpleNamespace(device=torch.device("cpu"), world_size=world, local_world_size=world)
    parse = pretrain.build_parser().parse_args
    base = ["--model", "mae_vit_tiny_patch4", "--batch-size", str(batch), "--accum-iter",
            str(accum), "--blr", repr(blr)]
    args = parse(base)
    pretrain._resolve_defaults(args, rt)
    assert args.effective_batch == batch * accum * world
    assert args.lr == pytest.approx(blr * batch * accum * world / 256, rel=1e-15)
    lr = random.uniform(1e-5, 1e-3)
    args = parse(base + ["--lr", repr(lr)])
    pretrain._resolve_defaults(args, rt)
    assert args.lr == lr


def test_accum_iter_2_equals_a_batch_twice_as_large(tmp_path):
    """--accum-iter 2 with batch 4 takes the step --accum-iter 1 with batch 8 takes (the same
    samples and masks, the loss averaged over the two halves): the same lr, the same losses
    pairwise averaged, two AdamW steps with the same moments (which, unlike Adam's weights, scale
    with the gradient: a sum of the halves' gradients would show) and the same weights, up to
    rounding."""
    run = TINY + ["--data", "synthetic", "--img-size", "16", "--epochs", "1",
                  "--blr", repr(random.uniform(5e-3, 3e-2))]
    big, accumulated = tmp_path / "big", tmp_path / "accumulated"
    assert pretrain.main(run + ["--batch-size", "8", "--steps-per-epoch", "2",
                                "--output-dir", str(big)]) == 0
    assert pretrain.main(run + ["--batch-size", "4", "--accum-iter", "2", "--steps-per-epoch", "4",
                                "--output-dir", str(accumulated)]) == 0
    whole, halves = _step_losses(big), _step_losses(accumulated)
    assert len(whole) == 2 and len(halves) == 4
    # the second pair is after the first update: the steps matched
    pair_means = [(a + b) / 2 for a, b in zip(halves[::2], halves[1::2])]
    assert pair_means == pytest.approx(whole, rel=1e-5)
    # the mean of each step's lr logged once per iteration: 4 terms against 2
    assert _log(accumulated)[0]["train_lr"] == pytest.approx(_log(big)[0]["train_lr"], rel=1e-14)
    a, b = _checkpoint(big), _checkpoint(accumulated)
    assert a["args"]["lr"] == b["args"]["lr"]
    for name, want in a["optimizer"]["state"].items():
        got = b["optimizer"]["state"][name]
        assert got["step"].item() == want["step"].item() == 2, name
        for key in ("exp_avg", "exp_avg_sq"):  # measured within 1e-6 of the largest entry
            assert (got[key] - want[key]).abs().max() <= 1e-5 * want[key].abs().max(), (name, key)
    # Adam divides a gradient by its own size, so rounding noise in a near-zero gradient moves a
    # weight by up to ~1% of lr a step (measured): compared to 5% of lr
    lr = a["args"]["lr"]
    _assert_weights_close(a["model"], b["model"], lr, 2, 0.05 * lr)


def test_mask_ratio_reaches_the_models_forward(tmp_path, monkeypatch):
    """--mask-ratio is what every training forward gets, and it masks that many patches."""
    ratio = random.choice([0.25, 0.5, 0.6, 0.9])
    seen = []

    def record(module, args, kwargs, output):
        if module.training:
            seen.append((kwargs.get("mask_ratio"), output[2].sum(dim=1)))

    _hook_the_runs_model(monkeypatch, record)
    assert pretrain.main(TINY + ["--data", "synthetic", "--img-size", "16", "--epochs", "1",
                                 "--batch-size", "4", "--steps-per-epoch", "2",
                                 "--mask-ratio", str(ratio), "--output-dir", str(tmp_path)]) == 0
    patches = (16 // 4) ** 2
    assert len(seen) == 2
    for mask_ratio, masked in seen:
        assert mask_ratio == ratio
        assert masked.tolist() == [patches - int(patches * (1 - ratio))] * 4


# --------------------------------------------------------------------------- official spellings

# Every option of main_pretrain.py's get_args_parser (facebookresearch/mae).
MAIN_PRETRAIN_OPTIONS = {
    "--batch_size", "--epochs", "--accum_iter", "--model", "--input_size", "--mask_ratio",
    "--norm_pix_loss", "--weight_decay", "--lr", "--blr", "--min_lr", "--warmup_epochs",
    "--data_path", "--output_dir", "--log_dir", "--device", "--seed", "--resume", "--start_epoch",
    "--num_workers", "--pin_mem", "--no_pin_mem", "--world_size", "--local_rank", "--dist_on_itp",
    "--dist_url"}


def test_official_command_line_parses():
    """The main_pretrain.py arguments of the official PRETRAIN.md's ViT-L command (its submitit
    flags left out), with the rest of main_pretrain.py's options spelled its way."""
    data = f"/datasets/imagenet{random.randint(0, 999)}"
    args = pretrain.build_parser().parse_args([
        "--batch_size", "64", "--model", "mae_vit_large_patch16", "--norm_pix_loss",
        "--mask_ratio", "0.75", "--epochs", "800", "--warmup_epochs", "40", "--blr", "1.5e-4",
        "--weight_decay", "0.05", "--data_path", data,
        "--accum_iter", "2", "--input_size", "224", "--min_lr", "1e-6", "--output_dir", "./od",
        "--device", "cuda", "--seed", "3", "--resume", "", "--num_workers", "10", "--no_pin_mem"])
    assert (args.batch_size, args.model, args.norm_pix_loss, args.mask_ratio) == \
        (64, "mae_vit_large_patch16", True, 0.75)
    assert (args.epochs, args.warmup_epochs, args.blr, args.lr, args.weight_decay) == \
        (800, 40, 1.5e-4, None, 0.05)
    assert (args.data, args.accum_iter, args.img_size, args.min_lr, args.output_dir) == \
        (data, 2, 224, 1e-6, "./od")
    assert (args.device, args.seed, args.num_workers) == ("cuda", 3, 10)
    assert args.resume is None and args.pin_mem is False
    parse = pretrain.build_parser().parse_args
    assert parse(["--model", "mae_vit_tiny_patch4"]).pin_mem is True  # official default
    assert parse(["--model", "mae_vit_tiny_patch4", "--no_pin_mem", "--pin_mem"]).pin_mem is True
    assert parse(["--model", "mae_vit_tiny_patch4", "--no-pin-mem"]).pin_mem is False
    assert parse(["--model", "mae_vit_tiny_patch4", "--resume", "auto"]).resume == "auto"


def test_help_names_the_official_spellings_it_takes_and_refuses(capsys):
    accepted, refused = set(pretrain.OFFICIAL_SPELLINGS), set(pretrain.OFFICIAL_REFUSED)
    assert accepted | refused == MAIN_PRETRAIN_OPTIONS and not accepted & refused
    options = pretrain.build_parser()._option_string_actions
    assert accepted <= set(options) and not refused & set(options)
    assert pretrain.main(["--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert ("main_pretrain.py spellings work as they do there: "
            + ", ".join(pretrain.OFFICIAL_SPELLINGS)) in help_text
    assert "these are refused: " + ", ".join(pretrain.OFFICIAL_REFUSED) in help_text
    assert ("--epochs 800 (400 there) and --blr 1.5e-4 (1e-3 there)" in help_text
            and "(10 there)" in help_text)


@pytest.mark.parametrize("flag", sorted(pretrain.OFFICIAL_REFUSED))
def test_refused_official_flags_are_named(tmp_path, capsys, flag):
    value = [] if flag == "--dist_on_itp" else ["1"]
    rc = pretrain.main(TINY + ["--epochs", "1", "--output-dir", str(tmp_path), flag, *value])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"error: {flag} is main_pretrain.py's option, refused here: " in err, err
    assert pretrain._REFUSED_WHY[flag] in err and len(err.strip().splitlines()) == 1, err
    assert not tmp_path.joinpath(pretrain.CHECKPOINT).exists()
    # hyphenated and --flag=value spellings too; after '--' nothing is an option
    assert pretrain._refused_flag(["--start-epoch=3"]) == "--start_epoch"
    assert pretrain._refused_flag(["--", "--start_epoch"]) is None


def test_pin_memory_when_asked_and_on_cuda(tmp_path):
    parse = pretrain.build_parser().parse_args
    pin, no_pin = parse(["--model", "mae_vit_tiny_patch4"]), parse(
        ["--model", "mae_vit_tiny_patch4", "--no_pin_mem"])
    assert pretrain._pin_memory(pin, torch.device("cuda", 0)) is True
    assert pretrain._pin_memory(no_pin, torch.device("cuda", 0)) is False
    assert pretrain._pin_memory(pin, torch.device("cpu")) is False
    # the DataLoader gets it (a CPU run: nothing to pin for)
    args = parse(TINY + ["--data", "synthetic", "--synthetic-size", "8", "--img-size", "16",
                         "--batch-size", "4", "--output-dir", str(tmp_path), "--pin_mem"])
    rt = pretrain._Runtime(args)
    assert pretrain._Job(args, rt).loader.pin_memory is False


def test_resume_empty_string_starts_afresh(tmp_path, capsys):
    out = tmp_path / "out"
    run = TINY + ["--data", "synthetic", "--img-size", "16", "--batch-size", "4",
                  "--steps-per-epoch", "2", "--output-dir", str(out)]
    assert pretrain.main(run + ["--epochs", "1"]) == 0
    first = _checkpoint(out)
    capsys.readouterr()
    # no resume: refused in the folder of a run, epoch 1 anew in another
    assert pretrain.main(run + ["--epochs", "1", "--resume", ""]) == 2
    assert "holds a run" in capsys.readouterr().err
    other = tmp_path / "other"
    assert pretrain.main(run + ["--epochs", "1", "--resume", "", "--output-dir", str(other)]) == 0
    assert "resumed from" not in capsys.readouterr().out
    again = _checkpoint(other)
    assert again["epoch"] == 0 and again["step"] == 2
    for key, value in first["model"].items():  # the same seeded run, done again
        assert torch.equal(value, again["model"][key]), key


# --------------------------------------------------------------------------- GradScaler state

def test_scaler_state_only_with_fp16_and_resumes_either_way(tmp_path, capsys):
    """fp32 writes no 'scaler' entry (official load_model loads any it finds, and a GradScaler
    refuses None); fp16 resuming from such a checkpoint starts a fresh scaler and says so; fp16
    resuming from an fp16 checkpoint continues its scaler; a bad 'scaler' entry is a clear
    error."""
    out = tmp_path / "out"
    run = TINY + ["--data", "synthetic", "--img-size", "16", "--batch-size", "4",
                  "--steps-per-epoch", "2", "--output-dir", str(out), "--resume", "auto"]
    assert pretrain.main(run + ["--epochs", "1"]) == 0
    assert "scaler" not in _checkpoint(out)
    capsys.readouterr()

    assert pretrain.main(run + ["--epochs", "2", "--dtype", "fp16"]) == 0
    assert "holds no GradScaler state" in capsys.readouterr().out
    ckpt = _checkpoint(out)
    assert ckpt["scaler"]["scale"] >= 65536.0 / 4  # fresh: 2 ** 16, halved at most twice
    assert ckpt["scaler"]["_growth_tracker"] + math.log2(65536.0 / ckpt["scaler"]["scale"]) <= 2
    official = torch.amp.GradScaler("cpu")  # what official load_model does with the entry
    official.load_state_dict(ckpt["scaler"])
    assert official.get_scale() == ckpt["scaler"]["scale"]

    # an fp16 resume continues the saved scaler: a scale set low stays low (it would grow only
    # after 2000 good steps), where a fresh one starts at 65536
    low = float(2 ** random.randint(3, 10))
    ckpt["scaler"]["scale"] = low
    torch.save(ckpt, out / pretrain.CHECKPOINT)
    assert pretrain.main(run + ["--epochs", "3", "--dtype", "fp16"]) == 0
    assert "holds no GradScaler state" not in capsys.readouterr().out
    assert 0 < _checkpoint(out)["scaler"]["scale"] <= low

    # fp32 resuming from it drops the entry
    assert pretrain.main(run + ["--epochs", "4"]) == 0
    assert "scaler" not in _checkpoint(out)

    ckpt = _checkpoint(out)
    ckpt["scaler"] = {"not": "a scaler state"}
    torch.save(ckpt, out / pretrain.CHECKPOINT)
    capsys.readouterr()
    assert pretrain.main(run + ["--epochs", "5", "--dtype", "fp16"]) == 2
    assert "its 'scaler' entry is not a GradScaler state" in capsys.readouterr().err


# --------------------------------------------------------------------------- official checkpoints

def _official_checkpoint(path, epoch, run_args, optimizer_groups=_timm_add_weight_decay):
    """Write what main_pretrain.py's misc.save_model writes after ``epoch``: the weights of a model
    trained two AdamW steps (a fastmae model: models_mae's modules, keys and order), the plain
    optimizer.state_dict() over timm's groups, the NativeScaler's GradScaler state and the
    argparse.Namespace. Returns (checkpoint, {official parameter index: name})."""
    torch.manual_seed(random.randrange(2 ** 31))
    model = fastmae.mae_vit_tiny_patch4(img_size=16)
    args = argparse.Namespace(
        batch_size=4, epochs=400, accum_iter=1, model="mae_vit_tiny_patch4", input_size=16,
        mask_ratio=0.75, norm_pix_loss=False, weight_decay=0.05, lr=run_args["lr"], blr=2e-2,
        min_lr=0.0, warmup_epochs=0, data_path="/datasets/imagenet", output_dir="./output_dir",
        log_dir="./output_dir", device="cuda", seed=0, resume="", start_epoch=0, num_workers=10,
        pin_mem=True, distributed=False, world_size=1, local_rank=-1, dist_on_itp=False,
        dist_url="env://")
    groups = optimizer_groups(model, args.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
    for _ in range(2):
        loss, _, _ = model(torch.rand(4, 3, 16, 16), mask_ratio=args.mask_ratio)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    # a CUDA run's NativeScaler (torch.cuda.amp.GradScaler), in a scale it reached
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** random.randint(8, 14))
    ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
            "scaler": scaler.state_dict(), "args": args}
    torch.save(ckpt, path)
    name_of = {id(p): n for n, p in model.named_parameters()}
    index_to_name = dict(enumerate(name_of[id(p)] for g in groups for p in g["params"]))
    return ckpt, index_to_name


def test_resumes_a_main_pretrain_checkpoint_where_official_would(tmp_path, monkeypatch, capsys):
    """An official main_pretrain.py checkpoint of epoch e (argparse.Namespace args, index-keyed
    AdamW state, GradScaler state) resumes at epoch e + 1 with its weights, its AdamW state
    under the right parameter names and its GradScaler scale, and trains on."""
    epoch = random.randint(0, 5)
    steps, lr = 2, 2e-2 * 4 / 256  # TINY's blr at batch 4, as fastmae resolves it
    path = tmp_path / f"checkpoint-{epoch}.pth"
    official, index_to_name = _official_checkpoint(path, epoch, {"lr": lr})
    seen = {}
    resume = pretrain._Job._resume

    def recording_resume(job):
        before = job.model.state_dict()
        assert not all(torch.equal(v, official["model"][k]) for k, v in before.items())
        seen["start"] = resume(job)
        seen["model"] = {k: v.clone() for k, v in job.model.state_dict().items()}
        params = dict(job.model.named_parameters())
        seen["optimizer"] = {name: {k: v.clone() for k, v in job.optimizer.state[p].items()}
                             for name, p in params.items() if p in job.optimizer.state}
        seen["scale"] = job.scaler.get_scale()
        return seen["start"]

    monkeypatch.setattr(pretrain._Job, "_resume", recording_resume)
    out = tmp_path / "out"
    assert pretrain.main(TINY + ["--data", "synthetic", "--img-size", "16", "--batch-size", "4",
                                 "--steps-per-epoch", str(steps), "--epochs", str(epoch + 2),
                                 "--dtype", "fp16", "--resume", str(path),
                                 "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (f"resumed from {path} (a main_pretrain.py checkpoint): epoch {epoch + 1} done, "
            f"global step {(epoch + 1) * steps}") in printed
    # its args were read (in fastmae's names): only what differs is named
    warning = next(line for line in printed.splitlines() if line.startswith("warning: resuming"))
    assert warning.endswith(
        f": data '/datasets/imagenet' -> 'synthetic'; epochs 400 -> {epoch + 2}"), warning

    assert seen["start"][0] == epoch + 1            # official: start_epoch = epoch + 1
    for key, value in official["model"].items():
        assert torch.equal(seen["model"][key], value), key
    state = official["optimizer"]["state"]
    assert len(seen["optimizer"]) == len(state) == len(index_to_name)
    for index, name in index_to_name.items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(seen["optimizer"][name][key], state[index][key]), (name, key)
    for name in ("cls_token", "mask_token", "blocks.0.attn.qkv.weight", "decoder_pred.bias"):
        assert seen["optimizer"][name]["step"].item() == 2
    assert seen["scale"] == official["scaler"]["scale"]

    ckpt = _checkpoint(out)                         # and it trained on, one epoch
    assert ckpt["epoch"] == epoch + 1 and ckpt["step"] == (epoch + 2) * steps
    assert [r["epoch"] for r in _log(out)] == [epoch + 1]
    assert next(iter(ckpt["optimizer"]["state"].values()))["step"].item() == 2 + steps


def _one_weight_left_out(model, weight_decay):
    groups = _timm_add_weight_decay(model, weight_decay)
    groups[1]["params"] = groups[1]["params"][:-1]
    return groups


def _decay_group_reversed(model, weight_decay):
    groups = _timm_add_weight_decay(model, weight_decay)
    groups[1]["params"] = groups[1]["params"][::-1]
    return groups


@pytest.mark.parametrize("groups", [_one_weight_left_out, _decay_group_reversed],
                         ids=["count", "order"])
def test_a_main_pretrain_optimizer_of_another_model_is_a_clear_error(tmp_path, capsys, groups):
    """An official optimizer state whose groups hold a different number of parameters, or whose
    state tensors do not have the shapes of the parameters they map to, is refused by name."""
    path = tmp_path / "checkpoint-3.pth"
    _official_checkpoint(path, 3, {"lr": 2e-2 * 4 / 256}, optimizer_groups=groups)
    model = fastmae.mae_vit_tiny_patch4(img_size=16)
    name_of = {id(p): n for n, p in model.named_parameters()}
    no_decay, decay = ([name_of[id(p)] for p in g["params"]]
                       for g in _timm_add_weight_decay(model, 0.05))
    rc = pretrain.main(TINY + ["--data", "synthetic", "--img-size", "16", "--batch-size", "4",
                               "--epochs", "5", "--resume", str(path),
                               "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"fastmae pretrain: error: {path}: its optimizer" in err
    if groups is _one_weight_left_out:
        assert (f"param groups of [{len(no_decay)}, {len(decay) - 1}] parameters where this "
                f"model's are [{len(no_decay)}, {len(decay)}]") in err, err
    else:  # the first decay index holds the last weight's state, and maps to the first weight
        first, last = (dict(model.named_parameters())[n] for n in (decay[0], decay[-1]))
        assert first.shape != last.shape
        index = len(no_decay)
        assert (f"'exp_avg' for parameter {index} has shape {tuple(last.shape)}, but parameter "
                f"{index} is {decay[0]}, of shape {tuple(first.shape)}") in err, err
    assert not (tmp_path / "out" / pretrain.CHECKPOINT).exists()


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
                                  "batch size 0", "empty output dir"])
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
    elif case == "empty output dir":  # main_pretrain.py's "save nothing"
        args += ["--output_dir", ""]
        expected = ["--output-dir ''", "give a folder"]
    else:
        args += ["--batch-size", "0"]
        expected = ["--batch-size", "positive integer"]
    rc = pretrain.main(args)
    err = capsys.readouterr().err
    assert rc == 2
    for text in expected:
        assert text in err, err
    assert not (tmp_path / "out").exists()  # a run that fails before training leaves no folder


# --------------------------------------------------------------------------- the output folder

_SMALL_RUN = TINY + ["--data", "synthetic", "--img-size", "16", "--batch-size", "4",
                     "--epochs", "1", "--warmup-epochs", "0", "--steps-per-epoch", "2"]


def _files(folder):
    """Every file of ``folder`` with its bytes and modification time."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in Path(folder).iterdir()}


@pytest.fixture
def finished_run(tmp_path):
    out = tmp_path / "run"
    assert pretrain.main(_SMALL_RUN + ["--output-dir", str(out)]) == 0
    return out


def test_a_fresh_run_into_a_folder_holding_a_run_is_refused(tmp_path, capsys, finished_run):
    before = _files(finished_run)
    capsys.readouterr()
    for resume in ([], ["--resume", ""]):  # '' is main_pretrain.py's "no resume"
        rc = pretrain.main(_SMALL_RUN + ["--output-dir", str(finished_run), *resume])
        err = capsys.readouterr().err
        assert rc == 2
        assert err == (f"fastmae pretrain: error: --output-dir {str(finished_run)!r} holds a run "
                       f"({pretrain.CHECKPOINT}, its log through epoch 1): pass --resume auto to "
                       f"continue it, or choose another folder\n")
        assert _files(finished_run) == before
    # --resume auto continues it (here: nothing left to do), and starts afresh in a new folder
    assert pretrain.main(_SMALL_RUN + ["--output-dir", str(finished_run), "--resume", "auto"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    new = tmp_path / "new"
    assert pretrain.main(_SMALL_RUN + ["--output-dir", str(new), "--resume", "auto"]) == 0
    assert "starting afresh" in capsys.readouterr().out
    assert _checkpoint(new)["epoch"] == 0 and [r["epoch"] for r in _log(new)] == [0]


def test_resuming_another_checkpoint_into_a_folder_holding_a_run_is_refused(
        tmp_path, capsys, finished_run):
    other = tmp_path / "other"
    assert pretrain.main(_SMALL_RUN + ["--output-dir", str(other)]) == 0
    before = _files(finished_run)
    capsys.readouterr()
    for resume in (other, other / pretrain.CHECKPOINT):  # a run's folder or its checkpoint
        rc = pretrain.main(_SMALL_RUN + ["--output-dir", str(finished_run), "--epochs", "2",
                                         "--resume", str(resume)])
        assert rc == 2
        assert capsys.readouterr().err == (
            f"fastmae pretrain: error: --output-dir {str(finished_run)!r} holds a run "
            f"({pretrain.CHECKPOINT}, its log through epoch 1), and --resume {str(resume)!r} is "
            f"another checkpoint: continuing from it here would overwrite that run; choose "
            f"another folder, or pass --resume auto to continue the folder's own run\n")
        assert _files(finished_run) == before
    # the folder's own checkpoint, named explicitly, continues it; another checkpoint goes on in
    # a new folder
    for resume, out, logged in ((finished_run / pretrain.CHECKPOINT, finished_run, [0, 1]),
                                (other / pretrain.CHECKPOINT, tmp_path / "continued", [1])):
        assert pretrain.main(_SMALL_RUN + ["--output-dir", str(out), "--epochs", "2",
                                           "--resume", str(resume)]) == 0
        assert [r["epoch"] for r in _log(out)] == logged


def test_a_run_that_fails_before_training_leaves_no_folder_and_no_change(
        tmp_path, capsys, finished_run):
    data = _write_image_folder(tmp_path / "data", n=8)
    (data / "class0" / "broken.jpg").write_bytes(b"this is not a JPEG")
    bad_data = _SMALL_RUN + ["--data", str(data)]
    # a fresh run: no folder left behind
    assert pretrain.main(bad_data + ["--output-dir", str(tmp_path / "fresh")]) == 2
    assert "broken.jpg" in capsys.readouterr().err
    assert not (tmp_path / "fresh").exists()
    # a resumed run (whose log it would rewrite) and a bad --resume: the run's files untouched
    before = _files(finished_run)
    jpeg = tmp_path / "photo.jpg"
    jpeg.write_bytes((data / "class0" / "img0.jpg").read_bytes())
    for extra in (["--resume", "auto", "--epochs", "2"], ["--resume", str(jpeg)]):
        args = (bad_data if "auto" in extra else _SMALL_RUN) + ["--output-dir", str(finished_run)]
        assert pretrain.main(args + extra) == 2
        assert "error: " in capsys.readouterr().err
        assert _files(finished_run) == before
        assert [r["epoch"] for r in _log(finished_run)] == [0]


def test_an_output_dir_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "a-file"
    path.write_text("not a folder")
    assert pretrain.main(_SMALL_RUN + ["--output-dir", str(path)]) == 2
    assert capsys.readouterr().err == \
        f"fastmae pretrain: error: --output-dir {str(path)!r} is a file, not a folder\n"
    assert pretrain.main(_SMALL_RUN + ["--output-dir", str(path / "sub")]) == 2
    assert f"--output-dir {str(path / 'sub')!r}: {str(path)!r} is a file" in capsys.readouterr().err
    assert path.read_text() == "not a folder"


@pytest.mark.parametrize("case", ["empty file", "jpeg", "pickle of objects", "folder", "run folder",
                                  "another model"])
def test_resume_says_what_is_wrong_with_the_checkpoint(tmp_path, capsys, finished_run, case):
    capsys.readouterr()
    out = tmp_path / "out"
    run = _SMALL_RUN + ["--output-dir", str(out)]
    path = tmp_path / "ckpt.pth"
    if case == "empty file":
        path.write_bytes(b"")
        expected = f"--resume {str(path)!r} is an empty file, not a checkpoint"
    elif case == "jpeg":
        path = tmp_path / "photo.jpg"
        Image.new("RGB", (8, 8)).save(path)
        expected = (f"--resume {str(path)!r} is not a checkpoint: expected a file written by "
                    f"torch.save (.pth) or a fastmae/main_pretrain.py checkpoint")
    elif case == "pickle of objects":
        torch.save({"model": types.SimpleNamespace()}, path)
        expected = f"--resume {str(path)!r} holds a types.SimpleNamespace object"
    elif case == "folder":
        path = tmp_path / "empty-folder"
        path.mkdir()
        expected = f"--resume {str(path)!r} is a folder without {pretrain.CHECKPOINT}"
    elif case == "run folder":  # its checkpoint-last.pth: resumed, and nothing is left to do
        rc = pretrain.main(run + ["--resume", str(finished_run)])
        captured = capsys.readouterr()
        assert rc == 0, captured.err
        assert f"resumed from {finished_run / pretrain.CHECKPOINT}: epoch 1 done" in captured.out
        return
    else:
        path = finished_run
        run = [a if a != "mae_vit_tiny_patch4" else "mae_vit_base_patch16" for a in run]
        run += ["--img-size", "32"]
        expected = (f"--resume {str(path / pretrain.CHECKPOINT)!r} (saved from "
                    f"mae_vit_tiny_patch4) does not fit --model mae_vit_base_patch16: it lacks ")
    assert pretrain.main(run + ["--resume", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastmae pretrain: error: " + expected), err
    assert len(err.splitlines()) == 1 and "weights_only" not in err
    assert "StateDictOptions" not in err and "strict" not in err
    assert not out.exists()


def test_derive_seed_neighbouring_inputs_give_unrelated_seeds():
    """derive_seed's promise: inputs one apart in any part (the last one too) give unrelated
    63-bit seeds, about half their bits different."""
    rng = random.Random()
    for _ in range(300):
        parts = [rng.randrange(-2 ** 40, 2 ** 40) for _ in range(rng.randint(1, 4))]
        other = list(parts)
        other[rng.randrange(len(parts))] += 1
        a, b = fastmae_data.derive_seed(*parts), fastmae_data.derive_seed(*other)
        assert 0 <= a < 2 ** 63 and 0 <= b < 2 ** 63
        assert 10 <= bin(a ^ b).count("1") <= 53, (parts, other)


def test_image_paths_are_sorted_whatever_the_order_on_disk(tmp_path):
    """Index i is the same file on every machine: the paths are sorted by relative path, not
    listed in the file system's order."""
    rng = random.Random()
    root = tmp_path / "data"
    rels = sorted({f"{rng.choice(['', 'n01/', 'n02/', 'zz/'])}{rng.randrange(10 ** 6):06d}.png"
                   for _ in range(40)})
    for rel in rng.sample(rels, len(rels)):  # written in a random order
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), tuple(rng.randrange(256) for _ in range(3))).save(root / rel)
    ds = ImageFolderImages(str(root), 16)
    assert [os.path.relpath(p, root) for p in ds.paths] == [r.replace("/", os.sep) for r in rels]


def test_upper_case_extensions_are_images(tmp_path):
    """ImageNet's training files end in .JPEG: extensions match whatever their case, as
    torchvision's ImageFolder matches them."""
    root = tmp_path / "data" / "n01440764"
    root.mkdir(parents=True)
    pixels = (torch.rand(20, 24, 3) * 255).byte().numpy()
    for name in ("n01440764_10026.JPEG", "b.PNG", "c.Jpg", "d.jpeg"):
        fmt = "PNG" if name.lower().endswith("png") else "JPEG"
        Image.fromarray(pixels).save(root / name, format=fmt)
    (root / "notes.TXT").write_text("not an image")
    ds = build_dataset(str(tmp_path / "data"), 16)
    assert sorted(os.path.basename(p) for p in ds.paths) == ["b.PNG", "c.Jpg", "d.jpeg",
                                                              "n01440764_10026.JPEG"]
    assert ds.image(0).shape == (3, 16, 16)


def test_a_sample_is_augmented_for_the_epoch_set(tmp_path):
    """ds[i] (what the DataLoader reads) is image(i, epoch) for the epoch set_epoch gave: a new
    crop every epoch."""
    data = _write_image_folder(tmp_path / "data", n=3)
    ds = ImageFolderImages(str(data), 16, seed=random.randrange(2 ** 31))
    firsts = []
    for epoch in (0, 1, 5):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            image, index = ds[i]
            assert index == i and torch.equal(image, ds.image(i, epoch)), (i, epoch)
        firsts.append(ds[0][0])
    assert not torch.equal(firsts[0], firsts[1])


_OFFICIAL_MEAN, _OFFICIAL_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # main_pretrain.py


def _official_normalize(img01):
    mean, std = torch.tensor(_OFFICIAL_MEAN), torch.tensor(_OFFICIAL_STD)
    return (img01 - mean.view(3, 1, 1)) / std.view(3, 1, 1)


def test_fallback_transform_is_crop_resize_flip_normalize():
    """Without torchvision, pixel for pixel what torchvision's pipeline computes: the crop box and
    the flip drawn from the sample's seed, Pillow's crop (left, top, right, bottom), a bicubic
    resize, a left-right flip when torch.rand(1) < 0.5, ToTensor and the ImageNet Normalize."""
    rng = random.Random()
    W, H = rng.randint(20, 60), rng.randint(20, 60)
    img = Image.fromarray((torch.rand(H, W, 3) * 255).byte().numpy())
    transform = _RandomResizedCropFlip(16)
    flips = set()
    with torch.random.fork_rng(devices=[]):
        for _ in range(40):
            seed = rng.randrange(2 ** 63)
            torch.manual_seed(seed)
            i, j, h, w = _torchvision_get_params(W, H, (0.2, 1.0), (3 / 4, 4 / 3))
            flip = bool(torch.rand(1) < 0.5)
            torch.manual_seed(seed)
            got = transform(img)
            want = img.crop((j, i, j + w, i + h)).resize((16, 16), Image.BICUBIC)
            if flip:
                want = want.transpose(Image.FLIP_LEFT_RIGHT)
            want = torch.from_numpy(np.array(want)).permute(2, 0, 1).float().div_(255)
            assert torch.equal(got, _official_normalize(want)), (W, H, seed)
            flips.add(flip)
    assert flips == {True, False}


def test_synthetic_images_are_normalized_with_imagenets_mean_and_std():
    seed, size = random.randrange(2 ** 31), 16
    ds = SyntheticImages(8, size, seed=seed)
    for i in range(len(ds)):
        image, index = ds[i]
        assert index == i
        torch.testing.assert_close(image, _official_normalize(synthetic_image(seed, i, size)),
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode, fmt", [("L", "PNG"), ("LA", "PNG"), ("RGBA", "PNG"), ("P", "PNG"),
                                       ("CMYK", "JPEG")])
def test_images_of_any_mode_are_read_as_rgb(tmp_path, mode, fmt):
    """ImageNet holds grayscale and CMYK JPEGs (and PNGs with alpha): each is read as the RGB
    image Pillow converts it to, three channels, like torchvision's pil_loader."""
    pixels = (torch.rand(30, 26, 4) * 255).byte().numpy()
    src = (Image.fromarray(pixels, "RGBA") if "A" in mode
           else Image.fromarray(pixels[..., :3], "RGB"))
    src = src.convert(mode)
    (tmp_path / "odd").mkdir()
    (tmp_path / "rgb").mkdir()
    path = tmp_path / "odd" / f"x.{fmt.lower()}"
    src.save(path, format=fmt)
    with Image.open(path) as im:
        im.convert("RGB").save(tmp_path / "rgb" / "x.png")
    seed = random.randrange(2 ** 31)
    odd = ImageFolderImages(str(tmp_path / "odd"), 16, seed=seed)
    rgb = ImageFolderImages(str(tmp_path / "rgb"), 16, seed=seed)
    for epoch in range(3):
        image = odd.image(0, epoch)
        assert image.shape == (3, 16, 16)
        assert torch.equal(image, rgb.image(0, epoch))


def test_a_partial_accumulation_at_an_epochs_end_is_dropped(tmp_path, monkeypatch):
    """Iterations per epoch not a multiple of --accum-iter: the epoch's last iteration takes no
    optimizer step and its gradient does not leak into the next epoch (official train_one_epoch
    zero_grads when an epoch starts): a straight run equals one stopped after epoch 1 and resumed,
    whose gradients start empty."""
    accum = random.randint(2, 3)
    steps = accum + 1  # one full accumulation, then one iteration left over
    run = TINY + ["--data", "synthetic", "--img-size", "16", "--epochs", "2", "--batch-size", "4",
                  "--accum-iter", str(accum), "--steps-per-epoch", str(steps),
                  "--blr", repr(random.uniform(5e-3, 3e-2))]
    straight, resumed = _straight_and_resumed(tmp_path, monkeypatch, run, stop_after=1)
    a, b = _checkpoint(straight), _checkpoint(resumed)
    for state in a["optimizer"]["state"].values():
        assert state["step"].item() == 2  # one step an epoch: the left-over iterations took none
    assert _step_losses(straight) == _step_losses(resumed)  # bitwise
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_each_epoch_reads_a_seeded_permutation_augmented_and_masked_for_its_epoch(
        tmp_path, monkeypatch):
    """Batch i of epoch e (module docstring): the samples DistributedSampler's permutation seeded
    by seed + e puts there (a new order every epoch), each augmented for (seed, e, sample) and
    masked with the noise of (seed, e, sample): new crops and masks every epoch."""
    seed, batch, steps, epochs = random.randrange(1, 2 ** 31), 4, 2, 2
    data = _write_image_folder(tmp_path / "data", n=12)
    seen = []

    def record(module, args, kwargs):
        if module.training:
            seen.append((args[0].clone(), kwargs["noise"].clone()))

    _hook_the_runs_model(monkeypatch, record, before=True)
    assert pretrain.main(TINY + ["--data", str(data), "--img-size", "16", "--epochs", str(epochs),
                                 "--batch-size", str(batch), "--steps-per-epoch", str(steps),
                                 "--seed", str(seed), "--output-dir", str(tmp_path / "out")]) == 0
    assert len(seen) == epochs * steps
    ds = build_dataset(str(data), 16, seed)
    orders = []
    for epoch in range(epochs):
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed + epoch))
        orders.append(order.tolist())
        for it in range(steps):
            indices = orders[-1][it * batch:(it + 1) * batch]
            imgs, noise = seen[epoch * steps + it]
            want = torch.stack([ds.image(j, epoch) for j in indices])
            assert torch.equal(imgs, want), (epoch, it)
            want = pretrain.masking_noise(seed, epoch, indices, (16 // 4) ** 2)
            assert torch.equal(noise, want), (epoch, it)
    assert orders[0] != orders[1]
    j = random.randrange(len(ds))  # a sample's crop and noise change with the epoch
    assert not torch.equal(ds.image(j, 0), ds.image(j, 1))
    assert not torch.equal(pretrain.masking_noise(seed, 0, [j], 16),
                           pretrain.masking_noise(seed, 1, [j], 16))


def test_fp16_overflow_backs_the_scale_off_and_skips_the_steps(tmp_path):
    """fp16 with a GradScaler whose scale overflows the fp16 gradients: every step is skipped
    (weights and AdamW state as they were) and the scale halves at each (GradScaler.update), as
    official NativeScaler does, so a too-high scale recovers."""
    out = tmp_path / "out"
    steps = random.randint(2, 3)
    run = TINY + ["--data", "synthetic", "--img-size", "16", "--batch-size", "4", "--dtype", "fp16",
                  "--steps-per-epoch", str(steps), "--output-dir", str(out), "--resume", "auto"]
    assert pretrain.main(run + ["--epochs", "1"]) == 0
    before = _checkpoint(out)
    huge = 2.0 ** random.randint(60, 90)  # any gradient times this overflows fp16
    before["scaler"]["scale"] = huge
    torch.save(before, out / pretrain.CHECKPOINT)
    assert pretrain.main(run + ["--epochs", "2"]) == 0
    after = _checkpoint(out)
    assert after["scaler"]["scale"] == huge * 0.5 ** steps
    for key, value in before["model"].items():
        assert torch.equal(value, after["model"][key]), key
    for name, state in before["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(v, after["optimizer"]["state"][name][k]), (name, k)


def test_logged_loss_is_the_mean_of_the_epochs_iteration_losses(tmp_path):
    """Official train_one_epoch logs its loss meter's global_avg: the mean of the epoch's
    iteration losses (the loss curve's points, under 100 iterations), not the last one."""
    steps = random.randint(3, 5)
    out = tmp_path / "out"
    assert pretrain.main(TINY + ["--data", "synthetic", "--img-size", "16", "--epochs", "1",
                                 "--batch-size", "4", "--steps-per-epoch", str(steps),
                                 "--output-dir", str(out)]) == 0
    record, = _log(out)
    losses = [loss for _, loss in record["loss_curve"]]
    assert len(losses) == record["iterations"] == steps
    assert [x for x, _ in record["loss_curve"]] == pytest.approx(
        [(it + 1) / steps for it in range(steps)], rel=1e-12)
    assert record["train_loss"] == pytest.approx(sum(losses) / steps, rel=1e-12)
    assert record["train_loss"] != pytest.approx(losses[-1], rel=1e-6)  # the loss moved


@pytest.mark.parametrize("case", ["warmup longer than the run", "mask ratio 1"])
def test_arguments_out_of_the_recipes_range_are_refused(tmp_path, capsys, case):
    """A warm-up longer than the run (its lr would never peak) and a mask ratio of 1 are usage
    errors (exit 2, said, nothing written), not a run or a traceback from the model."""
    epochs = random.randint(1, 5)
    args = TINY + ["--data", "synthetic", "--synthetic-size", "8", "--img-size", "16",
                   "--batch-size", "4", "--steps-per-epoch", "1", "--epochs", str(epochs),
                   "--output-dir", str(tmp_path / "out")]
    if case == "mask ratio 1":
        args += ["--mask-ratio", "1"]
        expected = "--mask_ratio: must be in [0, 1), got 1"
    else:
        args += ["--warmup-epochs", str(epochs + random.randint(1, 3))]
        expected = f"is more than --epochs {epochs}"
    assert pretrain.main(args) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_default_dtype_is_bf16_on_cuda_and_fp32_on_cpu(tmp_path):
    """--help's promise: no --dtype is bf16 on CUDA and fp32 on the CPU (no GradScaler either)."""
    parse = pretrain.build_parser().parse_args
    for device, want in (("cuda", "bf16"), ("cpu", "fp32")):
        rt = types.SimpleNamespace(device=torch.device(device), world_size=1, local_world_size=1)
        args = parse(["--model", "mae_vit_tiny_patch4", "--output-dir", str(tmp_path / device)])
        pretrain._resolve_defaults(args, rt)
        assert args.dtype == want, device
    dtype = random.choice(["bf16", "fp16", "fp32"])  # an explicit one is kept
    args = parse(["--model", "mae_vit_tiny_patch4", "--dtype", dtype,
                  "--output-dir", str(tmp_path)])
    pretrain._resolve_defaults(args, types.SimpleNamespace(device=torch.device("cpu"),
                                                           world_size=1, local_world_size=1))
    assert args.dtype == dtype


def test_kept_reconstructions_are_the_first_the_last_and_every_tenth():
    """reconstruction-epochNNNN.png (module docstring): the first and last epochs' and about ten
    evenly spaced in between."""
    for epochs in (1, 2, 9, 10, random.randint(11, 400)):
        kept = [e for e in range(epochs) if pretrain._keep_reconstruction(e, epochs)]
        assert kept[0] == 0 and kept[-1] == epochs - 1, epochs
        every = max(1, epochs // 10)
        assert all(b - a <= every for a, b in zip(kept, kept[1:])), epochs
        assert len(kept) <= min(epochs, 12), (epochs, kept)


def test_torchrun_two_ranks_accumulating_equal_one_process(tmp_path, single_process_run):
    """DDP with --accum-iter 2: 2 ranks x batch 2 x 2 iterations a step take the steps one process
    with batch 8 takes (the same samples, lr and masks): the gradient all-reduce must come with
    the iteration that steps, after the accumulation, or the ranks' weights part."""
    out = tmp_path / "ddp-accum"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fastmae.cli", "pretrain", *SHARED, "--batch-size", "2", "--accum-iter", "2",
           "--steps-per-epoch", "4", "--output-dir", str(out)]
    env = dict(os.environ, PYTHONPATH=str(REPO), FASTMAE_BACKEND="torch", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "DDP" in proc.stdout
    _assert_outputs(out, epochs=2)
    ref, got = _step_losses(single_process_run), _step_losses(out)
    assert len(got) == 2 * len(ref) == 8
    assert [(a + b) / 2 for a, b in zip(got[::2], got[1::2])] == pytest.approx(ref, rel=1e-5)
    a, b = _checkpoint(single_process_run), _checkpoint(out)
    assert a["args"]["lr"] == pytest.approx(b["args"]["lr"], rel=1e-15)
    # Adam divides a gradient by its own size: rounding noise in a near-zero gradient moves a
    # weight by ~1% of lr a step (as in test_accum_iter_2_equals_a_batch_twice_as_large)
    lr = b["args"]["lr"]
    _assert_weights_close(a["model"], b["model"], lr, 4, 0.05 * lr)
