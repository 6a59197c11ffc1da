"""fastmae.cuda_graph_step: its control flow with torch.cuda's stream, graph and RNG calls stubbed
(this machine has no GPU; `fastmae bench`'s "fastmae + CUDA graph" system runs it for real on
one), its argument checks, what its warm-up leaves behind (nothing) and its learning rate.

On the CPU a real ``torch.optim.AdamW(capturable=True)`` runs (torch's check that capturable
state lives on a GPU is widened to the CPU); the fake capture records the tensors it would
capture instead of running the step, and a fake replay runs the step eagerly, as the graph's
kernels would."""
import contextlib
import copy
import importlib

import pytest
import torch

import fastmae
from fastmae import graphs
from fastmae.backend import requested_backend


class FakeCuda(list):
    """The call log, and the fakes' knobs: ``capturing`` (inside the fake capture), ``rng`` (the
    fake device RNG state: a step "draws" by adding to it), ``on_capture`` / ``on_replay``
    (called at the capture's start / on each replay)."""
    capturing = False
    on_capture = on_replay = None

    def __init__(self):
        super().__init__()
        self.rng = torch.tensor([7], dtype=torch.uint8)


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's stream, graph and RNG calls replaced by recorders: returns the call log."""
    calls = FakeCuda()

    class FakeStream:
        def wait_stream(self, other):
            calls.append("wait")

    class FakeGraph:
        def replay(self):
            calls.append("replay")
            if calls.on_replay:
                calls.on_replay()

    @contextlib.contextmanager
    def fake_capture(graph, capture_error_mode="global"):
        calls.append("capture")
        if calls.on_capture:
            calls.on_capture()
        calls.capturing = True
        try:
            yield
        finally:
            calls.capturing = False
        calls.append("captured")

    def set_rng_state(state, device="cuda"):
        calls.rng = state.clone()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_capture)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": calls.rng.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    # capturable Adam's state on CPU tensors (torch allows it on GPUs only)
    monkeypatch.setattr(importlib.import_module("torch.optim.adam"),
                        "_get_capturable_supported_devices",
                        lambda supports_xla=True: ["cpu"])
    return calls


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(4, 3, generator=g)),
            torch.nn.Parameter(torch.randn(5, generator=g))]


def _adamw(params, lr=0.1, capturable=True, **kw):
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.05,
                             capturable=capturable, **kw)


def _training_step(calls, params, opt, data):
    """A step on ``data`` (a list of tensors, one a step: the "static input" it reads when
    called, popped by the caller), advancing the fake RNG; inside the fake capture it runs
    nothing, as a real capture runs nothing."""
    def step():
        if calls.capturing:
            return torch.zeros(())
        x = data[0]
        loss = sum(((p * x[: p.numel()].view_as(p)) ** 2).sum() for p in params)
        loss.backward()
        opt.step()
        calls.rng = calls.rng + 1
        return loss.detach()
    return step


def _recording_zero_grad(calls, opt):
    zero_grad = opt.zero_grad

    def record(set_to_none=True):
        calls.append(("zero_grad", set_to_none))
        zero_grad(set_to_none=set_to_none)
    opt.zero_grad = record
    return opt


def test_warms_up_then_captures_once_then_replays(fake_cuda):
    """Warm-up steps on a side stream under the backend (gradients dropped after each), the
    warm-up undone, gradients set to None, one capture under the backend, then every call a
    replay returning the loss."""
    calls = fake_cuda
    loss = torch.tensor(1.5)
    opt = _recording_zero_grad(calls, _adamw(_params()))

    def step():
        calls.append(("step", requested_backend()))
        return loss
    replay = fastmae.cuda_graph_step(step, opt, warmup=2, backend="torch",
                                     _before_capture=lambda: calls.append("before capture"))
    zero = ("zero_grad", True)
    assert calls == ["wait", ("step", "torch"), zero, ("step", "torch"), zero, "wait",
                     "before capture", zero, "capture", ("step", "torch"), "captured"]
    calls.clear()
    assert replay() is loss and replay() is loss
    assert calls == ["replay", "replay"]


