"""A training step captured once into a CUDA graph and replayed: the host launches one graph
per step instead of every kernel, which is what makes fastmae's kernels pay off where the host
cannot launch them as fast as the GPU runs them (an eager step on the H200 we measured on; see
BENCHMARKS.md)."""
import contextlib

import torch

from fastmae.backend import use_backend


def cuda_graph_step(step, optimizer, warmup=3, backend=None):
    """Capture ``step`` into one CUDA graph; return a function that replays it.

    ``step()`` runs one training step on fixed ("static") input tensors -- forward under
    autocast, backward, ``optimizer.step()`` -- and returns the loss tensor. A model's
    ``torch.rand`` mask noise may stay inside: its Philox offsets advance on every replay, so
    each replay draws a fresh mask. ``optimizer`` must be built with ``capturable=True`` (with
    ``fused=True`` for AdamW, as the official recipe's). First ``warmup`` eager steps run on a
    side stream (Triton compiles and autotunes there, and the optimizer creates its state);
    then gradients are set to None and the step is captured once, so the captured backward
    writes the gradients into the graph's memory and the captured optimizer step reads them
    there. ``backend`` ("triton" or "torch") is the fastmae backend of the warm-up and capture
    (default: the current one).

    The returned function replays the graph and returns the captured loss tensor, overwritten
    by each replay; copy the next batch into the static input tensors (``.copy_()``) before
    calling it. fp16 autocast with a GradScaler cannot be captured this way (the scaler reads
    its overflow flag on the host)."""
    if not torch.cuda.is_available():
        raise RuntimeError("cuda_graph_step needs a CUDA GPU")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
        raise ValueError(f"warmup must be an int >= 1 (the eager steps before the capture), got {warmup!r}")
    if optimizer.defaults.get("capturable") is False:
        raise ValueError(f"optimizer must be built with capturable=True to be captured in a CUDA "
                         f"graph ({type(optimizer).__name__}(..., capturable=True))")

    def context():  # a fresh one each time: a generator-based context cannot be entered twice
        return use_backend(backend) if backend else contextlib.nullcontext()

    eager_steps(step, optimizer, warmup, context)
    graph, loss = capture(step, optimizer, context)

    def replay():
        graph.replay()
        return loss
    replay.graph = graph
    return replay


def eager_steps(step, optimizer, count, context=contextlib.nullcontext, stream=None):
    """Run ``step()`` ``count`` times eagerly on a side stream (``stream``, or a new one), as
    CUDA graphs want their warm-up (Triton compiles and autotunes there, cuBLAS sets up its
    workspaces, the optimizer creates its state), gradients set to None after each; the current
    stream then waits for them. ``context()``: entered around the steps. Returns what the last
    step returned, safe to read on the current stream."""
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
