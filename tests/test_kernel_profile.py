"""benches/kernel_profile.py (the attention kernels and the MLP's fused matmuls under Nsight
Compute): its profiled calls on the CPU smoke shapes, the ncu command lines it builds, its readers of ncu's CSV pages, and the
whole driver around a stand-in ncu that answers with those pages."""
import json
import os
import stat
import sys
import textwrap

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

_STALL = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
RAW_CSV = "\n".join([
    ",".join(f'"{h}"' for h in ("ID", "Process ID", "Kernel Name", _STALL.format("barrier"),
                                _STALL.format("long_scoreboard"), "gpu__time_duration.sum")),
    '"","","","ratio","ratio","nsecond"',
    '"0","4242","_attn_fwd","0.5","2.25","184350"',
    '"1","4242","_attn_bwd_dq","1.5","0.25","220000"',
    '"2","4242","_attn_bwd_dkdv","n/a","3","310000"',
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
    assert [(x["label"], x["kernel"]) for x in launches] == expected
    assert all(x["bytes"] > 0 and x["flops"] > 0 for x in launches)
    assert "FASTMAE_ATTN_BWD" not in os.environ  # the forced path is not left behind
    monkeypatch.setenv("FASTMAE_ATTN_BWD", "fused")  # and a user's own setting is put back
    kernel_profile.run_cases(["encoder"], smoke=True)
    assert os.environ["FASTMAE_ATTN_BWD"] == "fused"


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


def _stand_in_ncu(tmp_path, refuse_full_set=False):
    """An executable answering like ncu: the profiled run writes the launches file and the
    report (or, refuse_full_set, fails when asked for the "full" set); --import prints the page
    asked for."""
    pages = tmp_path / "pages.json"
    pages.write_text(json.dumps({"details": DETAILS_CSV, "raw": RAW_CSV, "source": SASS_CSV,
                                 "launches": {"launches": LAUNCHES, "autotuned": {"x": "y"}}}))
    script = tmp_path / "ncu"
    script.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, sys
        argv = sys.argv[1:]
        pages = json.load(open({str(pages)!r}))
        if {refuse_full_set!r} and "--set" in argv:
            sys.exit("==ERROR== a section of the set failed")
        if "--export" in argv:
            open(argv[argv.index("--export") + 1], "w").write("report")
            json.dump(pages["launches"], open(argv[argv.index("--launches") + 1], "w"))
            print("==PROF== Disconnected")
        else:
            print(pages[argv[argv.index("--page") + 1]])
        """))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_the_driver_around_a_stand_in_ncu(tmp_path, capsys):
    ncu = _stand_in_ncu(tmp_path)
    out = tmp_path / "out"
    assert kernel_profile.profile(str(out), ["decoder"], ncu) == 0
    for name in ("kernels.ncu-rep", "launches.json", "ncu.log", "details.csv", "raw.csv",
                 "sass_0__attn_fwd.csv", "sass_3__attn_bwd_dkdv.csv", "kernel_profile.json"):
        assert (out / name).exists(), name
    result = json.loads((out / "kernel_profile.json").read_text())
    assert result["kind"] == "kernel_profile" and result["autotuned"] == {"x": "y"}
    assert result["cases"] == {"decoder": {"batch": 256, "heads": 16, "tokens": 197,
                                           "head_dim": 32}}
    assert [r["kernel"] for r in result["launches"]] == [x["kernel"] for x in LAUNCHES]
    assert result["launches"][0]["sass"]["opcodes"] == {"HGMMA": 300.0, "MUFU": 200.0}
    assert "decoder bwd split" in capsys.readouterr().out


def test_the_driver_names_the_mlp_cases_shape(tmp_path):
    """kernel_profile.json describes an MLP case by its rows, hidden width and width."""
    out = tmp_path / "out"
    assert kernel_profile.profile(str(out), ["decoder", "mlp"], _stand_in_ncu(tmp_path)) == 0
    cases = json.loads((out / "kernel_profile.json").read_text())["cases"]
    assert cases["mlp"] == {"rows": 256 * 197, "hidden": 2048, "width": 512}
    assert cases["decoder"]["tokens"] == 197


def test_a_refused_full_set_is_retried_with_the_named_sections(tmp_path, capsys):
    ncu = _stand_in_ncu(tmp_path, refuse_full_set=True)
    out = tmp_path / "out"
    assert kernel_profile.profile(str(out), ["decoder"], ncu) == 0
    assert "a section of the set failed" in (out / "ncu.log").read_text()
    assert (out / "kernel_profile.json").exists()
    command = kernel_profile.profile_command("ncu", "r", [], kernel_profile.SECTIONS)
    assert "--set" not in command and command.count("--section") == len(kernel_profile.SECTIONS)
    assert "exit 1" in capsys.readouterr().err  # the first attempt's failure is said


def test_a_failed_profiled_run_is_reported(tmp_path, capsys):
    failing = tmp_path / "ncu"
    failing.write_text(f"#!{sys.executable}\nimport sys\nsys.exit(3)\n")
    failing.chmod(failing.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "out"
    assert kernel_profile.profile(str(out), ["decoder"], str(failing)) == 1
    assert capsys.readouterr().err.count("exit 3") == 2  # the full set, then the sections
    assert (out / "ncu.log").exists() and (out / "ncu_sections.log").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without GPU")
def test_without_a_gpu_it_says_so(capsys):
    assert kernel_profile.main(["--out", "unused"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--cases: expected some of .'decoder', 'encoder', 'mlp'"):
        kernel_profile.main(["--cases", "decoder,middle"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_profiled_region_on_gpu():
    launches = kernel_profile.run_cases(["encoder"])
    assert [x["kernel"] for x in launches] == ["_attn_fwd", "_attn_bwd_dq", "_attn_bwd_dkdv",
                                              "_attn_bwd_dkdv"]