def test_backend_defaults_to_the_current_one(fake_cuda):
    seen = []
    with fastmae.use_backend("triton"):
        graphs.cuda_graph_step(lambda: seen.append(requested_backend()), _adamw(_params()),
                               warmup=1)
    assert seen == ["triton", "triton"]


@pytest.mark.parametrize("warmup", [0, -1, 1.5, True])
def test_warmup_is_checked(fake_cuda, warmup):
    with pytest.raises(ValueError, match="warmup must be an int >= 1"):
        fastmae.cuda_graph_step(lambda: None, _adamw(_params()), warmup=warmup)


def test_optimizer_must_be_capturable(fake_cuda):
    with pytest.raises(ValueError, match=r"capturable=True .*optimizer.defaults has "
                                         r"capturable=False"):
        fastmae.cuda_graph_step(lambda: None, _adamw(_params(), capturable=False))


def test_every_param_group_must_be_capturable(fake_cuda):
    """A group added with capturable=False is refused, though the defaults say True (its
    optimizer step would read the step count on the host)."""
    a, b = _params()
    opt = _adamw([a])
    opt.add_param_group({"params": [b], "capturable": False})
    ran = []
    with pytest.raises(ValueError, match="param group 1 has capturable=False"):
        fastmae.cuda_graph_step(lambda: ran.append(1), opt)
    assert not ran


@pytest.mark.parametrize("make", [lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                                  lambda ps: torch.optim.NAdam(ps, capturable=True)])
def test_optimizers_whose_warm_up_cannot_be_undone_are_refused(fake_cuda, make):
    """Their fresh state is not zeros (SGD's momentum buffer starts at the first gradient,
    NAdam's mu_product at 1): refused before anything runs."""
    ran = []
    with pytest.raises(ValueError, match="must be a torch.optim.Adam or AdamW, got"):
        fastmae.cuda_graph_step(lambda: ran.append(1), make(_params()))
    assert not ran


def test_needs_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        fastmae.cuda_graph_step(lambda: None, _adamw(_params()))


def _snapshot(calls, params, opt):
    return {"params": [p.detach().clone() for p in params], "rng": calls.rng.clone(),
            "state": {i: {k: (v, v.clone()) for k, v in opt.state[p].items()}
                      for i, p in enumerate(params) if p in opt.state}}


