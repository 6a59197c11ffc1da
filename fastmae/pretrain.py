"""``fastmae pretrain``: pretrain an MAE with the official recipe (facebookresearch/mae
``main_pretrain.py`` + ``engine_pretrain.py``) on one process, under ``torchrun`` with DDP, or with
FSDP2.

The recipe: AdamW with betas (0.9, 0.95); lr = blr x effective batch / 256; a linear warmup, then a
half-cycle cosine, set every iteration from the fractional epoch; weight decay on weights only.

Reproducibility: the model is initialized from ``--seed``; data order is the DistributedSampler's
permutation seeded by seed + epoch; every random thing a sample needs — its augmentation and its
masking noise — is derived from (seed, epoch, sample index). So a run's numbers do not depend on
unsaved state: an interrupted run resumed from ``checkpoint-last.pth`` reaches the same loss as
an uninterrupted one (bitwise on CPU in fp32), and N ranks x batch B see the same samples with the
same masks as one process with batch N x B.

``--cuda-graph`` (one CUDA process): after 3 eager iterations, each iteration -- forward,
backward, AdamW step -- is one replay of a CUDA graph captured once, so the host launches one
graph per iteration instead of every kernel (an eager fastmae step on the H200 we measured was
host-bound: BENCHMARKS.md). The same iterations as an eager run, with fused, capturable AdamW.

Outputs, in ``--output-dir`` (rank 0 only): ``checkpoint-last.pth`` (written atomically every
epoch), ``log.jsonl`` (one line per epoch), ``loss-curve.png`` and ``reconstruction.png`` (every
epoch), and ``reconstruction-epochNNNN.png`` kept for the first, the last and every tenth of the
run's epochs.
"""
import argparse
import contextlib
import glob
import json
import math
import os
import pickle
import random
import re
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist

from fastmae import graphs
from fastmae._provenance import git_commit, triton_version
from fastmae.checkpoint import RefusedObject, torch_load_safely
from fastmae.cli import int_at_least
from fastmae.data import DataError, build_dataset, derive_seed
from fastmae.model import MODELS

CHECKPOINT = "checkpoint-last.pth"
LOG = "log.jsonl"
LOSS_CURVE = "loss-curve.png"
RECONSTRUCTION = "reconstruction.png"

# Test hook: seconds to sleep between writing a checkpoint's temporary file and renaming it, so a
# test can kill the process mid-write.
_CHECKPOINT_PAUSE_ENV = "FASTMAE_TEST_CHECKPOINT_PAUSE"

_TAG_NOISE = 3          # keeps the masking-noise streams apart from data.py's
_VIEW_EPOCH = -1        # the "epoch" whose noise masks the fixed reconstruction batch
_VIEW_IMAGES = 4        # rows in the reconstruction PNG
_CURVE_POINTS = 100     # at most this many loss points per epoch in log.jsonl
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


class _UsageError(ValueError):
    """Arguments that do not fit together or a checkpoint that cannot be used."""


class _NonFiniteLoss(RuntimeError):
    pass


# ============================================================================ command line

_positive_int = int_at_least(1)
_non_negative_int = int_at_least(0)


def _non_negative_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}") from None
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _resume_arg(text):
    """``--resume``'s value; '' (main_pretrain.py's default spelling) means no resume."""
    return text or None


def _mask_ratio(text):
    value = _non_negative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


# main_pretrain.py's options that fastmae pretrain takes as they are spelled there, and those it
# refuses: the launcher sets the distributed ones, and fastmae has no TensorBoard log and starts
# a run at an epoch only from a checkpoint (--resume).
OFFICIAL_SPELLINGS = ("--batch_size", "--epochs", "--accum_iter", "--model", "--input_size",
                      "--mask_ratio", "--norm_pix_loss", "--weight_decay", "--lr", "--blr",
                      "--min_lr", "--warmup_epochs", "--data_path", "--output_dir", "--device",
                      "--seed", "--resume", "--num_workers", "--pin_mem", "--no_pin_mem")
OFFICIAL_REFUSED = ("--log_dir", "--start_epoch", "--world_size", "--local_rank", "--dist_on_itp",
                    "--dist_url")
_LAUNCHER = "torchrun sets it (`torchrun --nproc_per_node N -m fastmae.cli pretrain ...`)"
_REFUSED_WHY = {
    "--log_dir": "fastmae writes no TensorBoard log: its log.jsonl is in --output-dir",
    "--start_epoch": "a run starts at a later epoch only from its checkpoint: use --resume",
    "--world_size": _LAUNCHER,
    "--local_rank": _LAUNCHER,
    "--dist_on_itp": "fastmae runs distributed under torchrun, not on ITP",
    "--dist_url": _LAUNCHER,
}


