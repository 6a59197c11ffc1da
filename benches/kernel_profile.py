"""Hardware counters of the attention kernels (and the MLP's fused matmuls) at MAE's shapes, read
with Nsight Compute (ncu).

    python benches/kernel_profile.py [--out DIR] [--cases decoder,encoder,mlp] [--ncu PATH]
    python benches/kernel_profile.py --smoke     # CPU: the profiled calls through the interpreter

Why: on the H200 the decoder's attention (ViT-B/16: N = 197, d = 32, batch 256 x 16 heads) ran
at 25-37% of its memory floor, ~5.5 ms of a 40 ms step, and within 4-13% across every tiling the
autotuners hold (benches/results/h200-2026-12-04-6c02ddb, autotune_timings): what holds it back
is not a tile size, and timings alone do not say what it is. This reads it off the counters: for
each kernel the occupancy it reached, how busy the issue slots were, the warps eligible to issue,
why the others stalled (per issued instruction), and which SASS instructions the stall samples
fall on.

How: the script runs itself under ncu (``--profile-from-start off``: only the region between
cudaProfilerStart and Stop is profiled, after every kernel has been compiled and autotuned
outside it; ``--clock-control none``: the card's clocks as found; ``--set full``). In that region
each case runs the forward once, the two-kernel backward once (dQ, then dK-dV) and each
one-kernel backward (every key, then every query, in a program's tile) once, as the model calls
them: q, k, v views of a packed (B, N, 3, H, d) bf16 qkv, the
gradients into one packed buffer, the qkv bias's column sums on. The "mlp" case runs the
decoder MLP's fc1 with its bias + GELU and fc2's input gradient with the GELU backward each
way fastmae.ops times (kernels/gelu_matmul.py's threads' and TMA kernels, and the bias + GELU
kernels of the split way, whose cuBLAS matmuls ncu leaves out). It writes to DIR:

- ``kernels.ncu-rep`` (the report), ``details.csv`` and ``raw.csv`` (ncu's details and raw pages)
  and ``sass_<n>_<kernel>.csv`` (each launch's SASS with its stall samples);
- ``launches.json``: what was launched in the region, in order, with the configurations the
  autotuners picked and timed;
- ``kernel_profile.json`` and, printed last, a table: per launch its time, registers,
  occupancy, issue-slot use, eligible warps, the top stall reasons, and the instructions with
  the most stall samples.

ncu must be on PATH, in /opt/nvidia/nsight-compute/*/ or /usr/local/cuda/bin, or given with --ncu.
"""
import argparse
import contextlib
import csv
import glob
import io
import json
import os
import re
import shutil
import subprocess
import sys

import torch

# ViT-B/16 (batch, heads, tokens, head dim): the decoder attends over 1 + 196 tokens at d = 32,
# the encoder over 1 + 49 visible ones at d = 64
CASES = {"decoder": (256, 16, 197, 32), "encoder": (256, 12, 50, 64)}
SMOKE_CASES = {"decoder": (2, 2, 37, 32), "encoder": (1, 2, 20, 64)}
# the decoder MLP's fc1 (M = batch x tokens rows, K = 512 -> N = 2048) and fc2's input gradient
MLP_CASES = {"mlp": (256 * 197, 2048, 512)}
SMOKE_MLP_CASES = {"mlp": (37, 64, 32)}
# the kernels ncu profiles (its --kernel-name): fastmae's attention, fused matmuls, bias + GELU
KERNELS = "regex:^_(attn|matmul|bias_gelu)"
WAYS = ("split", "fused", "fused_q")  # the backward's ways (kernels/attention.py: _bwd_strategy)

# ncu's details page, by section: what the summary table takes (name, the column's heading)
DETAILS = [("Duration", "us"), ("Registers Per Thread", "regs"),
           ("Block Limit Registers", "blocks/SM"), ("Theoretical Occupancy", "occ theo %"),
           ("Achieved Occupancy", "occ %"),
           ("Issue Slots Busy", "issue %"), ("Eligible Warps Per Scheduler", "eligible"),
           ("Warp Cycles Per Issued Instruction", "cyc/issue"),
           ("Compute (SM) Throughput", "SM %"), ("DRAM Throughput", "DRAM %")]
