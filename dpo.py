"""Preference tuning (DPO): tune an SFT run on (prompt, chosen, rejected) pairs made by prepare.py --mode=dpo.

    python prepare.py --mode=dpo --tokenizer=out/tiny/tokenizer.model             # offline demo pairs
    python dpo.py config/dpo_tiny_cpu.py                                          # CPU demo (Quick start)
    python dpo.py --init_from=out/sft_137m --data_dir=data/dpo_ultrafeedback      # one GPU
    torchrun --standalone --nproc_per_node=8 dpo.py --init_from=out/sft_137m --data_dir=data/dpo_ultrafeedback
    python dpo.py config/dpo_tiny_cpu.py --init_from=resume                       # continue a stopped run
    python sample.py --out_dir=out/tiny_dpo --chat                                # talk to it

The loss is DPO's (Rafailov et al. 2023), -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) -
log ref(y_l|x))]), with log-probabilities summed over completion tokens only, plus nll_weight times the chosen
completions' mean negative log-likelihood per token (RPO, Pang et al. 2024): plain DPO can raise the margin by
making both answers less likely, the chosen one too, until greedy answers degenerate into loops; the NLL term holds
the chosen answers' likelihood up. The reference is the SFT model, frozen: no gradients, no optimizer state. Each
row of a batch holds one prompt + completion, padded after its end; a pair's chosen and rejected rows go through
the same forward pass.
"""

import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import batching
import chat
import checkpoints
import disk
import runtime
from accepts import above, at_least, auto, between, folder, ns_precision, one_of, precision, torch_device, writable
from runtime import UserError
from shards import collate_pairs, pair_rows

# ----------------------------------------------------------------------------- config
# I/O
out_dir: writable = "out/dpo"  # run folder for the preference-tuned model
init_from: one_of("resume") | folder = "out/sft"  # an SFT run folder (its best checkpoint), or resume: out_dir's
data_dir: folder = "data/dpo_stdlib"  # folder made by prepare.py --mode=dpo
overwrite = False  # allow a new run to replace one already in out_dir
eval_interval: at_least(1) = 100  # steps between evaluations (held-out loss, rewards and preference accuracy)
eval_iters: between(1, 100_000) = 10  # validation micro-batches per evaluation
log_interval: at_least(1) = 10  # steps between progress lines
ckpt_interval: at_least(1) = 100  # steps between checkpoints (one is also written at the end)
patience: at_least(0) = 0  # stop after this many evaluations without a new best held-out loss (0 = never)
keep_last: at_least(1) = 3  # step checkpoints kept (ckpt_best.safetensors, lowest held-out loss, is kept besides)
# DPO
beta: above(0) = 0.1  # inverse temperature of the preference model: rewards are beta x log(policy / reference)
nll_weight: at_least(0) = 0.2  # weight of the chosen answers' NLL per token in the loss (0 = DPO); at 0 34% loop
precompute_ref = False  # compute the reference's log-probabilities once up front, then free the reference model
# data
batch_size: auto | between(1, 2**16) = 8  # pairs per micro-batch and rank (2 rows each); auto: the most that fit
gradient_accumulation_steps: between(1, 2**16) = 1  # micro-batches per step, summed over all ranks
global_batch_size: between(0, 2**32) = 0  # pairs per step, all ranks; sets gradient_accumulation_steps if > 0
# optimizer: smaller steps than SFT, DPO only nudges a model that already answers
optimizer: one_of("muon", "adamw") = "muon"  # muon (Muon + AdamW, below) or adamw: AdamW for every parameter
lr_frac: above(0, most=1) = 0.05  # peak learning rates as a fraction of the SFT run's; 0.2 degrades (PERF.md)
muon_momentum: at_least(0, below=1) = 0.95  # Nesterov momentum of Muon (at 1 its buffer would never leave zero)
ns_dtype: ns_precision = "auto"  # Muon's Newton-Schulz precision (auto: bfloat16 on CUDA, float32 on CPU and MPS)
beta1: at_least(0, below=1) = 0.9  # AdamW
beta2: at_least(0, below=1) = 0.95  # AdamW
weight_decay: at_least(0) = 0.0  # decoupled weight decay on matrices and embedding
grad_clip: at_least(0) = 1.0  # clip the global gradient norm to this (0 = off)
max_iters: at_least(1) = 200  # optimizer steps
warmup_iters: at_least(0) = 10  # linear warmup steps
lr_decay_iters: at_least(0) = 0  # the linear decay ends here (0 = max_iters)
min_lr_frac: between(0.0, 1.0) = 0.0  # final learning rate as a fraction of the peak (linear decay)
# system
device: torch_device = "auto"  # auto (cuda > mps > cpu), cuda, cuda:N, mps, cpu; one this machine has
dtype: precision = "auto"  # auto: bfloat16 on CUDA, float32 on MPS and CPU (backends.py)
compile = False  # torch.compile of the policy; rows change length every batch, so it recompiles often
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
global_batch = batching.check_batch(config, world_size, batching.memory_limit(env["device"]))  # pairs a step
torch.manual_seed(seed)

