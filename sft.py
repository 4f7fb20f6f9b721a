"""Supervised fine-tuning: turn a pretrained run into a chat model on conversations made by prepare.py --mode=sft.

    python prepare.py --mode=sft --tokenizer=out/tiny/tokenizer.model             # offline demo conversations
    python sft.py config/sft_tiny_cpu.py                                          # CPU demo (Quick start)
    python sft.py --init_from=out/pretrain_137m --data_dir=data/sft_ultrachat    # one GPU
    torchrun --standalone --nproc_per_node=8 sft.py --init_from=out/pretrain_137m --data_dir=data/sft_ultrachat
    python sft.py config/sft_tiny_cpu.py --init_from=resume                       # continue a stopped run
    python sample.py --out_dir=out/tiny_sft --chat                                # talk to it

The loss is the cross-entropy on assistant tokens only (and the <|end|> closing each answer). Each row of a
batch holds one conversation, padded after its end, so no conversation attends to another.

Fine-tuning must not undo pretraining. Two guards, both measured on the reference run (PERF.md, issue 25): the
learning rates are a small fraction (lr_frac) of the base run's, as nanochat's SFT runs at 2% of its pretraining
rates; and `replay` of each batch's rows are windows of the base run's pretraining data, whose mean loss over every
token is added to the conversations' mean loss, so the model keeps predicting the code it was trained on. Each
evaluation prints the held-out loss on that pretraining data beside the masked validation loss.
"""

import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import batching
import chat
import checkpoints
import disk
import runtime
from accepts import above, at_least, auto, between, folder, ns_precision, one_of, precision, torch_device, writable
from runtime import UserError
from shards import TokenWindows, find_shards, open_shard

# ----------------------------------------------------------------------------- config
# I/O
out_dir: writable = "out/sft"  # run folder for the fine-tuned model
init_from: one_of("resume") | folder = "out/run"  # a pretrained run folder (its best checkpoint), or resume: out_dir's
data_dir: folder = "data/sft_stdlib"  # folder made by prepare.py --mode=sft
overwrite = False  # allow a new run to replace one already in out_dir
eval_interval: at_least(1) = 100  # steps between evaluations (masked validation loss and sample answers)
eval_iters: between(1, 100_000) = 10  # validation micro-batches per evaluation
log_interval: at_least(1) = 10  # steps between progress lines
ckpt_interval: at_least(1) = 100  # steps between checkpoints (one is also written at the end)
patience: at_least(0) = 0  # stop after this many evaluations without a new best validation loss (0 = never)
keep_last: at_least(1) = 3  # step checkpoints kept (ckpt_best.safetensors is kept besides)
num_samples: at_least(0) = 3  # held-out prompts answered at each evaluation
max_new_tokens: at_least(1) = 128  # answer length limit, for samples and the end-of-turn measurement
# data
batch_size: auto | between(1, 2**16) = 8  # conversations per micro-batch and rank; auto: most that fit (+ global_batch)
gradient_accumulation_steps: between(1, 2**16) = 1  # micro-batches per step, summed over all ranks
global_batch_size: between(0, 2**32) = 0  # conversations per step, all ranks; sets gradient_accumulation_steps if > 0
replay: at_least(0, below=1) = 0.25  # share of a micro-batch's rows that are pretraining windows (0 = off); see below
# optimizer: much smaller steps than pretraining, the model already knows the language
optimizer: one_of("muon", "adamw") = "muon"  # muon (Muon + AdamW, below) or adamw: AdamW for every parameter
lr_frac: above(0, most=1) = 0.05  # peak learning rates as a fraction of the base run's (its muon_lr and learning_rate)
muon_momentum: at_least(0, below=1) = 0.95  # Nesterov momentum of Muon (at 1 its buffer would never leave zero)
ns_dtype: ns_precision = "auto"  # Muon's Newton-Schulz precision (auto: bfloat16 on CUDA, float32 on CPU and MPS)
beta1: at_least(0, below=1) = 0.9  # AdamW
beta2: at_least(0, below=1) = 0.95  # AdamW
weight_decay: at_least(0) = 0.0  # decoupled weight decay on matrices and embedding
grad_clip: at_least(0) = 1.0  # clip the global gradient norm to this (0 = off)
max_iters: at_least(1) = 300  # optimizer steps
warmup_iters: at_least(0) = 20  # linear warmup steps
lr_decay_iters: at_least(0) = 0  # the linear decay ends here (0 = max_iters)
min_lr_frac: between(0.0, 1.0) = 0.0  # final learning rate as a fraction of the peak (linear decay)
# system
device: torch_device = "auto"  # auto (cuda > mps > cpu), cuda, cuda:N, mps, cpu; one this machine has
dtype: precision = "auto"  # auto: bfloat16 on CUDA, float32 on MPS and CPU (backends.py)
compile = False  # torch.compile; rows change length every batch, so it recompiles often
seed: between(0, 2**32 - 1) = 1337  # data order
# -----------------------------------------------------------------------------
runtime.install_error_handler()
config = runtime.configure(
    globals(),
    sys.argv[1:],
    rules=[lambda c: batching.check_batch(vars(c), c.world_size, 1)],  # batch_size=auto on the device: below
)