_TIME_UNITS = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6}
# the warp-state section's stall breakdown, in warp cycles per issued instruction
_STALL = re.compile(r"^smsp__average_warps?_issue_stalled_(\w+?)_per_issue_active\.ratio$")


# ----------------------------------------------------------------------------- the profiled run

def _case_calls(B, H, N, d, device, dtype):
    """[(way, zero-argument call)] of one attention case, laid out as fastmae.ops calls it."""
    from fastmae.kernels import attention
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    qkv = rand(B, N, 3, H, d)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    o = torch.empty(B, N, H, d, device=device, dtype=dtype).transpose(1, 2)
    do = rand(B, N, H, d).transpose(1, 2)
    dqkv = torch.empty(B, N, 3, H, d, device=device, dtype=dtype)
    dq, dk, dv = dqkv.permute(2, 0, 3, 1, 4).unbind(0)
    dsum = torch.empty(*attention.grad_sum_shape(B, H, N, d), device=device, dtype=torch.float32)
    scale = d ** -0.5
    _, lse = attention.attention_fwd(q, k, v, scale, out=o)

    def backward(way):
        def call():
            before = os.environ.get("FASTMAE_ATTN_BWD")
            os.environ["FASTMAE_ATTN_BWD"] = way  # read at each call (_common.keep_faster)
            try:
                attention.attention_bwd(do, q, k, v, o, lse, scale, dq=dq, dk=dk, dv=dv, dsum=dsum)
            finally:
                if before is None:
                    os.environ.pop("FASTMAE_ATTN_BWD", None)
                else:
                    os.environ["FASTMAE_ATTN_BWD"] = before
        return call

    return [("fwd", lambda: attention.attention_fwd(q, k, v, scale, out=o))] + [
        (f"bwd {way}", backward(way)) for way in WAYS]


def _mlp_calls(M, N, K, device, dtype):
    """[(way, zero-argument call)] of the MLP case: fc1 + bias + GELU, then fc2's input gradient
    through the GELU, each the ways fastmae.ops._mlp_way times (the TMA one where it applies)."""
    import torch.nn.functional as F

    from fastmae.kernels import bias_gelu, gelu_matmul
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    a, w1, bias = rand(M, K), rand(N, K, scale=K ** -0.5), rand(N).float()
    dm, w2 = rand(M, K), rand(K, N, scale=N ** -0.5)
    f, _ = gelu_matmul.matmul_bias_gelu(a, w1, bias, dtype)
    ways = ["fused"] + (["fused_tma"] if gelu_matmul.tma_ok(
        a.device, dtype, N, a=a, w=w1, dm=dm, w2=w2, f=f) else [])
    calls = [(f"fc1 {way}", lambda tma=way == "fused_tma": gelu_matmul.matmul_bias_gelu(
        a, w1, bias, dtype, tma=tma)) for way in ways]
    calls.append(("fc1 split", lambda: bias_gelu.bias_gelu_fwd(F.linear(a, w1), bias, dtype)))
    calls += [(f"fc2_dgrad {way}", lambda tma=way == "fused_tma": gelu_matmul.matmul_gelu_bwd(
        dm, w2, f, bias, dtype, reduce=False, tma=tma)) for way in ways]
    calls.append(("fc2_dgrad split", lambda: bias_gelu.bias_gelu_bwd(
        torch.mm(dm, w2), f, bias, dtype, reduce=False)))
    return calls


@contextlib.contextmanager
def _recording(launches, label):
    """Every fastmae kernel launch inside, appended to ``launches`` as {label, kernel}."""
    from fastmae.kernels import _common
    previous = _common.OBSERVER
    _common.OBSERVER = lambda name, nbytes, flops: launches.append(
        {"label": label, "kernel": name, "bytes": nbytes, "flops": flops})
    try:
        yield
    finally:
        _common.OBSERVER = previous


def run_cases(names, smoke=False):
    """Compile and autotune every call of the cases outside the profiled region, then make each
    call once inside it. Returns the launches made inside, in order."""
    cuda = not smoke
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32  # the interpreter has no bf16
    table = SMOKE_CASES if smoke else CASES
    mlp_table = SMOKE_MLP_CASES if smoke else MLP_CASES
    calls = []
    for name in names:
        if name in mlp_table:
            case_calls = _mlp_calls(*mlp_table[name], device=device, dtype=dtype)
        else:
            case_calls = _case_calls(*table[name], device=device, dtype=dtype)
        for way, call in case_calls:
            calls.append((f"{name} {way}", call))
    for _, call in calls:  # outside the profiled region: every compile and autotuning search
        call()
        call()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
    launches = []
    try:
        for label, call in calls:
            with _recording(launches, label):
                call()
    finally:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
    return launches


