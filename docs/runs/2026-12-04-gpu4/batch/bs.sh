# issue 37, smaller batches alone: the config's recipe at 512K, 256K and 128K tokens a step, each to the same 26.2M
# tokens with its own schedule (warmups scaled to equal tokens), the three sharing the GPU (equal-token comparison;
# their wall times say nothing). Metrics copied to $OUT every 10 s; everything stopped at 400 s.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
t0=$(date +%s); date -u
python3 prepare.py --corpus=python --vocab_size=32000 --tokenizer_docs=8000 --data_dir=data/python32k > $OUT/prepare.log 2>&1 || { tail -5 $OUT/prepare.log; exit 1; }
echo "prepare $(( $(date +%s) - t0 )) s"
common="config/reference_137m.py --data_dir=data/python32k --ckpt_interval=100000"
TORCHINDUCTOR_CACHE_DIR=/tmp/i1 setsid python3 train.py $common --out_dir=/tmp/o/bs512 --max_iters=50 --eval_interval=10 > $OUT/bs512.log 2>&1 &
TORCHINDUCTOR_CACHE_DIR=/tmp/i2 setsid python3 train.py $common --out_dir=/tmp/o/bs256 --max_iters=100 --gradient_accumulation_steps=8 --warmup_iters=60 --muon_momentum_warmup=40 --eval_interval=20 > $OUT/bs256.log 2>&1 &
TORCHINDUCTOR_CACHE_DIR=/tmp/i3 setsid python3 train.py $common --out_dir=/tmp/o/bs128 --max_iters=200 --gradient_accumulation_steps=4 --warmup_iters=120 --muon_momentum_warmup=80 --eval_interval=40 > $OUT/bs128.log 2>&1 &
while [ $(( $(date +%s) - t0 )) -lt 400 ]; do
  sleep 10; for r in bs512 bs256 bs128; do mkdir -p $OUT/$r; cp /tmp/o/$r/metrics.jsonl $OUT/$r/ 2>/dev/null; done
  [ -z "$(jobs -r)" ] && break
done
pkill -f train.py; sleep 2
for r in bs512 bs256 bs128; do cp /tmp/o/$r/metrics.jsonl $OUT/$r/ 2>/dev/null; echo "== $r"; grep "val loss" $OUT/$r.log | tail -4; tail -1 $OUT/$r.log; done
date -u
