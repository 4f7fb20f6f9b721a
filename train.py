"""Pretrain a GPT on memmap token shards with Muon + AdamW.

    python train.py config/tiny_cpu.py                          # CPU demo (Quick start)
    python train.py config/pretrain_137m.py                     # one GPU
    torchrun --standalone --nproc_per_node=8 train.py config/pretrain_137m.py
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=10.0.0.1 --master_port=29500 \\
        train.py config/pretrain_137m.py                        # then node_rank=1 on the second node
    python train.py config/tiny_cpu.py --init_from=resume       # continue a stopped run exactly

Config: the globals below; a config file and --key=value override them (checked: see runtime.configure).
"""

import math
import sys
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import batching
import checkpoints
import runtime
from accepts import (
    above,
    any_text,
    at_least,
    auto,
    between,
    device_type,
    folder,
    one_of,
    precision,
    torch_device,
    writable,
)
from model import GPT, GPTConfig, document_mask
from peer import NanoGPT
from runtime import UserError
from shards import TokenWindows, find_shards, read_header
from tokenizer import find_tokenizer, load_tokenizer

# ----------------------------------------------------------------------------- config
# I/O
out_dir: writable = "out/run"  # run folder: checkpoints, metrics.jsonl, tb/, a copy of the tokenizer
data_dir: folder = "data/stdlib"  # folder made by prepare.py: tokenizer.model, train_*.bin, val_*.bin
init_from: one_of("scratch", "resume") = "scratch"  # resume: from the latest checkpoint in out_dir
overwrite = False  # allow init_from=scratch to replace a run already in out_dir
eval_interval: at_least(1) = 250  # steps between validation-loss evaluations
eval_iters: between(1, 100_000) = 20  # micro-batches per evaluation (per rank)
log_interval: at_least(1) = 10  # steps between progress lines / metrics records
ckpt_interval: at_least(1) = 500  # steps between checkpoints (one is also written at the end)
keep_last: at_least(1) = 3  # step checkpoints kept (ckpt_best.safetensors is kept besides)
patience: at_least(0) = 0  # stop after this many evaluations without a new best validation loss (0 = never)
# data
batch_size: auto | between(1, 2**16) = 8  # sequences per micro-batch and rank; auto: the most that fit (+ global_batch)
block_size: between(1, 4096) = 1024  # sequence length in tokens: the model's context
gradient_accumulation_steps: between(1, 2**16) = 8  # micro-batches per step, all ranks (a multiple of the world size)
global_batch_size: between(0, 2**32) = 0  # sequences per step, all ranks; sets gradient_accumulation_steps if > 0
block_size_schedule: any_text = ""  # length curriculum, "T:share,...", e.g. "1024:0.8,4096:0.2"; "" = block_size only
doc_mask = False  # attention stays inside documents (each starts with <|endoftext|>), not across the window
data_order: one_of("random", "epoch") = "random"  # random: nanoGPT's windows; epoch: every token once a pass, shuffled
# model
vocab_size: between(0, 2**32) = 0  # 0 = the data folder's tokenizer size; a set value must match the shards
n_layer: between(1, 1024) = 12  # transformer blocks
n_head: at_least(1) = 6  # attention heads (n_embd / n_head is the head size: 128 runs attention ~3% faster than 64)
n_embd: between(1, 2**16) = 768  # residual width
mlp_hidden: between(1, 2**18) = 3072  # SwiGLU hidden width
rope_theta: above(0) = 10000.0  # RoPE base
activation_checkpointing = False  # recompute blocks in backward: less memory, ~30% more compute
# the speedrun recipes' model changes (issue 37): off by default; model.GPTConfig says where each comes from
qk_norm = False  # RMS-norm q and k per head (modded-nanogpt, nanochat)
attn_scale: at_least(0) = 0.0  # attention softmax scale; 0 = 1/sqrt(head size). modded-nanogpt: 0.12 with qk_norm
zero_init = False  # attention and MLP output projections start at zero (loss at init ~15 with the tied embeddings)
logit_softcap: at_least(0) = 0.0  # logits = cap * tanh(logits / cap); 0 = off. nanochat and modded-nanogpt: 15
value_embeds = False  # gated value embeddings on every other layer, the last included (nanochat)
x0_shortcut = False  # learned mix of the embedding into the input of every block (nanochat's x0_lambdas)
value_residual = False  # learned mix of layer 0's attention values into every later layer's (modded-nanogpt)
embed_norm = False  # RMS-norm the token embedding before the first block (nanochat)
arch: one_of("gpt", "nanogpt") = "gpt"  # model.py's, or nanoGPT's GPT-2 (peer.py), to compare on the same data
# optimizer
optimizer: one_of("muon", "adamw") = "muon"  # Muon + AdamW (below), or AdamW for all at learning_rate (then ~5e-4)
muon_lr: at_least(0) = 0.02  # Muon learning rate for the hidden matrices (spectral-norm scale, not AdamW's)
muon_momentum: at_least(0, below=1) = 0.95  # Nesterov momentum of Muon (at 1 its buffer would never leave zero)
muon_momentum_start: at_least(0, below=1) = 0.85  # Muon's momentum at step 0 with muon_momentum_warmup (modded-nanogpt)
muon_momentum_warmup: at_least(0) = 0  # steps of a linear rise from muon_momentum_start to muon_momentum (0 = off)
muon_weight_decay: auto | float & at_least(0) = "auto"  # decoupled decay of Muon's matrices; auto: weight_decay's
cautious_wd = False  # weight decay only where the update and the weight share a sign (muon.py; modded-nanogpt)
ns_dtype: one_of("auto", "float32", "bfloat16") = "auto"  # Muon's Newton-Schulz; auto: bf16 on CUDA, else fp32
learning_rate: at_least(0) = 0.006  # AdamW learning rate for the embedding (= the head) and norm gains; all with adamw
beta1: at_least(0, below=1) = 0.9  # AdamW
beta2: at_least(0, below=1) = 0.95  # AdamW
weight_decay: at_least(0) = 0.0  # decoupled decay of the embedding, and of the matrices unless muon_weight_decay
grad_clip: at_least(0) = 1.0  # clip the global gradient norm to this (0 = off)
max_iters: at_least(1) = 5000  # optimizer steps in the whole run
warmup_iters: at_least(0) = 100  # linear warmup steps
lr_decay_iters: at_least(0) = 0  # the decay ends here (0 = max_iters)
lr_schedule: one_of("cosine", "wsd") = "cosine"  # after warmup: cosine; wsd: flat, then linear over cooldown_frac
cooldown_frac: between(0.0, 1.0) = 0.6  # wsd: the last share of the steps to lr_decay_iters, decaying to min_lr_frac
min_lr_frac: between(0.0, 1.0) = 0.1  # final learning rate as a fraction of the peak
# system
device: torch_device = "auto"  # auto (cuda > mps > cpu), cuda, cuda:N, mps, cpu; one this machine has
dtype: precision = "auto"  # auto: bfloat16 on CUDA, float32 on MPS and CPU (backends.py says why)
compile: auto | bool = "auto"  # torch.compile the model; auto: on CUDA only (backends.py says why)
compile_regions = False  # with compile, arch=gpt, no cuda_graphs: each block (one graph for all) and the loss apart
cuda_graphs = False  # with compile on one CUDA GPU: replay each micro-step as CUDA graphs (for small micro-batches)
seed: between(0, 2**32 - 1) = 1337  # model init and data order
# -----------------------------------------------------------------------------
runtime.install_error_handler()
config = runtime.configure(
    globals(),
    sys.argv[1:],
    rules=[  # the relations between keys, checked with the values (see runtime.configure)
        (lambda c: c.n_embd % (2 * c.n_head) == 0, "n_embd={n_embd} must be n_head={n_head} x an even head size"),
        (lambda c: c.arch == "gpt" or c.n_embd % 64 == 0, "arch=nanogpt: n_embd={n_embd} must be a multiple of 64"),
        lambda c: batching.check_batch(vars(c), c.world_size, 1),  # and batch_size=auto against the device, below
        lambda c: batching.parse_schedule(c.block_size_schedule, c.block_size),
        (
            lambda c: not c.cuda_graphs or (c.compile and device_type(c.device) == "cuda" and c.world_size == 1),
            "cuda_graphs=true needs compile=true on a single CUDA GPU (no torchrun); drop it otherwise",
        ),
        (
            lambda c: c.arch == "gpt" or not any(getattr(c, k) for k in checkpoints.FEATURE_KEYS),
            "arch=nanogpt is nanoGPT's GPT-2, without model.py's features (qk_norm ... embed_norm); use arch=gpt",
        ),
        (
            lambda c: not c.doc_mask or (c.arch == "gpt" and not c.cuda_graphs),
            "doc_mask=true needs arch=gpt (the peer has no mask) and no cuda_graphs; drop one of them",
        ),
    ],
)

