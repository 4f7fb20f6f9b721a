#!/usr/bin/env bash
# bash .whl/refjob2.sh: `DPO_PAIRS=sampled bash reference.sh` from nothing, DPO on code pairs judged by execution only
# (--task=code --sample_n=8 --sample_unjudged=written), its files to /tmp/job; then compare.sh's line for ours alone
# (config/reference_137m.py on compare.sh's 640-step schedule, an empty Inductor cache, stopped at 75 s); then a
# second DPO on the same pairs at twice the rate (lr_frac 0.1) and its evaluation
J=/tmp/job
mkdir -p $J
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
DPO_PAIRS=sampled PAIRS_ARGS="--task=code --sample_n=8 --sample_unjudged=written" bash reference.sh > $J/ref.log 2>&1
echo "reference.sh rc=$?" >> $J/times
cp -r out/ref_sampled_card $J/card
for r in ref ref_sft ref_dpo_sampled; do
    mkdir -p $J/$r && cp out/$r/report.md out/$r/report.json out/$r/metrics.jsonl out/$r/curves.png out/$r/humaneval_greedy.jsonl $J/$r/ 2>/dev/null
done
for d in python32k sft_python32k dpo_python32k_sampled; do cp data/$d/manifest.json $J/manifest_$d.json 2>/dev/null; done
t=$(date +%s)
TORCHINDUCTOR_CACHE_DIR=/tmp/ind_muon timeout 75 python train.py config/reference_137m.py --data_dir=data/python32k --out_dir=out/cmp_muon --init_from=scratch --eval_interval=10 --max_iters=640 > $J/muon.log 2>&1
echo "muon $(( $(date +%s)-t )) rc=$?" >> $J/times
cp out/cmp_muon/metrics.jsonl $J/muon_metrics.jsonl
touch $J/done1
t=$(date +%s)
python dpo.py config/reference_dpo.py --out_dir=out/ref_dpo_lr10 --data_dir=data/dpo_python32k_sampled --init_from=out/ref_sft --lr_frac=0.1 > $J/dpo_lr10.log 2>&1
python eval.py --out_dir=out/ref_dpo_lr10 --gen_batch=512 > $J/eval_lr10.log 2>&1
echo "lr10 $(( $(date +%s)-t )) rc=$?" >> $J/times
mkdir -p $J/ref_dpo_lr10 && cp out/ref_dpo_lr10/report.md out/ref_dpo_lr10/report.json out/ref_dpo_lr10/metrics.jsonl $J/ref_dpo_lr10/ 2>/dev/null
touch $J/done