@pytest.mark.parametrize("resumed", [False, True])
def test_the_warm_up_leaves_no_trace(fake_cuda, resumed):
    """What the capture sees is what was there before the warm-up, in the same tensors: the
    parameters, the state a resumed optimizer had (values copied back into its own tensors),
    the state the warm-up created zeroed in place (Adam's fresh state: zero moments, step 0;
    the same tensor objects, which the graph captures), and the RNG state."""
    calls = fake_cuda
    params = _params()
    opt = _adamw(params, amsgrad=True)
    data = [torch.randn(12)]
    step = _training_step(calls, params, opt, data)
    if resumed:  # a step taken before: the state exists, with its own values
        step()
        opt.zero_grad(set_to_none=True)
    before = _snapshot(calls, params, opt)
    warm = {}

    def last_warm_up_state():  # the state tensors as the warm-up left them
        warm.update({i: dict(opt.state[p]) for i, p in enumerate(params)})
    seen = {}
    calls.on_capture = lambda: (last_warm_up_state(), seen.update(_snapshot(calls, params, opt)))
    fastmae.cuda_graph_step(step, opt, warmup=3)
    for p, want in zip(seen["params"], before["params"]):
        assert torch.equal(p, want)
    assert torch.equal(seen["rng"], before["rng"]) and torch.equal(calls.rng, before["rng"])
    assert set(seen["state"]) == {0, 1}
    for i in (0, 1):
        assert set(seen["state"][i]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
        for k, (tensor, value) in seen["state"][i].items():
            assert tensor is warm[i][k]  # restored in place
            if resumed:
                old_tensor, old_value = before["state"][i][k]
                assert tensor is old_tensor and torch.equal(value, old_value), k
            else:
                assert not value.any(), k  # zeros: a fresh state
    assert all(p.grad is None for p in params)


def test_replays_are_the_first_training_steps(fake_cuda):
    """Replays (the fake runs the step eagerly, as the graph's kernels would) after a 3-step
    warm-up give the parameters and step count of as many eager steps from the start: the
    warm-up trained nothing."""
    calls = fake_cuda
    data = [torch.randn(12) for _ in range(3)]
    eager_params = _params()
    eager_opt = _adamw(eager_params, lr=torch.tensor(0.1))  # as cuda_graph_step makes it
    batches = list(data)
    eager_step = _training_step(calls, eager_params, eager_opt, batches)
    for _ in range(3):
        eager_step()
        eager_opt.zero_grad(set_to_none=True)
        batches.pop(0)

    params = _params()
    opt = _adamw(params)
    static = [data[0].clone()]
    step = _training_step(calls, params, opt, static)

    def run():
        step()
        opt.zero_grad(set_to_none=True)
    calls.on_replay = run
    replay = fastmae.cuda_graph_step(step, opt, warmup=3)
    for x in data:
        static[0].copy_(x)
        replay()
    for p, q in zip(params, eager_params):
        assert torch.equal(p, q)
    assert [opt.state[p]["step"].item() for p in params] == [3.0, 3.0]


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")
def test_a_float_lr_becomes_a_tensor_the_replays_read(fake_cuda):
    """A float lr is turned into a 0-d float32 tensor on the parameters' device before the
    warm-up; filling it (by hand or by an LR scheduler) reaches the next replay."""
    calls = fake_cuda
    params = _params()
    opt = _adamw(params, lr=0.1)
    data = [torch.randn(12)]
    step = _training_step(calls, params, opt, data)
    lrs = []
    calls.on_replay = lambda: (lrs.append(opt.param_groups[0]["lr"].item()), step(),
                               opt.zero_grad(set_to_none=True))
    replay = fastmae.cuda_graph_step(step, opt, warmup=1)
    lr = opt.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and lr.dim() == 0 and lr.dtype == torch.float32
    assert lr.device == params[0].device and lr.item() == pytest.approx(0.1)
    lr.fill_(0.0)
    frozen = [p.detach().clone() for p in params]
    replay()  # lr 0: AdamW neither steps nor decays
    assert all(torch.equal(p, q) for p, q in zip(params, frozen))
    lr.fill_(0.2)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    scheduler.step()  # fills the tensor: 0.2 * 0.5
    assert opt.param_groups[0]["lr"] is lr
    replay()
    assert lrs == [pytest.approx(0.0), pytest.approx(0.1)]
    assert not all(torch.equal(p, q) for p, q in zip(params, frozen))


def test_a_tensor_lr_is_kept_and_one_elsewhere_refused(fake_cuda):
    lr = torch.tensor(0.01)
    opt = _adamw(_params(), lr=lr)
    fastmae.cuda_graph_step(lambda: None, opt, warmup=1)
    assert opt.param_groups[0]["lr"] is lr
    opt = _adamw(_params())
    opt.param_groups[0]["lr"] = torch.tensor(0.01, device="meta")
    with pytest.raises(ValueError, match=r"param group 0's lr is a torch.float32 tensor of "
                                         r"shape \(\) on meta: give a float or a 0-d float32 "
                                         r"tensor on its parameters' device \(cpu\)"):
        fastmae.cuda_graph_step(lambda: None, opt, warmup=1)
    opt = _adamw(_params(), lr=torch.tensor([0.01]))
    with pytest.raises(ValueError, match=r"param group 0's lr is a torch.float32 tensor of "
                                         r"shape \(1,\)"):
        fastmae.cuda_graph_step(lambda: None, opt, warmup=1)
    # torch's fused CUDA kernels read a tensor lr as float32
    opt = _adamw(_params())
    opt.param_groups[0]["lr"] = torch.tensor(0.01, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"param group 0's lr is a torch.float64 tensor"):
        fastmae.cuda_graph_step(lambda: None, opt, warmup=1)


def _assign_lr(opt):
    opt.param_groups[0]["lr"] = 1e-3


def _replace_lr_tensor(opt):
    opt.param_groups[0]["lr"] = torch.tensor(1e-3)


def _set(key, value):
    def change(opt):
        opt.param_groups[0][key] = value
    return change


def _add_group(opt):
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})


