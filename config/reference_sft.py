# The reference run's SFT stage (reference.sh): docstring questions and coding requests (write this function from its
# signature and docstring) about this machine's packages, at 5% of pretraining's learning rates, with replay.
out_dir = "out/ref_sft"  # chat with: python sample.py --out_dir=out/ref_sft --chat
init_from = "out/ref"  # the reference pretraining run
data_dir = "data/sft_python32k"  # made by: python prepare.py --mode=sft --corpus=python --task=both --tokenizer=...
batch_size = 64  # conversations per step
max_iters = 800  # ~0.85 passes over ~60K conversations: longer and gentler won the sweep (PERF.md, issue 25)
warmup_iters = 20  # short warmup for a short run
eval_interval = 100  # masked validation loss, pretraining held-out loss and three sample answers
eval_iters = 8  # 8 x 64 = 512 held-out conversations
log_interval = 20  # a progress line every 20 steps
ckpt_interval = 100  # best = lowest masked validation loss
keep_last = 1  # 1.6 GB each
max_new_tokens = 160  # answers longer than this count as not ending
