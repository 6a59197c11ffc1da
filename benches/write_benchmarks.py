"""Write BENCHMARKS.md from measured results, and the images/s chart it shows.

    python benches/write_benchmarks.py [RESULTS.json ...] [--chart benches/images_per_s.png]
                                       [--command "bash benches/gpu_suite.sh"] > BENCHMARKS.md
    python benches/write_benchmarks.py RESULTS.json ... --summary      # a short table instead
    python benches/write_benchmarks.py RESULTS.json ... --summary --against EARLIER.json ...
        # and this run against an earlier one of the same card, kernel by kernel

Inputs, told apart by their content: JSON written by ``fastmae bench --json`` (training step),
and pytest-benchmark JSON from ``pytest benches --benchmark-json`` (ops, and steps from
bench_step.py). Only GPU measurements are used: CPU smoke results are counted and left out.
Results are grouped by card, and every table holds one card's numbers only; where files of
several runs measure one card and model, the newest run's are used and the others left out.
With no GPU result the file says that no measurement has been made yet, and how to make one:
this script never writes a number it was not given.

Needs only the standard library, and matplotlib for the chart (the ``bench`` extra).
"""
import argparse
import json
import math
import os
import re
import sys
from collections import OrderedDict, defaultdict

SYSTEM_ORDER = ["fastmae_graph", "fastmae_compile", "fastmae", "reference", "reference_compile",
                "reference_graph"]
SYSTEM_LABELS = {"fastmae": "fastmae (triton kernels)", "reference": "reference, eager",
                 "reference_compile": "reference, torch.compile",
                 "fastmae_compile": "fastmae, torch.compile",
                 "fastmae_graph": "fastmae + CUDA graph", "reference_graph": "reference + CUDA graph"}
MODEL_ORDER = ["vit_b16", "vit_l16", "vit_h14", "tiny", "micro"]
MODEL_TITLES = {"vit_b16": "ViT-B/16", "vit_l16": "ViT-L/16", "vit_h14": "ViT-H/14",
                "tiny": "tiny (32 px)", "micro": "micro (16 px)"}
OP_ORDER = ["masking_indices", "random_masking", "patch_embed_visible", "unshuffle",
            "masked_mse_loss", "attention_enc", "attention_dec", "packed_attention_enc",
            "packed_attention_dec", "layer_norm_enc", "add_layer_norm_enc", "add_layer_norm_dec",
            "bias_gelu_enc", "bias_gelu_dec"]
MODE_ORDER = ["fwd", "bwd", "fwdbwd"]
DEFAULT_COMMAND = "bash benches/gpu_suite.sh"


# ============================================================================ reading results

class Results:
    """Everything read from the inputs, GPU measurements only, by card."""

    def __init__(self):
        self.steps = defaultdict(list)   # card -> fastmae-bench step results
        self.ops = defaultdict(list)     # card -> op records (pytest-benchmark extra_info)
        self.step_suite = defaultdict(list)  # card -> bench_step records
        self.envs = defaultdict(list)    # card -> (source, env dict)
        self.floors = defaultdict(list)  # card -> (source, floors dict)
        self.commands = []
        self.ignored = []                # (file, why)

    def cards(self):
        return sorted(set(self.steps) | set(self.ops) | set(self.step_suite))


def _card(env):
    return (env or {}).get("gpu")


def _gpu_records(data):
    """The GPU measurements of a pytest-benchmark file: ops (with gpu_ms) and steps (with
    ms_per_step) that name their card."""
    out = []
    for b in data["benchmarks"]:
        info = b.get("extra_info") or {}
        if info.get("gpu") and ((info.get("suite") == "ops" and info.get("gpu_ms") is not None)
                                or (info.get("suite") == "step"
                                    and info.get("ms_per_step") is not None)):
            out.append(info)
    return out


def _sustained(data):
    """A fastmae-bench file's rows with ms/step as the timed steps' total time over their
    number. Files written before fastmae bench recorded ms_median took the median step for
    ms/step: their rows are rederived from their own mean step (ms_mean, or their step times),
    images/s, MFU and the profile's step time with it, the median kept beside them."""
    batch = data["config"]["batch"]
    for r in data["results"]:
        times = r.get("ms_steps")
        if "ms_median" in r or r.get("ms_per_step") is None or not (times or r.get("ms_mean")):
            continue
        median, ms = r["ms_per_step"], r.get("ms_mean") or math.fsum(times) / len(times)
        r.update(ms_median=median, ms_per_step=ms, ms_mean=ms, images_per_s=batch * 1e3 / ms)
        if r.get("mfu") is not None:
            r["mfu"] *= median / ms
        if r.get("profile") and r["profile"].get("step_ms") == median:
            r["profile"]["step_ms"] = ms
    return data


def _add_step(res, name, data):
    _sustained(data)
    card, env = _card(data["env"]), data["env"]
    res.steps[card].append(data)
    res.envs[card].append((name, env))
    if data.get("floors"):
        res.floors[card].append((name, data["floors"]))
    if data.get("command"):
        res.commands.append(data["command"])