# ----------------------------------------------------------------------------- device / DDP
env = runtime.setup_device(device, dtype, compile, ns_dtype)
config.update(compile=env["compile"], ns_dtype=env["ns_dtype"])  # what auto chose, printed and stored
master, world_size, rank = env["master"], env["world_size"], env["rank"]
global_batch = batching.check_batch(config, world_size, batching.memory_limit(env["device"]))  # sequences a step
stages = batching.parse_schedule(block_size_schedule, block_size)  # [(sequence length, share of the run)]
# compile_regions is a way of compiling (config/reference_137m.py sets it): where it cannot apply, it is set aside
regions = compile_regions and env["compile"] and arch == "gpt" and not cuda_graphs
torch.manual_seed(seed)  # same init on every rank

# ----------------------------------------------------------------------------- data
train_shards = find_shards(data_dir, "train")  # one clear error for a missing or empty data folder
tokenizer_path = find_tokenizer(data_dir)
if tokenizer_path is None:
    raise UserError(f"{data_dir} has no tokenizer.model; re-run prepare.py for it")
vocab_size = vocab_size or read_header(train_shards[0])["vocab_size"]
config["vocab_size"] = vocab_size
bos_id = load_tokenizer(tokenizer_path).bos_id if doc_mask else None  # doc_mask: the document boundary
train_data = TokenWindows(data_dir, "train", block_size, vocab_size, seed, data_order)
val_data = TokenWindows(data_dir, "val", block_size, vocab_size, seed)


