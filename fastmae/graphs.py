"""A training step captured once into a CUDA graph and replayed: the host launches one graph
per step instead of every kernel, which is what makes fastmae's kernels pay off where the host
cannot launch them as fast as the GPU runs them (an eager step on the H200 we measured on; see
BENCHMARKS.md)."""
import contextlib
import copy

import torch

from fastmae.backend import use_backend

# The optimizers whose warm-up cuda_graph_step can undo: the state their first step creates
# ("step", "exp_avg", "exp_avg_sq" and, with amsgrad, "max_exp_avg_sq") starts at zero, so
# zeroing it in place is a fresh state. Other classes start theirs otherwise (SGD's momentum
# buffer at the first gradient, NAdam's mu_product at 1): zeroing it would change training.
_UNDOABLE = (torch.optim.Adam, torch.optim.AdamW)
_ZERO_FRESH_STATE = frozenset({"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"})
_MISSING = object()
_SET_LR = "set the lr with group['lr'].fill_(value)"


def cuda_graph_step(step, optimizer, warmup=3, backend=None, *, _before_capture=None):
    """Capture ``step`` into one CUDA graph; return a function that replays it.

    ``step()`` runs one training step on fixed ("static") input tensors -- forward under
    autocast, backward, ``optimizer.step()`` -- and returns the loss tensor. A model's
    ``torch.rand`` mask noise may stay inside: its Philox offsets advance on every replay, so
    each replay draws a fresh mask. ``optimizer``: a ``torch.optim.Adam`` or ``AdamW`` built with
    ``capturable=True`` (with ``fused=True`` for AdamW, as the official recipe's), its
    parameters on one CUDA device. ``backend`` ("triton" or "torch") is the fastmae backend of
    the warm-up and capture (default: the current one).

    First ``warmup`` eager steps run on a side stream (Triton compiles and autotunes there,
    cuBLAS sets up its workspaces, the optimizer creates its state); then they are undone, in
    place, so that the first replay is the first training step: the parameters and the
    optimizer state that existed before are copied back from a CPU snapshot taken before the
    warm-up, the state the warm-up created is zeroed (a fresh Adam state: zero moments, step
    0), and the device's CUDA RNG state is restored. Buffers the step changes that are not the
    optimizer's (a BatchNorm's running statistics; MAE has none) are not restored. Then
    gradients are set to None and the step is captured once, so the captured backward writes
    the gradients into the graph's memory and the captured optimizer step reads them there.
    Only Adam and AdamW are accepted: another optimizer's fresh state is not zeros (SGD's
    momentum buffer starts at the first gradient, NAdam's mu_product at 1), so its warm-up
    could not be undone; warm up and capture such a step with ``eager_steps`` and
    ``capture``.

    The learning rate can change between replays: each param group's float ``lr`` is turned
    into a 0-d float32 tensor on the parameters' device before the warm-up, which the captured
    optimizer step reads on every replay; set it with ``group['lr'].fill_(value)`` (torch's LR
    schedulers do). The group's other hyperparameters (betas, eps, weight_decay, ...) are fixed
    by the capture. Each replay checks, in a few Python operations, that every group's ``lr`` is
    still that tensor and its other hyperparameters are unchanged, and raises ValueError naming
    the group and key where one is not (``group['lr'] = x`` would otherwise be silently
    ignored).

    The returned function replays the graph and returns the captured loss tensor, overwritten
    by each replay; copy the next batch into the static input tensors (``.copy_()``) before
    calling it. fp16 autocast with a GradScaler cannot be captured this way (the scaler reads
    its overflow flag on the host). ``_before_capture``: a function called after the warm-up is
    undone, just before the capture (``fastmae bench`` resets the peak memory there)."""
    if not torch.cuda.is_available():
        raise RuntimeError("cuda_graph_step needs a CUDA GPU")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
        raise ValueError(f"warmup must be an int >= 1 (the eager steps before the capture), "
                         f"got {warmup!r}")
    _check_optimizer(optimizer)
    device = _tensor_lrs(optimizer)

    def context():  # a fresh one each time: a generator-based context cannot be entered twice
        return use_backend(backend) if backend else contextlib.nullcontext()

    saved = _snapshot(optimizer, device)
    eager_steps(step, optimizer, warmup, context)
    _undo_warmup(optimizer, saved, device)
    del saved
    if _before_capture is not None:
        _before_capture()
    graph, loss = capture(step, optimizer, context)
    captured = _captured_hyperparameters(optimizer)

    def replay():
        _check_hyperparameters(optimizer.param_groups, captured)
        graph.replay()
        return loss
    replay.graph = graph
    return replay


