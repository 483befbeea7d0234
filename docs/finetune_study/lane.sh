#!/usr/bin/env bash
# One lane of the fine-tuning study (issue 24). Start two, one per core:
#     nohup bash docs/finetune_study/lane.sh > /work/study/logs/lane-1.log 2>&1 &
#     sleep 20; nohup bash docs/finetune_study/lane.sh > /work/study/logs/lane-2.log 2>&1 &
# A lane takes the first run of the queue (LABEL SEED KIND BUNDLE-FOLDER a line, re-read before every run, so it can
# be edited while lanes run) that has no run file and no lock, and runs it in a finetune.py process of its own (one
# thread, nice 19). Runs lanes share through the run files' locks; a run cut off (a killed process, the end of a
# session) goes on from its last checkpoint (every 40 steps) when a lane takes it again. A lane ends when nothing is
# left that it can run; runs whose bundle is not converted yet are passed over (docs/finetune_study/convert_bundles.sh).
# Then: python benchmarks/finetune.py report --out /work/study/ft
set -u
cd "$(dirname "$0")/../.."
. .venv/bin/activate
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
B=${BUNDLES:-/work/study/bundles}
OUT=${STUDY_OUT:-/work/study/ft}
QUEUE=${QUEUE:-docs/finetune_study/queue.txt}
while true; do
  started=0
  while read -r label seed kind folder; do
    [ -z "$label" ] || [ "${label:0:1}" = "#" ] && continue
    [ -f "$OUT/runs/$label/seed-$seed.json" ] && continue
    lock="$OUT/runs/$label/seed-$seed.json.lock"  # held by a live process: another lane runs it
    if [ -f "$lock" ]; then
      pid=$(grep -o '"pid": [0-9]*' "$lock" | grep -o '[0-9]*$' || true)
      [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && continue
    fi  # a lock of a process that died (a kill, a session's end): finetune.py takes it over and resumes the run
    [ "$kind" = int8 ] || [ -d "$B/$folder/quailora_init" ] || { echo "not yet: $B/$folder"; continue; }
    extra=()
    case $kind in
      int8) extra=(--int8 "$label") ;;  # int8 takes the first bundle's LoraConfig: --plain plain= stays first
      *-bf16) extra=(--"${kind%-bf16}" "$label=$B/$folder" --adapter-dtype "$label=bfloat16") ;;  # factors in bf16
      *) [ "$label" = plain ] || extra=(--"$kind" "$label=$B/$folder") ;;
    esac
    echo "=== $(date -Is) $label seed $seed"
    nice -n 19 python benchmarks/finetune.py --threads 1 --no-gradient-checkpointing --out "$OUT" \
      --seed-list "$seed" --plain "plain=$B/nearest-exact" "${extra[@]}" --only "$label" \
      || { echo "=== $label seed $seed failed: lane stopped"; exit 1; }
    [ -f "$OUT/runs/$label/seed-$seed.json" ] || { echo "=== $label seed $seed not done: lane stopped"; exit 1; }
    started=1
    break
  done < "$QUEUE"
  [ $started = 1 ] || break
done
echo "=== $(date -Is) lane done"
