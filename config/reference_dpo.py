# The reference run's DPO stage (reference.sh): prefer the right docstring or function to another function's, at
# dpo.py's default rates (5% of the SFT run's) with its NLL term on the chosen answer (PERF.md, issue 25).
out_dir = "out/ref_dpo"  # chat with: python sample.py --out_dir=out/ref_dpo --chat
init_from = "out/ref_sft"  # the reference SFT run
data_dir = "data/dpo_python32k"  # made by: python prepare.py --mode=dpo --corpus=python --task=both ...
precompute_ref = False  # a live frozen reference: 150 steps need fewer passes than all ~43K pairs up front
batch_size = 32  # pairs per step (64 rows)
max_iters = 150  # ~5K pairs seen: a small move from the SFT model, as DPO should be
warmup_iters = 10  # short warmup for a short run
eval_interval = 50  # held-out loss, rewards and preference accuracy
eval_iters = 8  # 8 x 32 = 256 held-out pairs
log_interval = 10  # a progress line every 10 steps
ckpt_interval = 50  # best = lowest held-out loss
keep_last = 1  # 1.6 GB each
