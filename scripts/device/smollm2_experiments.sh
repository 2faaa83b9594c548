#!/usr/bin/env bash
# Issue 8 on a lent GPU machine, in back-to-back device calls (each carries < 64 MiB; the machine stays warm 30 s):
#   here:   bash scripts/device/smollm2_experiments.sh prepare   # .dev/{a,b,c}: GGUF halves, data subset, wheels
#   call a: bash scripts/device/smollm2_experiments.sh a         # carry .dev/a: GGUF part 00 + data -> /tmp/kava
#   call b: bash scripts/device/smollm2_experiments.sh b         # carry .dev/b: GGUF part 01 + wheels
#   call c: bash scripts/device/smollm2_experiments.sh c MIN     # carry .dev/c: ray wheel; install, convert, start
#           the matrix (configs/experiments/smollm2/matrix.yaml) in its own session with a MIN-minute deadline,
#           then wait (3rd argument, seconds; keep it <= 480: install + conversion take ~70 s of the 600 s call)
#           and pack what is done
#   call d: bash scripts/device/smollm2_experiments.sh d SECS    # wait up to SECS for the matrix, pack again
# What comes back ($OUT): results.tgz (run folders without adapters/checkpoints/stores), matrix.log, machine.txt.
set -uo pipefail
cmd=${1:?usage: smollm2_experiments.sh prepare|a|b|c MIN|d SECS}
K=/tmp/kava
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
OUT=${OUT:-/tmp/out}
env_setup() {
  export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 \
    OMP_NUM_THREADS=2 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
}
pack() {   # what is done so far -> $OUT (small files only; adapters and stores stay on the machine)
  mkdir -p "$OUT"
  [ -d runs/smollm2 ] && tar czf "$OUT/results.tgz" --exclude='*/adapter' --exclude='*/checkpoints' \
    --exclude='runs/smollm2/stores' --exclude='*/tb' runs/smollm2
  cp $K/matrix.log "$OUT/matrix.log" 2>/dev/null
  du -sh runs/smollm2/*/adapter runs/smollm2/stores/* 2>/dev/null > "$OUT/sizes.txt"
  ls -la "$OUT"
}
case $cmd in
  prepare)
    rm -rf .dev && mkdir -p .dev/a/data .dev/b/whl .dev/c/whl
    [ -f .models/smollm2/$GGUF ] || bash ../shared/tools/smollm2_gguf.sh .models/smollm2
    split -b 50M -d .models/smollm2/$GGUF .dev/$GGUF.part && mv .dev/$GGUF.part00 .dev/a/ && mv .dev/$GGUF.part01 .dev/b/
    D=../shared/data
    python3 -c "import gzip,sys; fi=gzip.open(sys.argv[1],'rt'); fo=gzip.open(sys.argv[2],'wt'); [fo.write(fi.readline()) for _ in range(32768)]" \
      $D/mult4x4.train_regen.jsonl.gz .dev/a/data/mult4x4.train_regen.jsonl.gz
    cp $D/{mult4x4,gsm8k,gsm_hard,svamp}.test.jsonl.gz $D/gsm8k_aug{,_nl}.train_no_aug.jsonl.gz .dev/a/data/
    [ -d .whl ] || bash ../shared/tools/device_wheels.sh .whl
    cp .whl/ray-*.whl .dev/c/whl/ && for w in .whl/*.whl; do case $w in *ray-*) ;; *) cp "$w" .dev/b/whl/ ;; esac; done
    du -sh .dev/*; sha256sum .models/smollm2/$GGUF ;;
  a) mkdir -p $K && cp -r .dev/a/* $K/ && ls -la $K $K/data && df -h /tmp | tail -1 ;;
  b) cp .dev/b/$GGUF.part01 $K/ && cp .dev/b/whl/*.whl .dev/c/whl/*.whl $K/ 2>/dev/null; ls $K
     cat $K/$GGUF.part00 $K/$GGUF.part01 > $K/$GGUF && sha256sum $K/$GGUF ;;
  c) minutes=${2:?deadline minutes}
     cp .dev/c/whl/*.whl $K/ && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
       --target /tmp/site $K/*.whl || exit 1
     env_setup
     nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/machine.txt" 2>&1; nproc >> "$OUT/machine.txt"
     python3 -c "import torch, transformers, peft, deepspeed, ray, zarr; print(torch.__version__, transformers.__version__, peft.__version__, deepspeed.__version__, ray.__version__, zarr.__version__)" >> "$OUT/machine.txt"
     rm -rf data && cp -r $K/data data && mkdir -p models
     time python3 -m jobs.convert_gguf $K $GGUF models/smollm2-135m-bf16 || exit 1
     setsid nohup python3 -m jobs.matrix configs/experiments/smollm2/matrix.yaml --var device=cuda \
       --deadline-min "$minutes" --reserve-min 3 > $K/matrix.log 2>&1 < /dev/null &
     echo $! > $K/matrix.pid
     end=$(( $(date +%s) + ${3:-520} ))
     while kill -0 "$(cat $K/matrix.pid)" 2>/dev/null && [ "$(date +%s)" -lt $end ]; do sleep 10; done
     pack; tail -n 40 $K/matrix.log ;;
  d) env_setup; end=$(( $(date +%s) + ${2:?seconds} ))
     while kill -0 "$(cat $K/matrix.pid)" 2>/dev/null && [ "$(date +%s)" -lt $end ]; do sleep 10; done
     pack; tail -n 60 $K/matrix.log; nvidia-smi --query-gpu=memory.used --format=csv ;;
esac
