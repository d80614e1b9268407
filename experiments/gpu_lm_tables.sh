#!/usr/bin/env bash
# The MovieLens tables with the LM (Tables 3-5) on a GPU machine, in one command.
#
#   python experiments/gpu_pack.py --lm checkpoints/lm   # here, first: .device/
#   bash experiments/gpu_lm_tables.sh      # there, with .device carried; results in $OUT
#
# Fits MLP-M, MLP-L and the LM (fine-tuned for LM_STEPS steps or LM_BUDGET seconds) on the GPU,
# unless gpu_pack.py packed them (`--lm`: then they are the ones fitted where the CPU tables ran),
# then runs the cells of Tables 3, 4 and 5 (S_base, LD, FD, MT, AEKD and DiverseDistill) with the
# trainer's defaults, JOBS runs at a time. A run recorded in the ledger (LEDGER, docs/results/runs, which
# travels with the tree) with the same teachers (weights' hash, precision) and steps is reused, so the
# device's minutes go to the runs missing (the MLP-only cells are recorded from this CPU). The LM is
# fitted under bfloat16 autocast and computes in bfloat16 as a teacher (LM_DTYPE; float32 for the
# exact fp32 numbers, at several times the cost). DEADLINE (seconds from the start; 0: none) stops
# the tables in time for the results that finished to be packed.
# The LM runs on the GPU (LM_DEVICE); the trainer (student, Distillation Module, MLP teachers) on
# TRAINER_DEVICE. On the GPU, the runs' processes share it by time-slicing, and 24 runs at once on an
# H200 made 4-10 DiverseDistill steps/s each (2026-12-04); on the CPU, a DiverseDistill step costs
# ~30 ms of one core (the module's W_M), but the GPU sees only the LM's kernels. Which is faster is
# not known yet, so by default the script times both (TRAINER_DEVICE=probe) and takes the faster.
# With a DEADLINE, experiments/deadline_shed.py stops the runs of lowest priority (highest seed
# first) while any run would miss it, rather than let every run miss it (SHED=0: it does not).
# At the DEADLINE every run gets SIGTERM, stops after its step and checkpoints it; a second call on the
# same (still warm) machine continues them (the table script resumes a run folder without a result).
# So the runs live in RUNS, outside the carried .device (which a call replaces). Each finished run is
# recorded in the ledger, which comes back in runs.tar.gz. Two calls, the second made at once so the
# machine stays warm:
#   SHED=0 DEADLINE=560 bash experiments/gpu_lm_tables.sh     # first: every run goes as far as it can
#   DEADLINE=T bash experiments/gpu_lm_tables.sh              # then: continue; shed what cannot finish
# The environment knobs make a quick dry run on a CPU:
#   PYTHON=.venv/bin/python WHEELS=0 DATA=SMALL_ML_FOLDER STEPS=30 SEEDS=0 LM_STEPS=4 MLP_EPOCHS=1 \
#     LM_DEVICE=cpu JOBS=1 CKPT=/tmp/ck RUNS=/tmp/runs LEDGER=/tmp/ledger OUT=/tmp/out bash experiments/gpu_lm_tables.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-1}            # install .device/whl (the GPU machine's grpcio/protobuf are not ours)
STEPS=${STEPS:-8000}
SEEDS=${SEEDS:-0 1 2}
JOBS=${JOBS:-12}
LM_STEPS=${LM_STEPS:-7000}     # ~3 epochs of the 76,000 fitting rows at batch 32
LM_BUDGET=${LM_BUDGET:-300}    # seconds
LM_DTYPE=${LM_DTYPE:-bfloat16}
LM_DEVICE=${LM_DEVICE:-cuda}
TRAINER_DEVICE=${TRAINER_DEVICE:-probe}  # cuda, cpu, or probe: time both, take the faster
PROBE_STEPS=${PROBE_STEPS:-150}
DEADLINE=${DEADLINE:-0}
MLP_EPOCHS=${MLP_EPOCHS:-40}
OUT=${OUT:-runs/gpu-out}
DATA=${DATA:-.device/data/ml-100k}
RUNS=${RUNS:-runs/gpu-tables}  # not under .device: a warm machine keeps it between calls
LEDGER=${LEDGER:-docs/results/runs}  # finished runs' records: reused where they match, and added to
CKPT=${CKPT:-.device/checkpoints}

