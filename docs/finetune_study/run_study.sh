#!/usr/bin/env bash
# The fine-tuning study (issue 24), in priority order. Start it TWICE, one process per core:
#     nohup bash /work/study/run_study.sh > /work/study/logs/study-1.log 2>&1 &
#     nohup bash /work/study/run_study.sh > /work/study/logs/study-2.log 2>&1 &
# Each (label, seed) run holds a .lock while it trains and writes /work/study/ft/runs/LABEL/seed-S.json when done,
# so the two processes share the list, and a stopped study resumes from the same command (a dead process's lock is
# taken over). A bundle folder that is not there yet is left out of this pass; run the script again later.
# The table and plot: python benchmarks/finetune.py report --out /work/study/ft (written after every run too).
set -eu
cd /work/main
. .venv/bin/activate
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
B=/work/study/bundles
# same math with or without gradient checkpointing (bit-identical losses on the tiny model), less CPU without
FT=(nice -n 19 python benchmarks/finetune.py --threads 1 --no-gradient-checkpointing --out /work/study/ft)
args=()
have() {  # kind label bundle-folder: the option, when the bundle is there
  if [ -d "$B/$3/quailora_init" ]; then args+=("--$1" "$2=$B/$3"); else echo "not yet: $3 (for $2)"; fi
}

# 1. seed 0 of every init. The references and today's default first; int8 takes the first bundle's LoraConfig
#    (nearest-exact: r 64, alpha 16), so that --plain stays first.
args=()
have plain plain nearest-exact
have bundle nearest-exact nearest-exact
have bundle nearest-exact-alpha0.44 nearest-exact-alpha0.44   # the scale first: the fade hypothesis (coordinator)
args+=(--int8 int8)
have plain gptq-plain gptq-r0                       #                      GPTQ base + PEFT's default init
have bundle nearest-exact-alpha1.78 nearest-exact-alpha1.78
have bundle nearest-exact-scales nearest-exact-scales
have bundle nearest-exact-scales-alpha0.44 nearest-exact-scales-alpha0.44
have bundle gptq-r0-alpha0.44 gptq-r0-alpha0.44
have bundle paper-als20 paper-als20                 # the paper: nearest + ALS-20
have bundle gptq-r0 gptq-r0                         # what the base keeps: GPTQ refine 0 + exact
have bundle gptq-r4 gptq-r4                         #                      GPTQ refine 4 + exact
have bundle nearest-exact-akaiming nearest-exact-akaiming   # the split, M unchanged
have bundle nearest-exact-u nearest-exact-u
have bundle nearest-exact-alpha4 nearest-exact-alpha4       # the scale: alpha 4, 1.78, 0.44 (factors x2, x3, x6)
have plain plain-alpha4 nearest-exact-alpha4        # plain QLoRA at alpha 4 and 0.44: the scale's own control
have plain plain-alpha0.44 nearest-exact-alpha0.44
have bundle nearest-exact-calib512 nearest-exact-calib512   # calibration size (427 records read)
have bundle gptq-r0-calib512 gptq-r0-calib512
have bundle gptq-r4-calib512 gptq-r4-calib512
"${FT[@]}" --seed-list 0 "${args[@]}"

# 2. seeds 1 and 2 of the references and today's default (>= 3 data orders each)
args=()
have plain plain nearest-exact
args+=(--int8 int8)
have bundle nearest-exact nearest-exact
"${FT[@]}" --seed-list 1,2 "${args[@]}"

# 3. the new default's seeds 1 and 2, once chosen: uncomment with its label and folder
# args=(); have plain plain nearest-exact; have bundle NEW NEW-FOLDER; "${FT[@]}" --seed-list 1,2 "${args[@]}"
echo study pass done
