# The reference run (reference.sh): the 137.8M model on every .py file of this machine's Python (standard library
# and site-packages, `prepare.py --corpus=python`), 654 s of training on one H200 (2026-12-02).
out_dir = "out/ref"  # then out/ref_sft and out/ref_dpo
data_dir = "data/python32k"  # made by: python prepare.py --corpus=python --vocab_size=32000 --data_dir=data/python32k
vocab_size = 32000  # the shards' vocabulary (checked at start)
n_layer = 12  # the reference shape: 12 x 768, 6 heads of 128
n_head = 6  # head size 128 (PERF.md)
n_embd = 768  # residual width
mlp_hidden = 3072  # SwiGLU hidden width
block_size = 2048  # HumanEval prompt + 512-token completion fits; trains ~7% faster per token than 4096 here
batch_size = 16  # 16 x 2048 = 32K tokens per micro-batch
gradient_accumulation_steps = 16  # 512K tokens per step
max_iters = 480  # 480 x 524,288 = 252M tokens: 2.6 passes over 97M tokens, 654 s at ~450K tok/s (H200)
warmup_iters = 30  # short warmup: Muon needs little
min_lr_frac = 0.05  # decay nearly to zero: the last steps of a short run count most
eval_interval = 40  # validation loss every ~21M tokens (20 x 32K tokens, ~1 s)
eval_iters = 20  # 655K validation tokens per evaluation
log_interval = 10  # a progress line every ~12 s
ckpt_interval = 40  # a checkpoint every ~50 s: a command stopped at its time limit loses less than a minute
keep_last = 1  # 1.6 GB each (weights and optimizer state); ckpt_best.safetensors is kept besides
compile = "auto"  # torch.compile on CUDA (a large win there), not on a Mac or a CPU (backends.py)
compile_regions = True  # each block compiled apart: first step 22 s instead of 60 s, 0.5% slower after (PERF.md)
