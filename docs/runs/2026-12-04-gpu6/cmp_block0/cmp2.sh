# bash .whl/cmp2.sh: the corpus, then ours as compare.sh runs it (config/reference_137m.py, 640-step schedule,
# evaluated every 10 steps, an empty Inductor cache), stopped at 75 s: the time to nanoGPT's 4.0928
export PYTHONUNBUFFERED=1
t=$(date +%s)
python prepare.py --corpus=python --vocab_size=32000 --tokenizer_docs=8000 --data_dir=data/python32k > $OUT/prep.log 2>&1
echo "prep $(( $(date +%s)-t ))"
TORCHINDUCTOR_CACHE_DIR=/tmp/ind_muon timeout 75 python train.py config/reference_137m.py --data_dir=data/python32k --out_dir=out/cmp_muon --init_from=scratch --eval_interval=10 --max_iters=640 > $OUT/muon.log 2>&1
cp out/cmp_muon/metrics.jsonl $OUT/muon_metrics.jsonl
grep val_loss $OUT/muon_metrics.jsonl | head -6; grep "^step 10/\|^step 20/" $OUT/muon.log
