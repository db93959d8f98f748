#!/bin/sh
# Issue 14's prune runs, one after another, at nice 19 and one thread. Resumable: a run whose report
# exists is skipped; an interrupted one continues from its checkpoints (CK, default /tmp/singh_ck).
# The dense SSD (ssd_dense.pt) comes first, from the train-detector command of README.md.
set -e
cd "$(dirname "$0")/../../.."
P=results/detection/prune
CK=${CK:-/tmp/singh_ck}
PY=${PY:-python}

run() {  # run NAME CONFIG [--set KEY=VALUE ...]: pycompress prune, report P/NAME.json, weights P/NAME.pt
  name=$1; config=$2; shift 2
  [ -f $P/$name.json ] && { echo "skip $name (report exists)"; return; }
  echo "run $name"
  nice -n 19 $PY -m pycompress prune --config $config --checkpoint-dir $CK/$name --resume "$@" \
    --output $P/$name.json --save $P/$name.pt > $P/$name.log 2>&1
}

run ssd_dense_control $P/ssd_dense_control.toml
run ssd_dense_control_budget $P/ssd_dense_control_budget.toml
run ssd_singh $P/ssd_singh.toml
run ssd_singh_norecovery $P/ssd_singh_norecovery.toml
# Singh again from the 3.92x model, to 0.2 of the dense SSD's parameters
t=$($PY -c "import json; r = json.load(open('$P/ssd_singh.json')); print(0.2 * r['dense']['params'] / r['fine_tuned']['params'])")
run ssd_singh_continued $P/ssd_singh.toml --set weights=$P/ssd_singh.pt --set target_params=$t --set singh.rounds=3
# the comparison rows prune one-shot to the parameter fraction Singh reached, same fine-tuning
kept=$($PY -c "import json; r = json.load(open('$P/ssd_singh.json')); print(r['pruned']['params'] / r['dense']['params'])")
run ssd_taylor $P/ssd_taylor.toml --set target_params=$kept
run ssd_l1 $P/ssd_l1.toml --set target_params=$kept
# and to the 5x target
run ssd_taylor_5x $P/ssd_taylor.toml --set target_params=0.2
run ssd_l1_5x $P/ssd_l1.toml --set target_params=0.2
# front only (the backbone's two phases) and back only (the extra layers), each to 15 % fewer parameters
run ssd_singh_front $P/ssd_singh.toml --set target_params=0.85 --set singh.rounds=3 \
  --set 'singh.phase_layers=[["backbone.0.*", "backbone.1.*", "backbone.3.*", "backbone.4.*"], ["backbone.6.*", "backbone.7.*", "backbone.9.*", "backbone.10.*"]]'
run ssd_singh_back $P/ssd_singh.toml --set target_params=0.85 --set singh.rounds=3 \
  --set 'singh.phase_layers=[["extras.*"]]'
# 12 fine-tuning epochs instead of 3: Singh's 5x model from its pruned checkpoint, taylor again
# (without that checkpoint the run prunes again from ssd_singh.pt, which gives the same model)
if [ -f $CK/ssd_singh_continued/pruned.pt ]; then
  mkdir -p $CK/ssd_singh_continued_ft12 && cp -n $CK/ssd_singh_continued/pruned.pt $CK/ssd_singh_continued_ft12/
fi
run ssd_singh_continued_ft12 $P/ssd_singh.toml --set weights=$P/ssd_singh.pt --set target_params=$t --set singh.rounds=3 \
  --set finetune.epochs=12
run ssd_taylor_5x_ft12 $P/ssd_taylor.toml --set target_params=0.2 --set finetune.epochs=12
run ssd_taylor_ft12 $P/ssd_taylor.toml --set target_params=$kept --set finetune.epochs=12
# Singh without recovery steps until it stalls (up to 14 rounds), then 12 epochs
run ssd_singh_norecovery_5x_ft12 $P/ssd_singh_norecovery.toml --set singh.rounds=14 --set finetune.epochs=12
# gradual taylor to 5x: 8 or 4 prune steps, an epoch of SGD after each, then the 12 epochs
run ssd_taylor_5x_it8_ft12 $P/ssd_taylor.toml --set target_params=0.2 --set steps=8 --set fine_tune_steps=188 \
  --set finetune.epochs=12
run ssd_taylor_5x_it4_ft12 $P/ssd_taylor.toml --set target_params=0.2 --set steps=4 --set fine_tune_steps=376 \
  --set finetune.epochs=12
# wider SSDs (width 12 and 16; their dense models come from the train-detector commands of README.md):
# Singh without recovery steps until it stalls, then again from the stalled model to 0.2 of dense
# (round limits as run: width 12 six, then eight, whose last removed nothing; width 16 ten, a round
# that removed nothing ended it at seven, then four, of which the first reached the target)
for wr in 12:6:8 16:10:4; do
  w=${wr%%:*}; r1=$(echo $wr | cut -d: -f2); r2=${wr##*:}
  M="{\"name\": \"ssd\", \"width\": $w}"
  run ssd${w}_singh $P/ssd_singh_norecovery.toml --model-kwargs "$M" --set weights=$P/ssd${w}_dense.pt --set singh.rounds=$r1
  t=$($PY -c "import json; r = json.load(open('$P/ssd${w}_singh.json')); print(0.2 * r['dense']['params'] / r['fine_tuned']['params'])")
  run ssd${w}_singh_continued $P/ssd_singh_norecovery.toml --model-kwargs "$M" --set weights=$P/ssd${w}_singh.pt \
    --set target_params=$t --set singh.rounds=$r2
done
M='{"name": "ssd", "width": 16}'
run ssd16_dense_control $P/ssd_dense_control.toml --model-kwargs "$M" --set weights=$P/ssd16_dense.pt
run ssd16_taylor_5x $P/ssd_taylor.toml --model-kwargs "$M" --set weights=$P/ssd16_dense.pt --set target_params=0.2
run ssd16_l1_5x $P/ssd_l1.toml --model-kwargs "$M" --set weights=$P/ssd16_dense.pt --set target_params=0.2
run ssd16_taylor_5x_ft12 $P/ssd_taylor.toml --model-kwargs "$M" --set weights=$P/ssd16_dense.pt --set target_params=0.2 \
  --set finetune.epochs=12
run yolo_teacher_pruned $P/yolo_teacher_prune.toml
run yolo_teacher_singh $P/yolo_teacher_singh.toml
run yolo_teacher_dense_control $P/yolo_teacher_prune.toml --set criterion=l1 --set target_params=1.0
[ -f $P/ssd_singh_deploy_latency.json ] || $PY scripts/detector_deploy_latency.py --detector-kwargs '{"name": "ssd", "width": 8}' \
  --dense $P/ssd_dense.pt --pruned $P/ssd_singh.pt --output $P/ssd_singh_deploy_latency.json \
  > $P/ssd_singh_deploy_latency.log 2>&1
