#!/usr/bin/env bash
# The GPU benchmark run that writes BENCHMARKS.md. Installs nothing.
#
#   bash benches/gpu_suite.sh [OUTDIR]        (default: $OUT if set, else out/bench)
#
# Most important first, each stage under its own time limit, every stage's output kept in
# OUTDIR as it is written (a run cut short still leaves what it measured):
# 0. the direct Triton launch checked against Triton's own (tests/test_direct_launch.py);
# 0b. the MLP's TMA kernels, each configuration once (a kind that fails is left out of the run);
# 0c. attention's head tilings (fused_q, the forward's 256-row tiles), each configuration once,
#     beside 0b (left out of the run if they fail);
# 1. `fastmae bench --compile` for ViT-B/16: fastmae's kernels compiled in parallel processes
#    (fastmae.precompile), then the eager reference, fastmae, fastmae + CUDA graph, reference +
#    CUDA graph and torch.compile of the reference, with the profiler's kernel breakdown, then
#    parity on one shared step at the timed batch and each CUDA graph's replays checked against
#    eager steps -> OUTDIR/step_vit_b16.json;
# 2. the issue's GPU training test: 20 AdamW steps of ViT-B/16 against the eager reference;
# 3. `fastmae bench` for ViT-L/16 (reference, fastmae, fastmae + CUDA graph, reference + CUDA
#    graph; then the same checks) -> step_vit_l16.json;
# 3b. benches/step_overhead.py: where the host time of an eager step goes -> step_overhead.txt;
# 3c. benches/sweep_bwd.py: the LayerNorm / bias + GELU backwards' and the partial sums' launch
#     configs -> sweep_bwd.txt;
# 3d. (PROFILE=1 only) benches/kernel_profile.py: the attention kernels' (PROFILE_CASES=...,mlp:
#     and the fused MLP matmuls') hardware counters
#     under Nsight Compute -> OUTDIR/profile/;
# 4. the other GPU correctness tests (pytest tests -m cuda; attention autotuning off);
# 5. the op suites (benches/bench_ops.py) at the ViT-B/16 shapes -> OUTDIR/ops.json;
# 6. BENCHMARKS.md and benches/images_per_s.png rewritten from those files (copies in OUTDIR);
#    then this run's training steps against the committed results of the same card
#    (benches/results, kernel by kernel; printed only), and a short table last.
# To commit a run: its OUTDIR JSON files (and suite.log) as a new folder of benches/results (e.g.
# h200-2026-11-28) with the BENCHMARKS.md and chart it wrote. BENCHMARKS.md shows that newest run
# only (tests/test_bench_cli.py checks it is the writer's rendering of the newest folder); the
# earlier folders stay, for the comparison above.
# On an H200 stages 0-3 took 241 s at db16320, 191 s at c79d6d3 and 311 s at 6c02ddb (on a
# machine whose host was slower: torch.compile of the reference 61 s instead of 40, and the
# attention autotuners now also search at the timed batch, not only at the parity batch); 3c
# took 33 s; stage 4's 126 tests have never finished inside a device lease: at c79d6d3 one had
# not reported after 200 s, and at 6c02ddb, cut 100 s in, 123 had passed and three had not
# reported: torch.compile of the whole ViT-B/16 (since cut to two blocks and one),
# test_a_precompiled_step_compiles_nothing_on_gpu and
# test_cuda_graph_run_equals_an_eager_run_on_gpu. For every target of the
# speed issue (ViT-B/16 against eager and torch.compile, ViT-L/16 against eager, each fastmae
# kernel against its floor, peak memory) and the training test in one command:
#   SKIP_HOST=1 SKIP_SWEEP=1 SKIP_OPS=1 SKIP_TESTS=1 bash benches/gpu_suite.sh
# and the CUDA tests alone in another (with 300 s they should finish; a test past its own limit
# is named):
#   SKIP_STEP=1 SKIP_TRAIN_TEST=1 L_MODEL= SKIP_HOST=1 SKIP_SWEEP=1 SKIP_OPS=1 bash benches/gpu_suite.sh
# The decoder attention's hardware counters (stage 3d, not yet run on a GPU: its autotuning, its
# compiles loaded from Triton's cache where stage 1 left them, then ncu's replays of five
# launches, four where stage 0c turned the head tilings off) go with the first: PROFILE=1.
# Stages 0 and 0b (two pytest processes of at most TMA_TIMEOUT each, not yet timed on a GPU)
# run before both, and beside 0b stage 0c (one of at most HEAD_TIMEOUT, compiling about 12
# kernels); with PROFILE=1 the PROFILE_TIMEOUT of 150 should keep the first inside a 600 s device call
# (stages 0-3 took 311 s at 6c02ddb, before 0b and 0c). With SKIP_STEP=1 stage 3d compiles
# under ncu: give it more.
#
# Knobs (environment): STEPS=10, WARMUP=3, L_MODEL=vit_l16 (empty: skip), OP_MODELS=vit_b16,
# TEST_WORKERS=8, LAUNCH_TIMEOUT=45, TMA_TIMEOUT=90 (each of stage 0b's two), B_TIMEOUT=270,
# TRAIN_TEST_TIMEOUT=60, L_TIMEOUT=180 (stages 1 and 3 took 151 s and 86 s at 6c02ddb, before
# the graphed reference and the graph checks were added),
# B_SYSTEMS=reference,fastmae,fastmae_graph,reference_graph,reference_compile,
# L_SYSTEMS=reference,fastmae,fastmae_graph,reference_graph (fastmae bench --systems; the
# graphed reference: what fastmae + CUDA graph is also set against, host cost out of both),
# TEST_TIMEOUT=300, TEST_CASE_TIMEOUT=200 (one test, with pytest-timeout), OPS_TIMEOUT=90,
# HOST_TIMEOUT=90, SWEEP_TIMEOUT=120, SKIP_STEP=0 (stage 1), SKIP_TRAIN_TEST=0, SKIP_HOST=0,
# SKIP_SWEEP=0, SKIP_TESTS=0, SKIP_OPS=0, PROFILE=0 (1: stage 3d), PROFILE_TIMEOUT=150,
# PROFILE_CASES=decoder (and/or encoder, mlp: the decoder MLP's fused matmuls, each way),
# HEAD_TIMEOUT=150 (stage 0c), SUITE_BUDGET=560 (s; every stage from 1 on fits in what is left),
# PYTHON=python3, SUITE_COMMAND (the command BENCHMARKS.md names as the one that reproduces it).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTDIR="${1:-${OUT:-$REPO/out/bench}}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
PY="${PYTHON:-python3}"
OP_MODELS="${OP_MODELS:-vit_b16}"
STEPS="${STEPS:-10}"
WARMUP="${WARMUP:-3}"
export PYTHONUNBUFFERED=1
LOG="$OUTDIR/suite.log"
: > "$LOG"
T0=$SECONDS
STATUS=0