test -d "$DATA" || { echo "no $DATA: run python experiments/gpu_pack.py first and carry .device" >&2; exit 2; }
if [ "$WHEELS" = 1 ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device/whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD/.device/site:$PWD:$PWD/proto
else
  export PYTHONPATH=$PWD/.device/site:$PWD:$PWD/proto
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT" "$RUNS" "$LEDGER"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee "$OUT/teachers.log"

for kind in mlp-m mlp-l; do
  if [ -f "$CKPT/$kind/teacher.yaml" ]; then echo "$kind: packed checkpoint, not refitted" | tee -a "$OUT/teachers.log"; continue; fi
  "$PYTHON" -m trainer.cli fit-teacher --kind "$kind" --data "$DATA" --out "$CKPT/$kind" \
    --max-epochs "$MLP_EPOCHS" 2>>"$OUT/teachers.log" | grep -o '"test_mse": [0-9.]*' | sed "s/^/$kind /" | tee -a "$OUT/teachers.log"
done
BF16=(); [ "$LM_DTYPE" = bfloat16 ] && BF16=(--bf16)
if [ -f "$CKPT/lm/teacher.yaml" ]; then
  echo "lm: packed checkpoint, not refitted" | tee -a "$OUT/teachers.log"
else
  "$PYTHON" -m trainer.cli fit-teacher --kind lm --data "$DATA" --out "$CKPT/lm" \
    --max-steps "$LM_STEPS" --time-budget "$LM_BUDGET" "${BF16[@]}" 2>>"$OUT/teachers.log" | tee "$OUT/lm-fit.json" \
    | grep -o '"test_mse": [0-9.]*' | sed "s/^/lm /" | tee -a "$OUT/teachers.log"
fi

# SHAPE_BENCH=1: first time the LM's Answer + AnswerVJP with a new number of rows each call, as served
# and as before 2026-12-04 (cuDNN attention, unpadded texts): bench/lm_shape_bench.py, into lm_shapes.json.
if [ "${SHAPE_BENCH:-0}" = 1 ]; then
  "$PYTHON" bench/lm_shape_bench.py --device "$LM_DEVICE" --dtype "$LM_DTYPE" --checkpoint "$CKPT/lm" --data "$DATA" \
    --calls "${SHAPE_CALLS:-60}" --warmup "${SHAPE_WARMUP:-10}" --out "$OUT/lm_shapes.json" | tee -a "$OUT/teachers.log"
fi

# Every run reads its teachers' outputs on the training rows (the baselines' targets, DiverseDistill's
# row anchors) from runs/.cache: compute the LM's once here rather than in every run at once.
"$PYTHON" -m trainer.cli train --method ld --teacher "local:$CKPT/lm?dtype=$LM_DTYPE&device=$LM_DEVICE" \
  --device cpu --data "$DATA" --steps 1 --run-dir "$(mktemp -d)/warmup" > /dev/null 2>>"$OUT/teachers.log"

# TRAINER_DEVICE=probe: time JOBS DiverseDistill runs with all three teachers at once for PROBE_STEPS
# steps with the trainer on the GPU, then on the CPU, and train the tables the faster way.
if [ "$TRAINER_DEVICE" = probe ]; then
  PROBES=$(mktemp -d); BEST=0
  for device in cuda cpu; do
    START=$SECONDS
    for i in $(seq "$JOBS"); do
      "$PYTHON" -m trainer.cli --threads 1 train --method diversedistill --device "$device" --teacher "local:$CKPT/mlp-l" \
        --teacher "local:$CKPT/mlp-m" --teacher "local:$CKPT/lm?dtype=$LM_DTYPE&device=$LM_DEVICE" --data "$DATA" \
        --seed "$i" --steps "$PROBE_STEPS" --run-dir "$PROBES/$device-$i" > /dev/null 2>"$RUNS/probe-$device-$i.log" &
    done
    wait
    FINISHED=$(find "$PROBES" -path "*/$device-*/result.json" | wc -l)
    RATE=0; [ "$FINISHED" = "$JOBS" ] && RATE=$((JOBS * PROBE_STEPS * 60 / (SECONDS - START + 1)))
    echo "probe: trainer on $device: $RATE steps/min over $JOBS runs ($FINISHED finished, $((SECONDS - START)) s)" \
      | tee -a "$OUT/teachers.log"
    if [ "$RATE" -gt "$BEST" ]; then BEST=$RATE; TRAINER_DEVICE=$device; fi
  done
  [ "$BEST" -gt 0 ] || { echo "probe: no way of training worked; see $RUNS/probe-*.log" >&2; exit 1; }
fi

LIMIT=()
if [ "$DEADLINE" != 0 ]; then
  LEFT=$((DEADLINE - SECONDS)); [ "$LEFT" -gt 0 ] || LEFT=1
  LIMIT=(timeout "$LEFT"); echo "tables: stopped after $LEFT s at the latest" | tee -a "$OUT/teachers.log"
  # Runs that would all miss the deadline are shed, lowest priority first, so that the rest finish
  # (SHED_MARGIN: seconds a run needs after its last step for its evaluation and result).
  if [ "${SHED:-1}" = 1 ]; then
    "$PYTHON" experiments/deadline_shed.py --runs-dir "$RUNS" --steps "$STEPS" \
      --deadline-at $(( $(date +%s) + LEFT - ${SHED_MARGIN:-30} )) > "$RUNS/shed.log" 2>&1 &
  fi
fi

# shellcheck disable=SC2086  # SEEDS is a list
STATUS=0
"${LIMIT[@]}" "$PYTHON" experiments/movielens_tables.py --tables 3 4 5 --seeds $SEEDS --steps "$STEPS" --jobs "$JOBS" \
  --teacher-option "lm=dtype=$LM_DTYPE" --teacher-option "lm=device=$LM_DEVICE" --device "$TRAINER_DEVICE" \
  --threads 1 --data "$DATA" --checkpoints "$CKPT" --runs-dir "$RUNS" --ledger "$LEDGER" --out "$OUT" \
  > "$OUT/tables.log" 2>&1 || STATUS=$?
# timeout's SIGTERM reached the runs too: give them a moment to write the checkpoint of their last step
# (a run's RUN/trainer.pid names its process while it trains; the table script forks them, so no cmdline does)
training() { for f in "$RUNS"/*/trainer.pid; do [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null && return 0; done; return 1; }
for _ in $(seq 30); do training || break; sleep 1; done
for run in "$RUNS"/*/; do  # how far each unfinished run got (a later call continues from there)
  latest="$run/checkpoints/$(cat "$run/checkpoints/latest" 2>/dev/null || true)/state.json"
  [ -f "$run/result.json" ] || [ ! -f "$latest" ] || \
    echo "unfinished: $(basename "$run"), checkpointed at step $(grep -o '"step": [0-9]*' "$latest" | grep -o '[0-9]*')"
done | tee -a "$OUT/teachers.log"
# What finished comes back either way (a stopped table is made again from these results, reused).
tar czf "$OUT/runs.tar.gz" "$LEDGER" "$RUNS"/*/metrics.jsonl "$RUNS"/*.log "$CKPT"/*/teacher.yaml 2>/dev/null || true
if [ "$STATUS" != 0 ]; then
  tail -n 30 "$OUT/tables.log"; tail -n 3 "$RUNS"/*.log | tail -n 60
  echo "tables stopped (exit $STATUS); $(find "$LEDGER" -name result.json | wc -l) results in the ledger packed in runs.tar.gz" >&2; exit 1
fi
tail -n 40 "$OUT/movielens.md"