def _load_state_dict(opt):
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))


@pytest.mark.parametrize("change, message", [
    (_assign_lr, r"param group 0's 'lr' is no longer the tensor the captured step reads "
                 r"\(now 0\.001\).*set the lr with group\['lr'\]\.fill_\(value\)"),
    (_replace_lr_tensor, r"param group 0's 'lr' is no longer the tensor"),
    (_set("betas", (0.8, 0.9)), r"param group 0's 'betas' changed after the capture "
                                r"\(\(0\.9, 0\.95\) -> \(0\.8, 0\.9\)\).*set the lr with "
                                r"group\['lr'\]\.fill_\(value\)"),
    (_set("eps", 1e-6), r"param group 0's 'eps' changed"),
    (_set("weight_decay", 0.0), r"param group 0's 'weight_decay' changed after the capture "
                                r"\(0\.05 -> 0\.0\)"),
    (_set("amsgrad", True), r"param group 0's 'amsgrad' changed"),
    (_add_group, r"the optimizer has 2 param groups, the captured step 1"),
    (_load_state_dict, r"param group 0 was replaced after the capture"),
])
def test_a_replay_refuses_hyperparameters_the_graph_does_not_read(fake_cuda, change, message):
    """MAE's schedule assigns group["lr"] = x every iteration: a replay would silently keep the
    captured value. Each replay checks the groups first, and replays nothing where one
    changed."""
    calls = fake_cuda
    opt = _adamw(_params())
    replay = fastmae.cuda_graph_step(lambda: None, opt, warmup=1)
    opt.param_groups[0]["initial_lr"] = 0.1  # what an LR scheduler adds: not read by the step
    replay()
    calls.clear()
    change(opt)
    with pytest.raises(ValueError, match=message):
        replay()
    assert "replay" not in calls


def test_state_the_warm_up_cannot_reset_is_refused_and_undone(fake_cuda):
    """An Adam subclass whose step creates state of its own: its fresh value is not known, so
    the warm-up is undone (parameters back, its state dropped) and nothing is captured."""
    class Tracking(torch.optim.AdamW):
        def step(self, closure=None):
            loss = super().step(closure)
            for g in self.param_groups:
                for p in g["params"]:
                    self.state[p].setdefault("visits", torch.ones(()))
            return loss

    calls = fake_cuda
    params = _params()
    before = [p.detach().clone() for p in params]
    opt = Tracking(params, lr=0.1, capturable=True)
    step = _training_step(calls, params, opt, [torch.randn(12)])
    with pytest.raises(ValueError, match="created optimizer state 'visits'.*nothing captured"):
        fastmae.cuda_graph_step(step, opt, warmup=2)
    assert "capture" not in calls
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    assert not opt.state and calls.rng.item() == 7


def _gpu_model_and_steps(backend, fixed_noise):
    torch.manual_seed(0)
    eager_model = fastmae.mae_vit_tiny_patch4(norm_pix_loss=True).cuda()
    graph_model = copy.deepcopy(eager_model)
    g = torch.Generator(device="cuda").manual_seed(0)
    imgs = torch.randn(8, 3, 32, 32, device="cuda", generator=g)
    noise = torch.rand(8, 64, device="cuda", generator=g) if fixed_noise else None

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
    return eager_model, graph_model, make