# ----------------------------------------------------------------------------- device / DDP
env = runtime.setup_device(device, dtype, compile, ns_dtype)
config["ns_dtype"] = env["ns_dtype"]  # what auto chose, printed and stored
master, world_size, rank = env["master"], env["world_size"], env["rank"]
global_batch = batching.check_batch(config, world_size, batching.memory_limit(env["device"]))  # conversations a step
torch.manual_seed(seed)

# ----------------------------------------------------------------------------- model and tokenizer
out = Path(out_dir)
resume = init_from == "resume"
base = out if resume else Path(init_from)
flag = "--out_dir" if resume else "--init_from"  # where the user named base: error messages say which to check
ckpt_path = checkpoints.find_checkpoint(base, "latest" if resume else "best", flag)
ckpt = checkpoints.load_checkpoint(ckpt_path)
if resume:  # checkpoints keep naming the run this one started from (eval.py follows it back)
    config["init_from"] = ckpt["config"]["init_from"]
runtime.check_optimizer(optimizer, ckpt if resume else None, out_dir)  # a new run starts with fresh state: either one
model = checkpoints.build_model(ckpt, ckpt_path).to(env["device"])
tok, base_tokenizer = chat.load_run_tokenizer(base, data_dir, "sft", flag)
muon_lr, learning_rate = runtime.fine_tuning_lrs(ckpt.get("config", {}), lr_frac, resume, ckpt_path)
config.update(muon_lr=muon_lr, learning_rate=learning_rate)  # the peak rates, stored: a DPO run takes its own from them
chain = checkpoints.lineage(base, ckpt.get("config", {}))  # back to the pretraining run: its data is replayed, scored
pretrain_dir = chain[-1][1].get("data_dir") if checkpoints.run_kind(chain[-1][1]) == "pretrain" else None
if not (pretrain_dir and Path(pretrain_dir).is_dir()):
    pretrain_dir = None  # unknown, moved or deleted: nothing to replay or score
if replay and pretrain_dir is None:
    raise UserError(
        f"replay={replay} needs the pretraining data of {base}, which is gone or unknown; make it again with "
        f"prepare.py or set --replay=0"
    )
if not resume and checkpoints.step_checkpoints(out) and not overwrite:
    raise UserError(f"{out_dir} already holds a run; use --init_from=resume, --overwrite=true or another --out_dir")


# ----------------------------------------------------------------------------- data
def load_conversations(split):
    """(ids, targets) int64 arrays per conversation; targets are -1 wherever the loss mask is 0."""
    ids, mask = [], []
    for path in find_shards(data_dir, split):
        if not path.with_suffix(".mask").is_file():
            raise UserError(f"{path} has no loss mask beside it; make SFT data with prepare.py --mode=sft")
        ids.append(np.asarray(open_shard(path, model.config.vocab_size), dtype=np.int64))
        mask.append(np.asarray(open_shard(path.with_suffix(".mask"), 2), dtype=bool))
    ids, mask = np.concatenate(ids), np.concatenate(mask)
    starts = list(np.flatnonzero(ids == tok.bos_id)) + [len(ids)]
    rows, too_long = [], 0
    for a, b in zip(starts[:-1], starts[1:], strict=True):
        x, m = ids[a:b], mask[a:b]
        if len(x) - 1 > model.config.block_size:  # prepare.py's --block_size may exceed the model's context
            too_long += 1
            continue
        rows.append((x[:-1], np.where(m[1:], x[1:], -1)))
    if too_long and master:
        print(
            f"{split}: dropped {too_long} of {len(starts) - 1} conversations longer than the model's context "
            f"of {model.config.block_size} tokens (prepare.py --mode=sft --block_size={model.config.block_size} "
            f"drops them up front)"
        )
    if not rows:
        raise UserError(f"no {split} conversation in {data_dir} fits the model's context of {model.config.block_size}")
    return rows


