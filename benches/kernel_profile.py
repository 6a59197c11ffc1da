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
kernels of the split way, whose cuBLAS matmuls ncu leaves out). The fused_q backward is
profiled only where attention's head tilings are on (gpu_suite.sh's stage 0c turns them off,
FASTMAE_ATTN_HEAD_TILES=0, where they failed on the GPU). It writes to DIR:

- ``kernels.ncu-rep`` (the report; a newer ncu may give it another extension, ``.ncu-repz``),
  ``details.csv`` and ``raw.csv`` (ncu's details and raw pages, in base units), ``ncu.log``
  (``ncu --version`` and the profiled run's output) and ``sass_<n>_<kernel>.csv`` (each launch's
  SASS with its stall samples);
- ``launches.json``: what was launched in the region, in order, with the configurations the
  autotuners picked and timed;
- ``kernel_profile.json`` and, printed last, a table: per launch its time, registers,
  occupancy, issue-slot use, eligible warps, the top stall reasons, and the instructions with
  the most stall samples.

Time: --timeout is one deadline for everything: the profiled run, a second one with fewer
sections where the first could not collect a section or metric (only then: a run that cannot
profile, that raised or that profiled nothing is not repeated), and the exports, which keep the
last EXPORT_SHARE_S of it. At the deadline (or when this process is told to stop) ncu's whole
process group goes, the profiled Python process with it. Under gpu_suite.sh (PROFILE_TIMEOUT,
150 s) the kernels' compiles come from Triton's cache, where stage 1 left them: the profiled run
loads them and autotunes (printing how long that took), so with stage 1 skipped the compiles run
under ncu and need a longer PROFILE_TIMEOUT. ncu's output is written to ncu.log as it comes.

ncu must be on PATH, in /opt/nvidia/nsight-compute/*/ or /usr/local/cuda*/bin, or given with
--ncu; where it is none of these the script says so and exits with SKIPPED (3).
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
import signal
import subprocess
import sys
import time

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
REPORT = "kernels"  # the report's name in DIR: ncu adds its extension
# exit status where no ncu is found: gpu_suite.sh says the stage was skipped, not that it failed
SKIPPED = 3
TIMED_OUT = 124  # the exit status _run gives a command it stopped at its deadline, as timeout(1)
# of --timeout, what the exports keep (ncu --import: two pages, then one SASS page a launch, a
# few seconds each; an estimate, not yet timed) and the least time worth a second profiled run
EXPORT_SHARE_S = 30
MIN_RUN_S = 30

# ncu's details page, by section: what the summary table takes (name, the column's heading)
DETAILS = [("Duration", "us"), ("Registers Per Thread", "regs"),
           ("Block Limit Registers", "blocks/SM"), ("Theoretical Occupancy", "occ theo %"),
           ("Achieved Occupancy", "occ %"),
           ("Issue Slots Busy", "issue %"), ("Eligible Warps Per Scheduler", "eligible"),
           ("Warp Cycles Per Issued Instruction", "cyc/issue"),
           ("Compute (SM) Throughput", "SM %"), ("DRAM Throughput", "DRAM %")]
# durations to microseconds: current ncu names the units ns, us, ms, s; older ones nsecond, ...
_TIME_UNITS = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3,
               "s": 1e6, "second": 1e6}
# the warp-state section's stall breakdown, in warp cycles per issued instruction
_STALL = re.compile(r"^smsp__average_warps?_issue_stalled_(\w+?)_per_issue_active\.ratio$")


# ----------------------------------------------------------------------------- the profiled run

def bwd_ways():
    """The backward's ways profiled (kernels/attention.py: _bwd_strategy): fused_q only where
    attention's head tilings are on (FASTMAE_ATTN_HEAD_TILES, read when the kernels import)."""
    from fastmae.kernels import attention
    return ("split", "fused") + (("fused_q",) if attention._HEAD_TILES else ())


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
        (f"bwd {way}", backward(way)) for way in bwd_ways()]


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
    started = time.monotonic()
    for _, call in calls:  # outside the profiled region: every compile and autotuning search
        call()
        call()
    print(f"{len(calls)} calls compiled and autotuned in {time.monotonic() - started:.0f} s",
          flush=True)
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

def _version_key(path):
    """A path's numbers as a tuple, so that versions compare as numbers (2023.10 after 2023.9)."""
    return tuple(int(n) for n in re.findall(r"\d+", path))