say() { echo "[gpu_suite +$((SECONDS - T0))s] $*" | tee -a "$LOG"; }
run() { "$@" 2>&1 | tee -a "$LOG"; return "${PIPESTATUS[0]}"; }
# SUITE_BUDGET seconds (one device call is at most 600 s): each stage from 1 on gets at most
# what is left of it, less 25 s for stage 6 and the summary, and is skipped, said, with under
# 20 s left; a stage's own limit applies where it is smaller. A killed stage keeps what it wrote
# (fastmae bench saves its JSON after each system).
BUDGET="${SUITE_BUDGET:-560}"
limit_now() {  # requested limit (s) -> the limit a stage gets now; 0: no time left for it
    local left=$((BUDGET - (SECONDS - T0) - 25))
    if [ "$left" -lt 20 ]; then echo 0
    elif [ "$1" -lt "$left" ]; then echo "$1"
    else echo "$left"
    fi
}
out_of_budget() {  # stage name: say it is skipped for want of time
    say "$1 skipped: under 20 s of SUITE_BUDGET=$BUDGET s left"
    STATUS=1
}

# fastmae's kernels live in kernels/ and are installed as fastmae.kernels (setup.py's
# package_dir). Where fastmae is not installed, a folder of links maps them, installing nothing.
RUN_DIR="$REPO"
if ! "$PY" -c "import torch" 2>/dev/null; then
    say "$PY cannot import torch: run this with the Python that has torch and triton (PYTHON=...)"
    exit 2
