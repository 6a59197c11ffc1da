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
    # the stages after the checks only logged (L_MODEL's bench, PROFILE's kernel_profile.py)
    python, logged = _logging_python(tmp_path)
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")])),
               PYTHON=python, SKIP_STEP="1", SKIP_TRAIN_TEST="1", L_MODEL="tiny",
               SKIP_HOST="1", SKIP_SWEEP="1", SKIP_OPS="1", SKIP_TESTS="1", PROFILE="1",
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
    # the switches hold for the rest of the run: the bench after the checks runs with them
    assert logged["env"].read_text().split() == [
        "FASTMAE_TRITON_LAUNCH=triton", "FASTMAE_TMA=0", "FASTMAE_ATTN_HEAD_TILES=0"]
    # stage 3d: PROFILE_TIMEOUT 150 s, well inside the budget; the script's deadline 20 s inside
    (profile,) = [line.split() for line in logged["profile"].read_text().splitlines()]
    assert profile[profile.index("--timeout") + 1] == "130"


def _logging_python(tmp_path):
    """PYTHON for the suite: logs `-m fastmae.cli` (its arguments, and the switches in its
    environment) and benches/kernel_profile.py (its arguments) instead of running them; runs
    anything else."""
    logged = {name: tmp_path / f"{name}.log" for name in ("bench", "env", "profile")}
    for path in logged.values():
        path.write_text("")
    wrapper = tmp_path / "python"
    wrapper.write_text(
        "#!/usr/bin/env bash\n"
        'if [ "$1" = "-m" ] && [ "$2" = "fastmae.cli" ]; then\n'
        f'    echo "${{*:3}}" >> "{logged["bench"]}"\n'
        '    echo "FASTMAE_TRITON_LAUNCH=${FASTMAE_TRITON_LAUNCH:-} FASTMAE_TMA=${FASTMAE_TMA:-}'
        ' FASTMAE_ATTN_HEAD_TILES=${FASTMAE_ATTN_HEAD_TILES:-}"'
        f' >> "{logged["env"]}"; exit 0\n'
        "fi\n"
        'if [ "${1##*/}" = "kernel_profile.py" ]; then\n'
        f'    echo "${{*:2}}" >> "{logged["profile"]}"; exit 0\n'
        "fi\n"
        f'exec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper), logged


def _bench_commands(tmp_path, returncode=0, **switches):
    """The `fastmae bench` commands the suite runs (PYTHON a wrapper that logs them instead of
    running them), the checks before them off, the stages after them skipped; the suite's
    exit status must be ``returncode``."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "import torch\ntorch.cuda.is_available = lambda: True\n")
    wrapper, logged = _logging_python(tmp_path)
    log = logged["bench"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")])),
               PYTHON=wrapper, FASTMAE_TRITON_LAUNCH="triton", FASTMAE_TMA="0",
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
    assert _bench_commands(tmp_path, returncode=1, SUITE_BUDGET="30", PROFILE="1") == []
    log = (tmp_path / "out" / "suite.log").read_text()
    for model in ("vit_b16", "vit_l16"):
        assert f"fastmae bench --model {model} skipped: under 20 s of SUITE_BUDGET=30 s left" in log
    assert "done in" in log
    # stage 3d still gets its least limit, 40 s, and its script a deadline 20 s inside it
    profile = (tmp_path / "profile.log").read_text().split()
    assert profile[profile.index("--timeout") + 1] == "20"


# limit_now alone, from the script: each call made within the second its T0 was read (retried
# where the clock ticks in between); "-" where it could not be
LIMIT_NOW = r"""
source <(sed -n '/^limit_now() {/,/^}/p' "$1")
at() {  # SUITE_BUDGET, requested limit
    BUDGET=$1
    for _ in 1 2 3; do
        T0=$SECONDS; r=$(limit_now "$2")
        [ $((SECONDS - T0)) -eq 0 ] && { echo "$r"; return; }
    done
    echo -
}
at 100 50; at 100 90; at 45 30; at 44 30
"""


def test_a_stage_gets_its_own_limit_or_what_is_left_of_the_budget():
    """What is left: the budget less 25 s for stage 6; under 20 s left, none (0)."""
    out = subprocess.run(["bash", "-c", LIMIT_NOW, "-", str(REPO / "benches" / "gpu_suite.sh")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    # 100 - 25 = 75 left: 50 as asked, 90 cut to 75; 45 - 25 = 20 left: 20; 44: 19, none
    assert out.stdout.split() == ["50", "75", "20", "0"]
