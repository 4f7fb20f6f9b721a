# bash .whl/ab.sh: train.py's throughput with the compiled loss chunk of 2048 rows (16 calls per 32K-token
# micro-batch) against 8192 rows (4 calls), each alone for 55 s
export PYTHONUNBUFFERED=1
t=$(date +%s)
python prepare.py --corpus=python --vocab_size=32000 --tokenizer_docs=8000 --data_dir=data/python32k > $OUT/prep.log 2>&1
echo "prep $(( $(date +%s)-t ))"
for c in 8192 2048; do
    sed -i "s/^CE_CHUNK = [0-9]*/CE_CHUNK = $c/" model.py
    timeout 55 python train.py config/reference_137m.py --data_dir=data/python32k --out_dir=out/c$c --init_from=scratch --max_iters=640 --eval_interval=1000 --ckpt_interval=100000 > $OUT/c$c.log 2>&1
    echo "CE_CHUNK $c"; grep "^step" $OUT/c$c.log | tail -4
done
