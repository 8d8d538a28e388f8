#!/usr/bin/env bash
# Issue #16's GPU measurements in one go, written to ONE JSON file (docs/benchmarks.md §4):
#
#   launch/gpu_bench.sh OUT.json            # on a GPU machine (one device is used: CUDA_VISIBLE_DEVICES=0)
#   SMOKE=1 launch/gpu_bench.sh OUT.json    # the same pieces on tiny demo models, on any machine (CPU: ~minutes)
#
# Runs, each under a time limit (BENCH_TIMEOUT s, default 600), with the recipe's bf16 compute and
# attention_impl=auto (cuDNN fused attention on a GPU):
#   pt        BEiT v2 ViT-B/16 pretraining step, batch $PT_BATCH (256): MFU and the top $TOP (20) device ops of a
#             jax.profiler trace
#   vqkd      VQ-KD ViT-B/16 step with a CLIP ViT-B/16 teacher, batch $VQ_BATCH (256): MFU and top ops
#   pt_torch  the pt step again, windows interleaved with PyTorch eager and torch.compile (mode=max-autotune, fused
#             SDPA, bf16 autocast, channels-last; settings printed and stored): the ratio of the same run. Last,
#             because max-autotune compiles for minutes: if it runs out of time, pt and vqkd are already written.
# OUT.json = {"environment": ..., "runs": {"pt": <bench result>, "vqkd": ...}, "errors": {...}}; one bench log per
# run next to it (OUT.json.<name>.log).
#
# Needs jax[cuda], flax, optax, orbax, torch, timm in $PYTHON (default python3). Packages that may be missing there
# (ml-collections, grain, transformers>=5 for the PyTorch reference, absl-py, tqdm, tensorboardX, pillow) are
# installed from wheels in $WHEELS (default ./wheels) without network: pip install --no-index --find-links.
set -uo pipefail

[ $# -eq 1 ] || { sed -n 2,19p "$0"; exit 2; }
out=$(realpath -m "$1")
mkdir -p "$(dirname "$out")"
py=${PYTHON:-python3}
limit=${BENCH_TIMEOUT:-600}
wheels=${WHEELS:-wheels}
top=${TOP:-20}
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

# Missing pure-Python dependencies from local wheels (no index, no network).
missing=$("$py" - <<'EOF'
import importlib.util
need = {"ml_collections": "ml-collections", "grain": "grain", "transformers": "transformers", "absl": "absl-py",
        "tqdm": "tqdm", "tensorboardX": "tensorboardX", "PIL": "pillow", "etils": "etils"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [ -n "$missing" ]; then
  echo "=== installing from $wheels: $missing"
  "$py" -m pip install -q --no-index --find-links "$wheels" $missing || echo "=== pip could not install: $missing"
fi

if [ -n "${SMOKE:-}" ]; then
  # Tiny demo stages: checks that every piece (build, compile, torch reference, profile, JSON) works here.
  pt_args=(--config configs/demo.py --stage pretrain --batch 8 --frozen_depth 1 --config.pretrain.model.depth=2
           --config.pretrain.model.early_layers=1 --config.pretrain.model.head_layers=1 --notorch_compile)
  vq_args=(--config configs/demo.py --stage vqkd --batch 8 --frozen_depth 1 --config.vqkd.model.depth=1
           --config.vqkd.model.decoder_depth=1)
  timing=(--steps 1 --warmup 1 --repeats 1)
else
  pt_args=(--config configs/beitv2_base_pt1k_300e.py --batch "${PT_BATCH:-256}" --torch_compile_mode max-autotune)
  vq_args=(--config configs/vqkd_base_clip.py --batch "${VQ_BATCH:-256}")
  timing=(--steps "${STEPS:-10}" --warmup 3 --repeats "${REPEATS:-3}")
fi

bench() {  # bench NAME ARGS...
  local name=$1; shift
  echo "=== $name: $*"
  timeout "$limit" "$py" -m beitv2_jax.bench "$@" "${timing[@]}" --noinput_pipeline --json "$out.$name.json" >"$out.$name.log" 2>&1
  local rc=$?
  grep -v -E "^(I|W)[0-9]{4} " "$out.$name.log" | tail -n 40
  [ $rc -eq 0 ] || echo "=== $name: exit $rc (log: $out.$name.log)"
}

bench pt "${pt_args[@]}" --profile_top "$top"
bench vqkd "${vq_args[@]}" --profile_top "$top"
bench pt_torch "${pt_args[@]}" --compare torch

"$py" - "$out" pt vqkd pt_torch <<'EOF'
import json, os, platform, sys
out, names = sys.argv[1], sys.argv[2:]
result = {"environment": {"python": platform.python_version(), "smoke": bool(os.environ.get("SMOKE"))},
          "runs": {}, "errors": {}}
try:
    import jax
    result["environment"].update(jax=jax.__version__, devices=[d.device_kind for d in jax.devices()])
except Exception as e:  # noqa: BLE001
    result["errors"]["jax"] = repr(e)
for name in names:
    path = f"{out}.{name}.json"
    if os.path.exists(path):
        with open(path) as f:
            result["runs"][name] = json.load(f)
        os.remove(path)
    else:
        with open(f"{out}.{name}.log") as f:
            result["errors"][name] = f.read()[-4000:]
with open(out, "w") as f:
    json.dump(result, f, indent=1)
for name, r in result["runs"].items():
    line = f"{name}: {r['jax']['step_ms']:.1f} ms/step, {r['jax']['img_per_s']:.0f} img/s"
    if r["jax"].get("mfu") is not None:
        line += f", MFU {100 * r['jax']['mfu']:.1f}%"
    for other in ("torch_eager", "torch_compile"):
        if other in r:
            line += f"; {other} {r[other]['img_per_s']:.0f} img/s (ours {r[other]['jax_speedup']:.2f}x)"
    print(line)
print(f"wrote {out}" + (f"; errors in {sorted(result['errors'])}" if result["errors"] else ""))
sys.exit(1 if result["errors"] else 0)
EOF
