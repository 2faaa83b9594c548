#!/usr/bin/env bash
# The GPU benchmark parts (each part runs in under 10 min on the GPUs it names):
#   part 1: tests/gpu, eval throughput, training (student vs online), cache build 1B again (1 GPU)
#   part 2: cache build job vs bare forward, store read/write on local disk  (1 GPU)
#   part 3: 2-GPU scaling of the cache build and of training                 (2 GPUs)
#   part 4: where the cache build's time goes (1B): store write capacity, bare passes with and without
#           cuDNN SDPA, the job with the defaults / cuDNN allowed / a faster write setting  (1 GPU)
#   part 5: the cache build job (teacher actor + write actors) vs bare, 1B and 3B, with write variants (1 GPU)
#   part 6: where a cache-build actor's compute time goes (1B; stage timings + torch.profiler tables)   (1 GPU)
#   part 7: student MFU vs micro-batch (64, 128) and with per-layer torch.compile                    (1 H200)
#   part 8: fused student passes (model.fused_kernels=compile): micro 256 with a profile, then compile vs hf
#           side by side at micro 128                                                              (1 H200)
#   part 9: the GPU tests                                                                          (1 GPU)
#   part 10: micro 256 with Inductor's C++ wrapper (less host time per kernel), micro 384, the GPU tests (1 H200)
#   part 11: where a fused student step makes the host wait for the device (sync debug mode)       (1 GPU)
#   part 12: after removing the host syncs: micro 256 (profile, sync sites), student vs online at global 128 (1 H200)
#   part 13: fused student at micro 384 (1 GPU), then 2 GPUs vs 1 at global 256 / micro 128     (2 H200)
#   part 14: length-grouped batches (train.group_by_length) vs uniform random ones, side by side, whole epochs per
#            round: 1B student at micro 256 (+ profile), then student vs online at global 128       (1 H200)
#   part 15: the same for the 3B shape at micro 128, then the GPU tests                            (1 H200)
#   part 16: parts 14-15's side-by-side runs again with 2 warm-up and 3 measured rounds (no profile)  (1 H200)
#   store: training from the store vs from memory, side by side (1B micro 256 and 3B micro 128, global 256: memory /
#          local store warm / cold / int8 / S3 on a local moto server / S3 through the local shard cache; the S3
#          ones only with moto and s3fs installed, else said and left out), the real jobs end to end
#          (job_bench: jobs.build_cache then jobs.train), the cache build vs the bare forward  (1 H200, <= 9.5 min)
# Usage on any GPU machine with kava installed (pip install -e '.[test]'), from the repository root:
#   bash bench/gpu_suite.sh PART          # e.g. bash bench/gpu_suite.sh store
# Each part writes its log and the benches' JSON summaries under $OUT (default bench/results/gpu).
set -uo pipefail
part=${1:?usage: gpu_suite.sh 1|2|...|16|store}
OUT=${OUT:-bench/results/gpu}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0 \
  RAY_AUTH_MODE=disabled NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