def get_batches(T):
    """This rank's micro-batches for one step, of sequences of T tokens (block_size_schedule's), as many as make
    batch_size x block_size tokens. Every rank draws the starts of the whole global step from the same generator
    and keeps its own slice, so any world size sees the same global batch."""
    B = batch_size * block_size // T  # rows per micro-batch
    starts = train_data.sample_starts(gradient_accumulation_steps * B, T)
    mine = starts[rank * accum_steps * B : (rank + 1) * accum_steps * B]
    for j in range(accum_steps):
        x, y = train_data.gather(mine[j * B : (j + 1) * B], T)
        if env["defaults"]["pin_memory"]:  # run on CUDA: pinned host memory lets the copy overlap the GPU's work
            x, y = x.pin_memory(), y.pin_memory()
        yield x.to(env["device"], non_blocking=True), y.to(env["device"], non_blocking=True)


def attention_mask(x):
    """doc_mask: what keeps attention inside documents (model.document_mask); else None, causal over the window."""
    return document_mask(x, bos_id) if doc_mask else None


# ----------------------------------------------------------------------------- model
ckpt, model_args = checkpoints.open_run(out_dir, init_from, overwrite, config, tokenizer_path, master)
model_config = GPTConfig(**model_args, activation_checkpointing=activation_checkpointing)
model = (GPT if arch == "gpt" else NanoGPT)(model_config).to(env["device"])
if ckpt is not None:
    checkpoints.load_model_state(model, ckpt["model"], out_dir)
