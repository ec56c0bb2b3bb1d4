#!/usr/bin/env bash
# The GPU part of the speed benchmarks, in one go (docs/perf.md, "GPU"): run from the repository root on a
# machine with a Hopper GPU and jax[cuda]. Logs and JSON go to $OUT (default /tmp/moe_jax_gpu).
#   1. bench_gmm.py: check the Mosaic grouped-matmul kernels (both forward kernels, 'jax' and 'ws') and
#      MoELayer dropless 'gmm' against references, sweep their tilings at the large shape, keep the best;
#   2. bench_layer.py, large shape (T=65536, D=1024, F=4096), K=2: the "dropless at >= 80% of one dense matmul"
#      bar, with each row's device time split by kernel (--profile);
#   3. bench_model.py: train-step tokens/s of a small LM, dense against MoE;
#   4. bench_layer.py, the CPU table's shape (T=8192, D=512, F=1024), every E, K=2 and 1.
# Optional (not in the default STEPS; add it with STEPS="... layer_large_bf16w"): the large shape again with
# bfloat16 weights (--param-dtype bfloat16), i.e. without the per-step float32 -> bfloat16 weight casts that
# cost 1.5 ms of the E=64 row on an H200 (docs/perf.md, "GPU: what is known").
# Each step has its own time limit, so that one slow step cannot starve the rest. The layer steps time 5
# back-to-back calls per sample (--calls 5; the H200 tables in docs/perf.md synced after every call).
set -u
OUT=${OUT:-/tmp/moe_jax_gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}
{ date -u; nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv
  $PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
} 2>&1 | tee "$OUT/env.txt"
STEPS=${STEPS:-check_ws gmm layer_large model layer_small}  # a subset reruns only those steps
step() {  # step NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  [[ " $STEPS " == *" $name "* ]] || return 0
  echo "== $name: $* (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
  echo "== $name: rc ${PIPESTATUS[0]}, ${SECONDS}-${t0} = $((SECONDS - t0))s"
}
# the warp-specialized forward kernel first, alone and briefly: if it fails (or hangs), the steps below leave it out
KERNELS=jax; GMM_ROWS=gmm_jax
step check_ws 75 $PY experiments/bench_gmm.py --check-only --kernels ws
[ -s "$OUT/check_ws.txt" ] && grep -q "PASS" "$OUT/check_ws.txt" && ! grep -q "FAIL" "$OUT/check_ws.txt" \
  && KERNELS=jax,ws GMM_ROWS=gmm_jax,gmm_ws
echo "== forward kernels: $KERNELS"
# the kernels at the layer bar's shape (M = 65536 * 2 rows, D = 1024, F = 4096)
step gmm 200 $PY experiments/bench_gmm.py --tokens 65536 --d-model 1024 --hidden 4096 --experts 8,64 \
  --kernels "$KERNELS" --json "$OUT/gmm_tiling.json"
TILING=()
[ -s "$OUT/gmm_tiling.json" ] && TILING=(--gmm-tiling "$OUT/gmm_tiling.json")
step layer_large 170 $PY experiments/bench_layer.py --no-pin --dtype bfloat16 --matmul --tokens 65536 \
  --seq-len 2048 --d-model 1024 --hidden 4096 --experts 8,64 --k 2 --dispatchers scatter,$GMM_ROWS \
  --repeats 10 --warmup 2 --calls 5 --json "$OUT/layer_large.json" --profile "$OUT/prof" "${TILING[@]}"
step model 120 $PY experiments/bench_model.py --no-pin --dtype bfloat16 --batch 32 --seq-len 512 --d-model 512 \
  --heads 8 --hidden 1024 --experts 8 --k 2 --moe-every 1 --dispatchers auto,dropless:gmm \
  --repeats 5 --steps 5 "${TILING[@]}"
step layer_small 200 $PY experiments/bench_layer.py --no-pin --dtype bfloat16 --matmul --experts 8,16,32,64 \
  --k 2,1 --dispatchers scatter,$GMM_ROWS,einsum --repeats 10 --warmup 2 --calls 5 --json "$OUT/layer_small.json" \
  "${TILING[@]}"
step layer_large_bf16w 150 $PY experiments/bench_layer.py --no-pin --dtype bfloat16 --param-dtype bfloat16 --matmul \
  --tokens 65536 --seq-len 2048 --d-model 1024 --hidden 4096 --experts 8,64 --k 2 --dispatchers scatter,$GMM_ROWS \
  --repeats 10 --warmup 2 --calls 5 --json "$OUT/layer_large_bf16w.json" "${TILING[@]}"
