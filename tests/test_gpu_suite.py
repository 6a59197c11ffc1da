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