def _refused_flag(argv):
    """The first of main_pretrain.py's refused options in ``argv`` (also spelled with hyphens or
    as --flag=value), or None."""
    for arg in argv:
        if arg == "--":
            break
        if arg.startswith("--"):
            name = "--" + arg[2:].split("=", 1)[0].replace("-", "_")
            if name in OFFICIAL_REFUSED:
                return name
    return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastmae pretrain",
        description="Pretrain a Masked Autoencoder with the official recipe. Run it under "
                    "`torchrun --nproc_per_node N` for data-parallel training. These "
                    "main_pretrain.py spellings work as they do there: "
                    f"{', '.join(OFFICIAL_SPELLINGS)} (--resume '' is no resume; --output_dir "
                    f"'', no saving there, is refused); these are refused: "
                    f"{', '.join(OFFICIAL_REFUSED)}.",
        epilog="Defaults that differ from main_pretrain.py's: --epochs 800 (400 there) and "
               "--blr 1.5e-4 (1e-3 there), as in the commands its PRETRAIN.md recommends; "
               "--model has none (mae_vit_large_patch16 there); --num-workers is min(8, CPUs "
               "per process) (10 there); --dtype is bf16 on CUDA (fp16 with a GradScaler "
               "there); --data is synthetic (a path there).")
    a = p.add_argument
    a("--model", required=True, choices=sorted(MODELS), metavar="NAME",
      help=f"model factory: {', '.join(sorted(MODELS))}")
    a("--data", "--data_path", dest="data", default="synthetic", metavar="DIR|synthetic",
      help="an image folder, searched recursively (class subfolders or flat; only DIR/train "
           "when DIR holds a train/ folder, as main_pretrain.py reads), or 'synthetic': "
           "procedurally generated images (default)")
    a("--img-size", "--input_size", dest="img_size", type=_positive_int, default=None, metavar="PX",
      help="image side (default: the model's: 224, or 32 for mae_vit_tiny_patch4)")
    a("--epochs", type=_positive_int, default=800, metavar="N", help="default: %(default)s")
    a("--warmup-epochs", "--warmup_epochs", dest="warmup_epochs", type=_non_negative_int, default=40,
      metavar="N", help="linear lr warmup (default: %(default)s)")
    a("--batch-size", "--batch_size", dest="batch_size", type=_positive_int, default=64, metavar="N",
      help="images per process per iteration (default: %(default)s)")
    a("--accum-iter", "--accum_iter", dest="accum_iter", type=_positive_int, default=1, metavar="N",
      help="iterations of gradient accumulation per optimizer step (default: %(default)s)")
    a("--blr", type=_non_negative_float, default=1.5e-4, metavar="LR",
      help="base lr: lr = blr x batch-size x accum-iter x processes / 256 (default: %(default)s)")
    a("--lr", type=_non_negative_float, default=None, metavar="LR",
      help="absolute lr; overrides --blr")
    a("--min-lr", "--min_lr", dest="min_lr", type=_non_negative_float, default=0.0, metavar="LR",
      help="where the cosine ends (default: %(default)s)")
    a("--weight-decay", "--weight_decay", dest="weight_decay", type=_non_negative_float, default=0.05,
      metavar="WD", help="AdamW weight decay on weights; none on biases and norms (default: %(default)s)")
    a("--mask-ratio", "--mask_ratio", dest="mask_ratio", type=_mask_ratio, default=0.75, metavar="R",
      help="fraction of patches removed (default: %(default)s)")
    a("--norm-pix-loss", "--norm_pix_loss", dest="norm_pix_loss", action="store_true",
      help="loss on per-patch normalized pixels (the official recipe's choice)")
    a("--dtype", choices=sorted(_DTYPES), default=None,
      help="autocast dtype (default: bf16 on CUDA; fp32 on CPU, where bf16 is slow); "
           "fp16 runs with a GradScaler")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--cuda-graph", "--cuda_graph", dest="cuda_graph", action="store_true",
      help="run each iteration as one CUDA graph replay after 3 eager ones (one CUDA process, "
           "bf16 or fp32, --accum-iter 1, not with --compile; fused AdamW)")
    a("--fsdp", action="store_true", help="shard with FSDP2 (fully_shard per block, then the root)")
    a("--device", default=None, metavar="cuda|cpu", help="default: cuda when there is one")
    a("--output-dir", "--output_dir", dest="output_dir", default="output_dir", metavar="DIR",
      help="checkpoint, log and pictures (default: %(default)s)")
    a("--resume", type=_resume_arg, default=None, metavar="PATH|auto",
      help="continue from a checkpoint; 'auto': OUTPUT_DIR/checkpoint-last.pth when there is "
           "one, else start afresh; '': start afresh")
    a("--seed", type=int, default=0, help="default: %(default)s")
    a("--num-workers", "--num_workers", dest="num_workers", type=_non_negative_int, default=None,
      metavar="N", help="DataLoader workers per process (default: min(8, CPUs per process))")
    a("--pin-mem", "--pin_mem", dest="pin_mem", action="store_true",
      help="the DataLoader pins its batches in page-locked memory on CUDA (the default)")
    a("--no-pin-mem", "--no_pin_mem", dest="pin_mem", action="store_false",
      help="do not pin the DataLoader's batches")
    p.set_defaults(pin_mem=True)
    a("--no-progress", dest="no_progress", action="store_true",
      help="no progress bar (the epoch lines and the log stay)")
    a("--steps-per-epoch", dest="steps_per_epoch", type=_positive_int, default=None, metavar="N",
      help="cap the iterations per epoch (the lr schedule counts this many)")
    a("--synthetic-size", dest="synthetic_size", type=_positive_int, default=10_000, metavar="N",
      help="images in the synthetic data set (default: %(default)s)")
    return p


def main(argv=None) -> int:
    """Run ``fastmae pretrain`` with ``argv`` (the arguments after the command name)."""
    refused = _refused_flag(sys.argv[1:] if argv is None else argv)
    if refused:
        print(f"fastmae pretrain: error: {refused} is main_pretrain.py's option, refused here: "
              f"{_REFUSED_WHY[refused]}", file=sys.stderr)
        return 2
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse reports bad arguments (2) and --help (0) by exiting
        return e.code if isinstance(e.code, int) else 0
    try:
        return _run(args)
    except (DataError, _UsageError) as e:
        print(f"fastmae pretrain: error: {e}", file=sys.stderr)
        return 2
    except _NonFiniteLoss as e:
        print(f"fastmae pretrain: {e}", file=sys.stderr)
        return 1


# ============================================================================ the recipe

