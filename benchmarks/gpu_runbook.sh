#!/usr/bin/env bash
# The GPU runbook: on a machine with an NVIDIA GPU and no network, build the extension against the
# local torch, run the CUDA tests, run compute-sanitizer (memcheck, racecheck) on a small case of every
# CUDA kernel, run the benchmarks, then the CPU suite against this machine's torch, and leave the results
# in benchmarks/results/ (and in $OUT, packed as one archive, when $OUT is set, as on the device tool's
# machines). Steps run in that order, most valuable first, for a device budget that may run out.
#
#   bash benchmarks/gpu_runbook.sh            # everything: build tests nvrtc sanitizer bench cputests
#   STEPS="build tests" bash benchmarks/gpu_runbook.sh
#   STEPS="mainjob" bash benchmarks/gpu_runbook.sh          # the main job on the GPU (timed) + evaluate
#   STEPS="recipe16" bash benchmarks/gpu_runbook.sh         # the 16x16 recipe, stage 2 <= 10 min + evaluate
#   SANITIZER_TIMEOUT=600 bash benchmarks/gpu_runbook.sh   # seconds per compute-sanitizer tool (default 300)
#
# Python packages the machine lacks (e.g. expecttest, which torch.library.opcheck imports) can be put
# as wheels in .gpu_wheels/ (pip download expecttest -d .gpu_wheels) and are installed offline; the nvrtc
# step needs CuPy there (pip download cupy-cuda13x -d .gpu_wheels, or cupy-cuda12x for a CUDA 12 torch).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STEPS=${STEPS:-"build tests nvrtc sanitizer bench cputests"}
RES=benchmarks/results
mkdir -p "$RES"
gpu=$($PY -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))") || { echo "no GPU"; exit 1; }
log="$RES/runbook_${gpu}.log"
status=0
step() { echo; echo "=== $(date +%T) $*"; }
run() { "$@" || { echo "FAILED ($?): $*"; status=1; }; }

