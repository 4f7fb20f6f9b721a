# The command of this call (one line there), in the folder where job.sh had prepared data/python32k: compare.sh's
# nanoGPT row by hand, nanoGPT at compare.sh's 160 x 512K, ours at 128K tokens a step on a 640-step schedule (84M
# tokens, the same as nanoGPT's), each compiling into an empty Inductor cache; ours stopped at 240 s (only the time
# to nanoGPT's final loss is read from it).
export PYTHONUNBUFFERED=1
P="--qk_norm=false --attn_scale=0 --value_residual=false --x0_shortcut=false --logit_softcap=0 --embed_norm=false --zero_init=false --value_embeds=false --lr_schedule=cosine --cautious_wd=false"
TORCHINDUCTOR_CACHE_DIR=/tmp/ind_nanogpt timeout 290 python train.py config/reference_137m.py --data_dir=data/python32k --out_dir=out/cmp_nanogpt --init_from=scratch --eval_interval=10 --max_iters=160 --arch=nanogpt --optimizer=adamw --learning_rate=6e-4 --weight_decay=0.1 --min_lr_frac=0.1 $P > $OUT/nanogpt.log 2>&1
TORCHINDUCTOR_CACHE_DIR=/tmp/ind_muon timeout 240 python train.py config/reference_137m.py --data_dir=data/python32k --out_dir=out/cmp_muon --init_from=scratch --eval_interval=10 --max_iters=640 --gradient_accumulation_steps=4 --warmup_iters=120 --muon_momentum_warmup=80 > $OUT/muon.log 2>&1
python eval.py --out_dir=out/cmp_muon --compare=out/cmp_nanogpt --tasks=curves > $OUT/eval_cmp.log 2>&1
