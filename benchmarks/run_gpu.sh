#!/usr/bin/env bash
# The GPU session of issue 21 in one call: the CUDA tests, then the quiet MTAdam step
# benchmark (eager and CUDA-graph MTAdam and Adam, the fused update), then the balancer
# benchmark at K = 2, 10, 40, one after the other, with nothing else on the machine.
#
# Usage, from the repository root (no install needed; python3 must hold torch with CUDA):
#   bash benchmarks/run_gpu.sh OUTDIR                   # e.g. bash benchmarks/run_gpu.sh "$OUT"
#   GIT_REV=$(git rev-parse --short HEAD) bash ...      # records the commit where .git is absent
# Writes six files into OUTDIR:
#   run_gpu.log              machine line (GPU, driver, torch, CUDA, Triton), GPU processes and
#                            load at start and end, every step's command, status and wall time
#   tests_cuda.log           pytest of tests/test_mtadam.py, test_engine.py, test_backward.py
#                            (-x), then tests/test_fused.py, with LOSSBALANCE_TEST_DEVICE=cuda
#   mtadam_step_cuda.md/.log bench_mtadam_step.py --repeats 30 --warmup 5
#   balancers_cuda.md/.log   bench_balancers.py --terms 2,10,40 --repeats 20
# Each step has its own time limit (SIGINT first, so pytest prints what ran; SIGKILL 15 s
# later), all of them within RUN_GPU_BUDGET seconds (default 470, under 8 minutes); a failed
# or timed-out step is reported and the next one runs. The benchmarks rewrite their results
# file after every section, so a killed one keeps what it finished.
# Estimates on one H100/H200 (from the 2026-11-23 H100 run, launch-bound, under load then):
# tests 45-90 s (31 s on the 2-core CPU), test_fused 30-90 s (cold Triton compiles), step
# benchmark 60-150 s (about 60 s before, plus 10-40 s per fused compilation), balancers
# 30-60 s (Gramian-only at K = 40: 1 s a run, 22 runs).
# Dry run on a CPU (every step, tiny sizes):
#   RUN_GPU_DEVICE=cpu RUN_GPU_QUICK=1 RUN_GPU_TESTS="-k one_term" bash benchmarks/run_gpu.sh DIR
# Once MTAdam takes fused (benchmarks/fused_integration.md applied), every MTAdam of the test
# suite compiles its update at its first CUDA step (a few seconds per model), so the tests
# get more of the budget: limits 200 / 60 / 150 / 60 s instead of 120 / 90 / 170 / 80 s.
# Environment: PYTHON (default python3), RUN_GPU_DEVICE (cuda), RUN_GPU_BUDGET (470),
# RUN_GPU_QUICK (0; 1: --quick and one repetition), RUN_GPU_TESTS (extra pytest arguments),
# TIMEOUT_TESTS, TIMEOUT_FUSED, TIMEOUT_STEP, TIMEOUT_BALANCERS (the limits above).
set -u
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:?usage: bash benchmarks/run_gpu.sh OUTDIR}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$root"
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
device="${RUN_GPU_DEVICE:-cuda}"
budget="${RUN_GPU_BUDGET:-470}"
quick=()
repeats=30
warmup=5
balancer_repeats=20
if [ "${RUN_GPU_QUICK:-0}" = 1 ]; then
    quick=(--quick)
    repeats=1
    warmup=0
    balancer_repeats=1
fi
read -r -a test_args <<<"${RUN_GPU_TESTS:-}"
if grep -q "fused: bool | None = None" src/lossbalance/optim/_mtadam.py; then
    integrated="MTAdam(fused=None) integrated"
    limits=(200 60 150 60)
else
    integrated="MTAdam(fused=...) not integrated: the fused update is timed on its own"
    limits=(120 90 170 80)
fi
log="$out/run_gpu.log"
tests_log="$out/tests_$device.log"
: >"$log"
summary=()

say() {
    echo "$*" | tee -a "$log"
}

quiet_check() {
    say "load average ($1): $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo n/a)"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=name,driver_version,memory.used,utilization.gpu,clocks.sm,temperature.gpu \
            --format=csv,noheader 2>&1 | sed "s/^/gpu ($1): /" | tee -a "$log"
        local apps
        apps="$(nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader 2>&1)"
        say "GPU processes ($1): ${apps:-none}"
    fi
}