# ----------------------------------------------------------------------------- policy, reference and tokenizer
REF = "ref.safetensors"  # the frozen reference's weights, kept in out_dir so that a resumed run finds the same ones
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
muon_lr, learning_rate = runtime.fine_tuning_lrs(ckpt.get("config", {}), lr_frac, resume, ckpt_path)
config.update(muon_lr=muon_lr, learning_rate=learning_rate)  # the peak rates, stored
if resume and not (out / REF).is_file():
    raise UserError(f"{out} has no {REF} (the frozen reference); it was not written by dpo.py")
ref_path = out / REF if resume else ckpt_path
ref_model = checkpoints.build_model(checkpoints.load_checkpoint(ref_path) if resume else ckpt, ref_path)
ref_model = ref_model.to(env["device"]).eval().requires_grad_(False)
tok, base_tokenizer = chat.load_run_tokenizer(base, data_dir, "dpo", flag)
if not resume and checkpoints.step_checkpoints(out) and not overwrite:
    raise UserError(f"{out_dir} already holds a run; use --init_from=resume, --overwrite=true or another --out_dir")


# ----------------------------------------------------------------------------- data
def load_pairs(split):
    """(prompt, chosen, rejected) int64 token arrays per pair; pairs longer than the model's context are dropped."""
    rows, too_long = pair_rows(data_dir, split, model.config.vocab_size, model.config.block_size)
    if too_long and master:
        print(
            f"{split}: dropped {too_long} of {len(rows) + too_long} pairs longer than the model's context of "
            f"{model.config.block_size} tokens (prepare.py --mode=dpo --block_size={model.config.block_size} "
            f"truncates them instead)"
        )
    if not rows:
        raise UserError(f"no {split} pair in {data_dir} fits the model's context of {model.config.block_size}")
    return rows


train_rows, val_rows = load_pairs("train"), load_pairs("val")
longest = max(len(p) + max(len(c), len(r)) - 1 for p, c, r in train_rows)  # tokens in the longest training row
generator = torch.Generator().manual_seed(seed)


def collate(pairs):
    """collate_pairs on the device: chosen rows first, then rejected ones."""
    x, y = collate_pairs(pairs)
    return x.to(env["device"]), y.to(env["device"])


def get_batches():
    """This rank's micro-batches of one step, as (pair indices, x, y); all ranks draw the whole step's pairs."""
    picks = torch.randint(len(train_rows), (gradient_accumulation_steps * batch_size,), generator=generator)
    mine = picks[rank * accum_steps * batch_size : (rank + 1) * accum_steps * batch_size].tolist()
    for j in range(accum_steps):
        batch = mine[j * batch_size : (j + 1) * batch_size]
        yield (batch, *collate([train_rows[i] for i in batch]))


def sequence_logps(model, x, y):
    """Summed log-probability of each row's targets, targets of -1 left out: (B,) float32."""
    _, token_losses = model(x, y, reduction="none")  # (B, T), 0 where the target is -1
    return -token_losses.sum(1)


@torch.no_grad()
def reference_logps(x, y, table=None, picks=None):
    """The reference's summed log-probabilities of the rows of collate(pairs[picks]): looked up in table (the
    (n_pairs, 2) precomputed chosen/rejected values) when there is one, else computed by the reference model."""
    if table is not None:
        return table[picks].T.reshape(-1)
    with env["autocast"]:
        return sequence_logps(ref_model, x, y).float()


def precompute(rows):
    """(n_pairs, 2) reference log-probabilities of every pair's chosen and rejected completion."""
    out = [reference_logps(*collate(rows[a : a + batch_size])) for a in range(0, len(rows), batch_size)]
    return torch.cat([logps.view(2, -1).T for logps in out])


def dpo_loss(policy, reference, y):
    """Mean loss of a batch (DPO's, plus nll_weight x the chosen completions' NLL per token) and TRL's statistics
    (STATS), from (2B,) summed log-probabilities with the chosen rows first and the rows' targets y (-1 = none).
    Rewards = beta x log-ratio."""
    chosen, rejected = (beta * (policy.float() - reference)).chunk(2)
    margins = chosen - rejected
    nll = -policy.float().chunk(2)[0].sum() / (y.chunk(2)[0] != -1).sum()  # per token: long answers weigh no more
    loss = -F.logsigmoid(margins).mean() + nll_weight * nll
    stats = torch.stack([loss, chosen.mean(), rejected.mean(), (margins > 0).float().mean(), margins.mean(), nll])
    return loss, stats.detach()


