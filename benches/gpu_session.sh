#!/usr/bin/env bash
# One GPU session of prefopt in one device call: build, GPU correctness, benchmarks, report.
#
#   bash benches/gpu_session.sh [PART ...]        (repository root of a CUDA machine)
#
# PARTs run in the order given (default: build tests linear logits steps):
#   build   python -m prefopt build: compile the CUDA C++ extension (csrc/)
#   tests   python -m prefopt check, then pytest tests: on a GPU tests/conftest.py runs every
#           backend (triton, cuda, torch) on CUDA tensors, gpu-marked tests included
#           (tests/test_bench.py is left out: it runs the CPU main job, which CI runs)
#   linear  pytest benches/test_linear_gpu.py   the fused linear path against the peers (issue 5)
#   logits  pytest benches/test_logprobs_gpu.py the logits path
#   steps   pytest benches/test_steps_gpu.py    a DPO step and a KTO step
# Before any part: an offline editable install of prefopt (prefopt.kernels maps to kernels/, so a
# bare checkout does not import) and, when .peer-wheels/ is there, the peers' wheels (see
# benches/fetch_peer_wheels.sh; carry it with the call) into /tmp/prefopt-peers on PYTHONPATH.
#
# Time: a device command runs at most 10 minutes, so the session gets BUDGET_S seconds (default
# 560) and each part, as it starts, a share of what is left by weight (build 2, tests 3, linear 4,
# logits 2, steps 1), enforced by `timeout`; what a part leaves unused goes to the next ones.
# A benchmark row is also capped at ROW_TIMEOUT_S (default 240) where pytest-timeout is installed.
# Rows are appended to records.jsonl as each ends (PREFOPT_BENCH_RECORD, benches/conftest.py) and
# the report is rewritten after every part, so a session cut short keeps what it measured.
# Sessions needing more than one call: run the parts in separate calls and merge their
# records.jsonl afterwards on any machine with benches/report.py.
#
# Everything lands in $OUT (./gpu-session-out when OUT is unset), 6 files, as the device tool
# returns at most 8: session.log (all output), records.jsonl (raw rows), junit-tests.xml (the
# correctness suite), and from benches/report.py <date>-<gpu>.json, <date>-<gpu>.md and
# <date>-<gpu>-plots.tar.gz (unpack into benches/results/). The summary is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-$PWD/gpu-session-out}
mkdir -p "$OUT"
LOG=$OUT/session.log
START=$(date +%s)
BUDGET_S=${BUDGET_S:-560}
ROW_TIMEOUT_S=${ROW_TIMEOUT_S:-240}
REPORT_RESERVE_S=30
PARTS=("$@")
[ ${#PARTS[@]} -eq 0 ] && PARTS=(build tests linear logits steps)
export PYTHONUNBUFFERED=1 PIP_ROOT_USER_ACTION=ignore
export PREFOPT_BENCH_RECORD=$OUT/records.jsonl
export PREFOPT_CACHE_DIR=${PREFOPT_CACHE_DIR:-/tmp/prefopt-cache}
REPORT_DIR=/tmp/prefopt-report

log() { echo "[gpu_session +$(($(date +%s) - START))s] $*" | tee -a "$LOG"; }

weight() {
    case $1 in
        steps) echo 1 ;;
        build | logits) echo 2 ;;
        tests) echo 3 ;;
        linear) echo 4 ;;
        *) echo "unknown part '$1': choose from build tests linear logits steps" >&2; exit 2 ;;
    esac
}
for part in "${PARTS[@]}"; do weight "$part" >/dev/null || exit 2; done

# capped SECONDS COMMAND...: run it with its output in the log, killed at SECONDS.
capped() {
    local cap=$1
    shift
    log "run (cap ${cap}s): $*"
    timeout --kill-after=20 "$cap" "$@" 2>&1 | tee -a "$LOG"
    local status=${PIPESTATUS[0]}
    if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
        log "cut short at its cap of ${cap}s"
    else
        log "exit status $status"
    fi
}

report() {
    rm -rf "$REPORT_DIR"
    local junit=()
    [ -s "$OUT/junit-tests.xml" ] && junit=(--junit "tests=$OUT/junit-tests.xml")
    [ -s "$PREFOPT_BENCH_RECORD" ] || return 0
    timeout 120 python3 benches/report.py --out "$REPORT_DIR" "${junit[@]}" "$PREFOPT_BENCH_RECORD" 2>&1 | tee -a "$LOG"
    for summary in "$REPORT_DIR"/*.json "$REPORT_DIR"/*.md; do
        [ -f "$summary" ] && cp "$summary" "$OUT/"
    done
    for plots in "$REPORT_DIR"/*/; do
        compgen -G "$plots*.png" >/dev/null &&
            tar -czf "$OUT/$(basename "$plots")-plots.tar.gz" -C "$REPORT_DIR" "$(basename "$plots")"
    done
}

pytest_flags=(-p no:cacheprovider -rfE)
python3 -c "import pytest_timeout" 2>/dev/null && pytest_flags+=(--timeout "$ROW_TIMEOUT_S")

log "parts: ${PARTS[*]}; budget ${BUDGET_S}s; output in $OUT"
nvidia-smi 2>&1 | tee -a "$LOG"
if ! python3 -c "import prefopt.kernels" 2>/dev/null; then
    capped 180 python3 -m pip install --quiet --no-deps --no-build-isolation --no-index -e .
fi
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

for index in "${!PARTS[@]}"; do
    part=${PARTS[$index]}
    weights_left=0
    for later in "${PARTS[@]:$index}"; do weights_left=$((weights_left + $(weight "$later"))); done
    left=$((BUDGET_S - ($(date +%s) - START) - REPORT_RESERVE_S))
    cap=$((left * $(weight "$part") / weights_left))
    if [ "$cap" -lt 10 ]; then
        log "no time left for part $part"
        continue
    fi
    log "part $part: ${cap}s"
    case $part in
        build) capped "$cap" python3 -m prefopt build ;;
        tests)
            capped $((cap / 6)) python3 -m prefopt check
            workers=()
            python3 -c "import xdist" 2>/dev/null && workers=(-n "${TEST_WORKERS:-4}")
            capped $((cap - cap / 6)) python3 -m pytest tests -q "${pytest_flags[@]}" "${workers[@]}" \
                --ignore=tests/test_bench.py --junitxml="$OUT/junit-tests.xml"
            ;;
        linear) capped "$cap" python3 -m pytest benches/test_linear_gpu.py -q -s "${pytest_flags[@]}" ;;
        logits) capped "$cap" python3 -m pytest benches/test_logprobs_gpu.py -q -s "${pytest_flags[@]}" ;;
        steps) capped "$cap" python3 -m pytest benches/test_steps_gpu.py -q -s "${pytest_flags[@]}" ;;
    esac
    report
done

log "done; files in $OUT:"
ls -l "$OUT" | tee -a "$LOG"
for summary in "$OUT"/*.md; do
    [ -f "$summary" ] && head -c 10000 "$summary"
done
exit 0
