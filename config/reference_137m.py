# The reference run (reference.sh): the 137.8M model on every .py file of this machine's Python (standard library
# and site-packages, `prepare.py --corpus=python`), trained with the speedrun recipe of issue 37 (below) at 128K
# tokens a step: 1,720 steps, 591 s of training on one H200 at ~400K tok/s, val loss 1.1027, held-out bits per byte
# 0.5998, HumanEval pass@10 3.84% (2026-12-04, reference.sh at 0d057d9, docs/runs/2026-12-04-gpu6; at 512K a step,
# 440 steps: 643 s, 1.1618, 0.6260, 2.36%; without the recipe, 2026-12-02: 480 steps, 654 s, 1.2974, 0.7006). A run
# with the recipe's model keys on cannot be exported (docs/export.md).
out_dir = "out/ref"  # then out/ref_sft and out/ref_dpo
data_dir = "data/python32k"  # made by: python prepare.py --corpus=python --vocab_size=32000 --data_dir=data/python32k
vocab_size = 32000  # the shards' vocabulary (checked at start)
n_layer = 12  # the reference shape: 12 x 768, 6 heads of 128
n_head = 6  # head size 128 (PERF.md)
n_embd = 768  # residual width
mlp_hidden = 3072  # SwiGLU hidden width
block_size = 2048  # HumanEval prompt + 512-token completion fits; trains ~7% faster per token than 4096 here
batch_size = 16  # 16 x 2048 = 32K tokens per micro-batch
gradient_accumulation_steps = 4  # 128K tokens per step: at the same tokens, 4x the steps of 512K beat it by 0.058 val
# loss (1.1043 against 1.1618) at the same tok/s (PERF.md, "Smaller batches")
max_iters = 1720  # 1720 x 131,072 = 225M tokens, 2.3 passes: the recipe reads fewer tokens a second than the plain
# model (~400K tok/s on an H200 against 450K), so 1,720 steps keep pretraining within 2026-12-02's time
warmup_iters = 0  # the peak rate from the first step, as modded-nanogpt and nanochat train: qk_norm and zero_init keep
# the first steps stable (with 120 steps of warmup: val loss 1.1043, pass@10 3.50%; PERF.md, "No learning-rate warmup")
min_lr_frac = 0.05  # decay nearly to zero: the last steps of a short run count most
eval_interval = 172  # validation loss every ~23M tokens (20 x 32K tokens, ~1 s), ten in the run
eval_iters = 20  # 655K validation tokens per evaluation
log_interval = 20  # a progress line every ~7 s
ckpt_interval = 172  # a checkpoint every ~63 s: a command stopped at its time limit loses about a minute
keep_last = 1  # 1.6 GB each (weights and optimizer state); ckpt_best.safetensors is kept besides
compile = "auto"  # torch.compile on CUDA (a large win there), not on a Mac or a CPU (backends.py)
compile_regions = True  # each block compiled apart: first step 22 s instead of 60 s, 0.5% slower after (PERF.md)
# The recipe (issue 37; PERF.md, one H200): the plain model's 1.2974 took 252M tokens (480 steps of 512K); these
# keys ended at 1.2977 with 126M (240 steps of 512K, 2026-12-03) and at 1.2992 with 63M (480 steps of 128K,
# 2026-12-04); the 1,720-step run was below it by 113M (1.2558, mid-run). Each key: docs/pretraining.md.
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
muon_momentum_warmup = 80  # over the first 80 steps (10.5M tokens, as 20 steps of 512K were)
muon_weight_decay = 0.1  # decoupled decay of Muon's matrices
cautious_wd = True  # only where the update and the weight agree in sign (muon.py)
data_order = "epoch"  # every training token once a pass, in shuffled order (the default draws windows at random)
