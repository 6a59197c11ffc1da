"""fastmae.cuda_graph_step: its control flow with torch.cuda's stream and graph calls stubbed (this
machine has no GPU; `fastmae bench`'s "fastmae + CUDA graph" system runs it for real on one), and
its argument checks."""
import contextlib
from types import SimpleNamespace

import pytest
import torch

import fastmae
from fastmae import graphs
from fastmae.backend import requested_backend


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's stream and graph calls replaced by recorders: returns the call log."""
    calls = []

    class FakeStream:
        def wait_stream(self, other):
            calls.append("wait")

    class FakeGraph:
        def replay(self):
            calls.append("replay")

    @contextlib.contextmanager
    def fake_capture(graph, capture_error_mode="global"):
        calls.append("capture")
        yield
        calls.append("captured")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_capture)
    return calls


def _optimizer(calls, capturable=True):
    return SimpleNamespace(defaults={"capturable": capturable},
                           zero_grad=lambda set_to_none: calls.append(("zero_grad", set_to_none)))


def test_warms_up_then_captures_once_then_replays(fake_cuda):
    """Warm-up steps on a side stream under the backend (gradients dropped after each), gradients
    set to None, one capture under the backend, then every call a replay returning the loss."""
    calls = fake_cuda
    loss = torch.tensor(1.5)

    def step():
        calls.append(("step", requested_backend()))
        return loss
    replay = fastmae.cuda_graph_step(step, _optimizer(calls), warmup=2, backend="torch")
    zero = ("zero_grad", True)
    assert calls == ["wait", ("step", "torch"), zero, ("step", "torch"), zero, "wait", zero,
                     "capture", ("step", "torch"), "captured"]
    calls.clear()
    assert replay() is loss and replay() is loss
    assert calls == ["replay", "replay"]


def test_backend_defaults_to_the_current_one(fake_cuda):
    seen = []
    with fastmae.use_backend("triton"):
        graphs.cuda_graph_step(lambda: seen.append(requested_backend()), _optimizer(fake_cuda), warmup=1)
    assert seen == ["triton", "triton"]


@pytest.mark.parametrize("warmup", [0, -1, 1.5, True])
def test_warmup_is_checked(fake_cuda, warmup):
    with pytest.raises(ValueError, match="warmup must be an int >= 1"):
        fastmae.cuda_graph_step(lambda: None, _optimizer(fake_cuda), warmup=warmup)


def test_optimizer_must_be_capturable(fake_cuda):
    with pytest.raises(ValueError, match="capturable=True"):
        fastmae.cuda_graph_step(lambda: None, _optimizer(fake_cuda, capturable=False))


def test_needs_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        fastmae.cuda_graph_step(lambda: None, SimpleNamespace(defaults={}))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_replays_continue_the_eager_steps_on_gpu(backend):
    """Two copies of a model from the same weights, images and mask noise: the graph's replays
    (after its 2 eager warm-up steps) give the losses of eager steps 3, 4, 5, and the same
    weights after them."""
    import copy

    torch.manual_seed(0)
    eager_model = fastmae.mae_vit_tiny_patch4(norm_pix_loss=True).cuda()
    graph_model = copy.deepcopy(eager_model)
    g = torch.Generator(device="cuda").manual_seed(0)
    imgs = torch.randn(8, 3, 32, 32, device="cuda", generator=g)
    noise = torch.rand(8, 64, device="cuda", generator=g)

    def make(model):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), fused=True,
                                capturable=True)

        def step():
            with fastmae.use_backend(backend), torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(imgs, mask_ratio=0.75, noise=noise)[0]
            loss.backward()
            opt.step()
            return loss
        return opt, step

    eager_opt, eager_step = make(eager_model)
    graph_opt, graph_step = make(graph_model)
    replay = fastmae.cuda_graph_step(graph_step, graph_opt, warmup=2, backend=backend)
    eager_losses = []
    for _ in range(5):
        eager_losses.append(eager_step().item())
        eager_opt.zero_grad(set_to_none=True)
    graph_losses = [replay().item() for _ in range(3)]
    assert graph_losses == pytest.approx(eager_losses[2:], rel=1e-4)
    for (name, p), q in zip(eager_model.named_parameters(), graph_model.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-5), name