def find_ncu(given=None):
    """The ncu executable: ``given`` (None if it is none), else on PATH, else the newest
    standalone Nsight Compute (/opt/nvidia/nsight-compute/<version>), else the one of the
    newest CUDA toolkit (/usr/local/cuda-<version>, then /usr/local/cuda)."""
    if given:
        return shutil.which(given)
    found = shutil.which("ncu")
    if found:
        return found
    for pattern in ("/opt/nvidia/nsight-compute/*/ncu", "/usr/local/cuda*/bin/ncu"):
        candidates = sorted(glob.glob(pattern), key=_version_key)
        if candidates:
            return candidates[-1]
    return None


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
    """{file name: ncu command} exporting the report as text: the details and raw pages (in base
    units: ncu otherwise picks a unit a value), and each launch's SASS with its stall samples
    (picked by kernel name and occurrence). The pages first: the summary reads them."""
    page = [ncu, "--import", report, "--csv", "--print-units", "base", "--page"]
    out = {"details.csv": [*page, "details"], "raw.csv": [*page, "raw"]}
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
    a metric: ID, ..., Kernel Name, ..., Section Name, Metric Name, Metric Unit, Metric Value,
    and in current ncu the rules' columns after it, which a metric's row may leave out and a
    rule's row fills, its metric's empty); durations in microseconds, numbers as floats."""
    head, rows = _table(text, "ID", "Kernel Name", "Metric Name", "Metric Unit", "Metric Value")
    if head is None:
        return {}
    col = {name: head.index(name) for name in
           ("ID", "Kernel Name", "Metric Name", "Metric Unit", "Metric Value")}
    last = max(col.values())
    out = {}
    for row in rows:
        if len(row) <= last or not row[col["Metric Name"]]:
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
    (one row a result, one column a metric; a row of units, with no ID, may follow the heading;
    a row may end before the heading does)."""
    head, rows = _table(text, "ID", "Kernel Name")
    if head is None:
        return {}
    id_col = head.index("ID")
    stall_cols = [(i, m.group(1)) for i, name in enumerate(head) if (m := _STALL.match(name))]
    out = {}
    for row in rows:
        if len(row) <= id_col or not row[id_col]:
            continue
        stalls = {reason: _number(row[i]) for i, reason in stall_cols if i < len(row)}
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
        if len(row) <= max(source, samples):
            continue
        for i, h in reason_cols:
            if i < len(row):
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

