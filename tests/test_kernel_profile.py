"""benches/kernel_profile.py (the attention kernels and the MLP's fused matmuls under Nsight
Compute): its profiled calls on the CPU smoke shapes, the ncu command lines it builds, its
readers of ncu's CSV pages (older and current ncu's), and the whole driver around a stand-in ncu
that answers with those pages, fails as ncu fails, or hangs."""
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from _bench_script import load as load_bench_script

kernel_profile = load_bench_script("kernel_profile")

HEAD = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream",'
        '"Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit",'
        '"Metric Value"')


def _detail(rid, kernel, section, name, unit, value):
    return (f'"{rid}","4242","python3","127.0.0.1","{kernel}","1","7","(128, 1, 1)",'
            f'"(4096, 4, 1)","0","9.0","{section}","{name}","{unit}","{value}"')


DETAILS_CSV = "\n".join([
    "==PROF== Connected to process 4242 (/usr/bin/python3)",
    HEAD,
    _detail(0, "_attn_fwd", "GPU Speed Of Light Throughput", "Duration", "usecond", "184.35"),
    _detail(0, "_attn_fwd", "Launch Statistics", "Registers Per Thread", "register/thread", "128"),
    _detail(0, "_attn_fwd", "Occupancy", "Achieved Occupancy", "%", "23.50"),
    _detail(1, "_attn_bwd_dq", "GPU Speed Of Light Throughput", "Duration", "msecond", "0.22"),
    _detail(1, "_attn_bwd_dq", "Compute Workload Analysis", "Issue Slots Busy", "%", "1,041.5"),
    _detail(2, "_attn_bwd_dkdv", "GPU Speed Of Light Throughput", "Duration", "nsecond",
            "310,000"),
]) + "\n"

# current ncu (2023.2 on): the rules' columns after the value, which a metric's row ends before
# (or leaves empty) and a rule's row fills, its metric's empty; units named ns, us, ms, s
RULES = '"Rule Name","Rule Type","Rule Description","Estimated Speedup Type","Estimated Speedup"'
DETAILS_CSV_CURRENT = "\n".join([
    "==PROF== Connected to process 4242 (/usr/bin/python3)",
    HEAD + "," + RULES,
    _detail(0, "_attn_fwd", "GPU Speed Of Light Throughput", "Duration", "us", "184.35"),
    _detail(0, "_attn_fwd", "Occupancy", "Achieved Occupancy", "%", "23.50") + ',"","","","",""',
    _detail(0, "_attn_fwd", "SpeedOfLight", "", "", "") + ',"SOLBottleneck","OPT","Low compute",'
    '"global","12.5"',
    _detail(1, "_attn_bwd_dq", "GPU Speed Of Light Throughput", "Duration", "ms", "0.22"),
    _detail(2, "_attn_bwd_dkdv", "GPU Speed Of Light Throughput", "Duration", "ns", "310,000"),
    _detail(3, "_attn_bwd_dkdv", "GPU Speed Of Light Throughput", "Duration", "s", "0.0000015"),
    _detail(4, "_attn_bwd_dq", "GPU Speed Of Light Throughput", "Duration", "second", "2e-6"),
]) + "\n"

_STALL = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
RAW_CSV = "\n".join([
    ",".join(f'"{h}"' for h in ("ID", "Process ID", "Kernel Name", _STALL.format("barrier"),
                                _STALL.format("long_scoreboard"), "gpu__time_duration.sum")),
    '"","","","ratio","ratio","nsecond"',
    '"0","4242","_attn_fwd","0.5","2.25","184350"',
    '"1","4242","_attn_bwd_dq","1.5","0.25","220000"',
    '"2","4242","_attn_bwd_dkdv","n/a","3","310000"',
]) + "\n"
# a row may end before the heading does: a stall column it lacks is left out, not the row
RAW_CSV_SHORT_ROWS = "\n".join([
    ",".join(f'"{h}"' for h in ("ID", "Kernel Name", _STALL.format("barrier"),
                                _STALL.format("long_scoreboard"), "launch__grid_size")),
    '"","","ratio","ratio",""',
    '"0","_attn_fwd","0.5","2.25"',
    '"1","_attn_bwd_dq","1.5"',
]) + "\n"