# ----------------------------------------------------------------------------- ncu and its output

def find_ncu(given=None):
    """The ncu executable: ``given``, else on PATH, else the newest under the usual folders."""
    if given:
        return given
    found = shutil.which("ncu")
    if found:
        return found
    candidates = sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu")) + \
        sorted(glob.glob("/usr/local/cuda*/bin/ncu"))
    return candidates[-1] if candidates else None


# what is collected where ncu's "full" set fails (it holds sections that some machines refuse):
# the ones the summary reads, and the per-instruction stall samples
SECTIONS = ("SpeedOfLight", "LaunchStats", "Occupancy", "SchedulerStats", "WarpStateStats",
            "ComputeWorkloadAnalysis", "InstructionStats", "MemoryWorkloadAnalysis",
            "SourceCounters")


def profile_command(ncu, report, inner_args, sections=None):
    """ncu's command line around this script's inner run: the "full" set of sections, or
    ``sections``."""
    collect = ["--set", "full"] if sections is None else [
        arg for name in sections for arg in ("--section", name)]
    return [ncu, "--profile-from-start", "off", "--clock-control", "none",
            "--target-processes", "all", *collect, "--import-source", "yes",
            "--kernel-name", KERNELS, "--export", report, "--force-overwrite",
            sys.executable, os.path.abspath(__file__), "--inner", *inner_args]


def export_commands(ncu, report, launches):
    """{file name: ncu command} exporting the report as text: the details and raw pages, and
    each launch's SASS with its stall samples (picked by kernel name and occurrence)."""
    out = {"details.csv": [ncu, "--import", report, "--csv", "--page", "details"],
           "raw.csv": [ncu, "--import", report, "--csv", "--page", "raw"]}
    seen = {}
    for n, launch in enumerate(launches):
        kernel = launch["kernel"]
        skip = seen.get(kernel, 0)
        seen[kernel] = skip + 1
        out[f"sass_{n}_{kernel}.csv"] = [
            ncu, "--import", report, "--csv", "--page", "source", "--print-source", "sass",
            "--kernel-name", kernel, "--launch-skip", str(skip), "--launch-count", "1"]
    return out


def _number(text):
    try:
        return float(str(text).replace(",", ""))
    except ValueError:
        return None


def _table(text, *names):
    """(heading, rows after it) of the CSV table in ncu's output whose heading row holds every
    one of ``names`` (ncu may print ==PROF== lines or a banner first); (None, []) if none."""
    rows = list(csv.reader(io.StringIO(text)))
    at = next((n for n, row in enumerate(rows) if all(name in row for name in names)), None)
    return (None, []) if at is None else (rows[at], rows[at + 1:])


def parse_details(text):
    """{result ID: {"kernel": name, metric name: value}} from ncu's details page in CSV (one row
    a metric: ID, ..., Kernel Name, ..., Section Name, Metric Name, Metric Unit, Metric Value);
    durations in microseconds, numbers as floats."""
    head, rows = _table(text, "ID", "Kernel Name", "Metric Name", "Metric Unit", "Metric Value")
    if head is None:
        return {}
    col = {name: head.index(name) for name in
           ("ID", "Kernel Name", "Metric Name", "Metric Unit", "Metric Value")}
    out = {}
    for row in rows:
        if len(row) < len(head):
            continue
        result = out.setdefault(row[col["ID"]], {"kernel": row[col["Kernel Name"]]})
        value = _number(row[col["Metric Value"]])
        unit = row[col["Metric Unit"]]
        if value is not None and unit in _TIME_UNITS:
            value *= _TIME_UNITS[unit]
        result[row[col["Metric Name"]]] = value if value is not None else row[col["Metric Value"]]
    return out


