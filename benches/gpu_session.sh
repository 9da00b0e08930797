#!/usr/bin/env bash
# One GPU session of prefopt in one device call of at most 8 minutes, the most valuable evidence
# first: correctness, then the kernels alone, then the headline benchmark rows.
#
#   bash benches/gpu_session.sh [PART ...]        (repository root; BUDGET_S seconds, default 450)
#
# PARTs run in this order (default: all of them; name some to rerun only those):
#   build         python -m prefopt build, in the background from the start (it needs only the
#                 CPUs); the cuda parts wait for it
#   check         python -m prefopt check --backend triton --backend torch: against float64 on
#                 four problems (cuda's check opens tests-cuda, once the extension is built)
#   tests-triton  the GPU subset of the correctness suite on backend "triton" (the logits path,
#                 the lse gradient, the fused linear path, the fused losses; CPU concerns such as
#                 the simulator, torch.compile and the integrations stay in CI)
#   tests-cuda    python -m prefopt check --backend cuda, then the same subset on backend "cuda",
#                 once the build is done
#   kernels       python benches/kernel_bench.py: each token-statistics kernel alone, GB/s and
#                 fraction of the copy bandwidth, clocks, registers and spills (~30 s)
#   headline      pytest -m headline over benches/test_logprobs_gpu.py, test_linear_gpu.py and
#                 test_steps_gpu.py, in that order: 5 timed calls (PREFOPT_BENCH_CALLS), at most
#                 ROW_TIMEOUT_S (60) seconds a row
# Each part gets, as it starts, a share of the time left by weight (check 2, tests-triton 6,
# tests-cuda 2, kernels 3, headline 9), REPORT_RESERVE_S kept for the report; what a part leaves
# unused goes to the next ones. A pytest part is stopped with SIGINT at its cap, so that pytest
# still writes its junit file and its summary. The parts that can use the CUDA extension
# (tests-cuda, kernels, headline) wait for the build first. The report is rewritten after every
# part, so a session cut short keeps what it measured; plots are drawn afterwards, on any
# machine, from records.jsonl (benches/report.py without --no-plots).
#
# Without a GPU the same script runs end to end in well under 2 minutes, as CI runs it, so that a
# mistake in it costs no device time: build is skipped, check and kernels run through Triton's
# interpreter on tiny problems, the test parts only collect their selection, every headline row is
# skipped with its reason, and the report is written. It then exits 1 if any command failed.
#
# Before any part: an offline editable install of prefopt (prefopt.csrc maps to csrc/, so a bare
# checkout does not find it as installed) and, when .peer-wheels/ is there, the peers' wheels (see
# benches/fetch_peer_wheels.sh; carry it with the call) into /tmp/prefopt-peers on PYTHONPATH.
#
# Output in $OUT (./gpu-session-out when unset), at most 6 files, as the device tool returns at
# most 8: session.log (everything, the build log included), records.jsonl (raw rows: kernels and
# headline), junit-tests-triton.xml and junit-tests-cuda.xml (one per pytest invocation of the
# correctness suite), and from benches/report.py <date>-<gpu>.json and <date>-<gpu>.md. The
# summary is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-$PWD/gpu-session-out}
mkdir -p "$OUT"
LOG=$OUT/session.log
START=$(date +%s)
BUDGET_S=${BUDGET_S:-450}
ROW_TIMEOUT_S=${ROW_TIMEOUT_S:-60}
TEST_TIMEOUT_S=${TEST_TIMEOUT_S:-120}
REPORT_RESERVE_S=${REPORT_RESERVE_S:-25}
ALL_PARTS=(build check tests-triton tests-cuda kernels headline)
export PYTHONUNBUFFERED=1 PIP_ROOT_USER_ACTION=ignore
export PREFOPT_BENCH_RECORD=$OUT/records.jsonl PREFOPT_BENCH_CALLS=${PREFOPT_BENCH_CALLS:-5}
export PREFOPT_CACHE_DIR=${PREFOPT_CACHE_DIR:-/tmp/prefopt-cache}
REPORT_DIR=/tmp/prefopt-report
BUILD_LOG=/tmp/prefopt-build.log
BUILD_STATUS=/tmp/prefopt-build.status
CORRECTNESS_FILES=(tests/test_token_logprobs.py tests/test_lse_gradient.py tests/test_linear.py
                   tests/test_fused_losses.py tests/test_sequence_logprobs.py)