def dry_loss(x, y):
    """batch_size=auto's dry runs: the policy's DPO loss with the reference's forward pass, as in training."""
    return dpo_loss(sequence_logps(model, x, y), reference_logps(x, y), y)[0]


STATS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "nll"]


# ----------------------------------------------------------------------------- optimizer
# from here on `optimizer` is the optimizer itself; config["optimizer"] keeps its name
optimizer = runtime.make_optimizer(
    model, muon_lr, muon_momentum, learning_rate, (beta1, beta2), weight_decay, optimizer, env["ns_dtype"]
)
# batch_size=auto: dry runs at the longest pair find the largest micro-batch that fits (a resume keeps its own);
# with precompute_ref the reference is still there, and its forward pass still in them: a cautious choice
try_step = batching.dry_run(env, model, optimizer, dry_loss, longest, rows=2)
batch_size, gradient_accumulation_steps = batching.pick_batch(
    config, env, global_batch, ckpt if resume else None, try_step
)
accum_steps = gradient_accumulation_steps // world_size
ref_train = ref_val = None
if precompute_ref:  # every rank computes all of them: any rank may draw any pair
    t0 = time.time()
    ref_train, ref_val = precompute(train_rows), precompute(val_rows)
    del ref_model  # its memory goes back; from here on reference_logps looks the values up
    if master:
        print(f"reference log-probabilities of {len(train_rows) + len(val_rows)} pairs in {time.time() - t0:.1f}s")