def _add_benchmarks(res, name, records):
    for info in records:
        card = info["gpu"]
        (res.ops if info["suite"] == "ops" else res.step_suite)[card].append(info)
        if info.get("env") and not any(s == name for s, _ in res.envs[card]):
            res.envs[card].append((name, info["env"]))
        if info.get("floors") and not any(s == name for s, _ in res.floors[card]):
            res.floors[card].append((name, info["floors"]))


def _in_folder(path):
    return "/".join(os.path.normpath(os.path.abspath(path)).split(os.sep)[-2:])


def load(paths):
    """The GPU results of ``paths``. Where several files hold the same card's numbers of one
    model (and suite), only the newest measurement's file is used and the others are listed as
    left out: a table never mixes two runs, whatever order the files come in."""
    res = Results()
    runs = []  # (name, what to add, what it measures: {(card, suite, model)}, date, add, path)
    for path in paths:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        name = os.path.basename(path)
        if isinstance(data, dict) and str(data.get("schema", "")).startswith("fastmae-bench/"):
            env = data.get("env") or {}
            card = _card(env)
            if data.get("tiny_cpu") or not card:
                res.ignored.append((name, "CPU run (tiny configuration), not a measurement of speed"))
                continue
            runs.append((name, data, {(card, "train_step", data["config"]["model"])},
                         env.get("date") or "", _add_step, path))
        elif isinstance(data, dict) and isinstance(data.get("benchmarks"), list):
            records = _gpu_records(data)
            if not records:
                res.ignored.append((name, "no GPU measurement in it (CPU smoke run)"))
                continue
            runs.append((name, records, {(r["gpu"], r["suite"], r.get("model")) for r in records},
                         max((r.get("env") or {}).get("date") or "" for r in records),
                         _add_benchmarks, path))
        else:
            res.ignored.append((name, "not a fastmae or pytest-benchmark result file"))
    newest = {}  # (card, suite, model) -> (date, index in runs)
    for i, (_, _, keys, date, _, _) in enumerate(runs):
        for key in keys:
            if key not in newest or date > newest[key][0]:
                newest[key] = (date, i)
    for i, (name, data, keys, _, add, _) in enumerate(runs):
        # the newer file named with its folder: a run's files keep their names from run to run
        later = _distinct(_in_folder(runs[newest[key][1]][5]) for key in sorted(keys, key=str)
                          if newest[key][1] != i)
        if later:
            res.ignored.append((name, f"an earlier run of the same card and model than "
                                      f"{', '.join(later)}"))
        else:
            add(res, name, data)
    return res


# ============================================================================ formatting

