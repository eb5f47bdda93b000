#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run that ends by itself within about 9 minutes:
#   1. tests.log       the GPU tests (pytest -m gpu): training in each precision, torch.compile,
#                      evaluation and serving against the CPU
#   2. train_step.log  bench/train_step.py: our step in float32 (channels-last and contiguous),
#                      bfloat16 and float16 against torchvision's float32 step, and against
#                      torchvision with its reference script's --amp
#   3. reference.log   `kubeseg train` end to end on CamVid at the reference product's example
#                      setting (FCN/ResNet-50, crop 240, batch 16): images/s with data loading
#   4. quality.log     bench/quality_camvid.py --mode gpu (DeepLabV3/ResNet-50 at 480x360,
#                      bfloat16, from scratch): validation mIoU and time
#   5. compile.log     bench/train_step.py: torch.compile against eager, bfloat16
# Each part has a time limit and the whole a deadline, so a part that hangs costs only itself.
#
#   bench/gpu_checks.sh [OUTDIR]        (CamVid from $CAMVID, default ../shared/datasets/camvid)
set -u
cd "$(dirname "$0")/.."
out=$(mkdir -p "${1:-gpu-checks}" && cd "${1:-gpu-checks}" && pwd)
camvid=$(cd "${CAMVID:-../shared/datasets/camvid}" && pwd) || exit 2
python=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# the benchmarks read CamVid beside the checkout, as on a developer's machine
if [ ! -e ../shared/datasets/camvid ]; then
    mkdir -p ../shared/datasets && ln -s "$camvid" ../shared/datasets/camvid
fi
deadline=$((SECONDS + ${GPU_CHECKS_SECONDS:-540}))
workers=$(( $(nproc) > 4 ? $(nproc) - 2 : 2 ))

part() {  # part NAME SECONDS COMMAND...: run with a limit of SECONDS or what is left
    local name=$1 limit=$2 left=$((deadline - SECONDS))
    shift 2
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 20 ]; then echo "== $name: skipped, out of time"; return; fi
    echo "== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout -k 5 "$limit" "$@" >>"$out/$name.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - start))s"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$python" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision',
  torchvision.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
} >"$out/tests.log" 2>&1

part tests 110 "$python" -m pytest -p no:cacheprovider -q -m gpu tests/engine/test_cuda.py \
    tests/test_metrics.py tests/test_device.py
part train_step 170 "$python" bench/train_step.py --device cuda --algorithms fcn,deeplab \
    --warmup 5 --steps 20 --configs float32,float32+contiguous,bfloat16,float16
part train_step 50 "$python" bench/train_step.py --device cuda --algorithms fcn \
    --warmup 5 --steps 20 --baseline-precision float16 --configs bfloat16,float16
part reference 80 "$python" -m kubeseg train --data-root "$camvid" --output "$out/reference-run" \
    --device cuda --workers "$workers" --log-every 10 \
    --set algorithm=fcn --set backbone=resnet-50 --set use_pretrained_model=False \
    --set num_classes=11 --set num_training_samples=367 --set crop_size=240 \
    --set mini_batch_size=16 --set optimizer=rmsprop --set learning_rate=0.0001 \
    --set epochs=4 --set precision_dtype=bfloat16
cat "$out/reference-run/metrics.jsonl" >>"$out/reference.log" 2>/dev/null
part quality 150 "$python" bench/quality_camvid.py --mode gpu --device cuda --skip-baseline \
    --epochs 30 --workers "$workers" --work "$out/quality-run" --set precision_dtype=bfloat16
part compile 100 "$python" bench/train_step.py --device cuda --algorithms fcn \
    --warmup 5 --steps 20 --configs bfloat16,bfloat16+compile
rm -rf "$out/reference-run" "$out/quality-run"  # logs only: the models are not kept
