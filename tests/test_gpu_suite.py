"""benches/gpu_suite.sh's control flow, on a CPU: a GPU session is too short to spend on a bug in
it. With CUDA faked as available (a sitecustomize that makes torch.cuda.is_available say yes),
the GPU checks that run before anything is measured all fail, or time out, as they would where
their kernels fault or hang: the script must say so, set each switch for the rest of its run,
and finish, leaving BENCHMARKS.md and its chart as they were (it measured nothing)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
UNTOUCHED = ("BENCHMARKS.md", "benches/images_per_s.png")  # written only from a run's results


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="fakes a GPU on a CPU machine; where there is one, the script runs")
def test_each_failed_first_check_switches_its_kernels_off(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import torch\ntorch.cuda.is_available = lambda: True\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTMAE_TMA",
                                                            "FASTMAE_ATTN_HEAD_TILES")}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")])),
               PYTHON=sys.executable, SKIP_STEP="1", SKIP_TRAIN_TEST="1", L_MODEL="",
               SKIP_HOST="1", SKIP_SWEEP="1", SKIP_OPS="1", SKIP_TESTS="1",
               HEAD_TIMEOUT="1")  # stage 0c times out: no pytest starts in a second
    before = [(REPO / name).read_bytes() for name in UNTOUCHED]
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(REPO / "benches" / "gpu_suite.sh"), str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    log = (out / "suite.log").read_text()
    assert proc.returncode == 1, log  # a failed stage: STATUS=1
    for said in ("the direct launch failed here",  # stage 0: FASTMAE_TRITON_LAUNCH=triton
                 "the TMA kernels failed here",  # 0b: FASTMAE_TMA=0
                 "0c/6 attention's head tilings: exit 124",  # 0c, beside 0b: timed out
                 "timed out after 1 s",
                 "attention's head tilings failed here",  # FASTMAE_ATTN_HEAD_TILES=0
                 "done in"):
        assert said in log, said
    assert (out / "head_tilings.log").exists()
    assert [(REPO / name).read_bytes() for name in UNTOUCHED] == before  # no result: no page


def _bench_commands(tmp_path, returncode=0, **switches):
    """The `fastmae bench` commands the suite runs (PYTHON a wrapper that logs them instead of
    running them), the checks before them off, the stages after them skipped; the suite's
    exit status must be ``returncode``."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "import torch\ntorch.cuda.is_available = lambda: True\n")
    log = tmp_path / "bench_commands.log"
    log.write_text("")
    wrapper = tmp_path / "python"
    wrapper.write_text(
        "#!/usr/bin/env bash\n"
        'if [ "$1" = "-m" ] && [ "$2" = "fastmae.cli" ]; then\n'
        f'    echo "${{*:3}}" >> "{log}"; exit 0\n'
        "fi\n"
        f'exec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")])),
               PYTHON=str(wrapper), FASTMAE_TRITON_LAUNCH="triton", FASTMAE_TMA="0",
               FASTMAE_ATTN_HEAD_TILES="0", SKIP_TRAIN_TEST="1", SKIP_HOST="1",
               SKIP_SWEEP="1", SKIP_OPS="1", SKIP_TESTS="1", **switches)
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(REPO / "benches" / "gpu_suite.sh"), str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == returncode, (out / "suite.log").read_text()
    return [line.split() for line in log.read_text().splitlines()]


def _systems(command):
    return command[command.index("--systems") + 1].split(",")


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="fakes a GPU on a CPU machine; where there is one, the script runs")
def test_the_graphed_reference_is_timed_beside_fastmae_graphed(tmp_path):
    """Both training-step stages time "reference + CUDA graph", the system the graphed fastmae
    is set against without the host's cost in either; SKIP_STEP and L_MODEL still pick them."""
    b16, l16 = _bench_commands(tmp_path)
    assert b16[:3] == ["bench", "--model", "vit_b16"] and "--compile" in b16
    assert _systems(b16) == ["reference", "fastmae", "fastmae_graph", "reference_graph",
                             "reference_compile"]
    assert l16[:3] == ["bench", "--model", "vit_l16"]
    assert _systems(l16) == ["reference", "fastmae", "fastmae_graph", "reference_graph"]
    for command in (b16, l16):
        assert command[command.index("--json") + 1].endswith(f"step_{command[2]}.json")
    (tiny,) = _bench_commands(tmp_path, SKIP_STEP="1", L_MODEL="tiny")
    assert tiny[:3] == ["bench", "--model", "tiny"] and "reference_graph" in _systems(tiny)


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="fakes a GPU on a CPU machine; where there is one, the script runs")
def test_stages_past_the_budget_are_skipped_and_said(tmp_path):
    """With SUITE_BUDGET spent (stage 6 keeps 25 s, a stage needs 20), the training-step stages
    are skipped, each said, the run fails (STATUS=1) and still ends with its summary."""
    assert _bench_commands(tmp_path, returncode=1, SUITE_BUDGET="30") == []
    log = (tmp_path / "out" / "suite.log").read_text()
    for model in ("vit_b16", "vit_l16"):
        assert f"fastmae bench --model {model} skipped: under 20 s of SUITE_BUDGET=30 s left" in log
    assert "done in" in log
