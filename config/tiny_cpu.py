# The Quick start run: a 4.46M-parameter model that learns to write Python-looking text on a 2-core CPU in a
# few minutes, from the standard-library corpus that `python prepare.py` builds with no download.
out_dir = "out/tiny"  # samples: python sample.py --out_dir=out/tiny
data_dir = "data/stdlib"  # made by `python prepare.py`
n_layer = 4  # small enough for ~1 s/step on two cores
n_head = 4  # head size 64 (the reference has 128; at this width 2 heads would be too few)
n_embd = 256  # residual width
mlp_hidden = 768  # 3x n_embd: SwiGLU's three matrices cost about what a 4x GELU MLP does
block_size = 256  # tokens of context: a screenful of code
batch_size = 16  # sequences per micro-batch
gradient_accumulation_steps = 1  # 4096 tokens per step; small steps learn fastest at this scale
max_iters = 200  # steps; ~0.8M tokens: the Quick start, install included, within 10 minutes
warmup_iters = 20  # short warmup for a short run
eval_interval = 100  # validation loss at steps 0, 100, 200
eval_iters = 10  # 10 x 16 x 256 = 41K validation tokens per evaluation
log_interval = 20  # a progress line every 20 steps
ckpt_interval = 100  # a checkpoint at each evaluation
compile = False  # compiling takes longer than this whole run on a CPU (and on a GPU: 200 small steps)
