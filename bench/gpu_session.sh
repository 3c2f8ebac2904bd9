#!/usr/bin/env bash
# Everything a lent GPU is for, in one call, from the repository root:
#
#     C3DZOO_COMMIT=<sha of the tree you send> bash bench/gpu_session.sh
#
# 1. prints the GPU (nvidia-smi) and the versions of python, torch, CUDA, cuDNN, triton;
# 2. installs c3dzoo offline, building the CUDA extension when csrc/ has one (falls back to a
#    plain install when that build fails, so the Python backends are still measured);
# 3. runs the parity tests, the GPU-only ones first (junit xml in $OUT);
# 4. runs the benchmarks into $OUT/<gpu-name>.json (plus a .partial.jsonl written as they go);
# 5. prints the headline table last (bench/report.py).
#
# Full logs stay in $OUT; the console gets only a few lines per step, so the table at the end
# survives the device tool's 12,000-character output tail. Copy $OUT/<gpu-name>.json into
# bench/results/ (see bench/results/README.md).
#
# Time: the whole script aims at C3DZOO_SESSION_BUDGET_S (default 510 s, under the tool's 600 s
# per command). The tests get at most C3DZOO_TESTS_TIMEOUT_S (default 180 s), with an untimed
# warm-up of the benchmarks' compile caches beside them (C3DZOO_BENCH_WARM=0 skips it); the
# benchmarks get what is left and skip, with the reason, whatever no longer fits (what the issues'
# targets compare runs first: see run_order in bench/_harness.py). max-autotune runs only with C3DZOO_BENCH_AUTOTUNE=1 and needs
# a session of its own (minutes per graph). Other knobs: see bench/_harness.py.
#
# The device copy of the tree has no .git, hence C3DZOO_COMMIT (typed literally: a $(git ...) in
# the command would run on the device, where there is no repository).

set -uo pipefail  # no -e: a failing step is reported and the next one still runs

OUT="${OUT:-/tmp/c3dzoo-gpu-session}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
BUDGET_S="${C3DZOO_SESSION_BUDGET_S:-510}"
TESTS_TIMEOUT_S="${C3DZOO_TESTS_TIMEOUT_S:-180}"
BENCH_MIN_S=240  # the tests never eat into this much of the benchmarks' time
status=0

section() { printf '\n== %s  [%ss]\n' "$1" "$SECONDS"; }
left() { echo $(( BUDGET_S - SECONDS )); }
short() { cut -c1-220; }  # one long line must not eat the output budget

# --------------------------------------------------------------------------- 1. GPU and versions
section "GPU and versions"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed (see $OUT/nvidia-smi.txt)"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,temperature.gpu,power.draw,power.limit \
    --format=csv 2>&1 | head -4 | short
GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
SLUG="$(printf '%s' "${GPU_NAME:-unknown-gpu}" | tr '[:upper:]' '[:lower:]' | sed -e 's/[^a-z0-9]\{1,\}/-/g' -e 's/^-//' -e 's/-$//')"
"$PY" - <<'EOF' 2>&1 | tail -4 | short
import importlib.metadata as md, platform, torch
def v(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "-"
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}), triton {v('triton')}, pytest-benchmark "
      f"{v('pytest-benchmark')}, nvidia-ml-py {v('nvidia-ml-py')}")
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")
EOF
echo "commit: ${C3DZOO_COMMIT:-not given (set C3DZOO_COMMIT=<sha>; recorded as unknown unless .git exists)}"

# --------------------------------------------------------------------------- 2. install
section "install (offline; CUDA extension when csrc/ has one)"
if C3DZOO_BUILD_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/install.log" 2>&1; then
    tail -1 "$OUT/install.log" | short
else
    echo "install with C3DZOO_BUILD_CUDA=1 failed; last lines of $OUT/install.log:"
    grep -iE "error|fatal" "$OUT/install.log" | tail -6 | short
    echo "retrying without the CUDA extension"
    if ! "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/install-nocuda.log" 2>&1; then
        tail -4 "$OUT/install-nocuda.log" | short
        status=1
    fi
fi
"$PY" -c "
import c3dzoo
for name, s in c3dzoo.backends().items():
    print(f'  {name}: ' + ('available' if s['available'] else 'unavailable: ' + s['reason']))
" 2>&1 | tail -4 | short

# --------------------------------------------------------------------------- 3. parity tests
# Most of a cold run's time is compiling: Triton JIT-compiles each kernel specialisation one at a
# time per process (~2 s each for sm_90, measured here on the CPU machine), and torch.compile takes
# minutes per model. So the tests run on several processes (pytest-xdist, in the GPU image), and
# beside them an untimed pass of the whole-model benchmarks fills the Triton and Inductor caches
# on disk, so the timed benchmarks after it find their kernels and graphs compiled.
section "parity tests (tests/, junit: $OUT/tests-*junit.xml) + bench cache warm-up beside them"
XDIST_TESTS=() XDIST_WARM=()
if "$PY" -c "import xdist" 2>/dev/null; then
    XDIST_TESTS=(-n "${C3DZOO_TEST_WORKERS:-6}")
    XDIST_WARM=(-n 4)
else
    echo "pytest-xdist is missing: tests on one process, no cache warm-up"
