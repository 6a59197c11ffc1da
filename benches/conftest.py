"""pytest-benchmark suites of fastmae: ops (bench_ops.py) and the training step (bench_step.py).

On a GPU: ``pytest benches [--mae-models vit_b16,vit_l16,vit_h14] --benchmark-json out.json``
times the real MAE shapes. Without one, ``pytest benches --benchmark-disable`` runs every
benchmark once on tiny shapes through Triton's interpreter, as a smoke test (CI runs it).

Like tests/conftest.py, this switches the interpreter on before any kernel module (or triton)
is imported when there is no GPU. The files are named bench_*.py: they are collected here.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if HAS_CUDA else "cpu"
GPU_MODELS = ("vit_b16", "vit_l16", "vit_h14")


def pytest_addoption(parser):
    group = parser.getgroup("fastmae benches")
    group.addoption("--mae-models", default=os.environ.get("FASTMAE_BENCH_MODELS"),
                    help="comma-separated models whose shapes are timed on a GPU: vit_b16, vit_l16, "
                         "vit_h14 (default: all three, or micro with --benchmark-disable; env "
                         "FASTMAE_BENCH_MODELS). Without a GPU the micro model's shapes are used "
                         "whatever this says.")
    group.addoption("--mae-batch", type=int, default=None,
                    help="batch size instead of the models' own (256; 128 for ViT-H)")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped without one")


def pytest_collect_file(file_path, parent):
    # a bench_*.py named on the command line is collected by pytest itself
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def selected_models(config):
    if not HAS_CUDA:
        return ["micro"]
    raw = config.getoption("--mae-models")
    if not raw and config.getoption("benchmark_disable", default=False):
        return ["micro"]  # a smoke run (README's test command) on a GPU: not the real shapes
    names = [s.strip() for s in raw.split(",") if s.strip()] if raw else list(GPU_MODELS)
    bad = [n for n in names if n not in GPU_MODELS + ("tiny", "micro")]
    if bad:
        raise pytest.UsageError(f"--mae-models: unknown {', '.join(bad)}; choose from "
                                f"{', '.join(GPU_MODELS)}, tiny, micro")
    return names


def pytest_generate_tests(metafunc):
    if "mae_model" in metafunc.fixturenames:
        metafunc.parametrize("mae_model", selected_models(metafunc.config), scope="session")


@pytest.fixture(scope="session")
def device():
    return DEVICE


@pytest.fixture(scope="session")
def mae_batch(request):
    return request.config.getoption("--mae-batch")


@pytest.fixture(scope="session")
def floors():
    """Copy bandwidth and bf16 matmul rate of this GPU, measured once per session (None on CPU)."""
    from fastmae.bench import measure_floors
    return measure_floors()


@pytest.fixture(scope="session")
def env():
    from fastmae.bench import env_info
    return dict(env_info())
