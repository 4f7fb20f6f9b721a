# The Quick start's SFT run: teach the tiny pretrained model (config/tiny_cpu.py) to answer questions about
# standard-library functions with their docstrings, in the chat template, in about a minute on a 2-core CPU.
out_dir = "out/tiny_sft"  # chat with: python sample.py --out_dir=out/tiny_sft --chat
init_from = "out/tiny"  # the Quick start's pretrained run
data_dir = "data/sft_stdlib"  # made by: python prepare.py --mode=sft --tokenizer=out/tiny/tokenizer.model
batch_size = 16  # conversations per step: 120 steps see each of the ~570 training conversations ~3.4 times
max_iters = 120  # ~3.4 passes over the demo set; more overfits its 600 answers
warmup_iters = 10  # short warmup for a short run
eval_interval = 40  # masked validation loss and three sample answers every 40 steps
eval_iters = 4  # 4 x 16 = 64 validation conversations (all of them)
log_interval = 10  # a progress line every 10 steps
ckpt_interval = 60  # two checkpoints
max_new_tokens = 96  # answers longer than this count as not ending
lr_frac = 0.5  # of tiny_cpu.py's rates: at 0.2 only 75% of answers end in 120 steps; replay=0.25 (sft.py's) holds the
# pretraining loss to +0.40 nats here, against +1.87 without it (Quick start model, 2-core CPU, 2026-12-01)