log=$OUT/part$part.log
run() { echo "=== $*" | tee -a "$log"; "$@" 2>&1 | grep -v -E "WARNING|Warning|warn\(|FutureWarning" >> "$log"; echo "rc=${PIPESTATUS[0]}" >> "$log"; }
nvidia-smi --query-gpu=name,memory.total --format=csv >> "$log"
case $part in
  store)
     # one engine per shape trains from every targets path in turn (interleaved blocks); whole epochs per round.
     # The S3 paths need a moto server and s3fs (the [test] extra): without them they are left out, said here.
     s3=",s3" s3c=",s3-cache"
     if ! python3 -c "import moto.server, s3fs" 2>/dev/null; then
       s3="" s3c=""
       echo "targets s3 and s3-cache skipped: moto[server] or s3fs is not installed (pip install -e '.[test]')" \
         | tee -a "$log"
     fi
     # micro-batch per shape: 3B at 256 runs out of an H200's 141 GB, 128 fits (train_bench halves again and says
     # so if a shape still runs out)
     run timeout 170 python3 bench/train_bench.py --shape 1b --global-batch 256 --micro-batch 1b=256,3b=128 --pool 4 \
       --steps 4 --warmup 1 --rounds 2 --variants student:train.group_by_length=4 \
       --targets "memory,store,cold,int8$s3$s3c" --out "$OUT/train_targets_1b.json"
     run timeout 140 python3 bench/train_bench.py --shape 3b --global-batch 256 --micro-batch 1b=256,3b=128 --pool 2 \
       --steps 2 --warmup 1 --rounds 2 --variants student:train.group_by_length=2 \
       --targets "memory,store,cold,int8$s3" --out "$OUT/train_targets_3b.json"
     run timeout 180 python3 bench/job_bench.py --shape 1b --examples 1024 --steps 8 --warmup-steps 3 \
       --json "$OUT/job_bench_1b.json"
     run timeout 80 python3 bench/cache_build_bench.py --shapes 1b --examples 1024 --json "$OUT/cache_build_1b.json" ;;
  1) run python3 -m pytest tests/gpu -q -p no:cacheprovider
     run python3 bench/eval_bench.py --shape 1b --batch 64 --iters 5 --json "$OUT/eval_bench.json"
     run python3 bench/train_bench.py --shape 1b,3b --rounds 3 --out "$OUT/train_bench.json"
     run python3 bench/cache_build_bench.py --shapes 1b --examples 512 --json "$OUT/cache_build_bench_1b.json" ;;
  2) run python3 bench/cache_build_bench.py --shapes 1b,3b --examples 512 --json "$OUT/cache_build_bench.json"
     run python3 bench/store_bench.py --dir /tmp/store_bench --gpu-ex-per-s "${GPU_EX_PER_S:-200}" --json "$OUT/store_bench.json" ;;
  3) run timeout 200 python3 bench/cache_build_bench.py --shapes 1b --examples 4096 --actors 2 --json "$OUT/cache_build_2gpu.json"
     # equal global batch (128) and equal micro-batch per GPU: 1 GPU accumulates 2 micro-steps, 2 GPUs one each
     run timeout 170 python3 bench/train_bench.py --shape 1b --global-batch 128 --rounds 2 --out "$OUT/train_1gpu.json"
     run timeout 170 deepspeed --num_gpus 2 bench/train_bench.py --shape 1b --global-batch 128 --rounds 2 --world 2 \
       --compare "$OUT/train_1gpu.json" --out "$OUT/train_2gpu.json" ;;
  4) run timeout 90 python3 bench/codec_bench.py --shape 16,8,24,64 --rows 64 --codecs zstd:3,zstd:1 --writers 1,2,4,8
     run timeout 420 python3 bench/cache_build_bench.py --shapes 1b --examples 2048 --cudnn-check \
       --variant "model.sdpa_backends=[cudnn,flash,efficient,math]" --variant "store.clevel=1 build.writes_in_flight=4" \
       --json "$OUT/cache_build_diag_1b.json" ;;
  5) run timeout 60 python3 -m pytest tests/gpu -q -p no:cacheprovider
     run timeout 260 python3 bench/cache_build_bench.py --shapes 1b --examples 8192 \
       --variant "build.writers_per_actor=8" --json "$OUT/cache_build_1b.json"
     run timeout 200 python3 bench/cache_build_bench.py --shapes 3b --examples 2048 --json "$OUT/cache_build_3b.json" ;;
  6) run timeout 400 python3 bench/teacher_profile.py --shape 1b --examples 1024 ;;
  7) for m in 64 128; do   # student MFU: micro-batch size, then per-layer torch.compile (1 GPU, H200 memory)
       run timeout 150 python3 bench/train_bench.py --shape 1b --variants student --global-batch 128 --micro-batch $m \
         --rounds 2 --out "$OUT/train_student_m$m.json"
     done
     run timeout 240 python3 bench/train_bench.py --shape 1b --variants student --global-batch 128 --micro-batch 128 \
       --rounds 2 --compile --out "$OUT/train_student_m128_compile.json" ;;
  8) run timeout 280 python3 bench/train_bench.py --shape 1b --variants student --global-batch 256 --micro-batch 256 \
       --rounds 2 --profile --out "$OUT/train_fused_m256.json"
     run timeout 290 python3 bench/train_bench.py --shape 1b --variants student@compile,student@hf --global-batch 128 \
       --micro-batch 128 --rounds 2 --out "$OUT/train_fused_m128.json" ;;
  10) run timeout 240 python3 bench/train_bench.py --shape 1b --variants student --global-batch 256 --micro-batch 256 \
       --rounds 2 --profile --inductor cpp_wrapper=1 --out "$OUT/train_fused_m256_cpp.json"
     run timeout 200 python3 bench/train_bench.py --shape 1b --variants student --global-batch 384 --micro-batch 384 --profile \
       --rounds 2 --out "$OUT/train_fused_m384.json"
     run timeout 150 python3 -m pytest tests/gpu -q -p no:cacheprovider ;;
  9) run timeout 200 python3 -m pytest tests/gpu -q -p no:cacheprovider ;;
  12) run timeout 260 python3 bench/train_bench.py --shape 1b --variants student --global-batch 256 --micro-batch 256 \
       --rounds 2 --profile --find-syncs --out "$OUT/train_fused_m256.json"
     run timeout 300 python3 bench/train_bench.py --shape 1b --global-batch 128 --micro-batch 128 --online-micro-batch 32 \
       --rounds 2 --out "$OUT/train_student_online_128.json" ;;
  13) run timeout 200 python3 bench/train_bench.py --shape 1b --variants student --global-batch 384 --micro-batch 384 \
       --rounds 2 --out "$OUT/train_fused_m384.json"
     # 2 GPUs vs 1 at equal global batch (256) and equal micro-batch (128): 1 GPU accumulates 2, each of 2 GPUs 1
     run timeout 170 python3 bench/train_bench.py --shape 1b --variants student --global-batch 256 --micro-batch 128 \
       --rounds 2 --out "$OUT/train_fused_1gpu.json"
     run timeout 200 deepspeed --num_gpus 2 bench/train_bench.py --shape 1b --variants student --global-batch 256 \
       --micro-batch 128 --rounds 2 --world 2 --compare "$OUT/train_fused_1gpu.json" --out "$OUT/train_fused_2gpu.json" ;;
  14) run timeout 300 python3 bench/train_bench.py --shape 1b --global-batch 256 --micro-batch 256 --pool 8 --steps 8 \
       --rounds 2 --variants student:train.group_by_length=0,student:train.group_by_length=8 --profile \
       --out "$OUT/train_grouped_m256.json"
     run timeout 240 python3 bench/train_bench.py --shape 1b --global-batch 128 --micro-batch 128 --online-micro-batch 32 \
       --pool 4 --steps 4 --rounds 2 --variants student:train.group_by_length=8,online:train.group_by_length=8 \
       --out "$OUT/train_grouped_student_online_128.json" ;;
  15) run timeout 330 python3 bench/train_bench.py --shape 3b --global-batch 128 --micro-batch 128 --pool 4 --steps 4 \
       --rounds 2 --variants student:train.group_by_length=0,student:train.group_by_length=8 \
       --out "$OUT/train_grouped_3b_m128.json"
     run timeout 200 python3 -m pytest tests/gpu -q -p no:cacheprovider ;;
  16) run timeout 270 python3 bench/train_bench.py --shape 1b --global-batch 256 --micro-batch 256 --pool 8 --steps 8 \
       --warmup 2 --rounds 3 --variants student:train.group_by_length=0,student:train.group_by_length=8 \
       --out "$OUT/train_grouped_m256_r3.json"
     run timeout 290 python3 bench/train_bench.py --shape 3b --global-batch 128 --micro-batch 128 --pool 4 --steps 4 \
       --warmup 2 --rounds 3 --variants student:train.group_by_length=0,student:train.group_by_length=8 \
       --out "$OUT/train_grouped_3b_m128_r3.json" ;;
  11) run timeout 250 python3 bench/train_bench.py --shape 1b --variants student --global-batch 128 --micro-batch 128 \
       --rounds 1 --find-syncs ;;
esac
tail -n 60 "$log"