# step NAME LIMIT LOGFILE COMMAND...: run COMMAND under min(LIMIT, what is left of the budget)
step() {
    local name="$1" limit="$2" logfile="$3"
    shift 3
    local left=$((budget - SECONDS))
    if [ "$left" -lt "$limit" ]; then
        limit="$left"
    fi
    if [ "$limit" -lt 15 ]; then
        say "=== $name: SKIPPED (${left} s of the ${budget} s budget left)"
        summary+=("$name: skipped (budget)")
        return 0
    fi
    say "=== $name (limit ${limit} s): $*"
    echo "=== $name: $*" >>"$logfile"
    local start=$SECONDS
    timeout -s INT -k 15 "$limit" "$@" >>"$logfile" 2>&1
    local rc=$?
    local took=$((SECONDS - start)) status
    case "$rc" in
    0) status="ok" ;;
    124 | 137) status="TIMED OUT" ;;
    *) status="FAILED (exit $rc)" ;;
    esac
    say "... $name: $status after ${took} s (log: $(basename "$logfile"))"
    if [ "$rc" -ne 0 ]; then
        tail -n 8 "$logfile" | sed 's/^/    /' | tee -a "$log"
    fi
    summary+=("$name: $status, ${took} s")
}

say "run_gpu.sh (issue 21) at $(date -u '+%Y-%m-%d %H:%M:%S UTC'), git ${GIT_REV:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}, device $device, budget ${budget} s; $integrated"
"$py" - <<'EOF' 2>&1 | tee -a "$log"
import platform

import torch

try:
    import triton

    triton_version = triton.__version__
except ImportError:
    triton_version = "not installed"
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print(
    f"machine: {gpu}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
    f"Triton {triton_version}, python {platform.python_version()}, "
    f"{__import__('os').cpu_count()} CPUs"
)
EOF
if [ "$device" = cuda ] && ! "$py" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    say "FAILED: torch sees no CUDA device; nothing else runs"
    exit 1
fi
quiet_check start

timeout_plugin=()
if "$py" -c "import pytest_timeout" 2>/dev/null; then
    timeout_plugin=(--timeout 60) # one hung test (a graph capture) must not eat the step
fi
step tests "${TIMEOUT_TESTS:-${limits[0]}}" "$tests_log" \
    env LOSSBALANCE_TEST_DEVICE="$device" "$py" -m pytest -q -x -p no:cacheprovider \
    --durations 15 "${timeout_plugin[@]}" \
    tests/test_mtadam.py tests/test_engine.py tests/test_backward.py "${test_args[@]}"
step test_fused "${TIMEOUT_FUSED:-${limits[1]}}" "$tests_log" \
    env LOSSBALANCE_TEST_DEVICE="$device" "$py" -m pytest -q -p no:cacheprovider \
    --durations 10 "${timeout_plugin[@]}" tests/test_fused.py
quiet_check "before the benchmarks"
step mtadam_step "${TIMEOUT_STEP:-${limits[2]}}" "$out/mtadam_step_$device.log" \
    "$py" benchmarks/bench_mtadam_step.py --device "$device" --repeats "$repeats" \
    --warmup "$warmup" "${quick[@]}" --out "$out/mtadam_step_$device.md"
step balancers "${TIMEOUT_BALANCERS:-${limits[3]}}" "$out/balancers_$device.log" \
    "$py" benchmarks/bench_balancers.py --device "$device" --terms 2,10,40 \
    --repeats "$balancer_repeats" "${quick[@]}" --out "$out/balancers_$device.md"
quiet_check end

say ""
say "summary ($SECONDS s in all):"
for line in "${summary[@]}"; do
    say "  $line"
done
if [ -f "$out/mtadam_step_$device.md" ]; then
    say "headline rows of mtadam_step_$device.md:"
    grep -E "^\| (Adam \(summed|lossbalance\.MTAdam|functional\.mtadam|fused_update|update_reference)|^Issue-|^Fused element-wise|failed\*\*" \
        "$out/mtadam_step_$device.md" | tee -a "$log"
fi
if [ -f "$out/balancers_$device.md" ]; then
    grep -E "^Time at K|failed\*\*" "$out/balancers_$device.md" | tee -a "$log"
fi