raw_model = model  # checkpoints are saved from the unwrapped, uncompiled module

# ----------------------------------------------------------------------------- optimizer
# from here on `optimizer` is the optimizer itself; config["optimizer"] keeps its name
optimizer = runtime.make_optimizer(
    model,
    muon_lr,
    muon_momentum,
    learning_rate,
    (beta1, beta2),
    weight_decay,
    optimizer,
    env["ns_dtype"],
    muon_weight_decay,
    cautious_wd,
)
# batch_size=auto: dry runs of the new model find the largest micro-batch that fits (a resume keeps the checkpoint's)
try_step = batching.dry_run(env, model, optimizer, lambda x, y: model(x, y, mask=attention_mask(x))[1], block_size)
batch_size, gradient_accumulation_steps = batching.pick_batch(config, env, global_batch, ckpt, try_step)
accum_steps = gradient_accumulation_steps // world_size  # micro-batches this rank runs per step
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size  # the same at every length of the schedule
scaler = torch.amp.GradScaler(env["device_type"], enabled=env["ptdtype"] == torch.float16)  # fp16 needs it
iter_num, elapsed_before, early = 0, 0.0, checkpoints.EarlyStopping(patience)
if ckpt is not None:
    runtime.load_optimizer_state(optimizer, ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    train_data.set_state(ckpt["data"])  # a generator state, or the place in a pass
    runtime.set_rng_state(ckpt["rng"], env["device"])
    iter_num = ckpt["iter_num"]
    early = checkpoints.EarlyStopping(patience, ckpt["best_val_loss"], ckpt.get("early_stopping"))  # counts on
    elapsed_before = ckpt.get("elapsed_s", 0.0)  # the earlier segments' wall time (older checkpoints lack it)
    del ckpt
if master:  # the checkpoints' space, now rather than at the first save
    checkpoints.check_space(out_dir, raw_model, optimizer, keep_last)
if env["compile"]:
    # cuda_graphs: torch.compile's "reduce-overhead" replays the compiled forward and backward as CUDA graphs, one
    # launch instead of ~1000 per micro-step, which is what a micro-batch of 1 x 4096 is bound by (see PERF.md).
    # Gradients then accumulate into buffers of our own, kept between steps, never into a graph's outputs.
    # dynamic=False: a graph per shape; each length of block_size_schedule recompiles once, at its first step.
    # compile_regions: one block compiled and reused for all n_layer, a faster cold start (GPT.compile_regions).
    if regions:
        model.compile_regions()
    else:
        model = torch.compile(model, mode="reduce-overhead" if cuda_graphs else None, dynamic=False)
    if cuda_graphs:
        for p in raw_model.parameters():
            p.grad = torch.zeros_like(p)
if env["ddp"]:
    # run on CUDA (2 H200s, NCCL) and the CPU (2 gloo processes, tests/test_train.py)
    model = DDP(model, device_ids=[env["local_rank"]] if env["device_type"] == "cuda" else None)


# ----------------------------------------------------------------------------- schedule
def get_lr(it):
    """Multiplier of the peak learning rates: linear warmup, then cosine decay to min_lr_frac; or lr_schedule=wsd
    (warmup-stable-decay, modded-nanogpt's): the peak until the last cooldown_frac of the steps, then linear."""
    decay_end = lr_decay_iters or max_iters
    if it < warmup_iters:
        return (it + 1) / warmup_iters
    if it >= decay_end:
        return min_lr_frac
    if lr_schedule == "wsd":
        cooldown_start = max(warmup_iters, decay_end * (1 - cooldown_frac))
        if it < cooldown_start:
            return 1.0
        return 1 - (1 - min_lr_frac) * (it - cooldown_start) / (decay_end - cooldown_start)
    progress = (it - warmup_iters) / max(1, decay_end - warmup_iters)
    return min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))


