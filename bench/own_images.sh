#!/usr/bin/env bash
# The README's "Your own images" commands, timed on a small demo set saved as JPEGs (bench for the README figures).
#   PYTHONPATH=$PWD bash bench/own_images.sh [out_dir] [steps]
set -euo pipefail
OUT=${1:-runs/own_images}; STEPS=${2:-200}; PY=${PYTHON:-python}
mkdir -p "$OUT"; LOG="$OUT/times.txt"; : > "$LOG"
t() { local name=$1; shift; local s=$(date +%s.%N); "$@" > "$OUT/$name.log" 2>&1; \
      printf '%-22s %6.1f s\n' "$name" "$(echo "$(date +%s.%N) - $s" | bc)" | tee -a "$LOG"; }

# A folder of JPEGs: <root>/{train,val}/<class>/*.jpg (here: 10 demo classes, 50 + 10 images each, 64 px).
$PY - "$OUT" <<'PY'
import sys
from pathlib import Path
from PIL import Image
from pipelines.demo_data import make_demo_dataset
out = Path(sys.argv[1])
png = make_demo_dataset(out / "png", train_per_class=50, val_per_class=10, size=64)
for p in png.rglob("*.png"):
    q = out / "mine" / p.relative_to(png).with_suffix(".jpg")
    q.parent.mkdir(parents=True, exist_ok=True)
    Image.open(p).convert("RGB").save(q, quality=95)
PY
IMG=$OUT/mine; R=$OUT/runs; C="train.cpu=true tensorboard=false data.num_workers=0"

# From scratch: tokenizer -> tokens -> AR -> samples.
t tokenizer       $PY -m pipelines.train.tokenizer data.root=$IMG run_dir=$R/tok train.max_steps=$STEPS $C
t extract         $PY -m pipelines.tokens.extract tokenizer_ckpt=$R/tok data.root=$IMG out_dir=$R/tokens cpu=true
t ar              $PY -m pipelines.train.ar shards=$R/tokens run_dir=$R/ar train.max_steps=$STEPS $C
t sample          $PY tools/sample.py ckpt=$R/ar class=all n=4 device=cpu
# From a published (converted) generator: here the run above stands in for it (no download on this machine).
# Tokens at 128 px with the source's tokenizer (another grid: 16x16), the generator fine-tuned on 3 classes of
# which one is renamed (a new class) and two are shared.
mkdir -p $OUT/mine3/train $OUT/mine3/val
for s in train val; do ln -sfn "$(cd $IMG/$s && pwd)/00_red_circle" $OUT/mine3/$s/00_red_circle
  ln -sfn "$(cd $IMG/$s && pwd)/01_green_square" $OUT/mine3/$s/01_green_square
  ln -sfn "$(cd $IMG/$s && pwd)/05_cyan_circle" $OUT/mine3/$s/my_new_class; done 2>/dev/null || true
t tokenizer_ft    $PY -m pipelines.train.tokenizer init_from=$R/tok data.root=$IMG data.resolution=128 \
                      run_dir=$R/tok_ft128 train.max_steps=$((STEPS / 4)) eval_max_images=50 $C
t extract_128     $PY -m pipelines.tokens.extract tokenizer_ckpt=$R/tok data.root=$OUT/mine3 resolution=128 \
                      out_dir=$R/tokens128 cpu=true
t ar_ft           $PY -m pipelines.train.ar init_from=$R/ar shards=$R/tokens128 run_dir=$R/ar_ft \
                      train.max_steps=$STEPS train.lr=3e-4 train.batch_size=16 $C
t sample_ft       $PY tools/sample.py ckpt=$R/ar_ft class=all n=4 device=cpu
cat "$LOG"