def _check_optimizer(optimizer):
    name = type(optimizer).__name__
    if not isinstance(optimizer, _UNDOABLE):
        raise ValueError(
            f"optimizer must be a torch.optim.Adam or AdamW, got {name}: cuda_graph_step undoes "
            f"its warm-up steps by zeroing the optimizer state they created, a fresh state for "
            f"Adam(W) only (warm up and capture other optimizers with fastmae.graphs.eager_steps "
            f"and fastmae.graphs.capture)")
    where = [("optimizer.defaults", optimizer.defaults)] + [
        (f"param group {i}", g) for i, g in enumerate(optimizer.param_groups)]
    for what, group in where:
        if not group.get("capturable"):
            raise ValueError(f"optimizer must be built with capturable=True to be captured in a "
                             f"CUDA graph ({name}(..., capturable=True)); {what} has capturable="
                             f"{group.get('capturable')!r}")
    if not any(g["params"] for g in optimizer.param_groups):
        raise ValueError("optimizer has no parameters")


def _tensor_lrs(optimizer):
    """Each group's float lr -> a 0-d float32 tensor on its parameters' device (the captured
    step reads it there on every replay). Returns the device of the first parameter."""
    device = next(p.device for g in optimizer.param_groups for p in g["params"])
    for i, group in enumerate(optimizer.param_groups):
        where = group["params"][0].device if group["params"] else device
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            # torch's fused CUDA kernels read a tensor lr as float32
            if lr.device != where or lr.dim() != 0 or lr.dtype != torch.float32:
                raise ValueError(f"param group {i}'s lr is a {lr.dtype} tensor of shape "
                                 f"{tuple(lr.shape)} on {lr.device}: give a float or a 0-d "
                                 f"float32 tensor on its parameters' device ({where})")
            continue
        if isinstance(lr, bool) or not isinstance(lr, (int, float)):
            raise ValueError(f"param group {i}'s lr must be a float or a 0-d tensor, got {lr!r}")
        group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=where)
    return device


def _params(optimizer):
    return [p for g in optimizer.param_groups for p in g["params"]]


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    return copy.deepcopy(value)


def _snapshot(optimizer, device):
    """What the warm-up changes, copied to the CPU: the parameters, the optimizer state that
    exists already (a resumed optimizer's), and the device's CUDA RNG state."""
    params = _params(optimizer)
    state = {}
    for p in params:
        s = optimizer.state.get(p)  # .get: optimizer.state is a defaultdict
        if s:
            state[p] = {k: _to_cpu(v) for k, v in s.items()}
    return {"params": [p.detach().to("cpu", copy=True) for p in params], "state": state,
            "rng": torch.cuda.get_rng_state(device)}


def _undo_warmup(optimizer, saved, device):
    """Undo the warm-up in place (the graph captures these very tensors): parameters and the
    state that existed before copied back, the state the warm-up created zeroed, the RNG state
    restored."""
    params = _params(optimizer)
    created = {}  # parameter -> the state keys the warm-up created
    for p in params:
        s = optimizer.state.get(p)
        if s:
            created[p] = [k for k in s if k not in saved["state"].get(p, {})]
    unknown = sorted({k for keys in created.values() for k in keys} - _ZERO_FRESH_STATE)
    with torch.no_grad():
        for p, before in zip(params, saved["params"]):
            p.copy_(before)
        if unknown:  # state we cannot reset: leave none of the warm-up's behind, and refuse
            for p, keys in created.items():
                for k in keys:
                    del optimizer.state[p][k]
                if not optimizer.state[p]:
                    del optimizer.state[p]
        for p, s in saved["state"].items():
            for k, v in s.items():
                now = optimizer.state[p].get(k, _MISSING)
                if isinstance(now, torch.Tensor) and isinstance(v, torch.Tensor):
                    now.copy_(v)
                else:
                    optimizer.state[p][k] = v
        if not unknown:
            for p, keys in created.items():
                for k in keys:
                    v = optimizer.state[p][k]
                    if isinstance(v, torch.Tensor):
                        v.zero_()
                    else:
                        optimizer.state[p][k] = type(v)(0)
    torch.cuda.set_rng_state(saved["rng"], device)
    if unknown:
        raise ValueError(f"{type(optimizer).__name__}'s warm-up created optimizer state "
                         f"{', '.join(map(repr, unknown))}, whose fresh value cuda_graph_step "
                         f"does not know (it zeroes {', '.join(sorted(_ZERO_FRESH_STATE))}); "
                         f"the warm-up was undone and nothing captured")


