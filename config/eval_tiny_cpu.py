# The Quick start's report card: the tiny DPO model on a CPU in about a minute. Small subsets: its figures show
# that every measure runs, not how good a model can be (see the README's Report card for the reference run).
out_dir = "out/tiny_dpo"  # the Quick start's last stage; bpb and contamination follow it back to out/tiny
bpb_tokens = 65536  # held-out tokens for bits per byte
problems = 20  # the first 20 HumanEval problems
samples = 4  # samples per problem for pass@k
pass_k = 2  # pass@2 from 4 samples
max_new_tokens = 64  # the tiny model's context is 256 tokens
gen_batch = 40  # sequences decoded at once
chat_questions = 32  # the demo's held-out questions
exec_workers = 2  # programs run at once: this is a 2-core machine