def adjust_learning_rate(optimizer, epoch: float, args) -> float:
    """Official ``util/lr_sched.adjust_learning_rate``: a linear warmup to ``args.lr`` over
    ``args.warmup_epochs``, then a half-cycle cosine to ``args.min_lr`` at ``args.epochs``;
    ``epoch`` is fractional."""
    if epoch < args.warmup_epochs:
        lr = args.lr * epoch / args.warmup_epochs
    else:
        progress = (epoch - args.warmup_epochs) / (args.epochs - args.warmup_epochs)
        lr = args.min_lr + (args.lr - args.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    for group in optimizer.param_groups:
        value = lr * group.get("lr_scale", 1.0)
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(value)  # a CUDA graph's optimizer step reads it there
        else:
            group["lr"] = value
    return lr


def named_param_groups(model):
    """([(name, parameter)] without weight decay, [(name, parameter)] with it): timm
    ``add_weight_decay``'s two groups in its order, each in ``named_parameters`` order."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append((name, param))
    return no_decay, decay


def param_groups_weight_decay(model, weight_decay: float):
    """Official (timm ``add_weight_decay``): no decay for biases, norms and other 1-D parameters;
    frozen parameters (the sin-cos position tables) are left out."""
    no_decay, decay = named_param_groups(model)
    return [{"params": [p for _, p in no_decay], "weight_decay": 0.0},
            {"params": [p for _, p in decay], "weight_decay": weight_decay}]


def masking_noise(seed: int, epoch: int, indices, num_patches: int) -> torch.Tensor:
    """(N, L) noise in [0, 1) for the model's ``noise=`` argument: the row of the sample with data
    set index ``i`` depends only on (seed, epoch, i), so a sample is masked the same way whatever
    rank, batch or resumed process sees it."""
    rows = [torch.rand(num_patches, generator=torch.Generator().manual_seed(
        derive_seed(seed, epoch, int(i), _TAG_NOISE))) for i in indices]
    return torch.stack(rows)


# ============================================================================ distributed

class _Runtime:
    """Where this process runs: rank, world size, device."""

    def __init__(self, args):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world_size)))
        want = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if want.startswith("cuda"):
            if not torch.cuda.is_available():
                raise _UsageError("--device cuda: no CUDA device is available")
            self.device = torch.device("cuda", self.local_rank if want == "cuda" else torch.device(want).index)
            torch.cuda.set_device(self.device)
        elif want == "cpu":
            self.device = torch.device("cpu")
        else:
            raise _UsageError(f"--device must be cuda or cpu, got {want!r}")
        self.is_main = self.rank == 0
        self.owns_group = False
        if (self.world_size > 1 or args.fsdp) and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if self.world_size > 1:
                dist.init_process_group(backend)   # torchrun's env:// rendezvous
            else:                                   # --fsdp on one process needs a group too
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            self.owns_group = True
        self.distributed = dist.is_initialized() and dist.get_world_size() > 1

    def mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar over all ranks."""
        if not self.distributed:
            return value.item()
        value = value.detach().float().clone()
        dist.all_reduce(value)  # SUM: gloo has no AVG
        return value.item() / self.world_size

    def same_on_all_ranks(self, value: int) -> bool:
        """Whether every rank holds the same integer ``value``."""
        if not self.distributed:
            return True
        t = torch.tensor([value, -value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # max(v) and -min(v)
        return t[0].item() == -t[1].item()

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def close(self):
        if self.owns_group:
            dist.destroy_process_group()


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


# ============================================================================ files

def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a directory
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path, write, pause=0.0):
    """Write ``path`` so that it is, at every moment, either the old file or the complete new one:
    ``write(f)`` fills a temporary file in the same directory, which is fsynced, renamed over
    ``path`` (atomic on POSIX), and the directory fsynced so the rename itself survives a crash."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it 0600; give it a normal file's mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if pause:
            time.sleep(pause)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _remove_stale_temporaries(output_dir):
    """Temporary files left by a process killed mid-write."""
    for name in (CHECKPOINT, LOG, LOSS_CURVE, RECONSTRUCTION):
        for tmp in glob.glob(os.path.join(glob.escape(output_dir), f".{name}.*.tmp")):
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _read_log(path, before_epoch):
    """The log's records of epochs < ``before_epoch`` (a line cut by a kill is skipped)."""
    records = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and record.get("epoch", before_epoch) < before_epoch:
                    records.append(record)
    return records


def _write_log(path, records):
    text = "".join(json.dumps(r) + "\n" for r in records)
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _save_png(image, path):
    _atomic_write(path, lambda f: image.save(f, format="PNG"))


# ============================================================================ RNG state

def _rng_state():
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        "python": random.getstate(),
        # as tensors and plain numbers so the checkpoint loads with weights_only=True
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
    }


def _set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available() \
            and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))


# ============================================================================ checkpoints

def _state_dict_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    # full (unsharded) tensors on the CPU: the official layout, loadable without fastmae or FSDP
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _gather_state(model, optimizer):
    """(model state_dict, optimizer state_dict), full, on rank 0. A collective under FSDP: every
    rank calls it. The optimizer's state is keyed by parameter name, so a checkpoint written with
    or without FSDP resumes either way."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    return get_state_dict(model, optimizer, options=_state_dict_options())


# How the optimizer runs, not what it has learnt: loading a state dict replaces its param groups
# whole, these flags included, so a resumed run keeps its own (e.g. --cuda-graph's fused,
# capturable AdamW, whose step counts then move to the GPU; an eager run resuming from such a
# checkpoint keeps the official defaults).
_OPTIMIZER_IMPLEMENTATION = ("foreach", "fused", "capturable", "differentiable")


def _with_this_runs_optimizer(optim_sd, optimizer):
    """``optim_sd`` with ``optimizer``'s implementation flags in every param group."""
    own = optimizer.param_groups[0]
    flags = {k: own[k] for k in _OPTIMIZER_IMPLEMENTATION if k in own}
    if not isinstance(optim_sd, dict) or not isinstance(optim_sd.get("param_groups"), list):
        return optim_sd  # not an optimizer state: set_state_dict says what is wrong
    return {**optim_sd, "param_groups": [{**g, **flags} if isinstance(g, dict) else g
                                         for g in optim_sd["param_groups"]]}


def _load_checkpoint(path):
    """The checkpoint at ``path``, loaded safely; a file that is none is a clear error."""
    not_one = (f"--resume {path!r} is not a checkpoint: expected a file written by torch.save "
               f"(.pth) or a fastmae/main_pretrain.py checkpoint")
    try:
        empty = os.path.getsize(path) == 0
    except OSError as e:
        raise _UsageError(f"--resume {path!r}: cannot read it: {e.strerror or e}") from e
    if empty:
        raise _UsageError(f"--resume {path!r} is an empty file, not a checkpoint")
    try:
        return torch_load_safely(path)  # main_pretrain.py's argparse.Namespace 'args' allowed
    except RefusedObject as e:  # a pickle of Python objects, which a safe load does not build
        raise _UsageError(f"--resume {path!r} holds a {e.name} object, which a "
                          f"checkpoint does not: fastmae loads tensors, numbers, strings "
                          f"and containers of them") from None
    except pickle.UnpicklingError:
        raise _UsageError(not_one) from None
    except Exception as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = lines[0] if lines else type(e).__name__
        if "zip archive" in reason or "magic number" in reason:
            raise _UsageError(f"{not_one} (or it is cut short: {reason})") from None
        raise _UsageError(f"--resume {path!r}: cannot load the checkpoint: {reason}") from e


# main_pretrain.py's names for the arguments fastmae spells otherwise
_OFFICIAL_ARG_NAMES = {"input_size": "img_size", "data_path": "data"}


def _saved_args(ckpt):
    """The checkpoint's 'args' as a dict in fastmae's names: fastmae saves a dict, main_pretrain.py
    its argparse.Namespace."""
    saved = ckpt.get("args")
    if isinstance(saved, argparse.Namespace):
        return {_OFFICIAL_ARG_NAMES.get(k, k): v for k, v in vars(saved).items()}
    return saved if isinstance(saved, dict) else {}