{
  echo "GPU: $gpu"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  nvcc --version | tail -n 2

  if [[ " $STEPS " == *" build "* ]]; then
    step "build"
    if [ -d .gpu_wheels ]; then run $PY -m pip install -q --no-index --find-links .gpu_wheels .gpu_wheels/*.whl; fi
    # This GPU's arch only (CI compiles every default arch): half the nvcc time of the device budget.
    cc=$($PY -c "import torch; print('%d%d' % torch.cuda.get_device_capability(0))")
    export DALLE_FAST_CUDA_ARCHS=${DALLE_FAST_CUDA_ARCHS:-$cc}
    run env MAX_JOBS=${MAX_JOBS:-16} $PY -m pip install -q --no-build-isolation --no-deps -e .
    # Without CUDA kernels every CUDA test would skip and the benchmarks would fail: stop here instead.
    if ! $PY -c "import torch, dalle_fast; assert torch._C._dispatch_has_kernel_for_dispatch_key('dalle_fast::sparse_attention_fwd', 'CUDA')"; then
      echo "FATAL: the build has no CUDA kernels (see the build output above)"; echo "runbook status: 1"; exit 1
    fi
  fi

  if [[ " $STEPS " == *" tests "* ]]; then
    # The emulated CUDA tests run in CI on CPUs; here the kernels run for real.
    step "CUDA tests (default and slow)"
    run $PY -m pytest -q -rs -m "slow or not slow" -k "cuda and not emulated" tests/
  fi

  if [[ " $STEPS " == *" nvrtc "* ]]; then
    # The second backend (dalle_fast/ops/nvrtc.py): the same kernels compiled at run time by NVRTC. Every op
    # must give the same bits as the nvcc build's (tests/test_nvrtc.py, forward and backward, every head
    # dim and dtype); then the first-use compile and cached load times for this GPU's arch, and the paper
    # shape's kernel times through each backend, back to back (goal: NVRTC within 2% of nvcc).
    step "NVRTC backend: same bits as nvcc, compile and load times, kernel times"
    if $PY -c "import sys; from dalle_fast.ops import nvrtc; sys.exit(nvrtc.unavailable_reason() is not None)"; then
      export DALLE_FAST_CACHE="$RES/nvrtc_cache"
      rm -rf "$DALLE_FAST_CACHE"
      cc=$($PY -c "import torch; print('%d%d' % torch.cuda.get_device_capability(0))")
      run $PY -m benchmarks.nvrtc_compile --arch "$cc" --out "$RES/${gpu}_nvrtc_compile.md"
      run env DALLE_FAST_REQUIRE_NVRTC=1 $PY -m pytest -q -rs -m "slow or not slow" -k "not test_every_kernel" \
        tests/test_nvrtc.py
      for backend in nvcc nvrtc; do
        run env DALLE_FAST_CUDA_BACKEND=$backend $PY -m benchmarks.run --device cuda --dtype bf16 --batch 8 --heads 16 \
          --shapes paper --no-memory --no-flex --out "$RES/${gpu}_bf16_backend_${backend}.md"
      done
    else
      echo "FAILED: NVRTC cannot compile here: $($PY -c 'from dalle_fast.ops import nvrtc; print(nvrtc.unavailable_reason())')"
      status=1
    fi
  fi

  if [[ " $STEPS " == *" sanitizer "* ]]; then
    for tool in memcheck racecheck; do
      step "compute-sanitizer --tool $tool"
      # Time-boxed: a tool that hangs or crawls must not spend the device budget the benchmarks need.
      run timeout "${SANITIZER_TIMEOUT:-300}" compute-sanitizer --tool "$tool" --error-exitcode 3 $PY csrc/tests/sanitize_case.py
    done
  fi

  if [[ " $STEPS " == *" bench "* ]]; then
    # The paper's shape only (the small one is launch-bound on a GPU); FlexAttention's compiles and the
    # peak-memory processes once, in bf16.
    step "benchmarks bf16"
    run $PY -m benchmarks.run --device cuda --dtype bf16 --batch 8 --heads 16 --shapes paper --out "$RES/${gpu}_bf16.md"
    step "benchmarks fp16"
    run $PY -m benchmarks.run --device cuda --dtype fp16 --batch 8 --heads 16 --shapes paper --no-memory --no-flex \
      --out "$RES/${gpu}_fp16.md"
    # The forward's other warp layout (4 warps of 16 rows instead of 2 of 32, head dim <= 64), to
    # check the default: compare the dalle_fast rows with those of ${gpu}_bf16.md.
    step "benchmarks bf16, forward with 16 rows per warp"
    run env DALLE_FAST_FWD_ROWS_PER_WARP=16 $PY -m benchmarks.run --device cuda --dtype bf16 --batch 8 --heads 16 \
      --shapes paper --no-memory --no-flex --out "$RES/${gpu}_bf16_rows16.md"
    step "benchmarks: sampling (KV cache, decode op)"
    run $PY -m benchmarks.bench_generate --device cuda --batches 1 32 --out "$RES/${gpu}_generate.md"
    step "benchmarks: per-resblock gradient scaling"
    run $PY -m benchmarks.bench_amp --device cuda --out "$RES/${gpu}_amp.md"
    step "benchmarks: training throughput, sparse vs dense (fp16, bf16)"
    run $PY -m benchmarks.bench_train --device cuda --precision fp16 --out "$RES/${gpu}_train_fp16.md"
    run $PY -m benchmarks.bench_train --device cuda --precision bf16 --out "$RES/${gpu}_train_bf16.md"
  fi
  # The main job and the 16x16 recipe on the GPU (not in the default STEPS: each takes minutes of the
  # device budget; STEPS="mainjob" or "recipe16" in a call of their own). Runs go to $RUNS; what is kept
  # (timing, fidelity table, samples) to $RES.
  RUNS=${RUNS:-/tmp/dalle_fast_gpu_runs}
  if [[ " $STEPS " == *" mainjob "* ]]; then
    step "the main job on the GPU, then its caption fidelity (64 captions, 16 draws)"
    rm -rf "$RUNS/main"; t0=$SECONDS
    run $PY -m dalle_fast.train --device cuda --root "$RUNS" --name main
    echo "main job: $((SECONDS - t0)) s end to end"
    run $PY -m dalle_fast.evaluate --run "$RUNS/main/dalle" --captions 64 --draws 16 --device cuda --out "$RES/${gpu}_mainjob_eval"
    cp "$RUNS/main/samples.png" "$RES/${gpu}_mainjob_samples.png" 2>/dev/null
  fi
  if [[ " $STEPS " == *" recipe16 "* ]]; then
    step "the 16x16 recipe on the GPU (stage 2 up to 10 minutes), then its caption fidelity"
    rm -rf "$RUNS/g16"; t0=$SECONDS
    run $PY -m dalle_fast.train --device cuda --root "$RUNS" --name g16 --grid 16 --width 128 --dalle-batch 8 \
      --dalle-steps 20000 --dalle-minutes 10
    echo "16x16 recipe: $((SECONDS - t0)) s end to end"
    run $PY -m dalle_fast.evaluate --run "$RUNS/g16/dalle" --captions 64 --draws 16 --device cuda --out "$RES/${gpu}_recipe16_eval"
    cp "$RUNS/g16/samples.png" "$RES/${gpu}_recipe16_samples.png" 2>/dev/null
  fi
  if [[ " $STEPS " == *" cputests "* ]]; then
    step "CPU tests (this machine's torch)"
    # No GPU visible: the CPU paths under this machine's torch (the CUDA tests ran above).
    run env CUDA_VISIBLE_DEVICES= $PY -m pytest -q -k "not emulated" tests/
  fi
  echo; echo "runbook status: $status"
} 2>&1 | tee "$log"

if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/gpu_results.tgz" "$RES"
  cp "$log" "$OUT/"
fi
grep -q "runbook status: 0" "$log"
