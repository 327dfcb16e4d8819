#!/usr/bin/env bash
# Run the four benchmarks once on CUDA and write every results file into one directory.
#
# Usage, from the repository root (no install needed):
#   bash benchmarks/run_gpu.sh OUTDIR            # e.g. bash benchmarks/run_gpu.sh "$OUT/bench"
# Writes OUTDIR/<benchmark>_cuda.md (Markdown results, with machine, versions and the
# command) and OUTDIR/<benchmark>_cuda.log (full stdout/stderr) for each benchmark, and
# OUTDIR/run_gpu.log. A failing or timed-out benchmark is reported and the next one runs;
# results files are written section by section, so a killed run keeps what it finished.
# Environment: PYTHON (default python3), BENCH_TIMEOUT (seconds per benchmark, default 150).
# Expected on one H100: about 2-3 minutes in total.
set -u
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:?usage: bash benchmarks/run_gpu.sh OUTDIR}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$root"
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
py="${PYTHON:-python3}"
limit="${BENCH_TIMEOUT:-150}"

run() {
    local name="$1"
    shift
    local start=$SECONDS
    echo "=== $name: $py $*"
    timeout --kill-after=10 "$limit" "$py" "$@" --device cuda --out "$out/$name.md" \
        >"$out/$name.log" 2>&1
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "FAILED: $name (exit $rc, see $out/$name.log)"
        tail -n 5 "$out/$name.log"
    fi
    echo "... $name took $((SECONDS - start)) s"
}

{
    echo "run_gpu.sh at $(date -u '+%Y-%m-%d %H:%M UTC'), git $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    "$py" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA DEVICE')" || echo "FAILED: torch"
    total=$SECONDS
    run mtadam_step_cuda benchmarks/bench_mtadam_step.py --repeats 30 --warmup 5 || echo FAILED
    run term_grads_cuda benchmarks/bench_term_grads.py --models cnn,mlp,encoder --repeats 20 || echo FAILED
    run scaling_cuda benchmarks/bench_scaling.py --terms 1,2,4,10,32 --models cnn,encoder \
        --repeats 10 --encoder-repeats 10 || echo FAILED
    run balancers_cuda benchmarks/bench_balancers.py --terms 2,10,40 --repeats 20 || echo FAILED
    echo "all benchmarks took $((SECONDS - total)) s; results in $out"
} 2>&1 | tee "$out/run_gpu.log"
