#!/usr/bin/env bash
# GPU check: build the native libraries in place, run the kernel tests with real compiled Triton and
# the CUDA selector, then the rest of tests/, run the GPU benchmarks, and print a short table. Needs a
# CUDA GPU, the torch and triton already installed, CMake and nvcc; no network. Budget: under 10
# minutes on an H100.
#
#   bash benchmarks/gpu_check.sh            # results under ${OUT:-gpu_check_out}/
#   AQL_CUDA_ARCHS=90 bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-gpu_check_out}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
status=0
step() { printf '\n=== %s (%ss) ===\n' "$1" "$SECONDS"; }

step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || { echo "no GPU"; exit 1; }
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

step "build (CMake, CUDA on; then aql_kernels._C against this machine's torch)"
# Only the card's own architecture by default: a quicker build than the 80;90 release default.
ARCH="${AQL_CUDA_ARCHS:-$("$PY" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')")}"
GEN=(); command -v ninja >/dev/null && GEN=(-G Ninja)
cmake -S . -B build/gpu_check "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DAQL_BUILD_CUDA=ON \
  -DAQL_CUDA_ARCHS="$ARCH" >"$OUT_DIR/cmake.log" 2>&1 && cmake --build build/gpu_check --parallel >>"$OUT_DIR/cmake.log" 2>&1
if [ $? -ne 0 ]; then tail -40 "$OUT_DIR/cmake.log"; echo "BUILD FAILED"; exit 1; fi
# The torch C++ extension (the small-call CPU route) is compiled against the torch installed here; it is
# optional: a failure is reported by backends() below and the ops take their Python route.
AQL_ONLY_TORCH_EXTENSION=1 "$PY" setup.py -q build_ext --inplace >"$OUT_DIR/extension.log" 2>&1 || tail -20 "$OUT_DIR/extension.log"
"$PY" -c "import aql_kernels; [print(f'{k:14s} {v.available!s:5s} {v.detail}') for k, v in aql_kernels.backends().items()]"

step "tests (compiled Triton, CUDA selector)"
# The selector first: its CUDA kernels are the code that only this machine can run.
for suite in tests/kernels/test_select.py "tests/kernels/test_scores.py tests/kernels/test_fisher.py"; do
  name=$(basename ${suite%% *} .py)
  timeout "${AQL_TEST_TIMEOUT:-200}" "$PY" -m pytest $suite -q -p no:cacheprovider --junitxml="$OUT_DIR/$name.xml" \
    >"$OUT_DIR/$name.log" 2>&1
  rc=$?
  tail -15 "$OUT_DIR/$name.log"
  [ $rc -eq 0 ] || { status=1; echo "FAILED: $suite (exit $rc)"; }
done

step "the rest of tests/ (trainer, strategies, estimators, integrations on the GPU machine)"
timeout "${AQL_REST_TIMEOUT:-300}" "$PY" -m pytest tests -q -p no:cacheprovider --ignore=tests/kernels/test_select.py \
  --ignore=tests/kernels/test_scores.py --ignore=tests/kernels/test_fisher.py --junitxml="$OUT_DIR/rest.xml" \
  >"$OUT_DIR/rest.log" 2>&1
rc=$?
tail -8 "$OUT_DIR/rest.log"
[ $rc -eq 0 ] || { status=1; echo "FAILED: the rest of tests/ (exit $rc)"; }

step "GPU benchmarks"
# torch.compile peers are left out here: their compile time would not fit the budget of this check.
timeout "${AQL_BENCH_TIMEOUT:-180}" "$PY" -m pytest benchmarks -q -p no:cacheprovider --benchmark-only \
  -k "cuda and not compile" --benchmark-json="$OUT_DIR/bench.json" --benchmark-columns=median,iqr,rounds \
  >"$OUT_DIR/bench.log" 2>&1 || status=1
grep -E "passed|failed|error" "$OUT_DIR/bench.log" | tail -3

step "summary"
[ -f "$OUT_DIR/bench.json" ] && "$PY" benchmarks/summarize.py "$OUT_DIR/bench.json" | tee "$OUT_DIR/summary.txt"
echo "gpu_check finished in ${SECONDS}s with status $status"
exit $status
