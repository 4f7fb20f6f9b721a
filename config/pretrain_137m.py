# The reference run: a 137.8M-parameter model trained on ~2.8B tokens (20 tokens per parameter, Chinchilla)
# of a 32K-vocabulary corpus made by `python prepare.py --input=... --vocab_size=32000`. One H100 or several.
# With the speedrun recipe of issue 37 (the keys at the end, as config/reference_137m.py; measured there, PERF.md):
# a run with its model keys on cannot be exported (docs/export.md says which keys to turn off for one that can).
out_dir = "out/pretrain_137m"  # checkpoints and metrics.jsonl
data_dir = "data/pretrain"  # prepare.py output with a 32000-token tokenizer
vocab_size = 32000  # must match the shards (checked at start)
n_layer = 12  # 12 x 768, as GPT-2 small
n_head = 6  # head size 128: the whole model trains 3% faster than with 12 heads of 64 on an H100 (PERF.md)
n_embd = 768  # residual width
mlp_hidden = 3072  # SwiGLU hidden width: with three matrices this is 113M non-embedding parameters
block_size = 4096  # full 4K context
batch_size = 8  # 8 x 4096 = 32K tokens per micro-batch per GPU
gradient_accumulation_steps = 8  # 8 x 32K = 256K tokens per step in total, on 1, 2, 4 or 8 GPUs. Smaller batches
# won on the reference (128K beat 512K by 0.058 val loss at 225M tokens, PERF.md); a run 12x longer wants a larger
# batch as its loss falls (modded-nanogpt: 393K at ~0.5B tokens), so half of 512K here, not measured at this length
max_iters = 10800  # 10800 x 256K = 2.83B tokens
warmup_iters = 0  # none, as the reference (no warmup beat 120 steps there: PERF.md); not measured at this length
eval_interval = 500  # validation loss every ~130M tokens
eval_iters = 20  # 20 x 32K = 655K validation tokens per rank per evaluation
log_interval = 10  # progress line every 10 steps
ckpt_interval = 1000  # a checkpoint every ~260M tokens
activation_checkpointing = False  # an 80 GB GPU fits batch_size=8 at 4K without it
compile = "auto"  # torch.compile on CUDA (a large win there), not on a Mac or a CPU (backends.py)
# The recipe (issue 37): what config/reference_137m.py measured on one H200; each key in docs/pretraining.md
qk_norm = True  # q and k RMS-normed per head
attn_scale = 0.12  # the softmax scale that qk_norm wants (modded-nanogpt)
value_residual = True  # layer 0's values mixed into every later layer's
x0_shortcut = True  # the embedding mixed into every block's input
logit_softcap = 15.0  # logits = 15 tanh(logits / 15)
embed_norm = True  # the embedding RMS-normed before the first block
zero_init = True  # attention and MLP output projections start at zero
lr_schedule = "wsd"  # flat, then a linear decay
cooldown_frac = 0.6  # the decay takes the last 60% of the steps
muon_momentum_start = 0.85  # Muon's momentum 0.85 -> 0.95 over the first 300 steps (modded-nanogpt's count; the
muon_momentum_warmup = 300  # reference run's 80 of its 1,720 steps would be ~500 of these 10,800)
muon_weight_decay = 0.1  # keeps the matrices' norms from growing over a long run
cautious_wd = True  # decay only where the update and the weight agree in sign (muon.py)
data_order = "epoch"  # every token once a pass: at 2.8B draws over ~2.8B tokens random windows leave ~36% unread
