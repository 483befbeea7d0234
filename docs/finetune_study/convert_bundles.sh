#!/usr/bin/env bash
# The study's SmolLM2-135M-Instruct bundles (issue 24), converted with the working tree's CLI into /work/study/bundles.
# Skips a bundle whose quailora_init/ is there; each takes 1-3 CPU minutes. Every bundle calibrates in bfloat16
# (--calib-dtype bfloat16), as `auto` did on the host of the seed-0 runs (AMX): on a host without AMX, auto
# would calibrate in float32 and give another M. The seed-0 nearest-exact bundle and the one rebuilt this way on
# an AMD host differ in the 5th digit of ||A|| and ||s B A|| (202.1663 / 93.1802 against 202.1640 / 93.1780).
# Usage: bash docs/finetune_study/convert_bundles.sh [NAME ...]   (no name: all, in the queue's order)
set -eu
cd "$(dirname "$0")/../.."
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
MODEL=$HOME/.cache/quailora-test-models/smollm2-135m-instruct   # python ../shared/scripts/smollm2.py makes it
CALIB=$(cd ../shared/data/calib && pwd)/self_instruct_alpaca.jsonl
B=/work/study/bundles
mkdir -p "$B" /work/study/logs
declare -A OPTIONS=(
  [nearest-exact]="--num-samples 128"                                   # today's default
  [paper-als20]="--num-samples 128 --solver als"                        # the paper: nearest + ALS-20
  [gptq-r0]="--num-samples 128 --rounding gptq"                         # what the base keeps: GPTQ refine 0
  [gptq-r4]="--num-samples 128 --rounding gptq --refine 4"              #                      GPTQ refine 4
  [nearest-exact-alpha0.44]="--num-samples 128 --lora-alpha 0.4444444444444444"  # the scale: M kept, factors x6
  [nearest-exact-alpha4]="--num-samples 128 --lora-alpha 4.0"                    #                      factors x2
  [nearest-exact-alpha64]="--num-samples 128 --lora-alpha 64.0"  # factors /2; its LoraConfig: plain at alpha 64
  [nearest-exact-akaiming]="--num-samples 128 --lora-split a-kaiming"   # the split, M kept: lora_A at PEFT's row norm
  [nearest-exact-u]="--num-samples 128 --lora-split u"                  #                    lora_A = V^T
  [nearest-exact-scales]="--num-samples 128 --scales calibrated"        # NF4 block scales searched under H
  [nearest-exact-calib512]="--num-samples 512"                          # calibration size (427 records read)
  [gptq-r0-calib512]="--num-samples 512 --rounding gptq"
  [gptq-r4-calib512]="--num-samples 512 --rounding gptq --refine 4"
)
ORDER=(nearest-exact paper-als20 gptq-r0 gptq-r4 nearest-exact-alpha0.44 nearest-exact-alpha64 nearest-exact-alpha4
       nearest-exact-akaiming
       nearest-exact-u nearest-exact-scales nearest-exact-calib512 gptq-r0-calib512 gptq-r4-calib512)
for name in "${@:-${ORDER[@]}}"; do
  [ -n "${OPTIONS[$name]+set}" ] || { echo "unknown bundle $name; one of: ${ORDER[*]}" >&2; exit 2; }
  [ -d "$B/$name/quailora_init" ] && continue
  echo "converting $name"
  # shellcheck disable=SC2086
  /usr/bin/time -f "$name: %U user + %S sys CPU s, %e s wall, %M KB" nice -n 19 quailora-convert "$MODEL" \
    --calib "$CALIB" --calib-dtype bfloat16 ${OPTIONS[$name]} --out "$B/$name" > "/work/study/logs/$name.log" 2>&1
  tail -1 "/work/study/logs/$name.log"
done