def _captured_hyperparameters(optimizer):
    """[(group, its lr tensor, ((key, value), ...)), ...]: what each replay must still find."""
    out = []
    for group in optimizer.param_groups:
        fixed = tuple((k, group.get(k, _MISSING)) for k in optimizer.defaults if k != "lr")
        out.append((group, group["lr"], fixed))
    return out


def _same(a, b):
    """A hyperparameter unchanged: the very tensor, or an equal non-tensor value."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - an object that cannot say: not the same
        return False


def _check_hyperparameters(groups, captured):
    """Raise ValueError where a param group's hyperparameters are not those the graph
    captured (its lr tensor replaced, another value changed, a group added or replaced)."""
    if len(groups) != len(captured):
        raise ValueError(f"the optimizer has {len(groups)} param groups, the captured step "
                         f"{len(captured)}: a group added after the capture is not in the graph")
    for i, (group, lr, fixed) in enumerate(captured):
        if groups[i] is not group:
            raise ValueError(f"param group {i} was replaced after the capture (load_state_dict?): "
                             f"the graph reads the old group's tensors")
        if group["lr"] is not lr:
            raise ValueError(f"param group {i}'s 'lr' is no longer the tensor the captured step "
                             f"reads (now {group['lr']!r}): the replay would ignore it; {_SET_LR}")
        for key, value in fixed:
            now = group.get(key, _MISSING)
            if not _same(now, value):
                raise ValueError(
                    f"param group {i}'s {key!r} changed after the capture ({value!r} -> "
                    f"{'(removed)' if now is _MISSING else repr(now)}): the graph replays the "
                    f"captured value; capture the step again to change it (only the lr can "
                    f"change between replays: {_SET_LR})")


def eager_steps(step, optimizer, count, context=contextlib.nullcontext, stream=None):
    """Run ``step()`` ``count`` times eagerly on a side stream (``stream``, or a new one), as
    CUDA graphs want their warm-up (Triton compiles and autotunes there, cuBLAS sets up its
    workspaces, the optimizer creates its state), gradients set to None after each; the current
    stream then waits for them. ``context()``: entered around the steps. Returns what the last
    step returned, safe to read on the current stream. The steps are real training steps: this
    undoes nothing (``cuda_graph_step`` does)."""
    side = stream if stream is not None else torch.cuda.Stream()
    current = torch.cuda.current_stream()
    side.wait_stream(current)
    out = None
    with context(), torch.cuda.stream(side):
        for _ in range(count):
            out = step()
            optimizer.zero_grad(set_to_none=True)
    current.wait_stream(side)
    if isinstance(out, torch.Tensor) and out.is_cuda:
        out.record_stream(current)  # its memory is not reused on the side stream while read here
    return out


def capture(step, optimizer, context=contextlib.nullcontext, capture_error_mode="global"):
    """Capture one ``step()`` into a new CUDA graph, gradients set to None first (so that the
    captured backward writes them into the graph's memory and the captured optimizer step reads
    them there). Nothing runs: ``graph.replay()`` runs it. Returns (graph, what step returned:
    its tensors are overwritten by each replay). ``capture_error_mode``: torch.cuda.graph's;
    "thread_local" where another thread may call CUDA meanwhile (a DataLoader's pin-memory
    thread allocating pinned memory), which "global" turns into a capture error."""
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with context(), torch.cuda.graph(graph, capture_error_mode=capture_error_mode):
        out = step()
    return graph, out