HEADLINE_FILES=(benches/test_logprobs_gpu.py benches/test_linear_gpu.py benches/test_steps_gpu.py)
FAILED=()

log() { echo "[gpu_session +$(($(date +%s) - START))s] $*" | tee -a "$LOG"; }

weight() {
    case $1 in
        build) echo 0 ;;
        check | tests-cuda) echo 2 ;;
        kernels) echo 3 ;;
        tests-triton) echo 6 ;;
        headline) echo 9 ;;
        *) echo "unknown part '$1': choose from ${ALL_PARTS[*]}" >&2; return 2 ;;
    esac
}

PARTS=("$@")
[ ${#PARTS[@]} -eq 0 ] && PARTS=("${ALL_PARTS[@]}")
for part in "${PARTS[@]}"; do weight "$part" >/dev/null || exit 2; done
wanted() { [[ " ${PARTS[*]} " == *" $1 "* ]]; }

# capped SIGNAL SECONDS COMMAND...: run it with its output in the log, sent SIGNAL at SECONDS
# (then killed 20 s later); a failed command is remembered for the exit status.
capped() {
    local signal=$1 cap=$2
    shift 2
    log "run (cap ${cap}s): $*"
    timeout -s "$signal" --kill-after=20 "$cap" "$@" 2>&1 | tee -a "$LOG"
    local status=${PIPESTATUS[0]}
    if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
        log "cut short at its cap of ${cap}s"
    else
        log "exit status $status"
        [ "$status" -ne 0 ] && FAILED+=("$* (exit $status)")
    fi
    return 0
}

# cap_of PART: its share of the time left, by weight over the parts still to run.
cap_of() {
    local part=$1 weights_left=0 later seen=0
    for later in "${PARTS[@]}"; do
        [ "$later" = "$part" ] && seen=1
        [ "$seen" -eq 1 ] && weights_left=$((weights_left + $(weight "$later")))
    done
    local left=$((BUDGET_S - ($(date +%s) - START) - REPORT_RESERVE_S))
    echo $((left * $(weight "$part") / (weights_left > 0 ? weights_left : 1)))
}

report() {
    rm -rf "$REPORT_DIR"
    [ -s "$PREFOPT_BENCH_RECORD" ] || return 0
    local junit=() file
    for file in "$OUT"/junit-*.xml; do
        [ -s "$file" ] && junit+=(--junit "$(basename "$file" .xml | sed 's/^junit-//')=$file")
    done
    timeout 60 python3 benches/report.py --no-plots --out "$REPORT_DIR" "${junit[@]}" "$PREFOPT_BENCH_RECORD" 2>&1 |
        tee -a "$LOG"
    [ "${PIPESTATUS[0]}" -ne 0 ] && FAILED+=("benches/report.py")
    for summary in "$REPORT_DIR"/*.json "$REPORT_DIR"/*.md; do
        [ -f "$summary" ] && cp "$summary" "$OUT/"
    done
}

pytest_flags=(-p no:cacheprovider -rfE)
timeout_flag() { python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout=$1"; }

log "parts: ${PARTS[*]}; budget ${BUDGET_S}s; output in $OUT"
if ! python3 -c "import prefopt.csrc" 2>/dev/null; then
    capped TERM 120 python3 -m pip install --quiet --no-deps --no-build-isolation --no-index -e .
fi
ON_GPU=0
python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null && ON_GPU=1
if [ "$ON_GPU" -eq 1 ]; then
    nvidia-smi 2>&1 | tee -a "$LOG"
else
    log "no GPU visible to PyTorch: a dry run (GPU parts skipped or run on tiny problems through the interpreter)"
fi

BUILD_PID=
if wanted build; then
    if [ "$ON_GPU" -eq 1 ]; then
        log "build: python -m prefopt build in the background (log in $BUILD_LOG, appended here when it ends)"
        rm -f "$BUILD_STATUS"
        (MAX_JOBS=${MAX_JOBS:-8} timeout -s TERM "$((BUDGET_S * 2 / 3))" python3 -m prefopt build >"$BUILD_LOG" 2>&1
         echo $? >"$BUILD_STATUS") &
        BUILD_PID=$!
    else
        log "build: skipped: no GPU (CI compiles csrc/ with nvcc, and against the CUDA build of torch 2.11)"
    fi
fi

# wait_for_build: join the background build and put its log in the session's.
wait_for_build() {
    [ -n "$BUILD_PID" ] || return 0
    log "waiting for the build"
    wait "$BUILD_PID"
    BUILD_PID=
    cat "$BUILD_LOG" >>"$LOG"
    tail -n 5 "$BUILD_LOG"
    local status
    status=$(cat "$BUILD_STATUS" 2>/dev/null || echo "unknown")
    log "build: exit status $status"
    [ "$status" = 0 ] || FAILED+=("python -m prefopt build (exit $status)")
}

if compgen -G ".peer-wheels/*.whl" >/dev/null; then
    # One wheel pip rejects (another Python's, say) stops a joint install: then one at a time,
    # so that the others still go in and the benchmarks name what is missing.
    install_peers=(python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade
                   --target /tmp/prefopt-peers)
    if ! "${install_peers[@]}" .peer-wheels/*.whl 2>&1 | tee -a "$LOG"; then
        for wheel in .peer-wheels/*.whl; do "${install_peers[@]}" "$wheel" 2>&1 | tee -a "$LOG"; done
    fi
    export PYTHONPATH=/tmp/prefopt-peers${PYTHONPATH:+:$PYTHONPATH}
else
    log "no .peer-wheels/: the peers run only where already installed (benches/fetch_peer_wheels.sh)"
fi
python3 -m prefopt info 2>&1 | tee -a "$LOG"

for part in "${PARTS[@]}"; do
    [ "$part" = build ] && continue
    case $part in tests-cuda | kernels | headline) wait_for_build ;; esac
    cap=$(cap_of "$part")
    if [ "$cap" -lt 10 ]; then
        log "part $part: not run, no time left"
        continue
    fi
    log "part $part: ${cap}s"
    case $part in
        check) capped TERM "$cap" python3 -m prefopt check --backend triton --backend torch ;;
        tests-triton | tests-cuda)
            backend=${part#tests-}
            if [ "$backend" = cuda ]; then
                capped TERM "$((cap / 4))" python3 -m prefopt check --backend cuda
                cap=$((cap - cap / 4))
            fi
            selection=(python3 -m pytest "${CORRECTNESS_FILES[@]}" -q "${pytest_flags[@]}" -k "$backend and not compile")
            if [ "$ON_GPU" -eq 1 ]; then
                workers=()
                python3 -c "import xdist" 2>/dev/null && workers=(-n "${TEST_WORKERS:-4}")
                capped INT "$cap" "${selection[@]}" "${workers[@]}" $(timeout_flag "$TEST_TIMEOUT_S") \
                    --junitxml="$OUT/junit-$part.xml"
            else
                log "$part: no GPU, so only its selection is collected (CI runs the whole suite on the CPU)"
                capped TERM "$cap" "${selection[@]}" -q --collect-only
            fi
            ;;
        kernels) capped TERM "$cap" python3 benches/kernel_bench.py --record "$PREFOPT_BENCH_RECORD" ;;
        headline)
            capped INT "$cap" python3 -m pytest "${HEADLINE_FILES[@]}" -m headline -q -s "${pytest_flags[@]}" \
                $(timeout_flag "$ROW_TIMEOUT_S")
            ;;
    esac
    report
done
wait_for_build

log "done in $(($(date +%s) - START))s; files in $OUT:"
ls -l "$OUT" | tee -a "$LOG"
for summary in "$OUT"/*.md; do
    [ -f "$summary" ] && head -c 8000 "$summary"
done
if [ ${#FAILED[@]} -gt 0 ]; then
    log "commands that failed:"
    printf '  %s\n' "${FAILED[@]}" | tee -a "$LOG"
    [ "$ON_GPU" -eq 0 ] && exit 1
fi
exit 0
