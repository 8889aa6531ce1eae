#!/usr/bin/env bash
# The GPU checks of the hot path and of the study workers, in one run of at most 9 minutes
# (BUDGET seconds), for a lent GPU machine:
#   device run:  bash benchmarks/gpu_check.sh        (timeout_s 600; results come back from $OUT)
# Uses the machine's own python3 (torch, triton, typer, rich, matplotlib, safetensors are
# there) with this checkout on PYTHONPATH: nothing is installed. The steps run in order of
# what they decide, each under its own limit and all under the budget: a step that runs
# out of time gets SIGINT (pytest then prints what ran; `normlab bench` writes the rows it
# measured, marked partial; host_overhead.py prints only at its end, so a cut there loses
# its table; per_example_overhead.py prints each row) and the next step starts. Every table
# goes to $OUT/results; on exit, whatever happened, the folder is archived beside the log
# and removed (at most 8 files come back from $OUT: the log and the archive; a machine
# killed before the trap runs leaves the folder's files, at most 7).
set -uo pipefail
OUT="${OUT:-runs/gpu_check}"
RES="$OUT/results"
mkdir -p "$RES"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
LOG="$OUT/gpu_check.log"
BUDGET="${BUDGET:-540}"  # seconds for all the steps; the archive takes a second after them
trap 'tar -czf "$OUT/gpu_check_results.tgz" -C "$OUT" results && rm -rf "$RES"; echo "done $(date -u +%T) after ${SECONDS}s" | tee -a "$LOG"' EXIT
step() {  # step SECONDS NAME COMMAND...: at most SECONDS, and never past the budget
  local limit=$1 name=$2; shift 2
  local left=$((BUDGET - SECONDS))
  ((left < limit)) && limit=$left
  if ((limit < 15)); then
    echo "=== $name: skipped, ${left}s of the budget left" | tee -a "$LOG"
    return
  fi
  echo "=== $name (limit ${limit}s) $(date -u +%T)" | tee -a "$LOG"
  local t0=$SECONDS rc
  # in the background and waited for: a signal to this script reaches the trap below
  # at once, which hands it on to the step (timeout passes it to the command)
  timeout -s INT -k 15 "$limit" "$@" >>"$LOG" 2>&1 &
  STEP=$!
  wait "$STEP"
  rc=$?
  STEP=
  echo "=== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$LOG"
}
STEP=
# stopped from outside (the machine's own limit, Ctrl-C): the running step is stopped too,
# and its output so far goes into the archive (the EXIT trap) rather than on after it
trap 'if [ -n "$STEP" ]; then kill -INT "$STEP" 2>/dev/null; wait "$STEP"; fi; echo "=== stopped from outside" >>"$LOG"; exit 130' INT TERM
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; "$PY" -c \
  "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"; } \
  >>"$LOG" 2>&1
# 1. host time per call, normlab vs torch (its own table on stdout)
step 50 host_overhead "$PY" benchmarks/host_overhead.py
# 2. study workers on the GPU: runs per GPU against one after another, a killed worker, Ctrl-C
step 60 gpu_study_workers "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/studies
# 3. the kernels' tests on the GPU (conftest turns the interpreter on only without CUDA):
#    the kernel files, in this order (files only: a directory among them would make pytest
#    collect in its own order; the Timer's one GPU test second, before the ~540 kernel
#    variants the rest compile cold, about 0.5 s each), then the rest of tests/ops (not the
#    sm90 compile test: it needs no GPU and runs in CI). -ra: an unexpected skip shows
KERNEL_TESTS="tests/ops/test_triton_gpu.py tests/bench/test_timer.py tests/ops/test_triton_norm.py
  tests/ops/test_triton_offset_cast.py tests/ops/test_triton_strided_rows.py tests/ops/test_adaln_ops.py
  tests/ops/test_triton_registration.py tests/ops/test_per_example.py tests/ops/test_checkpointing.py
  tests/ops/test_dropout.py"
# shellcheck disable=SC2086
step 110 gpu_kernel_tests "$PY" -m pytest -q -ra --durations=15 -p no:cacheprovider $KERNEL_TESTS
# shellcheck disable=SC2086
step 30 gpu_other_op_tests "$PY" -m pytest -q -ra -p no:cacheprovider tests/ops \
  --ignore=tests/ops/test_triton_sm90_compile.py \
  $(for f in $KERNEL_TESTS; do case $f in tests/ops/*) printf -- '--ignore=%s ' "$f";; esac; done)
# 4. a TransformerLM step, eager: pre/post x layernorm/rmsnorm, d_model 1024, 12 layers, 8 x 1024,
#    vocabulary 32000 (--quick: the committed table's configuration)
step 90 bench_e2e "$PY" -m normlab bench e2e --device cuda --dtype bf16 --quick --no-compile --out "$RES"
# 5. the kernels at hidden 1024, 4096 and 8192, eager (the auto threshold's evidence)
step 60 bench_kernels "$PY" -m normlab bench kernels --device cuda --dtype bf16 --hidden 1024,4096,8192 \
  --rows 16384,65536 --no-compile --out "$RES"
# 6. what per-example gradient norms cost
step 40 per_example "$PY" benchmarks/per_example_overhead.py
# 7. the compiled step against the same model with torch's norms, compiled alike (4 layers:
#    the ratio, not the size, is the target; one configuration, whose four cold compiles can
#    finish in what is left of the budget: a table is written per finished configuration)
step 100 bench_e2e_compiled "$PY" -m normlab bench e2e --device cuda --dtype bf16 --quick --compile \
  --n-layers 4 --configs pre-layernorm --out "$RES/compiled"