def parse_stalls(text):
    """{result ID: {stall reason: warp cycles per issued instruction}} from ncu's raw page in CSV
    (one row a result, one column a metric; a row of units, with no ID, may follow the heading)."""
    head, rows = _table(text, "ID", "Kernel Name")
    if head is None:
        return {}
    id_col = head.index("ID")
    stall_cols = [(i, m.group(1)) for i, name in enumerate(head) if (m := _STALL.match(name))]
    out = {}
    for row in rows:
        if len(row) < len(head) or not row[id_col]:
            continue
        stalls = {reason: _number(row[i]) for i, reason in stall_cols}
        out[row[id_col]] = {r: v for r, v in stalls.items() if v is not None}
    return out


def parse_sass(text, top=8):
    """From ncu's source page of one launch in CSV (SASS, one row an instruction, under a
    heading row that may follow a banner): {"top": the instructions with the most stall samples
    [(samples, SASS text)], "opcodes": {opcode: stall samples}, "reasons": {column: samples}
    (where the page has a column a stall reason, "stall_..."), most first}."""
    head, rows = _table(text, "Source")
    if head is None or not any(h.startswith("Warp Stall Sampling (All") for h in head):
        return {"top": [], "opcodes": {}, "reasons": {}}
    source = head.index("Source")
    samples = next(i for i, h in enumerate(head) if h.startswith("Warp Stall Sampling (All"))
    reason_cols = [(i, h) for i, h in enumerate(head) if h.startswith("stall_")]
    per_instruction, per_opcode, per_reason = [], {}, {}
    for row in rows:
        if len(row) < len(head):
            continue
        for i, h in reason_cols:
            per_reason[h] = per_reason.get(h, 0) + (_number(row[i]) or 0)
        count = _number(row[samples])
        if not count:
            continue
        sass = row[source].strip()
        words = [w for w in sass.split() if not w.startswith("@")]  # drop a predicate
        opcode = words[0].split(".")[0] if words else "?"
        per_opcode[opcode] = per_opcode.get(opcode, 0) + count
        per_instruction.append((count, sass))
    per_instruction.sort(key=lambda item: -item[0])

    def most_first(d):
        return dict(sorted(((k, v) for k, v in d.items() if v), key=lambda kv: -kv[1]))

    return {"top": per_instruction[:top], "opcodes": most_first(per_opcode),
            "reasons": most_first(per_reason)}


def summarize(launches, details, stalls, sass):
    """One row a profiled launch, matched to ncu's results in launch order."""
    ids = sorted(details, key=lambda i: int(i) if str(i).isdigit() else 0)
    rows = []
    for n, launch in enumerate(launches):
        rid = ids[n] if n < len(ids) else None
        metrics = details.get(rid, {})
        if metrics and metrics.get("kernel") != launch["kernel"]:
            metrics = {}  # ncu's order is not the launch order: leave it to the CSV files
        row = {**launch, "ncu_id": rid,
               "metrics": {name: metrics.get(name) for name, _ in DETAILS},
               "stalls": dict(sorted(stalls.get(rid, {}).items(), key=lambda kv: -kv[1]))}
        row["sass"] = sass.get(n, {"top": [], "opcodes": {}, "reasons": {}})
        rows.append(row)
    return rows