def _is_index_keyed(optim_sd) -> bool:
    """Whether ``optim_sd`` is a plain ``optimizer.state_dict()`` (main_pretrain.py's): state and
    param groups refer to parameters by index, where fastmae's name them."""
    groups = optim_sd.get("param_groups") if isinstance(optim_sd, dict) else None
    if not isinstance(groups, list) or not groups:
        return False
    params = [i for g in groups if isinstance(g, dict) for i in g.get("params", ())]
    return bool(params) and all(isinstance(i, int) and not isinstance(i, bool) for i in params)


def _name_keyed_optimizer_state(optim_sd, model, path):
    """main_pretrain.py's index-keyed optimizer state, keyed by parameter name as fastmae's is.
    Its groups are timm add_weight_decay's over the same modules in the same order (no decay,
    then decay, each in named_parameters order), as fastmae's are: the j-th index of a group is
    the j-th parameter of fastmae's group. The group sizes and every state tensor's shape must
    fit, or the checkpoint's model is not this one."""
    own = named_param_groups(model)
    saved = optim_sd["param_groups"]
    saved_sizes = [len(g.get("params", ())) if isinstance(g, dict) else 0 for g in saved]
    own_sizes = [len(group) for group in own]
    if saved_sizes != own_sizes:
        raise _UsageError(
            f"{path}: its optimizer state (main_pretrain.py's index-keyed layout) has param "
            f"groups of {saved_sizes} parameters where this model's are {own_sizes} (no weight "
            f"decay, then weight decay): it was not saved from this model")
    named = {}  # index -> (name, parameter)
    for group, own_group in zip(saved, own):
        named.update(zip(group["params"], own_group))
    if len(named) != sum(own_sizes):
        raise _UsageError(f"{path}: its optimizer's param groups list a parameter index twice")
    state = {}
    for index, entry in optim_sd.get("state", {}).items():
        if index not in named:
            raise _UsageError(f"{path}: its optimizer holds state for parameter {index!r}, "
                              f"which none of its param groups lists")
        name, param = named[index]
        if not isinstance(entry, dict):
            raise _UsageError(f"{path}: its optimizer's state for parameter {index} is a "
                              f"{type(entry).__name__}, not a dict of tensors")
        for key, value in entry.items():
            # 'step' is a count; every other AdamW state tensor has its parameter's shape
            if key != "step" and isinstance(value, torch.Tensor) and value.shape != param.shape:
                raise _UsageError(
                    f"{path}: its optimizer's {key!r} for parameter {index} has shape "
                    f"{tuple(value.shape)}, but parameter {index} is {name}, of shape "
                    f"{tuple(param.shape)}: it was not saved from this model")
        state[name] = entry
    groups = [{**group, "params": [name for name, _ in own_group]}
              for group, own_group in zip(saved, own)]
    return {"state": state, "param_groups": groups}


def _resume_path(args):
    if args.resume is None:
        return None
    if args.resume == "auto":
        path = os.path.join(args.output_dir, CHECKPOINT)
        return path if os.path.exists(path) else None
    if os.path.isdir(args.resume):  # a run's folder: its checkpoint
        path = os.path.join(args.resume, CHECKPOINT)
        if not os.path.isfile(path):
            raise _UsageError(f"--resume {args.resume!r} is a folder without {CHECKPOINT}: give "
                              f"a checkpoint file or a run's folder")
        return path
    if not os.path.isfile(args.resume):
        raise _UsageError(f"--resume {args.resume!r}: no such file")
    return args.resume


def _last_logged_epoch(output_dir):
    """The last epoch (counted from 1) that ``output_dir``'s log records; None when there is
    none or the log cannot be read."""
    try:
        records = _read_log(os.path.join(output_dir, LOG), math.inf)
    except (OSError, UnicodeDecodeError):
        return None
    epochs = [r["epoch"] for r in records if isinstance(r.get("epoch"), int)]
    return epochs[-1] + 1 if epochs else None


