#!/usr/bin/env bash
# One call of the lent GPU machine (device tool): `bash benchmarks/gpu_session.sh tests` runs the test suite on
# CUDA (the kernels for real): first the `gpu`-marked tests, then all the others, so that nothing runs twice;
# `bash benchmarks/gpu_session.sh bench` runs the benchmark report. Each mode fits one 10-minute call. Both first
# write the static sm_90a codegen report (`python -m benchmarks.codegen`, every kernel in every autotune config)
# to $OUT/codegen, so that the autotuner's picks on the device can be read against it.
# Logs, JUnit reports and results go under $OUT when set.
#
# The machine has no package registry: the project runs from the tree (PYTHONPATH=.), tests whose peer packages
# are missing there (ema-pytorch) skip themselves, and nothing beyond the project's own dependencies is assumed:
# the time limits are coreutils `timeout` (SIGINT first, so pytest still prints what ran), not pytest-timeout.
#
# The exit status is 0 only when every pytest run passed and ran at least one test. A run that collects
# nothing, only skips (no CUDA, so every gpu test skipped), errors, fails or times out exits non-zero, and the
# last lines say which run and why.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/triton-ema-gpu}"
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
# Seconds per pytest run; with the codegen report (90 s) the defaults leave a minute of a 600 s call for start-up
# and the copy back. The gpu run compiles every autotune config of every kernel (the config sweeps), so it gets the most.
GPU_TESTS_S="${GPU_TESTS_S:-270}"
OTHER_TESTS_S="${OTHER_TESTS_S:-200}"
BENCH_S="${BENCH_S:-450}"

if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
else
    echo "nvidia-smi: not found" | tee "$out/device.txt"
fi
python3 -c "
import torch, triton
print('torch', torch.__version__, 'triton', triton.__version__, 'cuda available', torch.cuda.is_available())
if not torch.cuda.is_available():
    print('WARNING: torch sees no CUDA device: this is not a GPU run, and the gpu tests will all skip')
" 2>&1 | tee -a "$out/device.txt"

failed=()
summaries=()

# The static codegen report (no GPU needed; the compiles are cached by Triton). Its failure is reported, not fatal.
CODEGEN_S="${CODEGEN_S:-90}"
echo "== codegen: python -m benchmarks.codegen --out $out/codegen (limit ${CODEGEN_S}s)"
if timeout --signal=INT --kill-after=30 "$CODEGEN_S" python3 -m benchmarks.codegen --out "$out/codegen" --jobs "$(nproc)" \
    >"$out/codegen.log" 2>&1; then
    summaries+=("codegen: OK ($out/codegen/report.json)")
else
    summaries+=("codegen: FAILED (see $out/codegen.log)")
fi

# run_tests NAME SECONDS PYTEST_ARGS...: one pytest run under a time limit, judged from its exit status and its
# JUnit report.
run_tests() {
    local name=$1 limit=$2
    shift 2
    local xml="$out/tests-$name.xml"
    rm -f "$xml"
    echo "== tests-$name: pytest $* (limit ${limit}s)"
    timeout --signal=INT --kill-after=30 "$limit" \
        python3 -m pytest tests -q -p no:cacheprovider -o faulthandler_timeout=120 --junitxml="$xml" "$@" 2>&1 |
        tee "$out/tests-$name.log"
    local rc=${PIPESTATUS[0]}
    local verdict
    verdict=$(python3 - "$xml" "$rc" "$limit" <<'EOF'
import sys
import xml.etree.ElementTree as ET

path, rc, limit = sys.argv[1], int(sys.argv[2]), sys.argv[3]
reasons = {
    1: "tests failed",
    2: "interrupted, or collection errors",
    3: "pytest internal error",
    4: "pytest usage error (an unknown option?)",
    5: "pytest collected no tests",
    124: f"timed out after {limit}s",
    137: f"killed after {limit}s (no exit on SIGINT)",
}
try:
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
except (OSError, ET.ParseError, AttributeError):
    counts = None
if counts is None:
    summary = "no JUnit report"
else:
    ran = counts["tests"] - counts["skipped"]
    summary = (
        f"{counts['tests']} reported, {ran} ran, {counts['failures']} failed, {counts['errors']} errors, "
        f"{counts['skipped']} skipped"
    )
ok = rc == 0 and counts is not None and counts["tests"] - counts["skipped"] > 0
if ok:
    print(f"OK: {summary}")
elif rc == 0:
    print(f"FAILED: {summary}: no test ran")
else:
    print(f"FAILED: exit status {rc}, {reasons.get(rc, 'unknown')}: {summary}")
EOF
)
    echo "== tests-$name: $verdict"
    summaries+=("tests-$name: $verdict")
    [[ $verdict == OK:* ]] || failed+=("tests-$name")
}

case "${1:-tests}" in
tests)
    run_tests gpu "$GPU_TESTS_S" -m gpu
    run_tests other "$OTHER_TESTS_S" -m "not gpu"
    ;;
bench)
    timeout --signal=INT --kill-after=30 "$BENCH_S" python3 -m benchmarks.report 2>&1 | tee "$out/bench.log"
    rc=${PIPESTATUS[0]}
    cp -r benchmarks/results "$out/"
    if [[ $rc -eq 0 ]]; then
        summaries+=("bench: OK")
    else
        summaries+=("bench: FAILED: exit status $rc$([[ $rc -eq 124 ]] && echo ", timed out after ${BENCH_S}s")")
        failed+=(bench)
    fi
    ;;
*)
    echo "usage: $0 tests|bench" >&2
    exit 2
    ;;
esac

echo "== summary (logs in $out)"
printf '   %s\n' "${summaries[@]}" | tee "$out/summary.txt"
if ((${#failed[@]})); then
    echo "== FAILED: ${failed[*]}" | tee -a "$out/summary.txt"
    exit 1
fi
echo "== all passed" | tee -a "$out/summary.txt"