@pytest.mark.cuda
@pytest.mark.parametrize("fixed_noise", [True, False])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_replays_are_the_first_eager_steps_on_gpu(backend, fixed_noise):
    """Two copies of a model from the same weights, images and mask noise (fixed, or drawn by
    the model from the CUDA RNG seeded alike): the graph's replays (after its 2 eager warm-up
    steps, undone) give the losses of eager steps 1, 2, 3, and the same weights after them."""
    eager_model, graph_model, make = _gpu_model_and_steps(backend, fixed_noise)
    eager_opt, eager_step = make(eager_model)
    graph_opt, graph_step = make(graph_model)
    torch.cuda.manual_seed(1)
    eager_losses = []
    for _ in range(3):
        eager_losses.append(eager_step().item())
        eager_opt.zero_grad(set_to_none=True)
    torch.cuda.manual_seed(1)
    replay = fastmae.cuda_graph_step(graph_step, graph_opt, warmup=2, backend=backend)
    graph_losses = [replay().item() for _ in range(3)]
    assert graph_losses == pytest.approx(eager_losses, rel=1e-4)
    for (name, p), q in zip(eager_model.named_parameters(), graph_model.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-5), name
    steps = {graph_opt.state[p]["step"].item() for p in graph_model.parameters()
             if p.requires_grad}
    assert steps == {3.0}


@pytest.mark.cuda
def test_filling_the_lr_reaches_the_replays_on_gpu():
    """On a real graph: lr filled with 0 freezes the weights on the next replay, and filled
    back moves them; assigning a float is refused."""
    _, model, make = _gpu_model_and_steps("triton", True)
    opt, step = make(model)
    replay = fastmae.cuda_graph_step(step, opt, warmup=1)
    for group in opt.param_groups:
        group["lr"].fill_(0.0)
    frozen = [p.detach().clone() for p in model.parameters()]
    replay()
    torch.cuda.synchronize()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), frozen))
    for group in opt.param_groups:
        group["lr"].fill_(1e-3)
    replay()
    torch.cuda.synchronize()
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), frozen))
    opt.param_groups[0]["lr"] = 1e-3
    with pytest.raises(ValueError, match=r"fill_\(value\)"):
        replay()


@pytest.mark.parametrize("lr", [True, "0.1", None])
def test_an_lr_that_is_not_a_number_is_refused(fake_cuda, lr):
    """A bool is not a learning rate (lr=True would train at 1.0): refused, as a string or None,
    before anything runs."""
    opt = _adamw(_params())
    opt.param_groups[0]["lr"] = lr
    ran = []
    with pytest.raises(ValueError,
                       match=r"param group 0's lr must be a float or a 0-d tensor, got"):
        fastmae.cuda_graph_step(lambda: ran.append(1), opt, warmup=1)
    assert not ran


def test_the_rng_state_saved_and_restored_is_the_parameters_devices(fake_cuda, monkeypatch):
    """The warm-up's RNG draws are undone on the device the step runs on (the parameters'), not
    on the current device, which may be another GPU."""
    calls = fake_cuda
    seen = []

    def get_rng_state(device="cuda"):
        seen.append(("get", torch.device(device)))
        return calls.rng.clone()

    def set_rng_state(state, device="cuda"):
        seen.append(("set", torch.device(device)))
        calls.rng = state.clone()
    monkeypatch.setattr(torch.cuda, "get_rng_state", get_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    params = _params(seed=torch.seed() % 1000)
    opt = _adamw(params)
    before = calls.rng.clone()
    fastmae.cuda_graph_step(_training_step(calls, params, opt, [torch.randn(12)]), opt, warmup=2)
    assert seen == [("get", params[0].device), ("set", params[0].device)]
    assert torch.equal(calls.rng, before)


def test_before_capture_sees_the_warm_up_undone(fake_cuda):
    """_before_capture (fastmae bench resets the peak memory there) runs after the warm-up is
    undone -- parameters, fresh optimizer state and RNG state back -- just before the capture."""
    calls = fake_cuda
    params = _params(seed=torch.seed() % 1000)
    opt = _adamw(params)
    before, rng = [p.detach().clone() for p in params], calls.rng.clone()
    seen = []

    def before_capture():
        seen.append((all(torch.equal(p, q) for p, q in zip(params, before)),
                     torch.equal(calls.rng, rng),
                     all(not v.any() for s in opt.state.values() for v in s.values()),
                     "capture" in calls))
    step = _training_step(calls, params, opt, [torch.randn(12)])
    fastmae.cuda_graph_step(step, opt, warmup=2, _before_capture=before_capture)
    assert seen == [(True, True, True, False)]
