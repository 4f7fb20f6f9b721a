#!/usr/bin/env bash
# bash .whl/job.sh ACCUM STEPS WARMUP MWARM INTERVAL: prepare, pretrain (recipe at ACCUM x 32K tokens a step), eval
A=$1 S=$2 W=$3 M=$4 I=$5
J=/tmp/job
mkdir -p $J
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
t0=$(date +%s)
python bench.py config/reference_137m.py --compile_modes=regions --seq_lens=2048 --train_steps=1 --optimizer_steps=1 --decode_batches= --out=$J/warm.json > $J/warm.log 2>&1 &
python prepare.py --corpus=python --vocab_size=32000 --tokenizer_docs=8000 --data_dir=data/python32k > $J/prep.log 2>&1
echo "prep $(( $(date +%s)-t0 ))" >> $J/times
wait
echo "warm $(( $(date +%s)-t0 ))" >> $J/times
t1=$(date +%s)
python train.py config/reference_137m.py --out_dir=out/bs$A --gradient_accumulation_steps=$A --max_iters=$S --warmup_iters=$W --muon_momentum_warmup=$M --eval_interval=$I --ckpt_interval=$I > $J/train.log 2>&1
echo "train $(( $(date +%s)-t1 )) rc=$?" >> $J/times
cp out/bs$A/metrics.jsonl $J/
t2=$(date +%s)
python eval.py --out_dir=out/bs$A --tasks=bpb,humaneval --gen_batch=512 > $J/eval.log 2>&1
echo "eval $(( $(date +%s)-t2 )) rc=$?" >> $J/times
cp out/bs$A/report.json out/bs$A/report.md $J/ 2>/dev/null
touch $J/done
