# bash .whl/short.sh STEPS: the recipe at 128K tokens a step on a schedule of STEPS steps, to $OUT as it goes
export PYTHONUNBUFFERED=1
t0=$(date +%s)
python bench.py config/reference_137m.py --compile_modes=regions --seq_lens=2048 --train_steps=1 --optimizer_steps=1 --decode_batches= --out=/tmp/warm.json > /dev/null 2>&1 &
python prepare.py --corpus=python --vocab_size=32000 --tokenizer_docs=8000 --data_dir=data/python32k > $OUT/prep.log 2>&1
wait; echo "prep+warm $(( $(date +%s)-t0 ))"
python train.py config/reference_137m.py --out_dir=out/short --gradient_accumulation_steps=4 --max_iters=$1 --warmup_iters=120 --muon_momentum_warmup=80 --eval_interval=60 --ckpt_interval=100000 > $OUT/short.log 2>&1
cp out/short/metrics.jsonl $OUT/short_metrics.jsonl; grep "val loss" $OUT/short.log | tail -3; echo "total $(( $(date +%s)-t0 ))"
