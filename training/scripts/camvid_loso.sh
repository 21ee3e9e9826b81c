#!/usr/bin/env bash
# Leave-one-sequence-out model selection on CamVid train (issue 22): for each of its three video
# sequences, fine-tune on the other two and score the held-out one. CamVid val is one sequence
# (0016E5) that also supplies 204 of the 367 train images, so val cannot tell how a recipe does on
# a street it never saw; these folds can.
#   bash training/scripts/camvid_loso.sh NAME [finetune options...]
#   e.g. bash training/scripts/camvid_loso.sh jitter --color-jitter 0.4
# Each fold: OUT/NAME-SEQ (weights) and OUT/NAME-SEQ.json (scores); about 12-15 min per fold on 2 CPU cores.
set -euo pipefail
NAME=${1:?usage: camvid_loso.sh NAME [finetune options...]}; shift
DATA=${DATA:-../shared/data/camvid}
OUT=${OUT:-runs/camvid-loso}
SEQS=${SEQS:-"0001TP 0006R0 0016E5"}
mkdir -p "$OUT"
for seq in $SEQS; do
  groupseg finetune --dataset camvid --data-root "$DATA" --out "$OUT/$NAME-$seq" --holdout-sequence "$seq" "$@"
  groupseg eval --dataset camvid --data-root "$DATA" --split train --holdout-sequence "$seq" \
    --weights "$OUT/$NAME-$seq" --out "$OUT/$NAME-$seq.json"
done
