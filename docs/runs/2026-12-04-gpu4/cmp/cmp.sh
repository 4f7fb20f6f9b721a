# issue 37's compare row in one call: nanoGPT's GPT-2 (160 steps, as compare.sh runs it) then ours (the config's
# recipe, a 160-step schedule, stopped after step 60: only the time to nanoGPT's final loss is measured), each alone,
# each compiling into an empty Inductor cache; then serve.py's bench on ours (issue 38, the batched draw). Files go to
# $OUT as they are made (a call stopped at its limit still returns them).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c "import torch; print(torch.__version__)"; git log --oneline -1 2>/dev/null
date -u; t0=$(date +%s)
python3 prepare.py --corpus=python --vocab_size=32000 --tokenizer_docs=8000 --data_dir=data/python32k > $OUT/prepare.log 2>&1 || { tail -5 $OUT/prepare.log; exit 1; }
echo "prepare $(( $(date +%s) - t0 )) s"
PLAIN="--qk_norm=false --attn_scale=0 --value_residual=false --x0_shortcut=false --logit_softcap=0 --embed_norm=false --zero_init=false --value_embeds=false --lr_schedule=cosine --cautious_wd=false"
t1=$(date +%s)
TORCHINDUCTOR_CACHE_DIR=/tmp/ind_nanogpt python3 train.py config/reference_137m.py --data_dir=data/python32k --out_dir=out/cmp_nanogpt --eval_interval=10 --max_iters=160 --arch=nanogpt --optimizer=adamw --learning_rate=6e-4 --weight_decay=0.1 --min_lr_frac=0.1 $PLAIN --ckpt_interval=1000 > $OUT/nanogpt.log 2>&1
echo "nanogpt rc=$? $(( $(date +%s) - t1 )) s"; tail -2 $OUT/nanogpt.log; mkdir -p $OUT/cmp_nanogpt; cp out/cmp_nanogpt/metrics.jsonl $OUT/cmp_nanogpt/
t2=$(date +%s)
TORCHINDUCTOR_CACHE_DIR=/tmp/ind_muon python3 train.py config/reference_137m.py --data_dir=data/python32k --out_dir=out/cmp_muon --eval_interval=10 --max_iters=160 --ckpt_interval=60 > $OUT/muon.log 2>&1 &
pid=$!
while kill -0 $pid 2>/dev/null; do ls out/cmp_muon/ckpt_0000060.safetensors >/dev/null 2>&1 && { sleep 5; kill $pid; break; }; sleep 2; done; wait $pid
echo "muon stopped $(( $(date +%s) - t2 )) s"; tail -3 $OUT/muon.log; mkdir -p $OUT/cmp_muon; cp out/cmp_muon/metrics.jsonl $OUT/cmp_muon/
python3 eval.py --out_dir=out/cmp_muon --compare=out/cmp_nanogpt --tasks=curves > $OUT/eval_cmp.log 2>&1; cat $OUT/eval_cmp.log | tail -8
cp out/cmp_muon/report.md out/cmp_muon/curves.png $OUT/cmp_muon/ 2>/dev/null
echo "elapsed $(( $(date +%s) - t0 )) s"; date -u
mkdir -p /tmp/w && cp .whl/serve_bench2.sh /tmp/w/sb.sh && sed -i 's#cd /tmp/w#cd '"$PWD"'#' /tmp/w/sb.sh
timeout 200 bash /tmp/w/sb.sh out/cmp_muon True > $OUT/serve_compiled.txt 2>&1; grep -v "^+" $OUT/serve_compiled.txt | tail -30; cp serve_True.log $OUT/ 2>/dev/null
date -u