def _stop_session(proc, grace=5):
    """End ``proc`` and every process of its session (ncu and the process it profiles): SIGTERM,
    then after ``grace`` seconds SIGKILL for whatever is left."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _run(command, path, deadline, append=False, merge_stderr=False):
    """Run ``command`` in a session of its own until ``deadline`` (time.monotonic()), its stdout
    written to ``path`` as it comes (appended, append; with its stderr, merge_stderr), so that a
    run cut short leaves what it printed. At the deadline, or where this process is stopped
    meanwhile, the whole session goes (a profiled process ncu started with it). Returns (exit
    status, TIMED_OUT at the deadline; the tail of stderr where it is not merged)."""
    with open(path, "a" if append else "w") as out:
        proc = subprocess.Popen(command, stdout=out, text=True, start_new_session=True,
                                stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE)
        try:
            _, err = proc.communicate(timeout=max(0.0, deadline - time.monotonic()))
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            err, rc = "timed out", TIMED_OUT
        finally:
            _stop_session(proc)
    return rc, (err or "")[-2000:]


_TRACEBACK = "Traceback (most recent call last):"
# ncu's report of a section or metric it could not collect: the named sections may do without it
_COLLECTION_FAILED = re.compile(r"^==ERROR==.*\b(section|metric|failed to profile).*$",
                                re.I | re.M)


def _exception_line(log):
    """The exception of the last Python traceback in ``log``: its first unindented line."""
    after = log[log.rindex(_TRACEBACK) + len(_TRACEBACK):].splitlines()
    return next((line.strip() for line in after
                 if line.strip() and not line[0].isspace() and not line.startswith("==")),
                "an exception")


def run_failure(rc, log, produced):
    """Whether the profiled run failed, from its exit status ``rc``, its output ``log`` and
    whether it ``produced`` the report and the launches file: None where it worked, else
    (retry, one-line reason). A retry (the named sections) is a whole second run: only where
    ncu could not collect a section or metric, never where it cannot profile here, profiled no
    kernel, or the profiled process raised."""
    if rc == 0 and produced:
        return None
    if "ERR_NVGPUCTRPERM" in log:
        return False, "ncu may not read this GPU's performance counters (ERR_NVGPUCTRPERM)"
    if _TRACEBACK in log:
        return False, f"the profiled process raised {_exception_line(log)}"
    if "No kernels were profiled" in log:
        return False, "ncu profiled no kernel (\"No kernels were profiled\")"
    if rc == TIMED_OUT:
        return False, "timed out"
    collection = _COLLECTION_FAILED.search(log)
    if collection:
        return True, collection.group(0).strip()
    errors = [line.strip() for line in log.splitlines() if line.startswith("==ERROR==")]
    if errors:
        return False, errors[-1]
    return False, "no report or launches file" if rc == 0 else "no ==ERROR== line in its output"


def reports(out_dir):
    """The reports ncu wrote in ``out_dir``: kernels.ncu-rep, or kernels with the extension a
    newer ncu gives it (.ncu-repz)."""
    return sorted(glob.glob(os.path.join(glob.escape(out_dir), REPORT + ".ncu-rep*")))


def _profiled_run(out_dir, ncu, inner_args, deadline):
    """Run the cases under ncu until ``deadline``: the "full" set, then, only where that could
    not collect a section or metric and time is left, the named sections. True if a run
    worked."""
    launches_path = os.path.join(out_dir, "launches.json")
    for attempt, sections in enumerate((None, SECTIONS)):
        for stale in reports(out_dir) + [launches_path]:  # a run that fails leaves none behind
            with contextlib.suppress(FileNotFoundError):
                os.remove(stale)
        command = profile_command(ncu, os.path.join(out_dir, REPORT), inner_args, sections)
        print("$ " + " ".join(command), flush=True)
        log = os.path.join(out_dir, f"ncu{'' if sections is None else '_sections'}.log")
        with open(log, "a" if attempt == 0 else "w") as f:
            f.write("$ " + " ".join(command) + "\n")
        rc, _ = _run(command, log, deadline, append=True, merge_stderr=True)
        with open(log, errors="replace") as f:
            failure = run_failure(rc, f.read(), bool(reports(out_dir))
                                  and os.path.exists(launches_path))
        if failure is None:
            return True
        retry, why = failure
        print(f"the profiled run failed (exit {rc}): {why} (see {os.path.basename(log)})",
              file=sys.stderr)
        if not retry or attempt == 1:
            return False
        if deadline - time.monotonic() < MIN_RUN_S:
            print("no time left for a run with the named sections", file=sys.stderr)
            return False


def _export(ncu, report, launches, out_dir, deadline):
    """Export the report as text, one ncu --import at a time until ``deadline``. Returns
    ({file name: its text, "" where not exported}, exit status: 0 if every export worked)."""
    texts, status, left_out = {}, 0, []
    for name, export in export_commands(ncu, report, launches).items():
        path = os.path.join(out_dir, name)
        texts[name] = ""
        if time.monotonic() >= deadline:
            left_out.append(name)
            continue
        rc, err = _run(export, path, deadline)
        if rc != 0:
            print(f"ncu export {name} failed (exit {rc}): {err}", file=sys.stderr)
            status = 1
        with open(path, errors="replace") as f:
            texts[name] = f.read()
    if left_out:
        print(f"no time left to export {', '.join(left_out)}", file=sys.stderr)
        status = 1
    return texts, status


def profile(out_dir, names, ncu, timeout=400):
    """Run the cases under ncu, export its report as text and summarize it, all inside
    ``timeout`` seconds (the exports keep the last EXPORT_SHARE_S, at most a quarter). Returns the
    exit status (0: every step worked)."""
    deadline = time.monotonic() + timeout
    os.makedirs(out_dir, exist_ok=True)
    launches_path = os.path.join(out_dir, "launches.json")
    log = os.path.join(out_dir, "ncu.log")
    with open(log, "w") as f:
        f.write(f"$ {ncu} --version\n")
    _run([ncu, "--version"], log, min(deadline, time.monotonic() + 20), append=True,
         merge_stderr=True)
    inner_args = ["--cases", ",".join(names), "--launches", launches_path]
    if not _profiled_run(out_dir, ncu, inner_args, deadline - min(EXPORT_SHARE_S, timeout / 4)):
        return 1
    with open(launches_path) as f:
        inner = json.load(f)
    launches = inner["launches"]
    texts, status = _export(ncu, reports(out_dir)[0], launches, out_dir, deadline)
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


def _stop(signum, frame):
    """SIGTERM (gpu_suite.sh's timeout) as an exit, so that ncu's session is ended on the way."""
    raise SystemExit(128 + signum)


def _parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "out/profile"),
                   help="folder for the report and its text exports (default: $OUT or out/profile)")
    p.add_argument("--cases", default="decoder", help="comma-separated: decoder, encoder, mlp")
    p.add_argument("--ncu", default=None, help="the ncu executable (default: found)")
    p.add_argument("--timeout", type=int, default=400,
                   help="seconds for everything: the profiled run(s) and the exports")
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
        where = args.ncu or "on PATH, in /opt/nvidia/nsight-compute/*/ or /usr/local/cuda*/bin"
        print(f"skipped: ncu (Nsight Compute) not found ({where}): give it with --ncu",
              file=sys.stderr)
        return SKIPPED
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        return profile(args.out, names, ncu, args.timeout)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
