#!/usr/bin/env bash
# The GPU checks of the hot path (and of the study workers, last), in one run of about 8 minutes, for a lent GPU machine:
#   device run:  bash benchmarks/gpu_check.sh        (timeout_s 600; results come back from $OUT)
# Uses the machine's own python3 (torch, triton, typer, rich, matplotlib, safetensors are
# there) with this checkout on PYTHONPATH: nothing is installed. Each step has its own time
# limit, so one slow step cannot eat the others; every table goes to $OUT/results and the
# whole folder comes back as one archive beside the log.
set -uo pipefail
OUT="${OUT:-runs/gpu_check}"
RES="$OUT/results"
mkdir -p "$RES"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
LOG="$OUT/gpu_check.log"
step() {  # step SECONDS NAME COMMAND...
  local limit=$1 name=$2; shift 2
  echo "=== $name (limit ${limit}s) $(date -u +%T)" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" >>"$LOG" 2>&1
  echo "=== $name: exit $? after $((SECONDS - t0))s" | tee -a "$LOG"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; "$PY" -c \
  "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"; } \
  >>"$LOG" 2>&1
# 1. host time per call, normlab vs torch (its own table on stdout)
step 75 host_overhead "$PY" benchmarks/host_overhead.py
# 2. a TransformerLM step: pre/post x layernorm/rmsnorm, d_model 1024, 12 layers, 8 x 1024, eager and compiled
step 200 bench_e2e "$PY" -m normlab bench e2e --device cuda --dtype bf16 --compile \
  --d-model 1024 --n-layers 12 --tokens 1024 --batch 8 --out "$RES"
# 3. the kernels at hidden 1024, 4096 and 8192
step 120 bench_kernels "$PY" -m normlab bench kernels --device cuda --dtype bf16 --hidden 1024,4096,8192 \
  --rows 16384,65536 --out "$RES"
# 4. what per-example gradient norms cost
step 60 per_example "$PY" benchmarks/per_example_overhead.py
# 5. the GPU tests
step 100 gpu_tests "$PY" -m pytest -q -x -p no:cacheprovider -m gpu tests/ops tests/bench tests/diagnostics
# 6. study workers on the GPU: runs per GPU against one after another, a killed worker, Ctrl-C
step 90 gpu_study_workers "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/studies
tar -czf "$OUT/gpu_check_results.tgz" -C "$OUT" results
echo "done $(date -u +%T)" | tee -a "$LOG"