fi
if ! (cd "$REPO" && "$PY" -c "import fastmae.kernels" 2>/dev/null); then
    SHIM="$(mktemp -d)"
    trap 'rm -rf "$SHIM"' EXIT  # links only: the run's files are all in OUTDIR
    mkdir -p "$SHIM/fastmae"
    ln -s "$REPO"/fastmae/*.py "$SHIM/fastmae/"
    ln -s "$REPO/kernels" "$SHIM/fastmae/kernels"
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
    RUN_DIR="$SHIM"
    say "fastmae is not installed: using links in $SHIM (fastmae.kernels -> kernels/)"
fi
cd "$RUN_DIR"
# a FASTMAE_COMMIT that is not a commit would be recorded in every result: refuse it up front
if ! "$PY" -c "from fastmae._provenance import git_commit; git_commit()"; then
    say "FASTMAE_COMMIT=${FASTMAE_COMMIT:-} is not a commit: export the sha the tree was copied from"
    exit 2
fi

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    say "no CUDA GPU here: this script measures GPUs only (try: fastmae bench, which runs a tiny CPU configuration)"
    exit 2
fi
run "$PY" - <<'EOF'
import torch, triton
print(f"GPU {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
EOF

# ---------------------------------------------------------------- 0. the direct launch
# fastmae hands compiled kernels straight to Triton's C launcher (kernels/_common.py); checked
# first, in about 20 s: if it fails on this GPU, the rest of the run takes Triton's own launch path
# (FASTMAE_TRITON_LAUNCH=triton, recorded in the results' env) rather than losing the run.
if [ "${FASTMAE_TRITON_LAUNCH:-direct}" != "triton" ]; then
    say "0/6 the direct Triton launch against Triton's own, on this GPU"
    if ! run timeout "${LAUNCH_TIMEOUT:-45}" "$PY" -m pytest "$REPO/tests/test_direct_launch.py" -m cuda \
            -q -p no:cacheprovider -rfE --tb=short; then
        say "the direct launch failed here: the rest of the run launches through Triton's own path"
        export FASTMAE_TRITON_LAUNCH=triton
        STATUS=1
    fi
fi

# ---------------------------------------------------------------- 0b and 0c: the newest kernels
# Each kind of kernel not yet run on a GPU when its stage came is run once a configuration, in a
# CUDA test of its own, before anything is measured; a kind that fails or hangs is left out of
# the rest of the run rather than faulting its benchmarks. Their compiles land in Triton's
# cache, where stage 1 finds them.
check_command() {  # time limit, test file, pytest -k expression: a kind's CUDA test, on its own
    timeout -k 10 "$1" "$PY" -m pytest "$REPO/tests/$2" -m cuda -k "$3" \
        -q -p no:cacheprovider -rfE --tb=short
}
said_timeout() {  # exit status, time limit: say so where a check timed out (124; 137: killed)
    if [ "$1" -eq 124 ] || [ "$1" -eq 137 ]; then
        say "timed out after $2 s (not a failed check: its compiles may need longer)"
    fi
}
first_check() {  # as check_command, its output in the log
    run check_command "$@"
    local rc=$?
    said_timeout "$rc" "$1"
    return "$rc"
}

# 0c. attention's head tilings (kernels/attention.py: the fused_q backward and the forward's
# 256-row tiles), each configuration once at MAE's shapes; left out where they fail
# (FASTMAE_ATTN_HEAD_TILES=0). It runs beside stage 0b, in a process of its own (a fault in one
# does not reach the other; their compiles, a CPU core each, overlap), its output in
# OUTDIR/head_tilings.log, copied into the log when it ends.
HEAD_PID=""
if [ "${FASTMAE_ATTN_HEAD_TILES:-1}" != "0" ]; then
    say "0c/6 attention's head tilings on this GPU, each configuration once (beside 0b)"
    check_command "${HEAD_TIMEOUT:-150}" test_kernel_attention.py \
        "every_autotune_config and (fused_q or fwd_head)" > "$OUTDIR/head_tilings.log" 2>&1 &
    HEAD_PID=$!
fi
head_tilings_result() {  # after stage 0b: wait for 0c, log its output, act on its exit status
    [ -n "$HEAD_PID" ] || return 0
    wait "$HEAD_PID"
    local rc=$?
    say "0c/6 attention's head tilings: exit $rc"
    tee -a "$LOG" < "$OUTDIR/head_tilings.log"
    said_timeout "$rc" "${HEAD_TIMEOUT:-150}"
    if [ "$rc" -ne 0 ]; then
        say "attention's head tilings failed here: the rest of the run leaves them out" \
            "(FASTMAE_ATTN_HEAD_TILES=0)"
        export FASTMAE_ATTN_HEAD_TILES=0
        STATUS=1
    fi
}

# 0b. kernels/gelu_matmul.py's TMA kernels at the decoder's widths, the flattened ones then the
# warp-specialized ones; left out where they fail (FASTMAE_TMA=0: every TMA kernel;
# FASTMAE_WARP_SPECIALIZE=0: the warp-specialized ones).
tma_check() {  # pytest -k expression, after the CUDA test's name
    first_check "${TMA_TIMEOUT:-90}" test_kernel_gelu_matmul.py "every_gpu_configuration and $1"
}
if [ "${FASTMAE_TMA:-1}" != "0" ]; then
    say "0b/6 the TMA MLP kernels on this GPU, each configuration once"
    if ! tma_check "tma and not warp"; then
        say "the TMA kernels failed here: the rest of the run leaves them out (FASTMAE_TMA=0)"
        export FASTMAE_TMA=0
        STATUS=1
    elif [ "${FASTMAE_WARP_SPECIALIZE:-1}" != "0" ] && ! tma_check "warp_specialized"; then
        say "the warp-specialized TMA kernels failed here: the rest of the run leaves them out" \
            "(FASTMAE_WARP_SPECIALIZE=0)"
        export FASTMAE_WARP_SPECIALIZE=0
        STATUS=1
    fi
fi
head_tilings_result

# ---------------------------------------------------------------- 1-3. training step
step_bench() {  # model timeout extra-args...
    local m=$1 limit
    limit=$(limit_now "$2")
    shift 2
    [ "$limit" -eq 0 ] && { out_of_budget "fastmae bench --model $m"; return; }
    say "fastmae bench --model $m $* --steps $STEPS --warmup $WARMUP"
    run timeout "$limit" "$PY" -m fastmae.cli bench --model "$m" "$@" \
        --steps "$STEPS" --warmup "$WARMUP" --no-progress --json "$OUTDIR/step_$m.json" \
        || { say "fastmae bench --model $m failed or timed out"; STATUS=1; }
}
B_SYSTEMS="${B_SYSTEMS:-reference,fastmae,fastmae_graph,reference_graph,reference_compile}"
L_SYSTEMS="${L_SYSTEMS:-reference,fastmae,fastmae_graph,reference_graph}"
if [ "${SKIP_STEP:-0}" != "1" ]; then
    say "1/6 training step, ViT-B/16"
    step_bench vit_b16 "${B_TIMEOUT:-270}" --compile --systems "$B_SYSTEMS"
fi

# ---------------------------------------------------------------- 2. the training test
if [ "${SKIP_TRAIN_TEST:-0}" != "1" ]; then
    say "2/6 GPU training test: 20 AdamW steps of ViT-B/16, fastmae against the eager reference"
    limit=$(limit_now "${TRAIN_TEST_TIMEOUT:-60}")
    [ "$limit" -eq 0 ] && out_of_budget "the training test" || \
    run timeout "$limit" "$PY" -m pytest "$REPO/tests/test_model_triton.py" -m cuda \
        -k trains_like_the_reference -q -p no:cacheprovider -rfE --tb=short \
        || { say "GPU training test failed or timed out"; STATUS=1; }
fi

if [ -n "${L_MODEL-vit_l16}" ]; then
    say "3/6 training step, ${L_MODEL-vit_l16}"
    step_bench "${L_MODEL-vit_l16}" "${L_TIMEOUT:-180}" --systems "$L_SYSTEMS"
fi

# ---------------------------------------------------------------- 3b. host cost
# where the host time of an eager step goes (the eager fastmae step was host-bound at 017ac2e)
if [ "${SKIP_HOST:-0}" != "1" ]; then
    say "3b/6 host cost of an eager step: benches/step_overhead.py -> step_overhead.txt"
    limit=$(limit_now "${HOST_TIMEOUT:-90}")
    [ "$limit" -eq 0 ] && out_of_budget "3b" || \
    timeout "$limit" "$PY" "$REPO/benches/step_overhead.py" --model vit_b16 \
        --batch 256 --profile-top 25 2>&1 | tee "$OUTDIR/step_overhead.txt" >> "$LOG" \
        || { say "step_overhead.py failed or timed out"; STATUS=1; }
fi

# ---------------------------------------------------------------- 3c. backward launch configs
# the LayerNorm and bias + GELU backwards under a grid of launch configurations (they ran at
# ~45% / ~60% of the copy bandwidth at 017ac2e)
if [ "${SKIP_SWEEP:-0}" != "1" ]; then
    say "3c/6 backward launch configurations: benches/sweep_bwd.py -> sweep_bwd.txt"
    limit=$(limit_now "${SWEEP_TIMEOUT:-120}")
    [ "$limit" -eq 0 ] && out_of_budget "3c" || \
    timeout "$limit" "$PY" "$REPO/benches/sweep_bwd.py" 2>&1 \
        | tee "$OUTDIR/sweep_bwd.txt" >> "$LOG" \
        || { say "sweep_bwd.py failed or timed out"; STATUS=1; }
fi

# ---------------------------------------------------------------- 3d. hardware counters
# off unless PROFILE=1: the attention kernels under Nsight Compute (benches/kernel_profile.py ->
# OUTDIR/profile): occupancy, issue-slot use, eligible warps, stall reasons, and the SASS
# instructions the stall samples fall on (the decoder's attention ran at 25-37% of its floor,
# flat across tilings, at 6c02ddb). The script keeps to one deadline, 20 s inside the stage's
# limit (its own start and summary take the rest), and ends ncu's process group at it or when
# this timeout stops it (-k 10: SIGKILL 10 s later). Exit 3: no ncu here, a skip.
if [ "${PROFILE:-0}" = "1" ]; then
    say "3d/6 attention kernels under ncu: benches/kernel_profile.py -> profile/"
    limit=$(limit_now "${PROFILE_TIMEOUT:-150}")
    [ "$limit" -lt 40 ] && limit=40  # its own deadline is 20 s inside: under 40, nothing profiles
    run timeout -k 10 "$limit" "$PY" "$REPO/benches/kernel_profile.py" --out "$OUTDIR/profile" \
        --cases "${PROFILE_CASES:-decoder}" --timeout $((limit - 20))
    rc=$?
    if [ "$rc" -eq 3 ]; then
        say "3d skipped: ncu (Nsight Compute) not found"
    elif [ "$rc" -ne 0 ]; then
        say "kernel_profile.py failed or timed out (exit $rc; its reason above, ncu's output in" \
            "profile/ncu*.log)"
        STATUS=1
    fi
fi

# ---------------------------------------------------------------- 4. correctness
if [ "${SKIP_TESTS:-0}" != "1" ]; then
    say "4/6 GPU correctness tests: pytest tests -m cuda"
    XDIST=()
    if [ "${TEST_WORKERS:-8}" -gt 1 ] && "$PY" -c "import xdist" 2>/dev/null; then
        XDIST=(-n "${TEST_WORKERS:-8}")
    fi
    # each test under its own limit where pytest-timeout is installed, under the stage's by 45 s
    # (the workers take ~20 s to start): a test that hangs fails with its stack, even inside C
    # (the thread method ends the worker; xdist names the test it crashed in). At db16320 and
    # c79d6d3 one of the tests had not finished when the stage's limit came, unnamed; -v names
    # each result, and the ids that got none are listed below.
    STAGE_LIMIT=$(limit_now "${TEST_TIMEOUT:-300}")
    [ "$STAGE_LIMIT" -lt 60 ] && STAGE_LIMIT=60  # the workers alone take ~20 s to start
    CASE_LIMIT="${TEST_CASE_TIMEOUT:-200}"
    [ "$CASE_LIMIT" -gt $((STAGE_LIMIT - 45)) ] && CASE_LIMIT=$((STAGE_LIMIT - 45))
    PER_TEST=()
    if "$PY" -c "import pytest_timeout" 2>/dev/null; then
        PER_TEST=(--timeout "$CASE_LIMIT" --timeout-method=thread)
    fi
    # node ids are relative to the rootdir (the repo): an absolute path deselects nothing (until
    # c79d6d3 stage 2's training test ran here again)
    TEST_ARGS=("$REPO/tests" -m cuda -p no:cacheprovider
               --deselect "tests/test_model_triton.py::test_vit_b16_trains_like_the_reference_on_gpu")
    TEST_LOG="$OUTDIR/cuda_tests.log"
    FASTMAE_ATTN_AUTOTUNE=0 timeout "$STAGE_LIMIT" "$PY" -m pytest "${TEST_ARGS[@]}" \
        -v -rfE --tb=short --durations=15 "${XDIST[@]}" "${PER_TEST[@]}" 2>&1 | tee "$TEST_LOG" \
        | grep -v -e "PytestBenchmarkWarning" -e "warner(" | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    if [ $rc -eq 124 ]; then
        say "GPU tests did not finish in ${STAGE_LIMIT}s; tests with no result:"
        # -v under xdist prints a test's id when it starts and again after its outcome
        "$PY" -m pytest "${TEST_ARGS[@]}" --collect-only -q 2>/dev/null | grep "::" \
            | "$PY" -c '
import re, sys
done = set()
for line in open(sys.argv[1], errors="replace"):
    m = re.search(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (\S+)", line)
    if m:
        done.add(m.group(2))
for test_id in (line.strip() for line in sys.stdin):
    if not any(d == test_id or d.endswith("/" + test_id) for d in done):
        print("  " + test_id)' "$TEST_LOG" | tee -a "$LOG"
        STATUS=1
    elif [ $rc -ne 0 ] && [ $rc -ne 5 ]; then
        say "GPU tests FAILED (exit $rc)"
        STATUS=1
    fi
fi

# ---------------------------------------------------------------- 5. op suites
if [ "${SKIP_OPS:-0}" != "1" ]; then
    say "5/6 op suites at $OP_MODELS shapes"
    limit=$(limit_now "${OPS_TIMEOUT:-90}")
    [ "$limit" -eq 0 ] && out_of_budget "5" || \
    run timeout "$limit" "$PY" -m pytest "$REPO/benches/bench_ops.py" -q -p no:cacheprovider \
        --mae-models "$OP_MODELS" --benchmark-json "$OUTDIR/ops.json" \
        --benchmark-columns=median,iqr,rounds --benchmark-group-by=group --benchmark-sort=name \
        || { say "op suites: some benchmarks failed or timed out (see above)"; STATUS=1; }
fi

# ---------------------------------------------------------------- 6. BENCHMARKS.md
say "6/6 writing BENCHMARKS.md and benches/images_per_s.png"
shopt -s nullglob
RESULTS=("$OUTDIR"/ops*.json "$OUTDIR"/step_*.json)  # globs: a skipped stage leaves no file
if [ ${#RESULTS[@]} -gt 0 ]; then
    "$PY" "$REPO/benches/write_benchmarks.py" "${RESULTS[@]}" --chart "$REPO/benches/images_per_s.png" \
        --md-dir "$REPO" --command "${SUITE_COMMAND:-bash benches/gpu_suite.sh}" > "$REPO/BENCHMARKS.md.new" \
        && mv "$REPO/BENCHMARKS.md.new" "$REPO/BENCHMARKS.md" \
        && cp "$REPO/BENCHMARKS.md" "$OUTDIR/BENCHMARKS.md" \
        || { say "writing BENCHMARKS.md failed"; STATUS=1; }
    [ -f "$REPO/benches/images_per_s.png" ] && cp "$REPO/benches/images_per_s.png" "$OUTDIR/"
fi

# ---------------------------------------------------------------- summary
say "done in $((SECONDS - T0))s; results in $OUTDIR"
# this run against the committed results of the same card (kernel by kernel), then the table
EARLIER=("$REPO"/benches/results/*/step_*.json)
run "$PY" "$REPO/benches/write_benchmarks.py" "${RESULTS[@]}" --summary \
    ${EARLIER[@]:+--against "${EARLIER[@]}"}
exit $STATUS