def _table(head, rows, align=None):
    align = align or ["l"] + ["r"] * (len(head) - 1)
    out = ["| " + " | ".join(head) + " |",
           "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _us(ms):
    us = ms * 1e3
    return f"{us:.1f}" if us < 100 else f"{us:.0f}"


def _x(v):
    return f"{v:.2f}x" if v else "-"


def _pct(v):
    return f"{100 * v:.0f}%" if v is not None else "-"


def _model_key(m):
    return (MODEL_ORDER.index(m) if m in MODEL_ORDER else len(MODEL_ORDER), m)


def _distinct(values):
    seen = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen


def slug(text):
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()


# ============================================================================ sections

def header(card, res):
    envs = res.envs[card]
    rows = []
    for key, what in [("gpu", "card"), ("driver", "driver"), ("cuda", "CUDA (torch build)"),
                      ("torch", "torch"), ("triton", "triton"),
                      ("triton_launch", "Triton launch path"),
                      ("mlp_tma", "MLP's TMA kernels"),
                      ("attn_head_tiles", "attention's head tilings"),
                      ("commit", "fastmae commit"), ("date", "measured")]:
        vals = _distinct([e.get(key) for _, e in envs if e.get(key)])
        if key in ("triton_launch", "mlp_tma", "attn_head_tiles") and not vals:
            continue  # runs before fastmae's direct launch (0deb43a), its TMA kernels'
            # switches (6f763c3) or attention's head tilings did not record them
        if len(vals) <= 1:
            rows.append((what, vals[0] if vals else "unknown"))
        else:
            per = "; ".join(f"{e.get(key)} ({src})" for src, e in envs)
            rows.append((what, per))
    lines = [_table(["", ""], rows, ["l", "l"])]
    for src, fl in res.floors[card]:
        lines.append(f"\nCeilings measured in the same run ({src}): device-to-device copy "
                     f"{fl['copy_bytes_per_s'] / 1e12:.2f} TB/s (bytes read + written), bf16 "
                     f"{fl['matmul_n']}^3 matmul {fl['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s.")
    return "\n".join(lines)


def _step_rows(card, res):
    """model -> {system -> record}, from fastmae bench first, bench_step.py where it has none."""
    by_model = OrderedDict()
    configs, parity = {}, {}
    for data in res.steps[card]:
        m = data["config"]["model"]
        configs[m] = data["config"]
        parity[m] = data.get("parity")
        for r in data["results"]:
            by_model.setdefault(m, {})[r["system"]] = r
    for info in res.step_suite[card]:
        m = info["model"]
        if m in configs:
            continue
        by_model.setdefault(m, {})[info["system"]] = {
            "system": info["system"], "label": info.get("label"), "ms_per_step": info["ms_per_step"],
            "images_per_s": info["images_per_s"], "mfu": info.get("mfu"),
            "peak_mem_gib": info.get("peak_mem_gib")}
        configs.setdefault(m + "#suite", {"model": m, "batch": info["batch"], "dtype": info["dtype"]})
    return by_model, configs, parity


HOST_BOUND_BUSY = 0.9  # a profiled step whose GPU was busy less than this share is host-bound


def _parity_batch(p):
    """Where a run's parity step ran relative to the timing (runs since it ran after the timing
    record it; earlier ones, before the timing at a batch of their own, say nothing)."""
    if p.get("retried"):
        return (f", after the timing; out of memory at the timed batch "
                f"{p['retried']['batch']}, so not the timed kernel paths")
    if not p.get("after_timing"):
        return ""
    if p.get("batch") == p.get("timed_batch"):
        return ", the timed batch, after the timing"
    return f", after the timing; not the timed batch {p.get('timed_batch')}"


def _graph_check_lines(by_model):
    """One line per graphed row whose run checked its replays against eager steps."""
    lines = []
    for m in sorted(by_model, key=_model_key):
        for s in SYSTEM_ORDER + sorted(set(by_model[m]) - set(SYSTEM_ORDER)):
            c = (by_model[m].get(s) or {}).get("graph_check")
            if not c:
                continue
            who = f"- {MODEL_TITLES.get(m, m)}, {SYSTEM_LABELS.get(s, s)}: graph check"
            if c.get("error"):
                lines.append(f"{who} FAILED: {c['error']}")
                continue
            of_moved = c.get("param_diff_of_moved")
            lines.append(
                f"{who} {'passed' if c.get('passed') else 'FAILED'}: {c['steps']} replays against "
                f"{c['steps']} eager steps from the same weights (batch {c['batch']}, "
                f"{c['dtype']}, fixed mask noise): worst loss error {c['loss_err']:.1e}; worst "
                f"parameter {c['param_worst']} off the eager one by {c['param_diff']:.1e}"
                + (f" ({100 * of_moved:.3g}% of how far the steps moved it)"
                   if of_moved is not None else "")
                + (f"; over the limit: {', '.join(c['params_failed'][:5])}"
                   if c.get("params_failed") else "") + ".")
    return lines


def _host_bound_lines(by_model):
    lines = []
    for m in sorted(by_model, key=_model_key):
        for s, r in by_model[m].items():
            if s.endswith("_graph"):  # replays: no host in the step (its idle time is gaps)
                continue
            prof = r.get("profile") or {}
            busy, step = prof.get("gpu_busy_ms_per_step"), prof.get("step_ms")
            if busy and step and busy < HOST_BOUND_BUSY * step:
                lines.append(f"- {MODEL_TITLES.get(m, m)}, {SYSTEM_LABELS.get(s, s)}: GPU busy "
                             f"{busy:.1f} ms per step of a {step:.1f} ms step ({busy / step:.0%})")
    return lines


def _ok(record):
    return bool(record) and not record.get("error")


def failed_checks(system, record, parity):
    """The checks behind a row's numbers that failed in its run: the run's parity step (fastmae
    against the reference) for a fastmae row, the row's own graph check (its CUDA graph's
    replays against eager steps) for a graphed one. [] where none failed or none ran."""
    out = []
    if system.startswith("fastmae") and parity and not parity.get("passed"):
        out.append("parity FAILED")
    check = record.get("graph_check")
    if check and not check.get("passed"):
        out.append("graph check FAILED")
    return out


def _speedup(base, r, failed):
    """A speed-up cell: ``r``'s images/s over ``base``'s, marked where a check failed."""
    cell = _x(base["ms_per_step"] / r["ms_per_step"]) if _ok(base) else "-"
    return cell + (f" ({', '.join(failed)})" if failed else "")


def model_section(card, res, chart_link):
    by_model, configs, parity = _step_rows(card, res)
    if not by_model:
        return None
    # a graphed reference timed: its column too (runs before it have none: no column)
    with_graph_ref = any(_ok(recs.get("reference_graph")) for recs in by_model.values())
    rows = []
    for m in sorted(by_model, key=_model_key):
        cfg = configs.get(m) or configs.get(m + "#suite") or {}
        recs = by_model[m]
        bases = [recs.get("reference"), recs.get("reference_compile")]
        if with_graph_ref:
            bases.append(recs.get("reference_graph"))
        for s in SYSTEM_ORDER + sorted(set(recs) - set(SYSTEM_ORDER)):
            r = recs.get(s)
            if r is None:
                continue
            name = f"{MODEL_TITLES.get(m, m)}, {cfg.get('batch', '?')}, {cfg.get('dtype', '?')}"
            if r.get("error"):
                rows.append([name, SYSTEM_LABELS.get(s, s), "failed", "", "", "", ""]
                            + [""] * len(bases))
                continue
            failed = failed_checks(s, r, parity.get(m))
            median = r.get("ms_median")
            rows.append([
                name, SYSTEM_LABELS.get(s, s), f"{r['ms_per_step']:.1f}",
                "-" if median is None else f"{median:.1f}", f"{r['images_per_s']:.0f}",
                _pct(r.get("mfu")),
                f"{r['peak_mem_gib']:.1f}" if r.get("peak_mem_gib") is not None else "-",
            ] + [_speedup(base, r, failed) for base in bases])
    head = ["model, batch, dtype", "system", "ms/step", "median ms", "images/s", "MFU", "peak GiB",
            "vs eager", "vs torch.compile"] + (["vs reference + CUDA graph"] if with_graph_ref
                                               else [])
    out = ["### Training step", "",
           "Forward + backward + fused AdamW, autocast, norm_pix_loss, mask ratio 0.75, random "
           "224 px images. ms/step: the timed steps' total time (CUDA events, after warm-up) "
           "over their number, so images/s is what the run sustained; the median step beside it. "
           "MFU = training FLOPs per image (3 x forward matmul + attention FLOPs, as "
           "the baselines count them) x images/s / the measured bf16 matmul rate (none for "
           "fp32). Speed-ups are this row's images/s over that system's. "
           "\"+ CUDA graph\": the same step captured once into a CUDA graph and replayed "
           "(`fastmae.bench.make_train_step(..., cuda_graph=True)`), which takes the host's "
           "per-launch cost out of the step."
           + (" \"vs reference + CUDA graph\": against the reference captured and replayed "
              "the same way, which has no host cost in its step either." if with_graph_ref
              else "")
           + (" A speed-up marked FAILED is one whose run's check of that row failed (below): "
              "its numbers are not a result." if any(
                  failed_checks(s, r, parity.get(m)) for m, recs in by_model.items()
                  for s, r in recs.items() if _ok(r)) else ""), "",
           _table(head, rows, ["l", "l"] + ["r"] * (len(head) - 2))]
    host_bound = _host_bound_lines(by_model)
    if host_bound:
        out += ["", "Host-bound rows (in the profiled steps the GPU was busy less than "
                f"{HOST_BOUND_BUSY:.0%} of a step: the host's launches, not the GPU, set the "
                "pace, and a slower or busier host shows in them):", ""] + host_bound
    lines = []
    for m in sorted(parity, key=_model_key):
        p = parity[m]
        if not p:
            continue
        if p.get("error"):
            lines.append(f"- {MODEL_TITLES.get(m, m)}: parity FAILED: {p['error']}")
            continue
        lines.append(
            f"- {MODEL_TITLES.get(m, m)}: parity {'passed' if p.get('passed') else 'FAILED'} on one "
            f"shared step (batch {p['batch']}{_parity_batch(p)}, {p['dtype']}; errors against the "
            f"{p['exact']}): loss "
            f"{p['loss_fastmae']:.5f} vs {p['loss_reference']:.5f}, worst gradient error "
            f"{p['grad_err']:.1e} ({p['grad_worst']}) where the eager reference's own is "
            f"{p['grad_err_eager']:.1e}; mask {'identical' if p['mask_equal'] else 'differs'}.")
    lines += _graph_check_lines(by_model)
    if lines:
        out += ["", "Parity, checked in the same run:", ""] + lines
    def title(d):
        return MODEL_TITLES.get(d["config"]["model"], d["config"]["model"])

    def last_choices(field):
        """'- model, key: value' lines of the last fastmae system of each model that has
        ``field`` (it holds every choice made in its process)."""
        lines = []
        for d in sorted(res.steps[card], key=lambda d: _model_key(d["config"]["model"])):
            found = [r[field] for r in d["results"] if r.get(field)]
            if found:
                lines += [f"- {title(d)}, {k}: {v}" for k, v in found[-1].items()]
        return lines

    def annotations(field):
        return [f"- {title(d)}: {text}" for d in res.steps[card] for text in d.get(field, [])]

    # (results since ea4a247 record the kernel paths, since 6c02ddb the autotuners' picks, since
    # the fused_tma MLP way the MLP matmuls' picks too, and the MLP's three ways)
    picks = last_choices("autotuned")
    mlp = any(", mlp " in line for line in picks)
    three_ways = any("fused_tma" in line for line in last_choices("paths_kept"))
    # runs whose parity step came before the timing, at a batch of its own, chose its paths too
    parity_first = any(d.get("parity") and not d["parity"].get("after_timing")
                       for d in res.steps[card])
    for lines, heading in (
            (last_choices("paths_kept"), "Kernel paths fastmae kept by timing "
             + ("each way" if three_ways else "both ways") + " on the first call of each shape"
             + (" (the parity step's batch included):" if parity_first else ":")),
            (picks, ("Attention and fused MLP matmul" if mlp else "Attention")
             + " configurations Triton's autotuner picked (fastest of the pruned pool, timed on "
             "the first call of each shape):"),
            (annotations("notes"), "Notes added to the result files after the run (no measured "
             "value changed):"),
            (annotations("corrections"), "Corrections made to the raw result files after the run "
             "(the files say so too):")):
        if lines:
            out += ["", heading, ""] + lines
    if chart_link:
        out += ["", f"![images/s per system on {card}]({chart_link})"]
    return "\n".join(out)


WORK_NOTE = ("GB and GFLOP: what each launch had to move and compute, as fastmae's launchers "
             "report it (every tensor argument read or written once, gathers at the rows they "
             "read; the FLOPs of matmul work: attention's products, patch embedding, the fused "
             "MLP matmuls). Floor: those bytes at the copy rate or those FLOPs at the bf16 "
             "matmul rate measured in the same run, whichever takes longer; \"of floor\" is "
             "the floor's time over the kernel's. The copy rate is what a 1 GiB device copy "
             "reached, not the memory's peak: a kernel whose data partly stays in L2 can pass "
             "it (over 100%).")


def _work_head(rows):
    """The work columns of a fastmae kernel table, where any of its rows has its work."""
    if not any(k.get("gb_per_s") is not None for k in rows):
        return []
    return ["GB/step", "GB/s", "GFLOP/step", "floor ms", "of floor"]


def _work_cells(k, head):
    """A row's cells under ``head`` (_work_head of its table: none where it is empty)."""
    if not head:
        return []
    if k.get("gb_per_s") is None:
        return ["-"] * 5
    floor = k.get("of_floor")
    return [f"{k['bytes_per_step'] / 1e9:.3f}", f"{k['gb_per_s']:.0f}",
            f"{k['flops_per_step'] / 1e9:.1f}" if k.get("flops_per_step") else "-",
            "-" if floor is None else f"{k['floor_ms_per_step']:.3f} ({k['floor_bound']})",
            "-" if floor is None else _pct(floor)]


def profile_section(card, res):
    """Where the GPU time of one step goes, from the profiler (fastmae bench's breakdown)."""
    out = []
    for data in sorted(res.steps[card], key=lambda d: _model_key(d["config"]["model"])):
        m = data["config"]["model"]
        for r in data["results"]:
            b = r.get("profile")
            title = (f"#### {MODEL_TITLES.get(m, m)}, batch {data['config']['batch']}, "
                     f"{SYSTEM_LABELS.get(r['system'], r['system'])}")
            if r.get("profile_error") and not r.get("error"):
                out += ["", title, "", f"The profiler's breakdown failed: {r['profile_error']}"]
            if not b or r.get("error"):
                continue
            cat_rows = [[c["name"], f"{c['ms_per_step']:.2f}", _pct(c["share"]),
                         f"{c['launches_per_step']:.0f}"] for c in b["categories"]]
            top_rows = [[f"`{k['name'][:80]}`", k["category"], f"{k['ms_per_step']:.2f}",
                         _pct(k["share"]), f"{k['launches_per_step']:.0f}"] for k in b["top_kernels"]]
            step = f" of a {b['step_ms']:.1f} ms step" if b.get("step_ms") else ""
            out += ["", title, "",
                    f"GPU busy {b['gpu_busy_ms_per_step']:.1f} ms per step{step}, "
                    f"{b['launches_per_step']:.0f} kernel launches per step "
                    f"({b['steps_profiled']} steps profiled).", "",
                    _table(["kernels", "ms/step", "share", "launches"], cat_rows),
                    "", _table(["kernel", "category", "ms/step", "share", "launches"], top_rows,
                               ["l", "l", "r", "r", "r"])]
            if b.get("fastmae_kernels"):  # every fastmae kernel (results since ea4a247 have them)
                ks = b["fastmae_kernels"]
                head = _work_head(ks)
                rows = [[f"`{k['name']}`", f"{k['ms_per_step']:.2f}", _pct(k["share"]),
                         f"{k['launches_per_step']:.0f}"] + _work_cells(k, head) for k in ks]
                out += ["", "Every fastmae kernel:", "",
                        _table(["kernel", "ms/step", "share", "launches"] + head, rows,
                               ["l", "r", "r", "r"] + ["r"] * len(head))]
            if b.get("fastmae_launches"):  # per grid and block (results since this field)
                ks = b["fastmae_launches"]
                head = _work_head(ks)
                rows = [[f"`{k['name']}`", k["launch"], f"{k['ms_per_step']:.2f}", _pct(k["share"]),
                         f"{k['launches_per_step']:.0f}"] + _work_cells(k, head) for k in ks]
                out += ["", "Every fastmae kernel by launch shape (the profiler's grid and threads "
                            "a program: e.g. encoder and decoder calls apart):", "",
                        _table(["kernel", "launch", "ms/step", "share", "launches"] + head, rows,
                               ["l", "l", "r", "r", "r"] + ["r"] * len(head))]
            if _work_head(b.get("fastmae_kernels", [])):
                out += ["", WORK_NOTE]
            if b.get("launch_work"):
                out += ["", f"Launch work {b['launch_work']}."]
    if not out:
        return None
    return "\n".join(["### Where a step's GPU time goes", "",
                      "torch.profiler over two training steps after the timed ones; kernel time "
                      "per step by category, then the kernels that took the most."] + out)


def op_section(card, res):
    recs = res.ops[card]
    if not recs:
        return None
    table = defaultdict(dict)
    for r in recs:
        table[(r["model"], r["op"], r["mode"])][r["impl"]] = r
    out = ["### Ops", "",
           "fastmae (backend \"triton\") against the eager reference (backend \"torch\") at the shapes "
           "and dtypes the training step gives each op (bf16 autocast). Time: median per call, CUDA "
           "events, L2 flushed before each call. Floor: the bytes the op must move at the measured "
           "copy bandwidth, or its FLOPs at the measured bf16 matmul rate, whichever is longer; "
           "\"% of floor\" = floor / time. Parity was checked on the same inputs before timing."]
    notes = _distinct([r.get("floor_note") for r in recs if r.get("floor_note")])
    for m in sorted({k[0] for k in table}, key=_model_key):
        rows = []
        keys = sorted((k for k in table if k[0] == m),
                      key=lambda k: (OP_ORDER.index(k[1]) if k[1] in OP_ORDER else 99,
                                     MODE_ORDER.index(k[2]) if k[2] in MODE_ORDER else 9))
        batch = None
        for k in keys:
            f, e = table[k].get("fastmae"), table[k].get("eager")
            any_r = f or e
            batch = any_r.get("batch", batch)
            dtype = any_r["dtype"] + (f" (amp {any_r['autocast']})" if any_r.get("autocast") else "")
            rate = ""
            if f:
                rate = (f"{f['tflops']:.1f} TFLOP/s" if f.get("floor_kind") == "matmul" and f.get("tflops")
                        else f"{f['gbps']:.0f} GB/s")
            rows.append([k[1], k[2], any_r["shape"], dtype,
                         _us(f["gpu_ms"]) if f else "-", _us(e["gpu_ms"]) if e else "-",
                         _x(e["gpu_ms"] / f["gpu_ms"]) if (f and e) else "-",
                         rate, _us(any_r["floor_ms"]) if any_r.get("floor_ms") else "-",
                         _pct(f.get("frac_floor")) if f else "-", _pct(e.get("frac_floor")) if e else "-"])
        out += ["", f"#### {MODEL_TITLES.get(m, m)}, batch {batch}", "",
                _table(["op", "mode", "shape", "dtype", "fastmae us", "eager us", "speed-up",
                        "fastmae rate", "floor us", "fastmae % of floor", "eager % of floor"],
                       rows, ["l", "l", "l", "l"] + ["r"] * 7)]
    if notes:
        out += ["", "Notes on the floors:", ""] + [f"- {n}" for n in notes]
    return "\n".join(out)


# ============================================================================ the chart

def write_chart(card, res, path):
    """Grouped bars of images/s per system and model for one card. Returns False without
    matplotlib or without data."""
    by_model, configs, _ = _step_rows(card, res)
    models = [m for m in sorted(by_model, key=_model_key)
              if any(not r.get("error") for r in by_model[m].values())]
    if not models:
        return False
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("write_benchmarks: matplotlib is not installed (pip install 'fastmae[bench]'): "
              "no chart", file=sys.stderr)
        return False
    systems = [s for s in SYSTEM_ORDER if any(s in by_model[m] for m in models)]
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.9 * len(models)))
    height = 0.8 / max(len(systems), 1)
    colors = {"fastmae": "#d62728", "fastmae_graph": "#ff9896", "fastmae_compile": "#e377c2",
              "reference": "#7f7f7f",
              "reference_compile": "#1f77b4", "reference_graph": "#aec7e8"}
    for i, s in enumerate(systems):
        ys, xs = [], []
        for j, m in enumerate(models):
            r = by_model[m].get(s)
            if r and not r.get("error"):
                ys.append(j + (i - (len(systems) - 1) / 2) * height)
                xs.append(r["images_per_s"])
        bars = ax.barh(ys, xs, height=height * 0.95, label=SYSTEM_LABELS.get(s, s),
                       color=colors.get(s))
        for b, v in zip(bars, xs):
            ax.text(b.get_width(), b.get_y() + b.get_height() / 2, f" {v:.0f}", va="center",
                    fontsize=8)
    labels = []
    for m in models:
        cfg = configs.get(m) or configs.get(m + "#suite") or {}
        labels.append(f"{MODEL_TITLES.get(m, m)}\nbatch {cfg.get('batch', '?')}")
    ax.set_yticks(range(len(models)))
    ax.set_yticklabels(labels)
    ax.invert_yaxis()
    ax.set_xlabel("images/s (training step, higher is better)")
    ax.set_title(f"MAE pretraining throughput on {card}", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.margins(x=0.15)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ============================================================================ the document

def placeholder(res, command):
    out = ["# fastmae benchmarks", "",
           "**No GPU measurement has been made yet.** This file is written by "
           "`benches/write_benchmarks.py` from what a GPU run measured, and no such run has "
           "happened, so it holds no numbers: none are estimated or copied from elsewhere.", "",
           "To produce it, on a machine with a CUDA GPU and fastmae's requirements (the script "
           "installs nothing; sized for about 5 minutes on an H100, not yet run on one):", "",
           "```bash", command, "```", "",
           "It runs the GPU correctness tests (`pytest tests -m cuda`), the op suites "
           "(`pytest benches/bench_ops.py`: every op, fastmae against the eager reference, forward, "
           "backward and both, at the ViT-B/16 and ViT-L/16 shapes), and `fastmae bench --compile` "
           "for ViT-B/16 and ViT-L/16 (training step: fastmae, the eager reference and "
           "torch.compile of it), then rewrites this file and the chart "
           "`benches/images_per_s.png` from the JSON it wrote.", "",
           "One model by hand: `fastmae bench --model vit_b16 --batch 256 --compile`."]
    if res.ignored:
        out += ["", "Inputs left out: " + "; ".join(f"{n} ({why})" for n, why in res.ignored) + "."]
    return "\n".join(out) + "\n"


def render(res, chart_path=None, md_dir=".", command=DEFAULT_COMMAND):
    cards = res.cards()
    if not cards:
        return placeholder(res, command)
    out = ["# fastmae benchmarks", "",
           "Written by `benches/write_benchmarks.py` from the JSON a GPU run wrote; every number "
           "below was measured by that run. Each section is one card; numbers from different cards "
           "are never put in one table.", "",
           "Reproduce (on a machine with a CUDA GPU; installs nothing):", "",
           "```bash", command]
    out += _distinct(c for c in res.commands if c != command)
    out += ["```"]
    for card in cards:
        chart_link = None
        if chart_path:
            path = chart_path if len(cards) == 1 else _per_card(chart_path, card)
            if write_chart(card, res, path):
                chart_link = os.path.relpath(path, md_dir).replace(os.sep, "/")
        out += ["", f"## {card}", "", header(card, res)]
        for section in (model_section(card, res, chart_link), profile_section(card, res),
                        op_section(card, res)):
            if section:
                out += ["", section]
    if res.ignored:
        out += ["", "Inputs left out: " + "; ".join(f"{n} ({why})" for n, why in res.ignored) + "."]
    return "\n".join(out) + "\n"


def _per_card(path, card):
    root, ext = os.path.splitext(path)
    return f"{root}-{slug(card)}{ext}"


def _floor_line(profile, most=3):
    """'fastmae kernels 20.70 ms a step, their floor 10.60 ms (51%); most time above it: ...'
    for a profile whose every fastmae kernel has its floor, else None."""
    rows = (profile or {}).get("fastmae_kernels") or []
    if not rows or any(r.get("of_floor") is None for r in rows):
        return None
    ms = sum(r["ms_per_step"] for r in rows)
    floor = sum(r["floor_ms_per_step"] for r in rows)
    furthest = sorted(rows, key=lambda r: r["floor_ms_per_step"] - r["ms_per_step"])[:most]
    return (f"fastmae kernels {ms:.2f} ms a step, their floor {floor:.2f} ms ({_pct(floor / ms)}); "
            "most time above it: " + ", ".join(
                f"{r['name']} {r['ms_per_step'] - r['floor_ms_per_step']:.2f} ms ({_pct(r['of_floor'])})"
                for r in furthest))


def summary(res):
    lines = []
    for card in res.cards():
        by_model, configs, parity = _step_rows(card, res)
        lines.append(f"{card}:")
        for m in sorted(by_model, key=_model_key):
            eager = by_model[m].get("reference")
            graph_ref = by_model[m].get("reference_graph")
            for s in SYSTEM_ORDER:
                r = by_model[m].get(s)
                if not r:
                    continue
                if r.get("error"):
                    lines.append(f"  {MODEL_TITLES.get(m, m):<9} {SYSTEM_LABELS[s]:<26} FAILED")
                    continue
                sp = (eager["ms_per_step"] / r["ms_per_step"]) if eager and not eager.get("error") else None
                failed = failed_checks(s, r, parity.get(m))
                lines.append(f"  {MODEL_TITLES.get(m, m):<9} {SYSTEM_LABELS[s]:<26} "
                             f"{r['ms_per_step']:7.1f} ms/step {r['images_per_s']:7.0f} img/s  "
                             f"MFU {_pct(r.get('mfu')):>4}  {_x(sp):>6} vs eager"
                             + (f"  {_x(graph_ref['ms_per_step'] / r['ms_per_step']):>6} vs "
                                "reference + CUDA graph" if _ok(graph_ref) else "")
                             + (f"  ({', '.join(failed)})" if failed else ""))
                floor = _floor_line(r.get("profile"))
                if floor:
                    lines.append(f"  {'':<9} {floor}")
            for s in SYSTEM_ORDER:
                c = (by_model[m].get(s) or {}).get("graph_check")
                if c:
                    lines.append(f"  {MODEL_TITLES.get(m, m):<9} {SYSTEM_LABELS[s]}: graph check "
                                 f"{'passed' if c.get('passed') else 'FAILED'}")
            p = parity.get(m)
            if p:
                lines.append(f"  {MODEL_TITLES.get(m, m):<9} parity "
                             f"{'passed' if p.get('passed') else 'FAILED'}")
        ops = res.ops[card]
        if ops:
            pairs = defaultdict(dict)
            for r in ops:
                pairs[(r["model"], r["op"], r["mode"])][r["impl"]] = r
            sps = [v["eager"]["gpu_ms"] / v["fastmae"]["gpu_ms"] for v in pairs.values()
                   if "eager" in v and "fastmae" in v]
            if sps:
                sps.sort()
                lines.append(f"  ops: {len(sps)} timed pairs, speed-up over eager median "
                             f"{sps[len(sps) // 2]:.2f}x (min {sps[0]:.2f}x, max {sps[-1]:.2f}x)")
    if not lines:
        lines.append("no GPU measurement in the inputs")
    return "\n".join(lines)


def _kernel_ms(profile):
    """({fastmae kernel: ms per step}, complete): every fastmae kernel where the profile lists
    them all (results since b0325d1), else those among its top kernels only."""
    if profile.get("fastmae_kernels") is not None:
        return {k["name"]: k["ms_per_step"] for k in profile["fastmae_kernels"]}, True
    return {k["name"]: k["ms_per_step"] for k in profile["top_kernels"]
            if k.get("category") == "fastmae kernels"}, False


def _profile_lines(a, b):
    """One fastmae step's profile, earlier run ``a`` against this run ``b``: GPU busy time,
    launches, the time by category and every fastmae kernel's."""
    def ms(v):
        return f"{v:7.2f}" if v is not None else "      -"

    lines = [f"      GPU busy {a['gpu_busy_ms_per_step']:.1f} -> {b['gpu_busy_ms_per_step']:.1f} "
             f"ms a step, {a['launches_per_step']:.0f} -> {b['launches_per_step']:.0f} launches"]
    cats_a = {c["name"]: c["ms_per_step"] for c in a["categories"]}
    cats_b = {c["name"]: c["ms_per_step"] for c in b["categories"]}
    for name in sorted(set(cats_a) | set(cats_b), key=lambda n: -cats_a.get(n, 0)):
        lines.append(f"      {name:<30} {ms(cats_a.get(name))} -> {ms(cats_b.get(name))} ms")
    (ka, complete_a), (kb, _) = _kernel_ms(a), _kernel_ms(b)
    unknown = False
    for name in sorted(set(ka) | set(kb), key=lambda n: -max(ka.get(n, 0), kb.get(n, 0))):
        was = ms(ka.get(name))
        if name not in ka and not complete_a:
            was, unknown = "      ?", True
        lines.append(f"        {name:<28} {was} -> {ms(kb.get(name))} ms")
    if unknown:
        lines.append("        (?: not among the earlier run's top kernels, all it recorded)")
    return lines


def _measurement(data):
    """What identifies one fastmae bench measurement across copies of its file."""
    env = data["env"]
    return _card(env), data["config"]["model"], env.get("commit"), env.get("date")


def comparison(earlier, res):
    """Lines comparing this run's training steps (``res``) with an earlier run's (``earlier``),
    card by card, never across cards: each system's ms/step and, for a profiled step, its GPU
    busy time, launches, categories and fastmae kernels. Printed for a session's notes only:
    BENCHMARKS.md holds one run's numbers."""
    lines = []
    for card in res.cards():
        if not res.steps[card]:
            continue
        now = {_measurement(d) for d in res.steps[card]}
        runs = [d for d in earlier.steps.get(card, []) if _measurement(d) not in now]
        if not runs:
            lines.append(f"{card}: no earlier run of this card to compare with")
            continue
        then = Results()
        then.steps[card] = runs  # load kept the newest file of each model
        old_rows, _, _ = _step_rows(card, then)
        new_rows, _, _ = _step_rows(card, res)
        when = {d["config"]["model"]: f"{d['env'].get('commit')}, {d['env'].get('date')}"
                for d in then.steps[card]}
        lines.append(f"{card}: this run against the latest earlier one, ms/step")
        for m in sorted(new_rows, key=_model_key):
            title = MODEL_TITLES.get(m, m)
            if m not in old_rows:
                lines.append(f"  {title}: not in the earlier runs")
                continue
            lines.append(f"  {title} (earlier: {when[m]})")
            for s in SYSTEM_ORDER:
                a, b = old_rows[m].get(s), new_rows[m].get(s)
                if not (a and b) or a.get("error") or b.get("error"):
                    continue
                was, now_ms = a["ms_per_step"], b["ms_per_step"]
                lines.append(f"  {title:<9} {SYSTEM_LABELS[s]:<26} {was:7.1f} -> {now_ms:7.1f}  "
                             f"({was / now_ms:.2f}x)")
                if a.get("profile") and b.get("profile"):
                    lines += _profile_lines(a["profile"], b["profile"])
    return "\n".join(lines) if lines else "no GPU training step in this run to compare"


def _measurements(path):
    """The fastmae bench measurements a result file holds (none for other files)."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if isinstance(data, dict) and str(data.get("schema", "")).startswith("fastmae-bench/"):
        return {_measurement(data)}
    return set()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="*", help="fastmae bench / pytest-benchmark JSON files")
    p.add_argument("--chart", default=None, help="write the images/s chart here (PNG)")
    p.add_argument("--md-dir", default=".", help="where the Markdown will live (for the chart link)")
    p.add_argument("--command", default=DEFAULT_COMMAND, help="the command that reproduces the run")
    p.add_argument("--summary", action="store_true", help="print a short text table instead")
    p.add_argument("--against", nargs="+", metavar="EARLIER.json",
                   help="with --summary: first compare the training steps with these earlier "
                        "results of the same card (printed only, never into BENCHMARKS.md)")
    args = p.parse_args(argv)
    if args.against and not args.summary:
        p.error("--against goes with --summary: BENCHMARKS.md holds one run's numbers")
    res = load(args.results)
    if args.summary:
        if args.against:
            # a copy of this run's own files among the earlier ones (committed, then compared
            # again; corrections may have changed its bytes) would, as the newest, stand in for
            # the run before it
            mine = set().union(*map(_measurements, args.results))
            earlier = [path for path in args.against if not _measurements(path) & mine]
            print(comparison(load(earlier), res))
        print(summary(res))  # the short table last
    else:
        sys.stdout.write(render(res, args.chart, args.md_dir, args.command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
