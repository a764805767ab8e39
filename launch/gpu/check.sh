#!/usr/bin/env bash
# The CUDA tests and the benchmarks on any CUDA machine; logs, JSON and tables to $OUT (default runs/gpu).
#
#   bash launch/gpu/check.sh                       # every stage (more than 10 minutes in all on one H200)
#   STAGES="tests" bash launch/gpu/check.sh        # one stage per call: tests, step, offload, graphs, tasks, memory,
#                                                  # materialize, stages, scaling, why, depth, async, big (the last five on
#                                                  # 2 GPUs),
#                                                  # full175 (issue 13: a 4- or 8-GPU host)
#   MODELS=opt-1.3b STAGES="step offload" bash launch/gpu/check.sh
#   ARCHIVE=1 ...                                  # everything in $OUT packed into $OUT/all.tgz at the end
#   device tool: run(command="STAGES=tests bash launch/gpu/check.sh", carry=[".whl"])
#
# tests:   python3 -m pytest -m cuda (the 2-GPU tests skip on one GPU; on 2 H200s 6.5 minutes once, over 9 another
#          time: split it over two calls with CUDA_TESTS, e.g. "tests/test_[a-n]*.py tests/checkpoint tests/tasks"
#          then "tests/test_[o-z]*.py")
# step:    launch/bench_step.py, the in-GPU step against two forwards and MeZO's pattern, and the kernels
# offload: launch/bench_offload.py, in-GPU and offloaded steps, half the blocks resident (13B: no in-GPU)
# graphs:  launch/bench_offload.py --cuda-graphs --no-in-gpu
# tasks:   launch/bench_tasks.py, OPT-1.3B shape through launch/train.py --task sst2, full and LoRA
# memory:  issue 11's shapes offloaded at 1x2048 (6.7B and 13B also 16x256), whole blocks against sub-modules
#          (zo2.offload.granularity block / layer), one process per model and granularity so NVML is the
#          run's own; OPT-175B's shape truncated to 6 and 12 blocks (MEMORY_MODELS overrides the list)
# materialize: launch/bench_materialize.py, OPT-30B fp16 straight into pinned memory against page-locking
#          the same bytes alone, peak host RSS throughout (~60 GB pinned twice, one after the other; 1-2 min)
# scaling: launch/bench_scaling.py, 1 and 2 GPUs (replicated, partitioned, perturbation-parallel) per model of
#          SCALING_MODELS (default opt-6.7b,opt-13b), partitioned once per zo2.offload.gather of GATHERS (default
#          auto,collective: copy engines against NCCL), PP (default 2; 1: none), a timeline PNG per mode at 2 GPUs
# why:     issue 12's open question on 2 GPUs: is the partitioned step bound by the host's kernel launches (the
#          timeline's host lead; whole blocks, plain and replayed from CUDA graphs) or by the host's memory traffic
#          (write_back_interval 4 against 8)? OPT-6.7B and 13B, 1x2048, the 1-GPU row first; then NVML per GPU
#          with NCCL's channels and buffers cut (about 6 minutes; WHY_MODELS="opt-6.7b" for one model, ~3)
# depth:   issue 12 on 2 GPUs: partitioned with prefetch_depth of DEPTHS (default auto 2 4), sub-modules against whole
#          blocks, 13B also perturbation-parallel; the 1-GPU row of each of DEPTH_MODELS first (about 7 minutes)
# full175: issue 13, OPT-175B's shape (all 96 blocks, ~350 GB fp16) materialized straight into pinned memory
#          and trained offloaded on one GPU (1x2048 and 16x256), then partitioned on every GPU of the host
#          (4 or 8; needs 512+ GiB of host memory): FULL175_STEPS steps (default 3) after one warm-up;
#          SKIP_ONE_GPU=1 leaves out the one-GPU run (each run alone may take several minutes); FULL175_MODEL=opt-175b@N
#          its first N blocks where the host cannot pin all 96 (2 x H200 kind, 256 GiB: N up to ~56), FULL175_MODEL=fit
#          as many as MemAvailable holds less 20 GiB (1 x H200 kind, 128 GiB: 31); FULL175_MORE=1 first also
#          materializes against page-locking alone (bench_materialize) and 6 blocks with their two forwards on the GPU
# async:   issue 12: zo2.async_step false against "auto" (g on the device, no host sync per step; ASYNC_STEPS
#          sets the values and their order in each process), each step timed alone and back to back, 1 GPU then
#          2 GPUs partitioned at each prefetch_depth of ASYNC_DEPTHS (default auto), per model of ASYNC_MODELS
#          (default opt-6.7b opt-13b; ~3 min per model)
# stages:  launch/bench_memory_stages.py: a rank's NVML and allocator stage by stage (context, init_distributed,
#          model, engine, steps), 1 GPU, then 2 ranks, then 2 ranks with NCCL's channels and buffers cut (~2 min)
# link:    launch/bench_link.py: every GPU's upload GB/s alone and with all GPUs at once, with write-backs beside
#          (whole or paced) and without (seconds)
# head:    issue 11's Qwen2.5-7B shape offloaded at 1x2048 with its untied head resident (zo2.offload.stream_head
#          false) against streamed ("auto"), alternating HEAD_ROUNDS (default 2) times, one process each (~3 min)
# big:     OPT-66B's shape on 2 GPUs, materialized straight into each rank's pinned shards, partitioned only
#          (the host cannot hold two replicas); node host RSS against the model's bytes
set -uo pipefail
cd "$(dirname "$0")/../.."
source launch/gpu/env.sh
MODELS=${MODELS:-opt-1.3b,opt-6.7b,opt-13b}
status=0
# The why and depth stages, each launch under a timeout (a hang costs one launch, not the whole call): the 1-GPU
# row of a model (one_gpu TAG MODEL), and a 2-rank partitioned launch at 1x2048 ($run2, more options after it).
cap="timeout ${WHY_TIMEOUT_S:-200}"
run2="$cap python3 -m torch.distributed.run --nproc_per_node 2 launch/bench_offload.py --batches 1x2048"
run2="$run2 --no-in-gpu --no-floor --partitioned --partitioned-only --steps 8 --warmup 2"
one_gpu() {  # TAG MODEL [more bench_offload options]
  local tag=$1 model=$2; shift 2
  $cap python3 launch/bench_offload.py --models "$model" --batches 1x2048 --no-in-gpu --no-floor --steps 8 \
    --warmup 2 "$@" --out "$OUT/${tag}_${model}_1gpu.json" >"$OUT/${tag}_${model}_1gpu.log" 2>&1 || status=1
  grep "^$model |" "$OUT/${tag}_${model}_1gpu.log"
}
for stage in ${STAGES:-tests step offload graphs tasks materialize}; do
  echo "== $stage $(date -u +%H:%M:%S)"
  case $stage in
    tests) python3 -m pytest -v -rs -m cuda ${CUDA_TESTS:-tests/} >"$OUT/pytest_cuda.txt" 2>&1 || status=1  # -v: names
           # each test as it ends, so a call cut short still says which failed
           tail -5 "$OUT/pytest_cuda.txt" ;;
    step) python3 launch/bench_step.py --models "$MODELS" --kernel-micro --out "$OUT/step.json" \
            >"$OUT/step.log" 2>&1 || status=1
          tail -n 25 "$OUT/step.log" ;;
    offload) for model in ${MODELS//,/ }; do
               half=$(python3 -c "from zo2_ds.bench import SHAPES; print(SHAPES['$model'].num_layers // 2)")
               python3 launch/bench_offload.py --models "$model" --resident "$half" --out "$OUT/offload_$model.json" \
                 >"$OUT/offload_$model.log" 2>&1 || status=1
               grep "^$model |" "$OUT/offload_$model.log"
             done ;;
    graphs) python3 launch/bench_offload.py --models "$MODELS" --no-in-gpu --cuda-graphs --out "$OUT/graphs.json" \
              >"$OUT/graphs.log" 2>&1 || status=1
            grep "^opt\|^llama\|^qwen" "$OUT/graphs.log" ;;
    tasks) python3 launch/bench_tasks.py --out "$OUT/tasks" >"$OUT/tasks.log" 2>&1 || status=1
           tail -n 6 "$OUT/tasks.log" ;;
    materialize) python3 launch/bench_materialize.py --model opt-30b --out "$OUT/materialize_opt-30b.json" \
                   >"$OUT/materialize_opt-30b.log" 2>&1 || status=1
                 tail -n 4 "$OUT/materialize_opt-30b.log" ;;
    memory) for spec in ${MEMORY_MODELS:-opt-175b@6:block opt-175b@6:layer opt-175b@12:layer opt-6.7b:block \
                 opt-6.7b:layer opt-13b:block opt-13b:layer opt-30b:layer qwen2.5-7b:layer}; do
              IFS=: read -r model unit depth <<<"$spec"  # MODEL:GRANULARITY[:PREFETCH_DEPTH]
              batches=1x2048; case $model in opt-6.7b|opt-13b) batches=1x2048,16x256 ;; esac
              tag=${model}_$unit${depth:+_depth$depth}
              python3 launch/bench_offload.py --models "$model" --batches $batches --no-in-gpu --no-floor \
                --granularities "$unit" ${depth:+--prefetch-depth $depth} --steps 5 --warmup 2 \
                --out "$OUT/memory_$tag.json" >"$OUT/memory_$tag.log" 2>&1 || status=1
              echo "$(grep "^$model |" "$OUT/memory_$tag.log" | tr '\n' ';') depth ${depth:-default}"
            done ;;
    scaling) python3 launch/bench_scaling.py --models "${SCALING_MODELS:-opt-6.7b,opt-13b}" --gpus 1,2 \
               --gathers "${GATHERS:-auto,collective}" --perturbation-parallel "${PP:-2}" \
               --timeline "$OUT/scaling_timeline.png" --out "$OUT/scaling.json" >"$OUT/scaling.log" 2>&1 || status=1
             grep -A30 "^model | gpus" "$OUT/scaling.log" ;;
    why) for model in ${WHY_MODELS:-opt-6.7b opt-13b}; do
           one_gpu why $model
           $run2 --models $model --granularities auto,block --cuda-graphs --timeline "$OUT/why_$model.png" \
             --out "$OUT/why_$model.json" \
             >"$OUT/why_$model.log" 2>&1 || status=1
           grep "^$model |\|compute starts" "$OUT/why_$model.log"
           $run2 --models $model --write-back-interval 8 --out "$OUT/why_${model}_wbi8.json" \
             >"$OUT/why_${model}_wbi8.log" 2>&1 || status=1
           echo "write_back_interval 8: $(grep "^$model |" "$OUT/why_${model}_wbi8.log")"
         done
         # NCCL's own memory (the world group's communicator): fewer channels and smaller buffers, 6.7B
         NCCL_MAX_NCHANNELS=2 NCCL_BUFFSIZE=1048576 $run2 --models opt-6.7b --out "$OUT/why_nccl_small.json" \
           >"$OUT/why_nccl_small.log" 2>&1 || status=1
         echo "NCCL_MAX_NCHANNELS=2 NCCL_BUFFSIZE=1MiB: $(grep "^opt-6.7b |" "$OUT/why_nccl_small.log")" ;;
    depth) for model in ${DEPTH_MODELS:-opt-13b opt-6.7b}; do  # issue 12: the ring's depth and unit, partitioned
             one_gpu depth $model
             pp=1; [ "$model" = opt-13b ] && pp=2  # the perturbation-parallel target is 13B's
             for depth in ${DEPTHS:-auto 2 4}; do
               $run2 --models $model --granularities auto,block --prefetch-depth $depth --perturbation-parallel $pp \
                 --out "$OUT/depth_${model}_$depth.json" >"$OUT/depth_${model}_$depth.log" 2>&1 || status=1
               grep "^$model |" "$OUT/depth_${model}_$depth.log" | sed "s/^/depth $depth: /"
             done
           done ;;
    full175) gpus=$(nvidia-smi -L | wc -l)
             # This host's links and its total under every GPU's uploads and write-backs (the estimator's --host_gbs)
             python3 launch/bench_link.py --out "$OUT/link_${gpus}gpu.json" >"$OUT/link_${gpus}gpu.log" 2>&1 || status=1
             grep -A8 "^gpus | mode" "$OUT/link_${gpus}gpu.log"
             m175=${FULL175_MODEL:-opt-175b}  # opt-175b@N: its first N blocks, for a host that cannot pin all 96
             if [ "$m175" = fit ]; then  # as many blocks (3.624 GB each) as MemAvailable holds less 20 GiB
               m175=opt-175b@$(awk '/MemAvailable/{n=int(($2*1024-20*2^30)/3624198144); print (n>96?96:n)}' /proc/meminfo)
             fi
             tag=${m175/@/_}  # file names without '@' (the device tool returns none with it)
             echo "$m175"
             args="--models $m175 --batches 1x2048,16x256 --no-in-gpu --no-floor --materialize"
             args="$args --steps ${FULL175_STEPS:-3} --warmup 1"
             if [ -n "${FULL175_MORE:-}" ]; then  # the same call's comparators, one process each
               # materializing against page-locking the same bytes alone, and the peak host RSS of each
               layers=${m175#opt-175b}; layers=${layers#@}
               python3 launch/bench_materialize.py --model opt-175b ${layers:+--layers $layers} \
                 --out "$OUT/materialize_$tag.json" >"$OUT/materialize_$tag.log" 2>&1 || status=1
               tail -n 3 "$OUT/materialize_$tag.log"
               # 6 blocks: two forwards on the GPU (the compute floor per block) and the offloaded step per block
               python3 launch/bench_offload.py --models opt-175b@6 --batches 1x2048,16x256 --no-in-gpu \
                 --steps "${FULL175_STEPS:-3}" --warmup 1 --out "$OUT/opt-175b_6_1gpu.json" \
                 >"$OUT/opt-175b_6_1gpu.log" 2>&1 || status=1
               tail -n 3 "$OUT/opt-175b_6_1gpu.log"
             fi
             if [ -z "${SKIP_ONE_GPU:-}" ]; then
               python3 launch/bench_offload.py $args --out "$OUT/${tag}_1gpu.json" >"$OUT/${tag}_1gpu.log" 2>&1 \
                 || status=1
               tail -n 4 "$OUT/${tag}_1gpu.log"
             fi
             if [ "$gpus" -gt 1 ]; then
               python3 -m torch.distributed.run --nproc_per_node "$gpus" launch/bench_offload.py $args --partitioned \
                 --partitioned-only --out "$OUT/${tag}_${gpus}gpu.json" >"$OUT/${tag}_${gpus}gpu.log" 2>&1 || status=1
               tail -n 4 "$OUT/${tag}_${gpus}gpu.log"
             fi ;;
    async) for model in ${ASYNC_MODELS:-opt-6.7b opt-13b}; do  # issue 12: zo2.async_step against a sync per step
             one_gpu async "$model" --async-steps "${ASYNC_STEPS:-false,auto}"
             for depth in ${ASYNC_DEPTHS:-auto}; do
               $run2 --models "$model" --async-steps "${ASYNC_STEPS:-false,auto}" --prefetch-depth "$depth" \
                 --out "$OUT/async_${model}_$depth.json" >"$OUT/async_${model}_$depth.log" 2>&1 || status=1
               grep "^$model |" "$OUT/async_${model}_$depth.log" | sed "s/^/depth $depth: /"
             done
           done ;;
    stages) for ranks in 1 2 2s; do  # 2s: 2 ranks with NCCL's channels and buffers cut
              nccl=(); [ "$ranks" = 2s ] && nccl=(NCCL_MAX_NCHANNELS=2 NCCL_BUFFSIZE=1048576)
              launch="python3"; [ "$ranks" != 1 ] && launch="python3 -m torch.distributed.run --nproc_per_node 2"
              env "${nccl[@]}" $cap $launch launch/bench_memory_stages.py ${STAGES_ARGS:-} \
                --out "$OUT/stages_$ranks.json" >"$OUT/stages_$ranks.log" 2>&1 || status=1
              grep "^rank 0 " "$OUT/stages_$ranks.log"
            done ;;
    link) python3 launch/bench_link.py --out "$OUT/link.json" >"$OUT/link.log" 2>&1 || status=1
          grep -B2 -A8 "^gpus | mode" "$OUT/link.log" ;;
    head) for round in $(seq "${HEAD_ROUNDS:-2}"); do
            for sh in false auto; do
              $cap python3 launch/bench_offload.py --models "${HEAD_MODEL:-qwen2.5-7b}" --batches "${HEAD_BATCHES:-1x2048}" \
                --no-in-gpu --no-floor --stream-head "$sh" --steps 8 --warmup 2 --out "$OUT/head_${sh}_$round.json" \
                >"$OUT/head_${sh}_$round.log" 2>&1 || status=1
              echo "stream_head=$sh round $round: $(grep "^${HEAD_MODEL:-qwen2.5-7b} |" "$OUT/head_${sh}_$round.log")"
            done
          done ;;
    big) python3 -m torch.distributed.run --nproc_per_node 2 launch/bench_offload.py --models opt-66b \
           --batches 1x2048 --no-in-gpu --no-floor --partitioned --partitioned-only --materialize --steps 3 \
           --warmup 1 --out "$OUT/opt-66b_2gpu.json" >"$OUT/opt-66b_2gpu.log" 2>&1 || status=1
         tail -n 4 "$OUT/opt-66b_2gpu.log" ;;
    *) echo "STAGES: unknown stage '$stage' (tests, step, offload, graphs, tasks, memory, materialize, scaling, why, depth, async, link, head, big, full175)"
       status=2 ;;
  esac
done
if [ -n "${ARCHIVE:-}" ]; then  # the device tool brings back at most 8 files: one archive of everything instead
  tar czf /tmp/check_all.tgz -C "$OUT" . && find "$OUT" -mindepth 1 -delete && mv /tmp/check_all.tgz "$OUT/all.tgz"
fi
exit $status
