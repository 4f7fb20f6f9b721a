# The Quick start's DPO run: teach the tiny SFT model (config/sft_tiny_cpu.py) to prefer the right docstring over
# another function's or one cut off halfway, in well under a minute and a half on a 2-core CPU.
out_dir = "out/tiny_dpo"  # chat with: python sample.py --out_dir=out/tiny_dpo --chat
init_from = "out/tiny_sft"  # the Quick start's SFT run
data_dir = "data/dpo_stdlib"  # made by: python prepare.py --mode=dpo --tokenizer=out/tiny/tokenizer.model
precompute_ref = True  # one forward pass over the ~600 pairs up front instead of a reference pass every step
batch_size = 8  # pairs per step (16 rows): 120 steps see each of the ~570 training pairs ~1.7 times
max_iters = 120  # enough to move the held-out preference clearly; more drifts far from the reference
warmup_iters = 10  # short warmup for a short run
eval_interval = 40  # held-out loss, rewards and preference accuracy every 40 steps
eval_iters = 4  # 4 x 8 = 32 held-out pairs (all of them)
log_interval = 10  # a progress line every 10 steps
ckpt_interval = 60  # two checkpoints