def _check_output_dir(args):
    """--output-dir must be a folder this run can make or write, and, unless it resumes the run
    it holds, not hold one: starting afresh there, or from another checkpoint, would overwrite
    its checkpoint and log."""
    out = args.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise _UsageError(f"--output-dir {out!r} is a file, not a folder")
    if not os.path.isdir(out):
        parent = os.path.dirname(os.path.abspath(out))
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise _UsageError(f"--output-dir {out!r}: {parent!r} is a file, not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise _UsageError(f"--output-dir {out!r}: no permission to create it in {parent!r}")
        return
    if not os.access(out, os.W_OK | os.X_OK):
        raise _UsageError(f"--output-dir {out!r}: no permission to write in it")
    own = os.path.join(out, CHECKPOINT)
    if not os.path.exists(own) or args.resume == "auto":
        return
    epoch = _last_logged_epoch(out)
    held = f"--output-dir {out!r} holds a run ({CHECKPOINT}" + \
        (f", its log through epoch {epoch})" if epoch else ")")
    if args.resume is None:
        raise _UsageError(f"{held}: pass --resume auto to continue it, or choose another folder")
    # an explicit --resume of another run's checkpoint would overwrite this folder's run
    named = os.path.join(args.resume, CHECKPOINT) if os.path.isdir(args.resume) else args.resume
    if os.path.exists(named) and not os.path.samefile(named, own):
        raise _UsageError(f"{held}, and --resume {args.resume!r} is another checkpoint: "
                          f"continuing from it here would overwrite that run; choose another "
                          f"folder, or pass --resume auto to continue the folder's own run")


def _model_state_problem(model_sd, model):
    """What keeps the checkpoint's model state from loading into ``model``, or None."""
    if not isinstance(model_sd, dict):
        return f"its 'model' entry is a {type(model_sd).__name__}, not a state dict"
    own = model.state_dict()

    def few(names):
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        return ", ".join(names[:3]) + more
    missing = [k for k in own if k not in model_sd]
    unexpected = [k for k in model_sd if k not in own]
    shapes = [f"{k} is {tuple(model_sd[k].shape)} there, {tuple(own[k].shape)} here"
              for k in own if isinstance(model_sd.get(k), torch.Tensor)
              and tuple(model_sd[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"it lacks {len(missing)} of this model's weights ({few(missing)})")
    if unexpected:
        problems.append(f"it has {len(unexpected)} weights this model lacks ({few(unexpected)})")
    if shapes:
        problems.append(f"{len(shapes)} weights differ in shape ({few(shapes)})")
    return "; ".join(problems) or None


# Arguments that shape the lr schedule, the data order or the masks: a resumed run that changes
# them does not continue the same run.
_RUN_DEFINING = ("model", "data", "img_size", "epochs", "warmup_epochs", "batch_size", "accum_iter",
                 "lr", "min_lr", "weight_decay", "mask_ratio", "norm_pix_loss", "seed",
                 "steps_per_epoch", "synthetic_size", "world_size")


# ============================================================================ pictures

def _view_indices(n):
    """Up to _VIEW_IMAGES data set indices spread over the data (not all from the first class)."""
    k = min(_VIEW_IMAGES, n)
    return [round(j * (n - 1) / max(k - 1, 1)) for j in range(k)]


def _keep_reconstruction(epoch, epochs):
    every = max(1, epochs // 10)
    return epoch == 0 or epoch == epochs - 1 or (epoch + 1) % every == 0


def _nice_ticks(lo, hi, count=5):
    """Round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0) * 0.1
        lo = lo - (hi - lo)
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(lo / step) * step
    ticks = []
    t = first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    if ticks[-1] < hi:
        ticks.append(round(t, 12))
    return ticks


def draw_loss_curve(points, title="training loss"):
    """A PIL line chart of (epoch, loss) points with axes, tick labels and axis titles (Pillow's
    ImageDraw: no plotting library needed)."""
    from PIL import Image, ImageDraw, ImageFont
    width, height = 800, 480
    left, right, top, bottom = 80, 24, 40, 60
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    xs = [p[0] for p in points] or [0.0, 1.0]
    ys = [p[1] for p in points] or [0.0, 1.0]
    xticks = _nice_ticks(0.0, max(max(xs), 1e-9))
    yticks = _nice_ticks(min(ys), max(ys))
    x0, x1, y0, y1 = xticks[0], xticks[-1], yticks[0], yticks[-1]

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (width - left - right),
                height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))

    grey, black, blue = (220, 220, 220), (0, 0, 0), (31, 119, 180)
    for t in yticks:
        _, yy = px(x0, t)
        d.line([(left, yy), (width - right, yy)], fill=grey)
        d.line([(left - 5, yy), (left, yy)], fill=black)
        label = f"{t:.4g}"
        d.text((left - 8 - d.textlength(label, font=font), yy - 6), label, fill=black, font=font)
    for t in xticks:
        xx, _ = px(t, y0)
        d.line([(xx, height - bottom), (xx, height - bottom + 5)], fill=black)
        label = f"{t:g}"
        d.text((xx - d.textlength(label, font=font) / 2, height - bottom + 8), label, fill=black, font=font)
    d.line([(left, top), (left, height - bottom), (width - right, height - bottom)], fill=black, width=1)
    d.text((width / 2 - d.textlength("epoch", font=font) / 2, height - 24), "epoch", fill=black, font=font)
    d.text((8, top - 24), "loss", fill=black, font=font)
    d.text((width / 2 - d.textlength(title, font=font) / 2, 12), title, fill=black, font=font)
    xy = [px(x, y) for x, y in points]
    if len(xy) > 1:
        d.line(xy, fill=blue, width=2)
    for x, y in xy[-1:]:
        d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=blue)
    return img


def _write_reconstruction(model, view_imgs, view_noise, args, epoch, output_dir, write):
    """The reconstruction of the fixed batch. Under FSDP every rank runs the forward (its
    all-gathers are collectives); only ``write`` ranks save it."""
    from fastmae.visualize import reconstruction_image
    image = reconstruction_image(model, view_imgs, mask_ratio=args.mask_ratio, noise=view_noise)
    if write:
        _save_png(image, os.path.join(output_dir, RECONSTRUCTION))
        if _keep_reconstruction(epoch, args.epochs):
            _save_png(image, os.path.join(output_dir, f"reconstruction-epoch{epoch:04d}.png"))


def _curve_points(points):
    """Per-iteration (epoch, loss) points, averaged in chunks down to _CURVE_POINTS."""
    if len(points) <= _CURVE_POINTS:
        return [[x, y] for x, y in points]
    out = []
    for c in range(_CURVE_POINTS):
        chunk = points[c * len(points) // _CURVE_POINTS:(c + 1) * len(points) // _CURVE_POINTS]
        out.append([sum(p[0] for p in chunk) / len(chunk), sum(p[1] for p in chunk) / len(chunk)])
    return out


# ============================================================================ training

def _run(args) -> int:
    rt = _Runtime(args)
    try:
        job = _Job(args, rt)
        return job.train()
    finally:
        rt.close()


def _say(rt, *parts):
    if rt.is_main:
        print(*parts, flush=True)


def _resolve_defaults(args, rt):
    """Fill in the defaults that depend on the machine, and check what argparse cannot."""
    if args.dtype is None:
        args.dtype = "bf16" if rt.device.type == "cuda" else "fp32"
    if args.num_workers is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        args.num_workers = min(8, max(1, cpus // max(1, rt.local_world_size)))
    if not args.output_dir:  # main_pretrain.py's '' for "save nothing"
        raise _UsageError("--output-dir '': fastmae pretrain always writes its checkpoint and "
                          "log; give a folder")
    _check_output_dir(args)
    if args.warmup_epochs > args.epochs:
        raise _UsageError(f"--warmup-epochs {args.warmup_epochs} is more than --epochs {args.epochs}")
    args.world_size = rt.world_size
    args.effective_batch = args.batch_size * args.accum_iter * rt.world_size
    if args.lr is None:
        args.lr = args.blr * args.effective_batch / 256
    if args.cuda_graph:
        problem = _cuda_graph_problem(args, rt)
        if problem:
            raise _UsageError(f"--cuda-graph {problem}")


def _pin_memory(args, device) -> bool:
    """Whether the DataLoader pins its batches: asked for (--pin-mem, the default) and feeding a
    GPU; pinned memory only speeds host-to-GPU copies."""
    return bool(args.pin_mem) and device.type == "cuda"


_CUDA_GRAPH_DEVICES = ("cuda",)  # the tests add "cpu", with torch.cuda's stream and graph stubbed


def _cuda_graph_problem(args, rt):
    """Why this run cannot be captured into a CUDA graph, or None."""
    if rt.device.type not in _CUDA_GRAPH_DEVICES:
        return "needs a CUDA device"
    if rt.world_size > 1 or args.fsdp:
        return "runs on one process without --fsdp (the gradient all-reduce is not captured)"
    if args.accum_iter != 1:
        return f"needs --accum-iter 1, got {args.accum_iter}"
    if args.compile:
        return "does not go with --compile"
    if args.dtype == "fp16":
        return "takes --dtype bf16 or fp32 (fp16's GradScaler reads its overflow flag on the host)"
    return None


class _GraphedIteration:
    """``--cuda-graph``: one training iteration (forward, backward, AdamW step) on a batch copied
    into fixed device buffers. The first ``WARMUP`` iterations run eagerly on a side stream
    (Triton compiles and autotunes, the optimizer creates its state); the next one captures the
    iteration into a CUDA graph, and it and every later one replay it. Each call returns a
    function that reads the iteration's loss later without waiting for work queued after it."""

    WARMUP = 3

    def __init__(self, job):
        self.forward, self.optimizer, self.autocast = job.forward, job.optimizer, job._autocast
        self.mask_ratio, self.device = job.args.mask_ratio, job.rt.device
        self.imgs = self.noise = None   # the fixed inputs, allocated on the first call
        self.graph = self.loss = None   # the graph and its loss tensor, once captured
        self.warm, self.stream = 0, None
        self.host_loss, self.reads = None, 0

    def _step(self):
        with self.autocast():
            loss, _, _ = self.forward(self.imgs, mask_ratio=self.mask_ratio, noise=self.noise)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def _first_call(self, imgs, noise):
        self.imgs = torch.empty(imgs.shape, dtype=imgs.dtype, device=self.device)
        self.noise = torch.empty(noise.shape, dtype=noise.dtype, device=self.device)
        # a captured step reads its lr from the GPU; a resumed state dict left floats
        for group in self.optimizer.param_groups:
            lr = group["lr"]
            group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=self.device)
        if self.device.type == "cuda":
            self.stream = torch.cuda.Stream()
            self.host_loss = torch.empty(2, dtype=torch.float32, pin_memory=True)

    def __call__(self, imgs, noise):
        if self.imgs is None:
            self._first_call(imgs, noise)
        self.imgs.copy_(imgs, non_blocking=True)
        self.noise.copy_(noise, non_blocking=True)
        if self.graph is None and self.warm < self.WARMUP:
            self.warm += 1
            loss = graphs.eager_steps(self._step, self.optimizer, 1, stream=self.stream)
            return self._reader(loss)
        if self.graph is None:
            # the DataLoader's pin-memory thread goes on allocating meanwhile
            self.graph, self.loss = graphs.capture(self._step, self.optimizer,
                                                   capture_error_mode="thread_local")
        self.graph.replay()
        return self._reader(self.loss)

    def _reader(self, loss):
        """A function returning ``loss``'s value as it is now: on a GPU, copied into pinned memory
        behind an event (two slots: a loss is read before the one two iterations later lands)."""
        if self.host_loss is None:
            value = loss.clone()
            return lambda: value.item()
        slot = self.host_loss[self.reads % 2]
        self.reads += 1
        slot.copy_(loss, non_blocking=True)
        landed = torch.cuda.Event()
        landed.record()

        def read():
            landed.synchronize()
            return slot.item()
        return read


class _Job:
    """One pretraining run: the model, its wrappers, the optimizer and the data, built from the
    arguments; ``train()`` runs the epochs."""

    def __init__(self, args, rt):
        from torch.utils.data import DataLoader, DistributedSampler
        _resolve_defaults(args, rt)
        self.args, self.rt = args, rt

        # the same initialization on every rank: FSDP, unlike DDP, does not broadcast it
        torch.manual_seed(args.seed)
        random.seed(args.seed + rt.rank)
        np.random.seed((args.seed + rt.rank) % 2 ** 32)
        kwargs = {"norm_pix_loss": args.norm_pix_loss}
        if args.img_size is not None:
            kwargs["img_size"] = args.img_size
        try:
            model = MODELS[args.model](**kwargs)
        except ValueError as e:
            raise _UsageError(f"cannot build {args.model}: {e}") from e
        args.img_size = model.patch_embed.img_size[0]
        self.num_patches = model.patch_embed.num_patches
        self.model = model.to(rt.device)

        self.dataset = build_dataset(args.data, args.img_size, args.seed, args.synthetic_size)
        # one process is a world of one: the same permutation and split either way
        self.sampler = DistributedSampler(self.dataset, num_replicas=rt.world_size, rank=rt.rank,
                                          shuffle=True, seed=args.seed, drop_last=True)
        self.loader = DataLoader(self.dataset, batch_size=args.batch_size, sampler=self.sampler,
                                 drop_last=True, num_workers=args.num_workers,
                                 pin_memory=_pin_memory(args, rt.device))
        if len(self.loader) == 0:
            raise DataError(f"{args.data!r} has {len(self.dataset)} images, fewer than one global "
                            f"batch of {args.batch_size * rt.world_size} (--batch-size "
                            f"{args.batch_size} x {rt.world_size} processes)")
        self.steps = len(self.loader)
        if args.steps_per_epoch is not None:
            if args.steps_per_epoch > self.steps:
                _say(rt, f"note: --steps-per-epoch {args.steps_per_epoch} is more than the data "
                         f"holds; using {self.steps}")
            self.steps = min(self.steps, args.steps_per_epoch)

        self.fsdp, self.wrapped = args.fsdp, self.model
        if args.fsdp:
            fully_shard = _fully_shard()
            for block in list(model.blocks) + list(model.decoder_blocks):
                fully_shard(block)
            fully_shard(model)
            # the model returns pred[:, 1:], a view; nothing writes to it in place
            warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        elif rt.distributed:
            self.wrapped = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)

        # a CUDA graph captures the fused AdamW step, its step counts and lr on the GPU
        graph_kw = {"fused": True, "capturable": True} if args.cuda_graph else {}
        self.optimizer = torch.optim.AdamW(param_groups_weight_decay(model, args.weight_decay),
                                           lr=args.lr, betas=(0.9, 0.95), **graph_kw)
        self.amp_dtype = _DTYPES[args.dtype]
        self.scaler = torch.amp.GradScaler(rt.device.type) if args.dtype == "fp16" else None
        # compiled last, over the DDP wrapper (the documented order); checkpoints and pictures use
        # the plain module
        self.forward = torch.compile(self.wrapped) if args.compile else self.wrapped
        self.graphed = _GraphedIteration(self) if args.cuda_graph else None

        self.checkpoint_path = os.path.join(args.output_dir, CHECKPOINT)
        self.log_path = os.path.join(args.output_dir, LOG)
        # what trained it, in the description and every checkpoint (plain strings: torch's
        # version is a str subclass that a weights_only load refuses)
        self.software = {"fastmae": git_commit(), "torch": str(torch.__version__),
                         "triton": triton_version()}

    # ------------------------------------------------------------------ the run
    def train(self) -> int:
        args, rt = self.args, self.rt
        start_epoch, step, resumed_from = self._resume()
        # the end of each epoch rewrites the log with these records (dropping those of epochs
        # the checkpoint lacks) and is the first write: a run that fails before it leaves no new
        # folder and the files of an existing one as they were
        history = _read_log(self.log_path, start_epoch) if resumed_from else []
        self._describe()
        if start_epoch >= args.epochs:
            _say(rt, f"nothing to do: the checkpoint has finished all {args.epochs} epochs")
            return 0

        # the fixed reconstruction batch: the same images and masks every epoch
        view_idx = _view_indices(len(self.dataset))
        self.view_imgs = torch.stack([self.dataset.image(i, 0) for i in view_idx]).to(rt.device)
        self.view_noise = masking_noise(args.seed, _VIEW_EPOCH, view_idx, self.num_patches).to(rt.device)
        if rt.is_main:
            _remove_stale_temporaries(args.output_dir)

        last_good = resumed_from
        for epoch in range(start_epoch, args.epochs):
            record, step = self._train_one_epoch(epoch, step, last_good)
            history.append(record)
            _say(rt, f"epoch {epoch + 1}/{args.epochs}: loss {record['train_loss']:.4f}, "
                     f"lr {record['train_lr']:.3e}, {record['images_per_s']:.1f} img/s, "
                     f"{record['epoch_time_s']:.1f} s")
            self._end_epoch(epoch, step, history)
            last_good = f"{self.checkpoint_path} (after epoch {epoch + 1}/{args.epochs})"
        epochs = f"{args.epochs} epoch" + ("s" if args.epochs != 1 else "")
        _say(rt, f"done: {epochs}; checkpoint {self.checkpoint_path}")
        return 0

    def _train_one_epoch(self, epoch, step, last_good):
        """One epoch, official ``train_one_epoch``: lr set per iteration from the fractional epoch,
        gradients accumulated over ``accum_iter`` iterations. Returns (log record, global step).

        A non-finite loss stops the run (the checkpoint of the last epoch is kept). Eager, the
        check comes before the backward, as official; under ``--cuda-graph`` an iteration's loss
        is read once the next iteration is queued, so that the GPU is not left idle while the
        host fetches the next batch."""
        from tqdm import tqdm
        args, rt, steps = self.args, self.rt, self.steps
        self.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)  # before iter(loader): the workers copy the data set then
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        global_batch = args.batch_size * rt.world_size
        points, lr = [], args.lr
        iteration_lrs = []  # each iteration's lr, averaged into the log as official's lr meter
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{args.epochs}",
                   disable=not rt.is_main or args.no_progress, dynamic_ncols=True)
        first_step = step
        t0 = time.perf_counter()

        def take_loss(it, loss_value):
            if not math.isfinite(loss_value):
                bar.close()
                raise _NonFiniteLoss(
                    f"loss is {loss_value} at iteration {it + 1}/{steps} of epoch "
                    f"{epoch + 1}/{args.epochs} (global step {first_step + it}); stopping. The last "
                    f"good checkpoint is kept: {last_good or 'none was written yet'}")
            points.append((epoch + (it + 1) / steps, loss_value))
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}",
                            img_s=f"{(it + 1) * global_batch / (time.perf_counter() - t0):.0f}",
                            refresh=False)
            bar.update(1)

        pending = None  # --cuda-graph: (iteration, a function reading its loss) not yet read
        for it, (imgs, indices) in enumerate(self.loader):
            if it >= steps:
                break
            if it % args.accum_iter == 0:
                lr = adjust_learning_rate(self.optimizer, epoch + it / steps, args)
            iteration_lrs.append(lr)
            noise = masking_noise(args.seed, epoch, indices.tolist(), self.num_patches)
            step += 1
            if self.graphed is not None:
                read_loss = self.graphed(imgs, noise)
                if pending is not None:
                    take_loss(pending[0], pending[1]())
                pending = (it, read_loss)
                continue
            imgs = imgs.to(rt.device, non_blocking=True)
            noise = noise.to(rt.device)
            update = (it + 1) % args.accum_iter == 0
            with self._grad_sync(update):
                with self._autocast():
                    loss, _, _ = self.forward(imgs, mask_ratio=args.mask_ratio, noise=noise)
                # every rank sees the same value, so all stop together
                take_loss(it, rt.mean(loss))
                loss = loss / args.accum_iter
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            if update:
                if self.scaler is not None:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        if pending is not None:
            take_loss(pending[0], pending[1]())
        bar.close()
        seconds = time.perf_counter() - t0
        record = {"epoch": epoch, "train_loss": sum(p[1] for p in points) / len(points),
                  "train_lr": sum(iteration_lrs) / len(iteration_lrs), "step": step,
                  "iterations": len(points),
                  "images_per_s": len(points) * global_batch / seconds, "epoch_time_s": seconds,
                  "loss_curve": _curve_points(points)}
        return record, step

    def _end_epoch(self, epoch, step, history):
        """Log, pictures, checkpoint — in that order: a kill in between leaves a log record of an
        epoch the checkpoint lacks, which the resumed run drops and redoes."""
        args, rt = self.args, self.rt
        if rt.is_main:
            os.makedirs(args.output_dir, exist_ok=True)
            _write_log(self.log_path, history)
            curve = [tuple(p) for r in history for p in r["loss_curve"]]
            _save_png(draw_loss_curve(curve), os.path.join(args.output_dir, LOSS_CURVE))
        if rt.is_main or self.fsdp:  # an FSDP forward is a collective: every rank runs it
            _write_reconstruction(self.model, self.view_imgs, self.view_noise, args, epoch,
                                  args.output_dir, rt.is_main)
        model_sd, optim_sd = _gather_state(self.model, self.optimizer)
        if rt.is_main:
            for group in optim_sd["param_groups"]:  # plain numbers, as an eager run writes them
                if isinstance(group.get("lr"), torch.Tensor):
                    group["lr"] = group["lr"].item()
            state = {"model": model_sd, "optimizer": optim_sd, "epoch": epoch, "step": step,
                     "rng": _rng_state(), "args": dict(vars(args)), "software": self.software}
            # only with a scaler: official load_model loads 'scaler' whenever the key is there,
            # and a GradScaler refuses None or the empty state of a disabled one
            if self.scaler is not None:
                state["scaler"] = self.scaler.state_dict()
            pause = float(os.environ.get(_CHECKPOINT_PAUSE_ENV, "0") or 0)
            _atomic_write(self.checkpoint_path, lambda f: torch.save(state, f), pause=pause)
        rt.barrier()  # no rank runs ahead of a checkpoint that may yet fail

    # ------------------------------------------------------------------ helpers
    def _grad_sync(self, sync: bool):
        """Skip the gradient all-reduce on accumulation iterations that do not step."""
        if self.fsdp:
            self.model.set_requires_gradient_sync(sync)
        elif not sync and isinstance(self.wrapped, torch.nn.parallel.DistributedDataParallel):
            return self.wrapped.no_sync()
        return contextlib.nullcontext()

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.rt.device.type, dtype=self.amp_dtype)

    def _describe(self):
        args, rt = self.args, self.rt
        n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        mode = ", FSDP2" if args.fsdp else ", DDP" if rt.distributed else ""
        _say(rt, f"fastmae pretrain: {args.model} ({n_params / 1e6:.1f}M trainable parameters), "
                 f"{args.img_size}px, {len(self.dataset)} images from "
                 f"{getattr(self.dataset, 'root', args.data)}, {self.steps} iterations/epoch")
        _say(rt, f"  {rt.world_size} process(es) on {rt.device.type}{mode}, {args.dtype}"
                 f"{', compiled' if args.compile else ''}{', CUDA graph' if args.cuda_graph else ''}"
                 f"; effective batch {args.effective_batch}, "
                 f"lr {args.lr:.3e} (base lr {args.lr * 256 / args.effective_batch:.3e})")
        _say(rt, "  " + " | ".join(f"{k} {v}" for k, v in self.software.items()))

    def _resume(self):
        """(first epoch, global step, a description of the checkpoint resumed from or None)."""
        from torch.distributed.checkpoint.state_dict import set_state_dict
        args, rt = self.args, self.rt
        path = _resume_path(args)
        if not rt.same_on_all_ranks(int(path is not None)):
            # ranks that resumed and ranks that did not would train different weights together
            raise _UsageError("the checkpoint to resume from is visible on some ranks only: put "
                              "--output-dir (and --resume) on storage every node can read")
        if path is None:
            if args.resume == "auto":
                _say(rt, f"no {CHECKPOINT} in {args.output_dir}: starting afresh")
            return 0, 0, None
        ckpt = _load_checkpoint(path)
        if not isinstance(ckpt, dict) or not {"model", "optimizer", "epoch"} <= set(ckpt):
            raise _UsageError(f"{path} is not a fastmae pretrain checkpoint (it needs model, "
                              f"optimizer and epoch entries)")
        saved = _saved_args(ckpt)
        changed = [f"{k} {saved[k]!r} -> {getattr(args, k)!r}" for k in _RUN_DEFINING
                   if k in saved and saved[k] != getattr(args, k)]
        if changed:
            _say(rt, "warning: resuming with different settings, so this does not continue the "
                     "same run: " + "; ".join(changed))
        problem = _model_state_problem(ckpt["model"], self.model)
        if problem:
            was = saved.get("model")
            was = f" (saved from {was})" if isinstance(was, str) and was != args.model else ""
            raise _UsageError(f"--resume {path!r}{was} does not fit --model {args.model}: "
                              f"{problem}")
        optim_sd = ckpt["optimizer"]
        official = _is_index_keyed(optim_sd)
        if official:
            optim_sd = _name_keyed_optimizer_state(optim_sd, self.model, path)
        try:
            optim_sd = _with_this_runs_optimizer(optim_sd, self.optimizer)
            set_state_dict(self.model, self.optimizer, model_state_dict=ckpt["model"],
                           optim_state_dict=optim_sd, options=_state_dict_options())
        except (RuntimeError, KeyError, ValueError) as e:
            # torch's text may advise options (StateDictOptions) this command does not have
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            reason = re.split(r"[.,;]?\s*(?:please\s+)?use StateDictOptions", lines[0] if lines
                              else type(e).__name__, flags=re.IGNORECASE)[0]
            raise _UsageError(f"--resume {path!r} does not fit --model {args.model}: its "
                              f"optimizer state does not: {reason}") from e
        if self.scaler is not None:
            self._resume_scaler(ckpt.get("scaler"), path)
        if ckpt.get("rng"):
            _set_rng_state(ckpt["rng"])
        # 'epoch' is the last finished one, in fastmae's checkpoints as in main_pretrain.py's
        # (whose load_model starts at checkpoint['epoch'] + 1)
        epoch = int(ckpt["epoch"])
        # main_pretrain.py counts no global step: take the iterations its epochs ran to be this
        # run's (the same data and batch)
        step = int(ckpt["step"]) if "step" in ckpt else (epoch + 1) * self.steps
        source = " (a main_pretrain.py checkpoint)" if official else ""
        _say(rt, f"resumed from {path}{source}: epoch {epoch + 1} done, global step {step}")
        return epoch + 1, step, f"{path} (after epoch {epoch + 1})"

    def _resume_scaler(self, state, path):
        """An fp16 run's GradScaler from the checkpoint's 'scaler' state. A checkpoint without one
        (a bf16 or fp32 run's; None or {} from older or official CPU runs) gets a fresh scaler:
        its scale starts high and halves at each overflowing step, which it skips, so it settles
        within a few steps -- no reason to refuse the checkpoint. bf16 and fp32 runs ignore it."""
        if not state:
            _say(self.rt, f"note: {path} holds no GradScaler state (it was not trained in fp16): "
                          f"fp16 starts a fresh one at scale {self.scaler.get_scale():g}")
            return
        try:
            self.scaler.load_state_dict(state)
        except (RuntimeError, KeyError, TypeError, AttributeError) as e:
            raise _UsageError(f"{path}: its 'scaler' entry is not a GradScaler state: {e}") from e
