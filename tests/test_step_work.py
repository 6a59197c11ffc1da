"""benches/step_work.py: each kernel's work in a training step, counted with stand-in launches,
extended linearly in the batch (checked against a direct count: within 1%, the partial-sum
buffers' rounding), and set against a bench
result's kernel times and floors. Subprocesses: the script installs Triton stand-ins for good."""
import json
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benches" / "step_work.py"

LINEARITY = r"""
import sys
sys.path.insert(0, {benches!r})
import step_work
counted = step_work.count("tiny", 5)
extended = step_work.extend(step_work.count("tiny", 2), step_work.count("tiny", 3), 2, 3, 5)
assert counted.keys() == extended.keys() and len(counted) > 8, (counted.keys(), extended.keys())
assert "_sum_partials" in step_work.NOT_LINEAR
for name, (n, nbytes, flops) in counted.items():
    e = extended[name]
    if name in step_work.NOT_LINEAR:  # reported as counted at the larger batch
        assert n == e[0] and e == step_work.count("tiny", 3)[name], (name, e)
        continue
    # exact but for the partial-sum buffers, whose rows are rounded to whole blocks of rows
    assert n == e[0] and abs(nbytes - e[1]) <= 0.01 * nbytes and abs(flops - e[2]) <= 1e-9 * flops, (
        name, counted[name], e)
print("ok", len(counted))
"""


def _run(*args):
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


def test_counts_extend_linearly_in_the_batch():
    assert _run("-c", LINEARITY.format(benches=str(SCRIPT.parent))).startswith("ok")


def test_kernels_against_a_results_floors(tmp_path):
    # FIXTURE: a made-up `fastmae bench --json` result (nothing in it was measured)
    result = {"config": {"model": "tiny", "batch": 4},
              "env": {"gpu": "FIXTURE-GPU", "commit": "fixture00000"},
              "floors": {"copy_bytes_per_s": 1e12, "matmul_flops_per_s": 1e14},
              "results": [{"system": "fastmae", "profile": {"top_kernels": [
                  {"name": "_layer_norm_fwd", "category": "fastmae kernels", "ms_per_step": 0.5},
                  {"name": "nvjet_fixture", "category": "matmul (cuBLAS)", "ms_per_step": 9.0}]}}]}
    path = tmp_path / "step_tiny.json"
    path.write_text(json.dumps(result))
    out = _run(str(SCRIPT), "--model", "tiny", "--batch", "4", "--against", str(path))
    assert "FIXTURE-GPU, commit fixture00000; copy 1.00 TB/s, bf16 matmul 100 TFLOP/s" in out
    rows = {m.group(1): m.groups() for m in re.finditer(
        r"^  (_\w+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\w+)\s+(\S+)\s+(\S+)$", out, re.M)}
    name, n, gb, gflop, floor_ms, bound, then, of_floor = rows["_layer_norm_fwd"]
    assert int(n) > 0 and bound == "memory" and then == "0.50"
    assert abs(float(floor_ms) - float(gb)) <= 1e-3  # its GB at 1 TB/s: that many ms
    assert of_floor == f"{100 * float(floor_ms) / 0.5:.0f}%"
    assert rows["_attn_fwd"][5] in ("memory", "matmul") and rows["_attn_fwd"][6] == "-"
    # another model or batch than the result's is refused
    bad = subprocess.run([sys.executable, str(SCRIPT), "--model", "tiny", "--batch", "8",
                          "--against", str(path)], capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "measured tiny at batch 4, not tiny at 8" in bad.stderr


# FIXTURE: made-up counts {batch: {kernel: [launches, bytes, FLOPs]}} at the two counted batches
# (2 and 4), standing in for step_work.count; and a made-up result at batch 8 to set them against
TABLE = r"""
import json, sys
sys.path.insert(0, {benches!r})
import step_work
fake = {{2: {{"_copy_k": [3, 2e9, 0], "_mm_k": [2, 0.5e9, 1e11], "_sum_partials": [4, 1e6, 0]}},
        4: {{"_copy_k": [3, 4e9, 0], "_mm_k": [2, 1e9, 2e11], "_sum_partials": [4, 3e6, 0]}}}}
step_work.count = lambda model, batch, seed=0: {{k: list(v) for k, v in fake[batch].items()}}
json.dump({{"config": {{"model": "tiny", "batch": 8}}, "env": {{"gpu": "G", "commit": "c"}},
           "floors": {{"copy_bytes_per_s": 1e12, "matmul_flops_per_s": 1e14}},
           "results": [{{"system": "fastmae", "profile": {{"top_kernels": [
               {{"name": "_copy_k", "category": "fastmae kernels", "ms_per_step": 16.0}},
               {{"name": "_mm_k", "category": "fastmae kernels", "ms_per_step": 5.0}}]}}}}]}},
          open({path!r}, "w"))
step_work.main(["--model", "tiny", "--batch", "8", "--against", {path!r}])
"""


def test_the_table_from_hand_made_counts(tmp_path):
    """Extension to batch 8 from counts at 2 and 4, GB (1e9 bytes), floors, bound, the fraction
    of the floor, the rows' order (most bytes first) and the total, on made-up counts."""
    out = _run("-c", TABLE.format(benches=str(SCRIPT.parent), path=str(tmp_path / "r.json")))
    rows = [line.split() for line in out.splitlines() if line.startswith("  ")][1:]
    assert [r for r in rows if not r[0].startswith("(")] == [
        # 2e9 + (4e9 - 2e9) * (8 - 2) / (4 - 2) = 8e9 bytes: 8 ms at 1e12 B/s; 8 / 16 ms = 50%
        ["_copy_k", "3", "8.000", "0.0", "8.000", "memory", "16.00", "50%"],
        # 2e9 bytes (2 ms) and 1e11 + 1e11 * 3 = 4e11 FLOPs (4 ms at 1e14 FLOP/s): matmul-bound;
        # 4 / 5 ms = 80%
        ["_mm_k", "2", "2.000", "400.0", "4.000", "matmul", "5.00", "80%"],
        # NOT_LINEAR: as counted at batch 4 (3e6 bytes), no time in the result
        ["_sum_partials", "4", "0.003", "0.0", "0.003", "memory", "-", "-"],
        # 3 + 2 + 4 launches, (8e9 + 2e9 + 3e6) / 1e9 GB, 4e11 / 1e9 GFLOP
        ["all", "9", "10.003", "400.0"]]
