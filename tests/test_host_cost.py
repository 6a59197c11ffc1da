"""benches/host_cost.py runs in its three launch modes and all three launch the same kernels: the
no-op counter (Triton launches stubbed), Triton's own Python launch path up to its C launcher, and
fastmae's direct launch in front of it."""
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benches" / "host_cost.py"


def _launches(*extra):
    out = subprocess.run([sys.executable, str(SCRIPT), "--steps", "1", *extra],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    found = re.search(r"fastmae \(triton\)\s+[\d.]+ ms/step host, (\d+) Triton launches", out.stdout)
    assert found, out.stdout
    return int(found.group(1))


def test_every_launch_path_launches_the_same_kernels():
    stubbed = _launches()
    assert stubbed > 100  # ViT-B depth: 20 blocks, several kernels each
    assert _launches("--launch-path", "triton") == stubbed
    assert _launches("--launch-path", "direct") == stubbed


def test_call_costs_times_each_avoided_form_against_the_used_one():
    """--call-costs runs (its plain attribute reads give Block._fused_args' exact arguments, an
    assert inside) and prints a positive time for both forms of every pair."""
    out = subprocess.run([sys.executable, str(SCRIPT), "--call-costs"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = re.findall(r"^  (.+?)\s+([\d.]+) /\s+([\d.]+) us$", out.stdout, re.M)
    assert len(rows) == 5, out.stdout
    assert all(float(a) > 0 and float(b) > 0 for _, a, b in rows)


def test_each_mlp_way_launches_its_own_kernels():
    """--mlp picks the MLP's way; fused_tma runs the TMA kernels' launchers on the CPU tensors
    (stubbed like the rest), as the direct launch path would on a GPU."""
    def mlp_kernels(way):
        out = subprocess.run([sys.executable, str(SCRIPT), "--steps", "1", "--launch-path",
                              "direct", "--mlp", way], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        found = re.search(r"the MLP's kernels a step: (.*)$", out.stdout, re.M)
        assert found, out.stdout
        return dict(re.findall(r"(\w+) x(\d+)", found.group(1)))

    blocks = "20"  # 12 encoder and 8 decoder blocks: one MLP each
    assert mlp_kernels("fused_tma") == {"_matmul_bias_gelu_tma": blocks,
                                        "_matmul_gelu_bwd_tma": blocks}
    assert mlp_kernels("fused") == {"_matmul_bias_gelu": blocks, "_matmul_gelu_bwd": blocks}
    assert mlp_kernels("split") == {"_bias_gelu_fwd": blocks, "_bias_gelu_bwd": blocks}
