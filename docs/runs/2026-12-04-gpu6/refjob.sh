#!/usr/bin/env bash
# bash .whl/refjob.sh: `bash reference.sh` from nothing, its files to /tmp/job, then compare.sh's nanoGPT row by hand
# (nanoGPT 160 x 512K, the config's warmup in tokens: none; ours at the config's 128K on compare.sh's 640-step
# schedule, stopped at 110 s), each train.py compiling into an empty Inductor cache
J=/tmp/job
mkdir -p $J
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
bash reference.sh > $J/ref.log 2>&1
echo "reference.sh rc=$?" >> $J/times
cp -r out/ref_card $J/card
for r in ref ref_sft ref_dpo; do
    mkdir -p $J/$r && cp out/$r/report.md out/$r/report.json out/$r/metrics.jsonl out/$r/curves.png out/$r/humaneval_greedy.jsonl $J/$r/ 2>/dev/null
done
for d in python32k sft_python32k dpo_python32k; do cp data/$d/manifest.json $J/manifest_$d.json 2>/dev/null; done
P="--qk_norm=false --attn_scale=0 --value_residual=false --x0_shortcut=false --logit_softcap=0 --embed_norm=false --zero_init=false --value_embeds=false --lr_schedule=cosine --cautious_wd=false"
t=$(date +%s)
TORCHINDUCTOR_CACHE_DIR=/tmp/ind_nanogpt timeout 290 python train.py config/reference_137m.py --data_dir=data/python32k --out_dir=out/cmp_nanogpt --init_from=scratch --eval_interval=10 --max_iters=160 --gradient_accumulation_steps=16 --warmup_iters=0 --arch=nanogpt --optimizer=adamw --learning_rate=6e-4 --weight_decay=0.1 --min_lr_frac=0.1 $P > $J/nanogpt.log 2>&1
echo "nanogpt $(( $(date +%s)-t )) rc=$?" >> $J/times
t=$(date +%s)
TORCHINDUCTOR_CACHE_DIR=/tmp/ind_muon timeout 110 python train.py config/reference_137m.py --data_dir=data/python32k --out_dir=out/cmp_muon --init_from=scratch --eval_interval=10 --max_iters=640 > $J/muon.log 2>&1
echo "muon $(( $(date +%s)-t )) rc=$?" >> $J/times
python eval.py --out_dir=out/cmp_muon --compare=out/cmp_nanogpt --tasks=curves > $J/eval_cmp.log 2>&1
mkdir -p $J/cmp && cp out/cmp_muon/report.md out/cmp_muon/curves.png $J/cmp/ && cp out/cmp_muon/metrics.jsonl $J/cmp/muon_metrics.jsonl && cp out/cmp_nanogpt/metrics.jsonl $J/cmp/nanogpt_metrics.jsonl
touch $J/done