fi
tests_s=$(( $(left) - BENCH_MIN_S ))
(( tests_s > TESTS_TIMEOUT_S )) && tests_s=$TESTS_TIMEOUT_S
warm_pid=
if (( ${#XDIST_WARM[@]} && tests_s >= 30 )) && [[ "${C3DZOO_BENCH_WARM:-1}" != 0 ]]; then
    # one untimed call per case (--benchmark-disable) of the torch.compile and the triton-autotune
    # contestants on the whole models (autotuning compiles every candidate tile config, the default
    # ones included, so the other fused contestants and the layers, at the models' shapes, find
    # their kernels too), 4 processes (~one model and contestant each), no budget; killed at the
    # tests' deadline, keeping what it compiled by then
    rm -f "$OUT/bench-warm-first-calls.jsonl"
    C3DZOO_BENCH_FIRST_CALLS_JSONL="$OUT/bench-warm-first-calls.jsonl" \
        timeout -k 5 "$tests_s" "$PY" -m pytest bench/ -q -rs -p no:cacheprovider "${XDIST_WARM[@]}" \
        --benchmark-disable -k "test_model and (compile- or autotune) and not maxat" \
        > "$OUT/bench-warm.log" 2>&1 &
    warm_pid=$!
fi
if (( tests_s < 30 )); then
    echo "skipped: no time left for the tests (${tests_s}s)"
else
    # the GPU-only tests first (real layer sizes, whole models, bf16, CUDA graphs): they are what
    # a CPU machine cannot check; the rest of the suite (compiled kernels on small shapes) after them
    start=$SECONDS
    timeout -k 10 "$tests_s" "$PY" -m pytest tests -q -rs -p no:cacheprovider -m gpu \
        ${XDIST_TESTS[@]+"${XDIST_TESTS[@]}"} \
        --junitxml="$OUT/tests-gpu-junit.xml" > "$OUT/tests-gpu.log" 2>&1
    rc=$?
    (( rc == 124 || rc == 137 )) && echo "TIMED OUT after ${tests_s}s (C3DZOO_TESTS_TIMEOUT_S)"
    grep -E "^(FAILED|ERROR)" "$OUT/tests-gpu.log" | head -8 | short
    grep -E "^SKIPPED" "$OUT/tests-gpu.log" | head -5 | short
    tail -1 "$OUT/tests-gpu.log" | short
    (( rc != 0 )) && status=1
    rest_s=$(( tests_s - (SECONDS - start) ))
    if (( rest_s < 30 )); then
        echo "the other tests: skipped, no time left (${rest_s}s)"
    else
        timeout -k 10 "$rest_s" "$PY" -m pytest tests -q -rs -p no:cacheprovider -m "not gpu" \
            ${XDIST_TESTS[@]+"${XDIST_TESTS[@]}"} \
            --junitxml="$OUT/tests-junit.xml" > "$OUT/tests.log" 2>&1
        rc=$?
        (( rc == 124 || rc == 137 )) && echo "the other tests: TIMED OUT after ${rest_s}s (partial: $OUT/tests.log)"
        grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -4 | short
        tail -1 "$OUT/tests.log" | short
        (( rc != 0 && rc != 124 && rc != 137 )) && status=1
    fi
fi
if [[ -n "$warm_pid" ]]; then
    wait "$warm_pid"
    rc=$?
    (( rc == 124 || rc == 137 )) && echo "bench warm-up: stopped at the tests' deadline (caches partly filled)"
    grep -E "^(FAILED|ERROR)" "$OUT/bench-warm.log" | head -4 | short
    echo "bench warm-up: $(tail -1 "$OUT/bench-warm.log" | short)"
    # its cold first calls (compiling beside the tests: upper bounds)
    "$PY" - "$OUT/bench-warm-first-calls.jsonl" <<'EOF' 2>/dev/null | head -12 | short
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"  cold first call: {r['group']}, {r['contestant']}: {r['first_call_s']:.1f} s")
EOF
    # recorded with the results: compile times below are warm-cache times (only if it finished)
    (( rc == 0 )) && export C3DZOO_BENCH_PREWARMED=1
fi

# --------------------------------------------------------------------------- 4. benchmarks
section "benchmarks (bench/, results: $OUT/$SLUG.json)"
bench_s=$(( $(left) - 20 ))  # the report needs a few seconds
(( bench_s < 60 )) && bench_s=60
JSON="$OUT/$SLUG.json"
PARTIAL="$OUT/$SLUG.partial.jsonl"
rm -f "$JSON" "$PARTIAL"
# the harness stops starting benchmarks when its budget is spent (pytest itself starts ~10 s
# earlier); the hard timeout, 40 s later, only catches one benchmark that overruns its estimate
# (its results up to then are in the .partial.jsonl)
C3DZOO_BENCH_BUDGET_S=$(( bench_s - 15 )) C3DZOO_BENCH_JSONL="$PARTIAL" \
    timeout -k 10 $(( bench_s + 40 )) "$PY" -m pytest bench/ --benchmark-only -q -rs -p no:cacheprovider \
    --benchmark-quiet --benchmark-json="$JSON" > "$OUT/bench.log" 2>&1
rc=$?
(( rc == 124 || rc == 137 )) && echo "TIMED OUT: pytest was killed; the table below comes from $PARTIAL"
grep -E "^(FAILED|ERROR)" "$OUT/bench.log" | head -6 | short
grep -E "^SKIPPED" "$OUT/bench.log" | head -8 | short  # [count] and reason, one line per reason
tail -1 "$OUT/bench.log" | short
(( rc != 0 )) && status=1

# --------------------------------------------------------------------------- 5. the table, last
section "results ($SLUG)"
if [[ -s "$JSON" ]]; then
    "$PY" bench/report.py "$JSON" | cut -c1-400
elif [[ -s "$PARTIAL" ]]; then
    "$PY" bench/report.py "$PARTIAL" | cut -c1-400
else
    echo "no results; last lines of $OUT/bench.log:"
    tail -15 "$OUT/bench.log" | short
fi
echo
echo "files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
echo "done in ${SECONDS}s, status $status"
exit $status
