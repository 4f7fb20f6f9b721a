# The reference run (reference.sh): the 137.8M model on every .py file of this machine's Python (standard library
# and site-packages, `prepare.py --corpus=python`), trained with the speedrun recipe of issue 37 (below): 440 steps,
# 643 s of training on one H200 at 372K tok/s, val loss 1.1618, held-out bits per byte 0.6260 (2026-12-03; the run of
# 2026-12-02, without the recipe: 480 steps, 654 s, 1.2974, 0.7006). A run with the recipe's model keys on cannot be
# exported (docs/export.md).
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
max_iters = 440  # 440 x 524,288 = 231M tokens, 2.4 passes: the recipe runs 13% slower per token (390K tok/s on an
# H200 against 450K), so 440 steps keep pretraining within 5% of 2026-12-02's 480 steps on the clock
warmup_iters = 30  # short warmup: Muon needs little
min_lr_frac = 0.05  # decay nearly to zero: the last steps of a short run count most
eval_interval = 40  # validation loss every ~21M tokens (20 x 32K tokens, ~1 s)
eval_iters = 20  # 655K validation tokens per evaluation
log_interval = 10  # a progress line every ~12 s
ckpt_interval = 40  # a checkpoint every ~50 s: a command stopped at its time limit loses less than a minute
keep_last = 1  # 1.6 GB each (weights and optimizer state); ckpt_best.safetensors is kept besides
compile = "auto"  # torch.compile on CUDA (a large win there), not on a Mac or a CPU (backends.py)
compile_regions = True  # each block compiled apart: first step 22 s instead of 60 s, 0.5% slower after (PERF.md)
# The recipe (issue 37; PERF.md, one H200, 2026-12-03): at 240 steps (126M tokens) these keys ended at val loss
# 1.2977 where the plain model needed 480 steps (252M) for 1.2974. Each key: docs/pretraining.md.
qk_norm = True  # q and k RMS-normed per head (modded-nanogpt, nanochat): alone -0.41 at 100 steps, the largest win
attn_scale = 0.12  # the softmax scale that qk_norm wants (modded-nanogpt)
value_residual = True  # layer 0's values mixed into every later layer's: alone -0.32 at 100 steps
x0_shortcut = True  # the embedding mixed into every block's input (nanochat)
logit_softcap = 15.0  # logits = 15 tanh(logits / 15): alone -0.07 at 100 steps
embed_norm = True  # the embedding RMS-normed before the first block (nanochat)
zero_init = True  # attention and MLP output projections start at zero (with the softcap: loss 11.6 at init, not 14.8)
value_embeds = False  # measured: -0.011 at 240 steps (within noise), but 147M more parameters and 6% fewer tok/s
lr_schedule = "wsd"  # flat, then a linear decay (modded-nanogpt): -0.23 alone at 100 steps
cooldown_frac = 0.6  # the decay takes the last 60% of the steps
muon_momentum_start = 0.85  # Muon's momentum rises 0.85 -> 0.95 (modded-nanogpt)
muon_momentum_warmup = 20  # over the first 20 steps
muon_weight_decay = 0.1  # decoupled decay of Muon's matrices
cautious_wd = True  # only where the update and the weight agree in sign (muon.py)
data_order = "epoch"  # every training token once a pass, in shuffled order (the default draws windows at random)