SASS_CSV = "\n".join([
    "Kernel Name: _attn_fwd",  # a banner before the heading
    '"Address","Source","Warp Stall Sampling (All Samples)",'
    '"Warp Stall Sampling (Not-issued Samples)","stall_wait","stall_long_sb"',
    '"0x7f0","@P0 MUFU.EX2 R4, R4","120","100","20","0"',
    '"0x800","HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ","300","280","0","250"',
    '"0x810","MUFU.EX2 R5, R5","80","60","50","0"',
    '"0x820","FADD R1, R2, R3","0","0","0","0"',
]) + "\n"

LAUNCHES = [{"label": "decoder fwd", "kernel": "_attn_fwd", "bytes": 1, "flops": 2},
            {"label": "decoder bwd split", "kernel": "_attn_bwd_dq", "bytes": 1, "flops": 2},
            {"label": "decoder bwd split", "kernel": "_attn_bwd_dkdv", "bytes": 1, "flops": 2},
            {"label": "decoder bwd fused", "kernel": "_attn_bwd_dkdv", "bytes": 1, "flops": 2}]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke shapes run on the interpreter")
def test_the_profiled_region_makes_each_call_once_in_order(monkeypatch):
    monkeypatch.delenv("FASTMAE_ATTN_BWD", raising=False)
    launches = kernel_profile.run_cases(["decoder", "encoder"], smoke=True)
    expected = []
    for case in ("decoder", "encoder"):
        expected += [(f"{case} fwd", "_attn_fwd"), (f"{case} bwd split", "_attn_bwd_dq"),
                     (f"{case} bwd split", "_attn_bwd_dkdv"),
                     (f"{case} bwd fused", "_attn_bwd_dkdv"),
                     (f"{case} bwd fused_q", "_attn_bwd_fused_q")]
    assert kernel_profile.bwd_ways() == ("split", "fused", "fused_q")  # head tilings on here
    assert [(x["label"], x["kernel"]) for x in launches] == expected
    assert all(x["bytes"] > 0 and x["flops"] > 0 for x in launches)
    assert "FASTMAE_ATTN_BWD" not in os.environ  # the forced path is not left behind
    monkeypatch.setenv("FASTMAE_ATTN_BWD", "fused")  # and a user's own setting is put back
    kernel_profile.run_cases(["encoder"], smoke=True)
    assert os.environ["FASTMAE_ATTN_BWD"] == "fused"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke shapes run on the interpreter")
