#!/usr/bin/env bash
# The study's bundles that /work/study/convert_bundles.sh (snapshot 3510143) cannot make: the --lora-split variants
# and the larger calibration. Run once, before run_study.sh, with the working tree /work/main (it has --lora-split).
# Skips a bundle whose folder is there. Each is ~1-3 CPU minutes on one thread.
set -eu
cd /work/main
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
CONVERT="nice -n 19 /work/main/.venv/bin/quailora-convert $HOME/.cache/quailora-test-models/smollm2-135m-instruct"
CALIB=/work/shared/data/calib/self_instruct_alpaca.jsonl
B=/work/study/bundles
mkdir -p /work/study/logs
one() {  # name, then options
  name=$1; shift
  [ -d "$B/$name/quailora_init" ] && return
  /usr/bin/time -f "cpu seconds %U user %S sys, %e wall" $CONVERT --calib "$CALIB" --out "$B/$name" "$@" \
    > "/work/study/logs/$name.log" 2>&1
}
# a base of lower error of its own: NF4 block scales searched under H (alpha 16, and the scale 0.44)
one nearest-exact-scales --num-samples 128 --scales calibrated
one nearest-exact-scales-alpha0.44 --num-samples 128 --scales calibrated --lora-alpha 0.4444444444444444
# the factors' split, M unchanged (alpha 16): lora_A with PEFT's Kaiming row norm, and lora_A = V^T
one nearest-exact-akaiming --num-samples 128 --lora-split a-kaiming
one nearest-exact-u --num-samples 128 --lora-split u
# calibration size: 512 asked, 427 read (all the file holds; the conversion warns)
one nearest-exact-calib512 --num-samples 512
one gptq-r0-calib512 --num-samples 512 --rounding gptq
one gptq-r4-calib512 --num-samples 512 --rounding gptq --refine 4
# the split variants must share nearest-exact's base and M: the same base tensors, the same s B A
/work/main/.venv/bin/python - <<'PYEOF'
import torch
from safetensors.torch import load_file
B = "/work/study/bundles"
def base(name):
    return load_file(f"{B}/{name}/model.safetensors")
def products(name):
    a = load_file(f"{B}/{name}/quailora_init/adapter_model.safetensors")
    return {k: a[k.replace("lora_A", "lora_B")].double() @ a[k].double() for k in a if "lora_A" in k}
ref_base, ref = base("nearest-exact"), products("nearest-exact")
for name in ("nearest-exact-akaiming", "nearest-exact-u"):
    same_base = all(torch.equal(ref_base[k], v) for k, v in base(name).items())
    worst = max(float((p - ref[k]).norm() / ref[k].norm()) for k, p in products(name).items())
    print(f"{name}: base identical to nearest-exact: {same_base}; worst relative product difference {worst:.1e}")
PYEOF
echo extra bundles done