train_rows, val_rows = load_conversations("train"), load_conversations("val")
longest = max(len(x) for x, _ in train_rows)  # tokens in the longest training row
generator = torch.Generator().manual_seed(seed)
# pretraining windows: replayed in training, and held out to measure forgetting (a short context is enough for that)
replay_T = min(model.config.block_size, 512)  # tokens per held-out window
replay_train = pretrain_dir and TokenWindows(
    pretrain_dir, "train", model.config.block_size, model.config.vocab_size, seed
)
replay_val = pretrain_dir and TokenWindows(pretrain_dir, "val", replay_T, model.config.vocab_size, seed)


def collate(rows):
    """Pad a list of conversations to the longest; padding has target -1 and comes after each conversation."""
    T = max(len(x) for x, _ in rows)
    X = torch.zeros(len(rows), T, dtype=torch.long)
    Y = torch.full((len(rows), T), -1, dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        X[i, : len(x)], Y[i, : len(y)] = torch.from_numpy(x), torch.from_numpy(y)
    return X.to(env["device"]), Y.to(env["device"])


def get_batches():
    """This rank's micro-batches of one step, as (x, y, conversation rows): the conversations first, then the replay
    windows, as long as the batch's longest conversation. All ranks draw the whole step's rows, as in train.py."""
    n = batch_size - n_replay  # conversations per micro-batch
    picks = torch.randint(len(train_rows), (gradient_accumulation_steps * n,), generator=generator)
    mine = picks[rank * accum_steps * n : (rank + 1) * accum_steps * n].tolist()
    starts = replay_train.sample_starts(gradient_accumulation_steps * n_replay) if n_replay else []
    starts = starts[rank * accum_steps * n_replay : (rank + 1) * accum_steps * n_replay]
    for j in range(accum_steps):
        x, y = collate([train_rows[i] for i in mine[j * n : (j + 1) * n]])
        if n_replay:
            rx, ry = replay_train.gather(starts[j * n_replay : (j + 1) * n_replay], x.shape[1])
            x, y = torch.cat([x, rx.to(x.device)]), torch.cat([y, ry.to(y.device)])
        yield x, y, n


def sft_loss(x, y, n):
    """(loss, replay loss): the mean loss on the assistant tokens of rows [:n], plus the mean loss on every token of
    the replay rows [n:] when there are any (their weight does not grow with their length)."""
    _, losses = model(x, y, reduction="none")  # (B, T), 0 where the target is -1
    counts = (y != -1).sum(1)
    loss = losses[:n].sum() / counts[:n].sum().clamp(min=1)
    if n == len(x):
        return loss, torch.zeros((), device=x.device)
    replayed = losses[n:].sum() / counts[n:].sum()
    return loss + replayed, replayed.detach()


# ----------------------------------------------------------------------------- optimizer
# from here on `optimizer` is the optimizer itself; config["optimizer"] keeps its name
optimizer = runtime.make_optimizer(
    model, muon_lr, muon_momentum, learning_rate, (beta1, beta2), weight_decay, optimizer, env["ns_dtype"]
)
# batch_size=auto: dry runs at the longest conversation find the largest micro-batch that fits (a resume keeps its own)
try_step = batching.dry_run(env, model, optimizer, lambda x, y: model(x, y)[1], longest)
batch_size, gradient_accumulation_steps = batching.pick_batch(
    config, env, global_batch, ckpt if resume else None, try_step
)
accum_steps = gradient_accumulation_steps // world_size
n_replay = min(max(round(replay * batch_size), 1), batch_size - 1) if replay else 0  # at least one row of each kind
if replay and batch_size < 2:
    raise UserError(f"replay={replay} needs batch_size >= 2 (a conversation and a replayed window); or --replay=0")
scaler = torch.amp.GradScaler(env["device_type"], enabled=env["ptdtype"] == torch.float16)
iter_num, early = 0, checkpoints.EarlyStopping(patience)
if resume:
    runtime.load_optimizer_state(optimizer, ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    generator.set_state(ckpt["data"])
    if replay_train and ckpt.get("replay_data") is not None:  # runs from before replay have no such state
        replay_train.generator.set_state(ckpt["replay_data"])
    runtime.set_rng_state(ckpt["rng"], env["device"])
    iter_num = ckpt["iter_num"]
    early = checkpoints.EarlyStopping(patience, ckpt["best_val_loss"], ckpt.get("early_stopping"))  # counts on
model_config = model.config
del ckpt
if master:
    if not resume:
        for old in [*checkpoints.step_checkpoints(out), out / checkpoints.BEST, out / "metrics.jsonl"]:
            old.unlink(missing_ok=True)
        shutil.rmtree(out / "tb", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    if not resume:  # on resume out_dir is the base and already holds it
        disk.copy_file(base_tokenizer, out / base_tokenizer.name)
    checkpoints.check_space(out_dir, model, optimizer, keep_last)  # now, not at the first save
raw_model = model
if env["compile"]:
    model = torch.compile(model, dynamic=True)
if env["ddp"]:
    # run on CUDA and the CPU (gloo); never on MPS
    model = DDP(model, device_ids=[env["local_rank"]] if env["device_type"] == "cuda" else None)


# ----------------------------------------------------------------------------- schedule
def get_lr(it):
    """Multiplier of the peak learning rates: linear warmup, then linear decay to min_lr_frac."""
    if it < warmup_iters:
        return (it + 1) / warmup_iters
    decay_end = lr_decay_iters or max_iters
    return 1 - (1 - min_lr_frac) * min(1, (it - warmup_iters) / max(1, decay_end - warmup_iters))


@torch.no_grad()
def estimate_loss():
    """Masked validation loss: mean over assistant tokens of the first eval_iters x batch_size conversations."""
    model.eval()
    total, count = torch.zeros((), device=env["device"]), torch.zeros((), device=env["device"])
    mine = val_rows[rank::world_size][: eval_iters * batch_size]
    for a in range(0, len(mine), batch_size):
        x, y = collate(mine[a : a + batch_size])
        with env["autocast"]:
            _, loss = model(x, y)
        n = (y != -1).sum()
        total, count = total + loss.float() * n, count + n
    model.train()
    if env["ddp"]:
        dist.all_reduce(total)
        dist.all_reduce(count)
    return (total / count).item()


@torch.no_grad()
def pretrain_loss():
    """Held-out loss on the pretraining data (eval_iters x batch_size windows of replay_T tokens, the same ones at
    every evaluation): the forgetting that replay and small learning rates guard against. NaN without that data."""
    if pretrain_dir is None:
        return float("nan")
    model.eval()
    total = torch.zeros((), device=env["device"])
    replay_val.generator.manual_seed(seed + rank)  # the same windows at every evaluation
    for _ in range(eval_iters):
        x, y = replay_val.gather(replay_val.sample_starts(batch_size))
        with env["autocast"]:
            _, loss = model(x.to(env["device"]), y.to(env["device"]))
        total += loss.float()
    model.train()
    if env["ddp"]:
        dist.all_reduce(total, op=dist.ReduceOp.AVG)
    return (total / eval_iters).item()


@torch.no_grad()
def answer(x):
    """Greedy answer to a held-out prompt (its tokens up to the first <|assistant|>); (text, ended with <|end|>)."""
    prompt = x[: np.flatnonzero(x == tok.special["<|assistant|>"])[0] + 1]
    end = tok.special[chat.END]
    raw_model.eval()
    ids = raw_model.generate(
        torch.tensor(prompt[None], device=env["device"]), max_new_tokens, temperature=0, stop_token=end
    )[0, len(prompt) :].tolist()  # prompt[None]: one (1, T) array; a list of arrays is slow and warns
    raw_model.train()
    return tok.decode(prompt), tok.decode([i for i in ids if i != end]), end in ids


# ----------------------------------------------------------------------------- loop
log = runtime.MetricsLog(out_dir, enabled=master)
if master:
    print("config:", " ".join(f"{k}={v}" for k, v in config.items()))
    print(
        f"sft: {raw_model.num_params() / 1e6:.2f}M parameters from {ckpt_path} | {len(train_rows)} train / "
        f"{len(val_rows)} val conversations | replay {n_replay}/{batch_size} rows from {pretrain_dir} | peak lr "
        f"muon {muon_lr:.2e} adamw {learning_rate:.2e} | device {env['device']} {env['ptdtype']} | {world_size} rank(s)"
    )
val_loss, last_eval = float("nan"), -1
if iter_num == 0:
    val_loss, last_eval, pre_loss = estimate_loss(), 0, pretrain_loss()
    log.log({"step": 0, "val_loss": val_loss, "pretrain_val_loss": pre_loss})
    if master:
        print(f"step 0: masked val loss {val_loss:.4f} | pretraining data held-out loss {pre_loss:.4f}")
loss_sum, replay_sum = torch.zeros((), device=env["device"]), torch.zeros((), device=env["device"])
steps_since_log, t_log, t_start, start_iter, tokens = 0, time.time(), time.time(), iter_num, 0
saver = checkpoints.Saver()  # checkpoints are written in the background, one at a time
while iter_num < max_iters and not early.stop:
    saver.check()  # a failed checkpoint write (a full disk) stops the run here
    lr_mult = get_lr(iter_num)
    for group in optimizer.param_groups:
        group["lr"] = group["peak_lr"] * lr_mult
    for micro_step, (x, y, n) in enumerate(get_batches()):
        if env["ddp"]:
            model.require_backward_grad_sync = micro_step == accum_steps - 1
        with env["autocast"]:
            loss, replayed = sft_loss(x, y, n)
            loss = loss / accum_steps
        loss_sum += loss.detach()
        replay_sum += replayed / accum_steps
        tokens += x.numel() * world_size
        scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    iter_num += 1
    steps_since_log += 1

    is_last = iter_num == max_iters
    if iter_num % log_interval == 0 or is_last or iter_num % ckpt_interval == 0:
        if env["ddp"]:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
            dist.all_reduce(replay_sum, op=dist.ReduceOp.AVG)
        train_loss, replay_loss = loss_sum.item() / steps_since_log, replay_sum.item() / steps_since_log
        runtime.check_finite(train_loss, "loss", iter_num, out_dir)
        dt = time.time() - t_log
        record = {
            "step": iter_num,
            "loss": train_loss,
            "replay_loss": replay_loss,
            "lr_mult": lr_mult,
            "tok_per_s": tokens / dt,
            **runtime.memory_stats(env["device"]),
            "elapsed_s": time.time() - t_start,
        }
        log.log(record)
        if master:
            eta = (max_iters - iter_num) * (time.time() - t_start) / (iter_num - start_iter)
            print(
                f"step {iter_num}/{max_iters} | loss {train_loss:.4f} (replay {replay_loss:.4f}) | lr x{lr_mult:.3f} | "
                f"{tokens / dt:,.0f} tok/s"
                f" | {runtime.format_memory(record)} | eta {runtime.format_duration(eta)}",
                flush=True,
            )
        loss_sum.zero_()
        replay_sum.zero_()
        steps_since_log, t_log, tokens = 0, time.time(), 0

    t_pause = time.time()
    if iter_num % eval_interval == 0 or is_last or (iter_num % ckpt_interval == 0 and last_eval != iter_num):
        val_loss, last_eval, pre_loss = estimate_loss(), iter_num, pretrain_loss()
        runtime.check_finite(val_loss, "validation loss", iter_num, out_dir)
        early.evaluated(val_loss)
        log.log({"step": iter_num, "val_loss": val_loss, "pretrain_val_loss": pre_loss})
        if master:
            print(f"step {iter_num}: masked val loss {val_loss:.4f} | pretraining data held-out loss {pre_loss:.4f}")
            for x, _ in val_rows[:num_samples]:
                question, reply, _ = answer(x)
                print(f"  {question.strip()!r} -> {reply.strip()!r}")
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
            rng=runtime.get_rng_state(env["device"]),
            data=generator.get_state(),
            replay_data=replay_train.generator.get_state() if replay_train else None,
        )
        saver.save(out_dir, iter_num, state, keep_last, is_best)  # written while the next steps run
    t_log += time.time() - t_pause
if early.stop:
    stopped, line = early.record(iter_num)
    log.log(stopped)
    if master:
        print(line)

# ----------------------------------------------------------------------------- end-of-turn rate, cleanup
if master and iter_num > start_iter:  # a finished run resumed (reference.sh again) trained nothing to check
    held_out = val_rows[:64]
    ended = sum(answer(x)[2] for x, _ in held_out)
    log.log({"step": iter_num, "eot_rate": ended / len(held_out)})
    print(
        f"end-of-turn: {ended}/{len(held_out)} held-out answers ({100 * ended / len(held_out):.0f}%) end with "
        f"{chat.END} within {max_new_tokens} tokens"
    )
saver.finish()  # the last checkpoint on disk before the run says it is done
log.close()
if master:
    print(f"done: {iter_num} steps, best masked val loss {early.best:.4f}, checkpoints in {out_dir}")
if env["ddp"]:
    runtime.end_distributed()