def test_fused_q_is_left_out_where_the_head_tilings_are_off(monkeypatch):
    """gpu_suite.sh's stage 0c sets FASTMAE_ATTN_HEAD_TILES=0 where they failed on the GPU."""
    from fastmae.kernels import attention
    monkeypatch.setattr(attention, "_HEAD_TILES", False)
    monkeypatch.delenv("FASTMAE_ATTN_BWD", raising=False)
    assert kernel_profile.bwd_ways() == ("split", "fused")
    launches = kernel_profile.run_cases(["encoder"], smoke=True)
    assert [x["label"] for x in launches] == ["encoder fwd", "encoder bwd split",
                                              "encoder bwd split", "encoder bwd fused"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke shapes run on the interpreter")
def test_the_mlp_case_makes_each_way_once(monkeypatch):
    """fc1 + bias + GELU and fc2's input gradient through the GELU, each way fastmae.ops times:
    the threads' and the TMA fused matmuls, and the split way's bias + GELU kernels (its cuBLAS
    matmuls are no fastmae launch)."""
    monkeypatch.delenv("FASTMAE_MLP", raising=False)
    launches = kernel_profile.run_cases(["mlp"], smoke=True)
    assert [(x["label"], x["kernel"]) for x in launches] == [
        ("mlp fc1 fused", "_matmul_bias_gelu"), ("mlp fc1 fused_tma", "_matmul_bias_gelu_tma"),
        ("mlp fc1 split", "_bias_gelu_fwd"), ("mlp fc2_dgrad fused", "_matmul_gelu_bwd"),
        ("mlp fc2_dgrad fused_tma", "_matmul_gelu_bwd_tma"),
        ("mlp fc2_dgrad split", "_bias_gelu_bwd")]
    assert all(x["bytes"] > 0 for x in launches)
    assert all(x["flops"] > 0 for x in launches if "matmul" in x["kernel"])


def test_ncu_command_lines():
    command = kernel_profile.profile_command("/x/ncu", "/o/k.ncu-rep", ["--cases", "decoder"])
    assert command[0] == "/x/ncu"
    text = " ".join(command)
    for flag in ("--profile-from-start off", "--clock-control none", "--set full",
                 "--kernel-name regex:^_(attn|matmul|bias_gelu)", "--export /o/k.ncu-rep"):
        assert flag in text
    assert command[-3:] == ["--inner", "--cases", "decoder"]
    exports = kernel_profile.export_commands("ncu", "k.ncu-rep", LAUNCHES)
    assert list(exports) == ["details.csv", "raw.csv", "sass_0__attn_fwd.csv",
                             "sass_1__attn_bwd_dq.csv", "sass_2__attn_bwd_dkdv.csv",
                             "sass_3__attn_bwd_dkdv.csv"]
    # the second dK-dV launch is the fused backward's: picked by occurrence
    second = exports["sass_3__attn_bwd_dkdv.csv"]
    assert second[second.index("--launch-skip") + 1] == "1"
    assert exports["sass_2__attn_bwd_dkdv.csv"][second.index("--launch-skip") + 1] == "0"
    for page in ("details.csv", "raw.csv"):  # one unit a metric, not one a value
        assert " --print-units base " in " ".join(exports[page])


def test_readers_of_ncu_pages():
    details = kernel_profile.parse_details(DETAILS_CSV)
    assert details["0"]["kernel"] == "_attn_fwd"
    assert details["0"]["Duration"] == pytest.approx(184.35)  # microseconds
    assert details["1"]["Duration"] == pytest.approx(220.0)
    assert details["2"]["Duration"] == pytest.approx(310.0)
    assert details["1"]["Issue Slots Busy"] == pytest.approx(1041.5)  # thousands separator
    assert details["0"]["Registers Per Thread"] == 128
    stalls = kernel_profile.parse_stalls(RAW_CSV)
    assert stalls["0"] == {"barrier": 0.5, "long_scoreboard": 2.25}
    assert stalls["2"] == {"long_scoreboard": 3.0}  # "n/a" dropped
    without_units = "\n".join(x for x in RAW_CSV.splitlines() if not x.startswith('"",'))
    assert kernel_profile.parse_stalls(without_units) == stalls
    sass = kernel_profile.parse_sass(SASS_CSV, top=2)
    assert sass["top"] == [(300.0, "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ"),
                           (120.0, "@P0 MUFU.EX2 R4, R4")]
    assert sass["opcodes"] == {"HGMMA": 300.0, "MUFU": 200.0}
    assert list(sass["reasons"].items()) == [("stall_long_sb", 250.0), ("stall_wait", 70.0)]
    current = kernel_profile.parse_details(DETAILS_CSV_CURRENT)
    assert current["0"]["Duration"] == pytest.approx(184.35)
    assert current["0"]["Achieved Occupancy"] == pytest.approx(23.5)
    assert "" not in current["0"]  # the rule's row
    assert current["1"]["Duration"] == pytest.approx(220.0)
    assert current["2"]["Duration"] == pytest.approx(310.0)
    assert current["3"]["Duration"] == pytest.approx(1.5)
    assert current["4"]["Duration"] == pytest.approx(2.0)
    assert kernel_profile.parse_stalls(RAW_CSV_SHORT_ROWS) == {
        "0": {"barrier": 0.5, "long_scoreboard": 2.25}, "1": {"barrier": 1.5}}
    short_sass = SASS_CSV.replace(',"20","0"', "")  # the row ends before its stall columns
    assert kernel_profile.parse_sass(short_sass)["opcodes"] == sass["opcodes"]
    assert kernel_profile.parse_details("no csv here") == {}
    assert kernel_profile.parse_stalls("") == {}
    assert kernel_profile.parse_sass("") == {"top": [], "opcodes": {}, "reasons": {}}

    rows = kernel_profile.summarize(LAUNCHES, details, stalls, {0: sass})
    assert [r["ncu_id"] for r in rows] == ["0", "1", "2", None]
    assert rows[0]["metrics"]["Duration"] == pytest.approx(184.35)
    assert list(rows[0]["stalls"]) == ["long_scoreboard", "barrier"]  # most first
    assert rows[3]["metrics"]["Duration"] is None  # no result for it
    table = kernel_profile.format_table(rows)
    assert "decoder fwd" in table and "long_scoreboard 2.2" in table and "HGMMA 300" in table
    assert "stall_long_sb 250" in table


def test_results_out_of_launch_order_are_not_matched():
    details = kernel_profile.parse_details(DETAILS_CSV)
    swapped = [LAUNCHES[1], LAUNCHES[0]]
    rows = kernel_profile.summarize(swapped, details, {}, {})
    assert all(r["metrics"]["Duration"] is None for r in rows)


# what the stand-in ncu's profiled run does, by mode: "works"; "refuse_full_set" (fails when asked
# for the "full" set: a section it cannot collect); "no_permission" (ERR_NVGPUCTRPERM: runs the
# process, profiles nothing, exit 0); "raises" (the profiled process's traceback); "hangs" (a
# process of its own started, its pid in child.pid, then asleep)
STAND_IN = """\
import json, os, subprocess, sys, time
argv = sys.argv[1:]
pages = json.load(open(PAGES))
if argv == ["--version"]:
    sys.exit(print("NVIDIA (R) Nsight Compute Command Line Profiler\\nVersion 2025.3.1.0"))
if "--export" not in argv:  # --import: the page asked for, of a report that is there
    assert os.path.exists(argv[argv.index("--import") + 1])
    if MODE == "slow_sass" and "source" in argv:
        time.sleep(60)
    sys.exit(print(pages[argv[argv.index("--page") + 1]]))
print("==PROF== Connected to process 4242 (/usr/bin/python3)", flush=True)
if MODE == "refuse_full_set" and "--set" in argv:
    sys.exit("==ERROR== a section of the set failed")
if MODE == "raises":
    print("Traceback (most recent call last):\\n  File \\"kernel_profile.py\\", line 1, in x\\n"
          "RuntimeError: CUDA error: an illegal memory access was encountered", file=sys.stderr)
    sys.exit(print("==PROF== Disconnected from process 4242") or 1)
if MODE == "hangs":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    open(os.path.join(os.path.dirname(PAGES), "child.pid"), "w").write(str(child.pid))
    time.sleep(60)
json.dump(pages["launches"], open(argv[argv.index("--launches") + 1], "w"))
if MODE == "no_permission":
    sys.exit(print("==ERROR== ERR_NVGPUCTRPERM - The user does not have permission to access "
                   "NVIDIA GPU Performance Counters on the target device 0."))
report = argv[argv.index("--export") + 1]  # ncu adds its extension where it is not given
open(report if report.endswith(EXTENSION) else report + EXTENSION, "w").write("report")
print("==PROF== Disconnected from process 4242")
"""


def _stand_in_ncu(tmp_path, mode="works", extension=".ncu-rep"):
    """An executable answering like ncu: --version, the profiled run as ``mode`` says (STAND_IN)
    with the report named as ncu names it (``extension``), and --import printing the page
    asked for (mode "slow_sass": the SASS pages only after a minute)."""
    pages = tmp_path / "pages.json"
    pages.write_text(json.dumps({"details": DETAILS_CSV, "raw": RAW_CSV, "source": SASS_CSV,
                                 "launches": {"launches": LAUNCHES, "autotuned": {"x": "y"}}}))
    script = tmp_path / "ncu"
    script.write_text(f"#!{sys.executable}\nPAGES, MODE, EXTENSION = {str(pages)!r}, {mode!r}, "
                      f"{extension!r}\n" + STAND_IN)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_the_driver_around_a_stand_in_ncu(tmp_path, capsys):
    ncu = _stand_in_ncu(tmp_path)
    out = tmp_path / "out"
    assert kernel_profile.profile(str(out), ["decoder"], ncu) == 0
    for name in ("kernels.ncu-rep", "launches.json", "ncu.log", "details.csv", "raw.csv",
                 "sass_0__attn_fwd.csv", "sass_3__attn_bwd_dkdv.csv", "kernel_profile.json"):
        assert (out / name).exists(), name
    log = (out / "ncu.log").read_text()
    assert "--version\nNVIDIA (R) Nsight Compute" in log and "==PROF== Disconnected" in log
    result = json.loads((out / "kernel_profile.json").read_text())
    assert result["kind"] == "kernel_profile" and result["autotuned"] == {"x": "y"}
    assert result["cases"] == {"decoder": {"batch": 256, "heads": 16, "tokens": 197,
                                           "head_dim": 32}}
    assert [r["kernel"] for r in result["launches"]] == [x["kernel"] for x in LAUNCHES]
    assert result["launches"][0]["sass"]["opcodes"] == {"HGMMA": 300.0, "MUFU": 200.0}
    assert "decoder bwd split" in capsys.readouterr().out


def test_a_report_under_a_newer_extension_is_found(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "kernels.ncu-rep").write_text("an earlier run's")  # not read: removed before the run
    ncu = _stand_in_ncu(tmp_path, extension=".ncu-repz")
    assert kernel_profile.profile(str(out), ["decoder"], ncu) == 0
    assert kernel_profile.reports(str(out)) == [str(out / "kernels.ncu-repz")]
    result = json.loads((out / "kernel_profile.json").read_text())
    assert result["launches"][0]["metrics"]["Duration"] == pytest.approx(184.35)


def test_the_driver_names_the_mlp_cases_shape(tmp_path):
    """kernel_profile.json describes an MLP case by its rows, hidden width and width."""
    out = tmp_path / "out"
    assert kernel_profile.profile(str(out), ["decoder", "mlp"], _stand_in_ncu(tmp_path)) == 0
    cases = json.loads((out / "kernel_profile.json").read_text())["cases"]
    assert cases["mlp"] == {"rows": 256 * 197, "hidden": 2048, "width": 512}
    assert cases["decoder"]["tokens"] == 197


def test_a_refused_full_set_is_retried_with_the_named_sections(tmp_path, capsys):
    ncu = _stand_in_ncu(tmp_path, mode="refuse_full_set")
    out = tmp_path / "out"
    assert kernel_profile.profile(str(out), ["decoder"], ncu) == 0
    assert "a section of the set failed" in (out / "ncu.log").read_text()
    assert "--section SpeedOfLight" in (out / "ncu_sections.log").read_text()
    assert (out / "kernel_profile.json").exists()
    command = kernel_profile.profile_command("ncu", "r", [], kernel_profile.SECTIONS)
    assert "--set" not in command and command.count("--section") == len(kernel_profile.SECTIONS)
    err = capsys.readouterr().err  # the first attempt's failure is said, in a line
    assert "(exit 1): ==ERROR== a section of the set failed (see ncu.log)" in err


@pytest.mark.parametrize("mode,why", [
    ("no_permission", "performance counters (ERR_NVGPUCTRPERM)"),
    ("raises", "raised RuntimeError: CUDA error: an illegal memory access was encountered")])
def test_a_run_that_a_retry_cannot_help_is_not_retried(tmp_path, capsys, mode, why):
    out = tmp_path / "out"
    assert kernel_profile.profile(str(out), ["decoder"], _stand_in_ncu(tmp_path, mode)) == 1
    err = capsys.readouterr().err
    assert why in err and err.count("the profiled run failed") == 1
    assert not (out / "ncu_sections.log").exists()


def test_a_failed_profiled_run_is_reported(tmp_path, capsys):
    failing = tmp_path / "ncu"
    failing.write_text(f"#!{sys.executable}\nimport sys\nsys.exit(3)\n")
    failing.chmod(failing.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "out"
    assert kernel_profile.profile(str(out), ["decoder"], str(failing)) == 1
    assert capsys.readouterr().err.count("exit 3") == 1  # no second run: nothing says a section
    assert (out / "ncu.log").exists() and not (out / "ncu_sections.log").exists()


def test_what_a_failed_run_says():
    failure = kernel_profile.run_failure
    assert failure(0, "==PROF== Disconnected", produced=True) is None
    assert failure(0, "==WARNING== No kernels were profiled.", produced=False) == (
        False, 'ncu profiled no kernel ("No kernels were profiled")')
    assert failure(kernel_profile.TIMED_OUT, "==PROF== Connected", produced=False) == (
        False, "timed out")
    retry, why = failure(1, '==ERROR== Failed to profile "_attn_fwd" in process 4242\n', False)
    assert retry and why.startswith("==ERROR== Failed to profile")
    chained = ("Traceback (most recent call last):\n  x\nKeyError: 1\n\nDuring handling of the "
               "above exception, another exception occurred:\n\nTraceback (most recent call "
               "last):\n  File \"y\", line 2\n    raise\n==PROF== Disconnected\nOSError: two\n"
               "==WARNING== No kernels were profiled.\n")
    assert failure(1, chained, False) == (False, "the profiled process raised OSError: two")
    assert failure(2, "", False) == (False, "no ==ERROR== line in its output")


def _running(pid):
    """Whether process ``pid`` runs (a zombie no longer does)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")
def test_at_the_deadline_ncu_and_what_it_started_are_stopped(tmp_path, capsys):
    """ncu's output is in its log as it comes, and the process it started goes with it."""
    out = tmp_path / "out"
    started = time.monotonic()
    assert kernel_profile.profile(str(out), ["decoder"], _stand_in_ncu(tmp_path, "hangs"),
                                  timeout=4) == 1
    assert time.monotonic() - started < 15
    assert "==PROF== Connected" in (out / "ncu.log").read_text()
    assert "(exit 124): timed out" in capsys.readouterr().err
    child = int((tmp_path / "child.pid").read_text())
    for _ in range(20):
        if not _running(child):
            break
        time.sleep(0.1)
    assert not _running(child)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")
def test_a_driver_told_to_stop_stops_ncu_first(tmp_path):
    """gpu_suite.sh's timeout sends SIGTERM to the driver, not to ncu's own session: the driver
    ends that session on its way out."""
    ncu, out = _stand_in_ncu(tmp_path, "hangs"), tmp_path / "out"
    code = textwrap.dedent(f"""\
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from _bench_script import load
        kernel_profile = load("kernel_profile")
        kernel_profile.torch.cuda.is_available = lambda: True
        sys.exit(kernel_profile.main(["--out", {str(out)!r}, "--ncu", {ncu!r}]))
        """)
    driver = subprocess.Popen([sys.executable, "-c", code])
    pid_file = tmp_path / "child.pid"
    for _ in range(300):
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.1)
    driver.send_signal(signal.SIGTERM)
    assert driver.wait(20) == 128 + signal.SIGTERM
    child = int(pid_file.read_text())
    for _ in range(20):
        if not _running(child):
            break
        time.sleep(0.1)
    assert not _running(child)


def test_the_exports_end_at_the_same_deadline(tmp_path, capsys):
    """An export cut at the deadline, the rest left out, and what was exported summarized."""
    out = tmp_path / "out"
    assert kernel_profile.profile(str(out), ["decoder"], _stand_in_ncu(tmp_path, "slow_sass"),
                                  timeout=4) == 1
    err = capsys.readouterr().err
    assert "ncu export sass_0__attn_fwd.csv failed (exit 124)" in err
    assert "no time left to export sass_1__attn_bwd_dq.csv, sass_2" in err
    result = json.loads((out / "kernel_profile.json").read_text())
    assert result["launches"][0]["metrics"]["Duration"] == pytest.approx(184.35)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without GPU")
def test_without_a_gpu_it_says_so(capsys):
    assert kernel_profile.main(["--out", "unused"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--cases: expected some of .'decoder', 'encoder', 'mlp'"):
        kernel_profile.main(["--cases", "decoder,middle"])


def test_without_ncu_the_stage_is_skipped(tmp_path, monkeypatch, capsys):
    """gpu_suite.sh reads SKIPPED as a skip, not a failure."""
    monkeypatch.setattr(kernel_profile.torch.cuda, "is_available", lambda: True)
    assert kernel_profile.find_ncu(str(tmp_path / "no-ncu")) is None
    assert kernel_profile.main(["--out", str(tmp_path), "--ncu", str(tmp_path / "no-ncu")]) == \
        kernel_profile.SKIPPED == 3
    assert "skipped: ncu (Nsight Compute) not found" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_profiled_region_on_gpu():
    """Each way of the backward once (fused_q only where the head tilings are on)."""
    kernels = {"split": ["_attn_bwd_dq", "_attn_bwd_dkdv"], "fused": ["_attn_bwd_dkdv"],
               "fused_q": ["_attn_bwd_fused_q"]}
    launches = kernel_profile.run_cases(["encoder"])
    assert [x["kernel"] for x in launches] == ["_attn_fwd"] + [
        kernel for way in kernel_profile.bwd_ways() for kernel in kernels[way]]


def test_results_are_matched_to_launches_in_numeric_id_order():
    """ncu's result IDs run 0, 1, ..., 10, 11: matched to the launches as numbers, not as
    strings (where "10" comes before "2"); a profile of all three cases has 16 launches."""
    # FIXTURE: 12 results of one kernel, each lasting its ID in microseconds
    details = {str(i): {"kernel": "_attn_fwd", "Duration": float(i)} for i in range(12)}
    launches = [{"label": f"l{i}", "kernel": "_attn_fwd"} for i in range(12)]
    rows = kernel_profile.summarize(launches, details, {}, {})
    assert [r["ncu_id"] for r in rows] == [str(i) for i in range(12)]
    assert [r["metrics"]["Duration"] for r in rows] == [float(i) for i in range(12)]


def test_stall_columns_named_per_warp_or_per_warps():
    """The raw page's stall metric is read in both spellings _STALL allows (warp, warps)."""
    raw = "\n".join(['"ID","Kernel Name",'
                     '"smsp__average_warp_issue_stalled_barrier_per_issue_active.ratio",'
                     '"smsp__average_warps_issue_stalled_wait_per_issue_active.ratio"',
                     '"0","_attn_fwd","1.5","0.75"']) + "\n"
    assert kernel_profile.parse_stalls(raw) == {"0": {"barrier": 1.5, "wait": 0.75}}


def test_the_top_instructions_leave_out_those_without_samples():
    """SASS_CSV's FADD has no stall sample: of its four instructions three are listed."""
    assert [text for _, text in kernel_profile.parse_sass(SASS_CSV)["top"]] == [
        "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ", "@P0 MUFU.EX2 R4, R4", "MUFU.EX2 R5, R5"]


def test_the_newest_ncu_of_a_folder_is_found(monkeypatch):
    """Without ncu on PATH: the newest version folder under /opt/nvidia/nsight-compute."""
    monkeypatch.setattr(kernel_profile.shutil, "which", lambda name: None)
    found = {"/opt/nvidia/nsight-compute/*/ncu": ["/opt/nvidia/nsight-compute/2025.1.0/ncu",
                                                  "/opt/nvidia/nsight-compute/2023.3.1/ncu"]}
    monkeypatch.setattr(kernel_profile.glob, "glob", lambda pattern: found.get(pattern, []))
    assert kernel_profile.find_ncu() == "/opt/nvidia/nsight-compute/2025.1.0/ncu"


@pytest.mark.parametrize("found, newest", [
    # versions compare as numbers: 2023.10 is newer than 2023.9 (a string sort took 2023.9)
    ({"/opt/nvidia/nsight-compute/*/ncu": ["/opt/nvidia/nsight-compute/2023.9.0/ncu",
                                           "/opt/nvidia/nsight-compute/2023.10.0/ncu"],
      "/usr/local/cuda*/bin/ncu": ["/usr/local/cuda-12.4/bin/ncu"]},
     "/opt/nvidia/nsight-compute/2023.10.0/ncu"),
    # no standalone install: the newest toolkit's, a versioned folder before the bare link
    ({"/usr/local/cuda*/bin/ncu": ["/usr/local/cuda-12.10/bin/ncu", "/usr/local/cuda/bin/ncu",
                                   "/usr/local/cuda-12.9/bin/ncu"]},
     "/usr/local/cuda-12.10/bin/ncu"),
    ({}, None)])
def test_versions_compare_as_numbers_and_a_standalone_ncu_comes_first(monkeypatch, found,
                                                                        newest):
    monkeypatch.setattr(kernel_profile.shutil, "which", lambda name: None)
    monkeypatch.setattr(kernel_profile.glob, "glob", lambda pattern: found.get(pattern, []))
    assert kernel_profile.find_ncu() == newest
