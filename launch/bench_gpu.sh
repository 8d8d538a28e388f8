#!/usr/bin/env bash
# The GPU benchmark suites of docs/benchmarks.md §4, one bench process per line, each under a time limit.
#
#   launch/bench_gpu.sh OUT_DIR SUITE [SUITE ...]
#
# Suites: smoke (demo pretrain stage), pt (BEiT v2 ViT-B/16 pretraining step, bf16, batches 64/128/256),
# pt_big (batch 384 with cuDNN attention, 512 with remat), pt_cudnn (cuDNN fused attention), pt_torch (against transformers BEiT,
# eager and torch.compile, AMP bf16), vqkd (VQ-KD ViT-B/16 step with a CLIP ViT-B/16 teacher, batches 128/256), vqkd_torch,
# pipeline (the grain input pipeline alone at $PIPELINE_WORKERS workers, default 4 8 14), tests (the GPU-only tests).
# Every bench writes OUT_DIR/<name>.json and OUT_DIR/<name>.log; the last lines printed are one row per bench.
# Environment: PYTHON (default python3), BENCH_TIMEOUT seconds per bench (default 300), STEPS, REPEATS.
set -uo pipefail

[ $# -ge 2 ] || { sed -n 2,12p "$0"; exit 2; }
out=$1; shift
mkdir -p "$out"
py=${PYTHON:-python3}
limit=${BENCH_TIMEOUT:-300}
steps=${STEPS:-10}
repeats=${REPEATS:-3}
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
PT=configs/beitv2_base_pt1k_300e.py
VQ=configs/vqkd_base_clip.py

bench() {  # bench NAME ARGS...
  local name=$1; shift
  echo "=== $name: $*"
  timeout "$limit" "$py" -m beitv2_jax.bench "$@" --steps "$steps" --repeats "$repeats" \
      --json "$out/$name.json" >"$out/$name.log" 2>&1
  local rc=$?
  grep -v -E "^(I|W)[0-9]{4} " "$out/$name.log" | tail -n 22
  [ $rc -eq 0 ] || echo "=== $name: exit $rc"
}

for suite in "$@"; do
  case $suite in
    smoke)
      bench smoke --config configs/demo.py --stage pretrain --noinput_pipeline ;;
    pt)
      for b in 64 128 256; do bench pt_b$b --config $PT --batch $b --noinput_pipeline; done ;;
    pt_big)
      bench pt_b384_cudnn --config $PT --batch 384 --noinput_pipeline --config.model.attention_impl=cudnn
      bench pt_b512_remat --config $PT --batch 512 --noinput_pipeline \
          --config.model.remat_policy=dots_with_no_batch_dims_saveable ;;
    pt_cudnn)
      for b in 128 256; do
        bench pt_b${b}_cudnn --config $PT --batch $b --noinput_pipeline --config.model.attention_impl=cudnn
      done ;;
    pt_torch)
      bench pt_b128_torch --config $PT --batch 128 --noinput_pipeline --compare torch ;;
    vqkd)
      for b in 128 256; do bench vqkd_b$b --config $VQ --batch $b --noinput_pipeline; done ;;
    vqkd_torch)
      bench vqkd_b128_torch --config $VQ --batch 128 --noinput_pipeline --compare torch ;;
    pipeline)
      for w in ${PIPELINE_WORKERS:-4 8 14}; do
        bench pipeline_w$w --config $PT --pipeline_only --batch 256 --pipeline_batches 16 --pipeline_workers $w
      done ;;
    tests)
      echo "=== tests"
      timeout "$limit" "$py" -m pytest -q -p no:cacheprovider tests/test_precision.py \
          >"$out/tests.log" 2>&1
      tail -n 5 "$out/tests.log" ;;
    *) echo "bench_gpu.sh: unknown suite $suite" >&2; exit 2 ;;
  esac
done

echo
echo "name | batch | attention | remat | step ms | img/s | MFU | torch eager / compile img/s | ours vs compile | peak mem GiB"
for f in "$out"/*.json; do
  [ -e "$f" ] || continue
  case $f in */pipeline_*) continue ;; esac
  "$py" - "$f" <<'EOF'
import json, os, sys
r = json.load(open(sys.argv[1]))
j = r.get("jax", {})
te, tc = r.get("torch_eager", {}), r.get("torch_compile", {})
mem = (r.get("peak_device_bytes") or 0) / 2**30
print(f"{os.path.basename(sys.argv[1])[:-5]} | {r['batch_size']} | {r['attention_impl']} | {r['remat_policy']} | "
      f"{j.get('step_ms', 0):.1f} | {j.get('img_per_s', 0):.0f} | {100 * (j.get('mfu') or 0):.1f}% | "
      f"{te.get('img_per_s', 0):.0f} / {tc.get('img_per_s', 0):.0f} | {tc.get('jax_speedup', 0):.2f}x | {mem:.1f}")
EOF
done
