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
    # the ratio printed is fastmae's host time over the reference's (each printed to 0.01 ms)
    ms = dict(re.findall(r"^  (reference|fastmae) \(\w+\)\s+([\d.]+) ms/step", out.stdout, re.M))
    ratio = re.search(r"fastmae / reference: ([\d.]+)x", out.stdout)
    assert ratio and abs(float(ratio.group(1)) - float(ms["fastmae"]) / float(ms["reference"])) \
        < 0.02, out.stdout
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


# host_cost.py replaces Triton's launchers on import: run in a process of its own
ARITHMETIC = r"""
import sys, timeit
sys.path.insert(0, {benches!r})
import host_cost
from fastmae.kernels import _common
now = [0.0]
host_cost.time.perf_counter = lambda: now[0]

def step(ticks):  # FIXTURE: a step that takes the next of ``ticks`` (2 ** -10 s each)
    it = iter(ticks)
    def run():
        now[0] += next(it) / 1024
    return run
# two systems, one round of 10 steps each: the 10th percentile is the second fastest
ms = host_cost.host_ms({{"a": step([5, 1, 9, 2, 8, 3, 7, 4, 6, 10]),
                        "b": step([30] * 9 + [1])}}, steps=10, warmup=0, repeats=1)
assert ms == {{"a": 2 / 1024 * 1e3, "b": 30 / 1024 * 1e3}}, ms
# call_costs: the best (least) of each form's rounds, per call in ns; FIXTURE: made-up timings
seconds = iter([3e-6, 1e-6, 2e-6, 4e-6, 1.5e-6, 5e-6] + [1e-6] * 24)
timeit.timeit = lambda fn, number: next(seconds)
first = host_cost.call_costs(number=10, repeat=3)[0]
assert first[1:] == (1.5e-6 / 10 * 1e9, 1e-6 / 10 * 1e9), first  # 150 and 100 ns
for path, direct in (("stub", False), ("triton", False), ("direct", True)):
    host_cost.use_launch_path(path)
    assert _common.DIRECT_LAUNCH is direct, path
print("ok")
"""


def test_host_time_and_call_cost_arithmetic():
    """host_ms (the 10th percentile of each system's step times, in ms), call_costs (the least
    of the rounds, ns a call) on a made-up clock, and each launch path's direct-launch switch."""
    out = subprocess.run([sys.executable, "-c", ARITHMETIC.format(benches=str(SCRIPT.parent))],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
