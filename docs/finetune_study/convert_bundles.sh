#!/usr/bin/env bash
# Study bundles, converted with the snapshot in /work/study/code (commit 3510143) at nice 19, one thread.
set -u
cd /work/study
export OMP_NUM_THREADS=1 PYTHONPATH=/work/study/code HF_HUB_OFFLINE=1
PY=/work/main/.venv/bin/python
MODEL=$HOME/.cache/quailora-test-models/smollm2-135m-instruct
CALIB=/work/shared/data/calib/self_instruct_alpaca.jsonl
one() {  # name, then settings as key=value python literals
  name=$1; shift
  [ -d bundles/$name/quailora_init ] && return
  kw=$(printf '%s, ' "$@")
  nice -n 19 $PY - <<PYEOF > logs/$name.log 2>&1
import time
from pathlib import Path
from quailora_convert.convert import ConvertSettings, convert
t = time.process_time()
convert(ConvertSettings(model="$MODEL", out=Path("bundles/$name"), calib="$CALIB", num_samples=128, device="cpu", $kw))
print("cpu seconds", time.process_time() - t)
PYEOF
  # the layout of issue 23: the adapter in quailora_init/
  mkdir -p bundles/$name/quailora_init && mv bundles/$name/adapter_config.json bundles/$name/adapter_model.safetensors bundles/$name/quailora_init/
}
mkdir -p bundles logs
one nearest-exact solver='"exact"'
one paper-als20 solver='"als"'
one gptq-r0 rounding='"gptq"'
one gptq-r4 rounding='"gptq"' refine=4
echo first four done
# the factors' scale, M unchanged: lora_alpha 16 / 4, / 9, / 36 (stored factors x2, x3, x6)
one nearest-exact-alpha4 lora_alpha=4.0
one nearest-exact-alpha1.78 lora_alpha=1.7777777777777777
one nearest-exact-alpha0.44 lora_alpha=0.4444444444444444
one gptq-r0-alpha0.44 rounding='"gptq"' lora_alpha=0.4444444444444444
echo alphas done