def format_table(rows):
    lines = ["launch                  kernel           " + "  ".join(
        f"{head:>10}" for _, head in DETAILS)]
    for r in rows:
        cells = []
        for name, _ in DETAILS:
            value = r["metrics"].get(name)
            cells.append(f"{value:10.1f}" if isinstance(value, float) else f"{str(value):>10}")
        lines.append(f"{r['label']:<23} {r['kernel']:<16} " + "  ".join(cells))
        stalls = ", ".join(f"{k} {v:.1f}" for k, v in list(r["stalls"].items())[:5])
        if stalls:
            lines.append(f"    stalls (warp cycles per issued instruction): {stalls}")
        for what, counts in (("reason", r["sass"]["reasons"]), ("opcode", r["sass"]["opcodes"])):
            text = ", ".join(f"{k} {int(v)}" for k, v in list(counts.items())[:6])
            if text:
                lines.append(f"    stall samples by {what}: {text}")
        for count, text in r["sass"]["top"][:3]:
            lines.append(f"    {int(count):8d}  {text}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- driver

def _run(command, path, timeout, with_stderr=False):
    """Run ``command``, its stdout (and with_stderr, its stderr) to ``path``; (return code,
    stderr tail)."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out, err, rc = exc.stdout or "", f"timed out after {timeout} s", 124
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
    else:
        out, err, rc = done.stdout, done.stderr, done.returncode
    with open(path, "w") as f:
        f.write(out + (err if with_stderr else ""))
    return rc, err[-2000:]


def profile(out_dir, names, ncu, timeout=400):
    """Run the cases under ncu, export its report as text and summarize it. Returns the exit
    status (0: every step worked)."""
    os.makedirs(out_dir, exist_ok=True)
    report = os.path.join(out_dir, "kernels.ncu-rep")
    launches_path = os.path.join(out_dir, "launches.json")
    inner_args = ["--cases", ",".join(names), "--launches", launches_path]
    for attempt, sections in enumerate((None, SECTIONS)):
        command = profile_command(ncu, report, inner_args, sections)
        print("$ " + " ".join(command), flush=True)
        log = os.path.join(out_dir, f"ncu{'' if sections is None else '_sections'}.log")
        rc, err = _run(command, log, timeout, with_stderr=True)
        if rc == 0 and os.path.exists(launches_path):
            break
        print(f"the profiled run failed (exit {rc}): see {os.path.basename(log)}\n{err}",
              file=sys.stderr)
        if rc == 124 or attempt == 1:  # a second run would not fit, or has failed too
            return 1
    with open(launches_path) as f:
        inner = json.load(f)
    launches = inner["launches"]
    status = 0
    texts = {}
    for name, export in export_commands(ncu, report, launches).items():
        rc, err = _run(export, os.path.join(out_dir, name), 120)
        if rc != 0:
            print(f"ncu export {name} failed (exit {rc}): {err}", file=sys.stderr)
            status = 1
        with open(os.path.join(out_dir, name)) as f:
            texts[name] = f.read()
    sass = {}
    for n, launch in enumerate(launches):
        sass[n] = parse_sass(texts.get(f"sass_{n}_{launch['kernel']}.csv", ""))
    rows = summarize(launches, parse_details(texts["details.csv"]),
                     parse_stalls(texts["raw.csv"]), sass)
    from fastmae.bench import env_info
    with open(os.path.join(out_dir, "kernel_profile.json"), "w") as f:
        json.dump({"kind": "kernel_profile", "env": env_info(), "cases": {
                   name: dict(zip(("rows", "hidden", "width"), MLP_CASES[name]))
                   if name in MLP_CASES else
                   dict(zip(("batch", "heads", "tokens", "head_dim"), CASES[name]))
                   for name in names}, "autotuned": inner["autotuned"], "launches": rows},
                  f, indent=1)
    print(format_table(rows))
    if not any(r["metrics"].get("Duration") for r in rows):
        print("no ncu result matched a launch: read details.csv", file=sys.stderr)
        status = 1
    return status


def _parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "out/profile"),
                   help="folder for the report and its text exports (default: $OUT or out/profile)")
    p.add_argument("--cases", default="decoder", help="comma-separated: decoder, encoder, mlp")
    p.add_argument("--ncu", default=None, help="the ncu executable (default: found)")
    p.add_argument("--timeout", type=int, default=400, help="seconds for the profiled run")
    p.add_argument("--smoke", action="store_true",
                   help="CPU: run the profiled calls at tiny shapes through the interpreter")
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--launches", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    known = {**CASES, **MLP_CASES}
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise SystemExit(f"--cases: expected some of {sorted(known)}, got {args.cases!r}")
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
    if args.smoke or args.inner:
        launches = run_cases(names, smoke=args.smoke)
        from fastmae.bench import autotuned
        result = {"launches": launches, "autotuned": autotuned()}
        if args.launches:
            with open(args.launches, "w") as f:
                json.dump(result, f, indent=1)
        for launch in launches:
            print(f"{launch['label']:<24} {launch['kernel']}")
        return 0
    if not torch.cuda.is_available():
        print("no CUDA GPU here: ncu profiles GPUs only (try --smoke)", file=sys.stderr)
        return 2
    ncu = find_ncu(args.ncu)
    if ncu is None:
        print("ncu (Nsight Compute) not found: give it with --ncu", file=sys.stderr)
        return 2
    return profile(args.out, names, ncu, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