scaler = torch.amp.GradScaler(env["device_type"], enabled=env["ptdtype"] == torch.float16)
iter_num, early = 0, checkpoints.EarlyStopping(patience)
if resume:
    runtime.load_optimizer_state(optimizer, ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    generator.set_state(ckpt["data"])
    runtime.set_rng_state(ckpt["rng"], env["device"])
    iter_num = ckpt["iter_num"]
    early = checkpoints.EarlyStopping(patience, ckpt["best_val_loss"], ckpt.get("early_stopping"))  # counts on
model_config = model.config
if master:
    if not resume:
        for old in [*checkpoints.step_checkpoints(out), out / checkpoints.BEST, out / "metrics.jsonl", out / REF]:
            old.unlink(missing_ok=True)
        shutil.rmtree(out / "tb", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    if not resume:  # on resume out_dir is the base and already holds them
        disk.copy_file(base_tokenizer, out / base_tokenizer.name)
        checkpoints.atomic_save({"model": ckpt["model"], "model_args": ckpt["model_args"]}, out / REF)
    checkpoints.check_space(out_dir, model, optimizer, keep_last)  # now, not at the first save
del ckpt
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
def evaluate(rows, table):
    """Held-out DPO loss and rewards (val_ + STATS), and how often the policy and the reference give the chosen
    completion the higher likelihood (val_prefers_chosen, ref_prefers_chosen): the models' own preferences,
    which TRL's rewards/accuracies (0 at the start, when the policy is the reference) is not."""
    model.eval()
    sums = torch.zeros(len(STATS) + 3, device=env["device"])
    mine = list(range(len(rows)))[rank::world_size]
    for a in range(0, len(mine), batch_size):
        picks = mine[a : a + batch_size]
        x, y = collate([rows[i] for i in picks])
        with env["autocast"]:
            policy = sequence_logps(model, x, y).float()
        reference = reference_logps(x, y, table, picks)
        _, stats = dpo_loss(policy, reference, y)
        prefers = [(logps[: len(picks)] > logps[len(picks) :]).sum() for logps in (policy, reference)]
        sums += torch.cat([stats * len(picks), torch.stack(prefers), sums.new_tensor([len(picks)])])
    model.train()
    if env["ddp"]:
        dist.all_reduce(sums)
    values = (sums[:-1] / sums[-1]).tolist()
    return dict(zip([f"val_{k}" for k in STATS] + ["val_prefers_chosen", "ref_prefers_chosen"], values, strict=True))


def report(step, r):
    print(
        f"step {step}: held-out loss {r['val_loss']:.4f} | margins {r['val_rewards/margins']:+.3f} | chosen NLL/token "
        f"{r['val_nll']:.3f} | "
        f"rewards/accuracies {r['val_rewards/accuracies']:.2f} | prefers chosen: policy "
        f"{r['val_prefers_chosen']:.2f}, SFT reference {r['ref_prefers_chosen']:.2f}"
    )


# ----------------------------------------------------------------------------- loop
log = runtime.MetricsLog(out_dir, enabled=master)
if master:
    print("config:", " ".join(f"{k}={v}" for k, v in config.items()))
    print(
        f"dpo: {raw_model.num_params() / 1e6:.2f}M parameters from {ckpt_path}, reference {ref_path} (frozen) | "
        f"beta {beta} | nll_weight {nll_weight} | peak lr muon {muon_lr:.2e} adamw {learning_rate:.2e} | "
        f"{len(train_rows)} train / {len(val_rows)} val pairs | device {env['device']} "
        f"{env['ptdtype']} | {world_size} rank(s)"
    )
val_loss, last_eval = float("nan"), -1
held_out = val_rows[: eval_iters * batch_size]
if iter_num == 0:
    result = evaluate(held_out, ref_val)
    val_loss, last_eval = result["val_loss"], 0
    log.log({"step": 0, **result})
    if master:
        report(0, result)
stats_sum = torch.zeros(len(STATS), device=env["device"])
steps_since_log, t_log, t_start, start_iter, tokens = 0, time.time(), time.time(), iter_num, 0
saver = checkpoints.Saver()  # checkpoints are written in the background, one at a time
while iter_num < max_iters and not early.stop:
    saver.check()  # a failed checkpoint write (a full disk) stops the run here
    lr_mult = get_lr(iter_num)
    for group in optimizer.param_groups:
        group["lr"] = group["peak_lr"] * lr_mult
    for micro_step, (picks, x, y) in enumerate(get_batches()):
        if env["ddp"]:
            model.require_backward_grad_sync = micro_step == accum_steps - 1
        with env["autocast"]:
            policy = sequence_logps(model, x, y)
        loss, stats = dpo_loss(policy, reference_logps(x, y, ref_train, picks), y)
        loss = loss / accum_steps
        stats_sum += stats / accum_steps
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
            dist.all_reduce(stats_sum, op=dist.ReduceOp.AVG)
        train = dict(zip(STATS, (stats_sum / steps_since_log).tolist(), strict=True))
        runtime.check_finite(train["loss"], "loss", iter_num, out_dir)
        dt = time.time() - t_log
        record = {
            "step": iter_num,
            **train,
            "lr_mult": lr_mult,
            "tok_per_s": tokens / dt,
            **runtime.memory_stats(env["device"]),
            "elapsed_s": time.time() - t_start,
        }
        log.log(record)
        if master:
            eta = (max_iters - iter_num) * (time.time() - t_start) / (iter_num - start_iter)
            print(
                f"step {iter_num}/{max_iters} | loss {train['loss']:.4f} | rewards chosen "
                f"{train['rewards/chosen']:+.3f} rejected {train['rewards/rejected']:+.3f} accuracies "
                f"{train['rewards/accuracies']:.2f} margins {train['rewards/margins']:+.3f} | lr x{lr_mult:.3f} | "
                f"{tokens / dt:,.0f} tok/s | {runtime.format_memory(record)} | eta {runtime.format_duration(eta)}",
                flush=True,
            )
        stats_sum.zero_()
        steps_since_log, t_log, tokens = 0, time.time(), 0

    t_pause = time.time()
    if iter_num % eval_interval == 0 or is_last or (iter_num % ckpt_interval == 0 and last_eval != iter_num):
        result = evaluate(held_out, ref_val)
        val_loss, last_eval = result["val_loss"], iter_num
        runtime.check_finite(val_loss, "validation loss", iter_num, out_dir)
        early.evaluated(val_loss)
        log.log({"step": iter_num, **result})
        if master:
            report(iter_num, result)
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
        )
        saver.save(out_dir, iter_num, state, keep_last, is_best)  # written while the next steps run
    t_log += time.time() - t_pause
if early.stop:
    stopped, line = early.record(iter_num)
    log.log(stopped)
    if master:
        print(line)

# ----------------------------------------------------------------------------- held-out preference accuracy, cleanup
result = evaluate(val_rows, ref_val)
log.log(
    {
        "step": iter_num,
        "all_val_prefers_chosen": result["val_prefers_chosen"],
        "all_ref_prefers_chosen": result["ref_prefers_chosen"],
    }
)
if master:
    print(
        f"held-out preference accuracy ({len(val_rows)} pairs, chosen more likely than rejected): SFT "
        f"{result['ref_prefers_chosen']:.1%} -> DPO {result['val_prefers_chosen']:.1%}"
    )
saver.finish()  # the last checkpoint on disk before the run says it is done
log.close()
if master:
    print(f"done: {iter_num} steps, best held-out loss {early.best:.4f}, checkpoints in {out_dir}")
if env["ddp"]:
    runtime.end_distributed()