def get_momentum(it):
    """Muon's momentum: a linear rise from muon_momentum_start over muon_momentum_warmup steps (modded-nanogpt: 0.85
    to 0.95 over 300; a low early momentum follows the fast-changing early gradients), then muon_momentum."""
    if it >= muon_momentum_warmup:
        return muon_momentum
    return muon_momentum_start + (muon_momentum - muon_momentum_start) * it / muon_momentum_warmup


def estimate_loss():
    """Mean validation loss over the same eval_iters micro-batches every time (averaged across ranks). Compiled
    (without cuda_graphs), it runs with autograd on and the loss detached: the training graphs serve it, where
    no_grad would compile inference graphs of their own (~15 s of an idle GPU at step 0 on an H200)."""
    net = model.module if env["ddp"] else model  # DDP's hooks only matter for a backward
    net.eval()
    val_data.generator.manual_seed(seed + rank)
    losses = torch.zeros(eval_iters, device=env["device"])
    with torch.set_grad_enabled(env["compile"] and not cuda_graphs):
        for k in range(eval_iters):
            x, y = val_data.gather(val_data.sample_starts(batch_size))
            x, y = x.to(env["device"]), y.to(env["device"])
            if cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            with env["autocast"]:  # no name holds the loss: its graph goes before the next forward
                losses[k] = net(x, y, mask=attention_mask(x))[1].detach()
    net.train()
    mean = losses.mean()
    if env["ddp"]:
        dist.all_reduce(mean, op=dist.ReduceOp.AVG)
    return mean.item()


# ----------------------------------------------------------------------------- loop
log = runtime.MetricsLog(out_dir, enabled=master)
peak = runtime.peak_flops(env["device"])
if master:
    print("config:", " ".join(f"{k}={v}" for k, v in config.items()))
    ns = f" | Muon's Newton-Schulz in {env['ns_dtype']}" if config["optimizer"] == "muon" else ""
    print(
        f"model: {raw_model.num_params() / 1e6:.2f}M parameters | device {env['device']} {env['ptdtype']}{ns} | "
        f"{world_size} rank(s) | {tokens_per_iter:,} tokens/step | {train_data.n_tokens:,} train tokens"
    )
    if compile_regions and not regions:
        print("compile_regions: set aside (it applies with compile=true, arch=gpt and no cuda_graphs)")
t_start, start_iter = time.time(), iter_num  # elapsed_s: elapsed_before + time since t_start (wall time over resumes)
val_loss, last_eval = float("nan"), -1
if iter_num == 0:
    val_loss, last_eval = estimate_loss(), 0
    log.log({"step": 0, "val_loss": val_loss, "tokens": 0, "elapsed_s": time.time() - t_start})
    if master:
        print(f"step 0: val loss {val_loss:.4f}")
loss_sum = torch.zeros((), device=env["device"])  # summed step losses since the last log line
steps_since_log, t_log = 0, time.time()
saver = checkpoints.Saver()  # checkpoints are written in the background, one at a time
while iter_num < max_iters and not early.stop:
    saver.check()  # a failed checkpoint write (a full disk) stops the run here
    lr_mult, momentum = get_lr(iter_num), get_momentum(iter_num)
    T = batching.block_size_at(stages, iter_num, lr_decay_iters or max_iters)  # this step's sequence length
    for group in optimizer.param_groups:
        group["lr"] = group["peak_lr"] * lr_mult
        if group["use_muon"]:
            group["momentum"] = momentum
    for micro_step, (x, y) in enumerate(get_batches(T)):
        if env["ddp"]:  # all-reduce gradients only on the last micro-batch
            model.require_backward_grad_sync = micro_step == accum_steps - 1
        if cuda_graphs:  # a new replay: the previous micro-step's graph outputs are no longer used
            torch.compiler.cudagraph_mark_step_begin()
        with env["autocast"]:
            _, loss = model(x, y, mask=attention_mask(x))
            loss = loss / accum_steps
        loss_sum += loss.detach()
        scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=not cuda_graphs)
    iter_num += 1
    steps_since_log += 1

    is_last = iter_num == max_iters
    if iter_num % log_interval == 0 or is_last or iter_num % ckpt_interval == 0:
        if env["ddp"]:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        train_loss = loss_sum.item() / steps_since_log
        runtime.check_finite(train_loss, "loss", iter_num, out_dir)
        dt = time.time() - t_log
        tok_s = steps_since_log * tokens_per_iter / dt
        record = {
            "step": iter_num,
            "loss": train_loss,
            "lr_mult": lr_mult,
            # the groups' rates now: muon_lr (with optimizer=muon only) and adamw_lr
            **{("muon_lr" if g["use_muon"] else "adamw_lr"): g["lr"] for g in optimizer.param_groups},
            **({"muon_momentum": momentum} if config["optimizer"] == "muon" else {}),
            "tok_per_s": tok_s,
            "seq_len": T,
            **runtime.memory_stats(env["device"]),
            "tokens": iter_num * tokens_per_iter,
            "elapsed_s": elapsed_before + time.time() - t_start,
        }
        if peak:
            record["mfu"] = raw_model.flops_per_token(T) * tok_s / (peak * world_size)
        log.log(record)
        if master:
            eta = (max_iters - iter_num) * (time.time() - t_start) / (iter_num - start_iter)
            mfu = f" | mfu {100 * record['mfu']:.1f}%" if peak else ""
            seq = f" | T {T}" if block_size_schedule else ""
            print(
                f"step {iter_num}/{max_iters} | loss {train_loss:.4f} | lr x{lr_mult:.3f}{seq} | {tok_s:,.0f} tok/s"
                f"{mfu} | {runtime.format_memory(record)} | eta {runtime.format_duration(eta)}",
                flush=True,
            )
        loss_sum.zero_()
        steps_since_log, t_log = 0, time.time()

    t_pause = time.time()  # evaluation and saving are left out of the next line's tokens/s
    if iter_num % eval_interval == 0 or is_last or (iter_num % ckpt_interval == 0 and last_eval != iter_num):
        val_loss, last_eval = estimate_loss(), iter_num
        # the weights about to be saved must be sound
        runtime.check_finite(val_loss, "validation loss", iter_num, out_dir)
        early.evaluated(val_loss)
        log.log(
            {
                "step": iter_num,
                "val_loss": val_loss,
                "tokens": iter_num * tokens_per_iter,
                "elapsed_s": elapsed_before + time.time() - t_start,
            }
        )
        if master:
            print(f"step {iter_num}: val loss {val_loss:.4f}")
    save = iter_num % ckpt_interval == 0 or is_last or early.must_save
    is_best = save and early.saved(iter_num, val_loss)  # on every rank: all keep the count, so all stop together
    if save and master:
        state = dict(
            model=raw_model.state_dict(),
            optimizer=optimizer.state_dict(),
            scaler=scaler.state_dict(),
            model_args=asdict(model_config),
            config=config,
            iter_num=iter_num,
            val_loss=val_loss,
            best_val_loss=early.best,
            early_stopping=early.state(),
            elapsed_s=elapsed_before + time.time() - t_start,
            rng=runtime.get_rng_state(env["device"]),
            data=train_data.state(),
        )
        saver.save(out_dir, iter_num, state, keep_last, is_best)  # written while the next steps run
    t_log += time.time() - t_pause

# ----------------------------------------------------------------------------- cleanup
if early.stop:
    stopped, line = early.record(iter_num)
    log.log(stopped)
    if master:
        print(line)
saver.finish()  # the last checkpoint on disk before the run says it is done
log.close()
if master:
    print(f"done: {iter_num} steps, best val loss {early.best:.4f}, checkpoints in {out_dir}")
if env["ddp"]:
    runtime.end_distributed()
