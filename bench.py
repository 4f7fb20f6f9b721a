"""Measure a config on whatever device this runs on: training, the optimizer step, generation, the data path.

    python bench.py config/pretrain_137m.py --peer=true           # the 137M reference (GPU), and nanoGPT's GPT-2
    python bench.py config/pretrain_137m.py --seq_lens=4096 --batch_size=1 --activation_checkpointing=true \\
        --gradient_accumulation_steps=128 --compile_modes=on,graphs   # low memory at 4K context
    python bench.py config/tiny_cpu.py                            # CPU; on a Mac add --device=mps (docs/backends.md)
    torchrun --standalone --nproc_per_node=8 bench.py config/pretrain_137m.py --compile_modes= --graph_modes=
        # the distributed Muon step: each rank orthogonalises its share and the updates are all-gathered

Training rows time whole optimizer steps (gradient_accumulation_steps micro-batches + the optimizer) on random
tokens, with the tokens of a micro-batch held at batch_size x block_size for every sequence length. MFU =
flops_per_token (6N + 12 L d T) x tokens/s over the device's dense bf16 peak (runtime.PEAK_FLOPS). The full
figures go to a JSON file; a short table is printed last. A train.py config file works as it is: the keys
bench.py has no use for (out_dir, max_iters, ...) are skipped. Under torchrun every rank measures its own GPU at
the same time and the Muon step is the distributed one; rank 0 prints and writes the results.
"""

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import checkpoints
import runtime
from accepts import (
    above,
    at_least,
    auto,
    between,
    comma_list,
    empty,
    int_list,
    ns_precision,
    precision,
    torch_device,
    writable_file,
)
from model import GPT, GPTConfig, KVCache, document_mask
from peer import NanoGPT
from shards import TokenWindows, write_shard

# ----------------------------------------------------------------------------- config
# model (a train.py config file sets these)
vocab_size: between(1, 2**32) = 32000  # tokens in the vocabulary
n_layer: between(1, 1024) = 12  # transformer blocks
n_head: at_least(1) = 6  # attention heads (head size 128)
n_embd: between(1, 2**16) = 768  # residual width
mlp_hidden: between(1, 2**18) = 3072  # SwiGLU hidden width
block_size: between(4, 4096) = 4096  # longest sequence, and the model's context
rope_theta: above(0) = 10000.0  # RoPE base
activation_checkpointing = False  # recompute blocks in backward
# the speedrun recipes' model changes (issue 37), to time their cost: as train.py's keys (model.GPTConfig's fields)
qk_norm = False  # RMS-norm q and k per head
attn_scale: at_least(0) = 0.0  # attention softmax scale; 0 = 1/sqrt(head size)
zero_init = False  # output projections start at zero (no speed effect; a model key, so accepted)
logit_softcap: at_least(0) = 0.0  # logits = cap * tanh(logits / cap); 0 = off
value_embeds = False  # gated value embeddings on every other layer
x0_shortcut = False  # learned mix of the embedding into every block's input
value_residual = False  # learned mix of layer 0's attention values into later layers'
embed_norm = False  # RMS-norm the token embedding
batch_size: between(1, 2**16) = 8  # sequences of block_size per micro-batch (shorter ones: as many tokens)
gradient_accumulation_steps: between(1, 2**16) = 16  # micro-batches per step (the config's: its reference batch)
muon_lr: at_least(0) = 0.02  # optimizer settings, as train.py (they do not change the speed)
muon_momentum: at_least(0, below=1) = 0.95  # Nesterov momentum of Muon (at 1 its buffer would never leave zero)
learning_rate: at_least(0) = 0.006  # AdamW learning rate
weight_decay: at_least(0) = 0.0  # decoupled weight decay
ns_dtype: ns_precision = "auto"  # Muon's Newton-Schulz precision (auto: bfloat16 on CUDA, float32 on CPU and MPS)
# what to measure
seq_lens: int_list = ""  # training sequence lengths; "" = block_size/4, block_size/2, block_size
compile_modes: auto | empty | comma_list("off", "on", "regions", "graphs") = "auto"  # auto: off,on on CUDA, else off
doc_len: at_least(0) = 0  # training rows: documents of this many tokens, attention inside them (doc_mask); 0 = off
train_steps: at_least(1) = 3  # timed optimizer steps per training row (after one warm-up step)
optimizer_steps: at_least(1) = 10  # timed steps of Muon alone and of AdamW alone
prompt_len: at_least(0) = 0  # prefill length for the generation rows (0: block_size / 2, at most 512)
new_tokens: at_least(0) = 0  # tokens decoded per generation row (0: block_size / 4, at most 256)
decode_batches: int_list = "1,8"  # batch sizes for generation
graph_modes: empty | comma_list("off", "on", "tuned") = "off,on"  # decoding: eager, CUDA graph, graph + tuned kernels
data_batches: at_least(1) = 200  # batches drawn from the shard reader
peer = False  # also time the anchor: a GPT-2 as nanoGPT builds and benches it, at this config's depth/width
out: writable_file = "out/bench.json"  # full results, as JSON (out/ is git-ignored: not into the checkout)
device: torch_device = "auto"  # auto (cuda > mps > cpu), cuda, mps, cpu; one this machine has
dtype: precision = "auto"  # auto (bfloat16 on CUDA, float32 on MPS and CPU: backends.py), float32, bfloat16, float16
seed: between(0, 2**32 - 1) = 0  # weights and random tokens
# -----------------------------------------------------------------------------
runtime.install_error_handler()
config = runtime.configure(
    globals(),
    sys.argv[1:],
    skip_foreign=True,
    rules=[  # the relations between keys, checked with the values (see runtime.configure)
        (lambda c: c.n_embd % (2 * c.n_head) == 0, "n_embd={n_embd} must be n_head={n_head} x an even head size"),
        (
            lambda c: not c.seq_lens or max(map(int, c.seq_lens.split(","))) <= c.block_size,
            "seq_lens={seq_lens} has a length over block_size={block_size}",
        ),
        (
            lambda c: (
                not c.graph_modes
                or (c.prompt_len or min(512, c.block_size // 2)) + (c.new_tokens or min(256, c.block_size // 4))
                <= c.block_size
            ),
            "prompt_len + new_tokens is over block_size={block_size}; lower them",
        ),
        (
            lambda c: not c.doc_len or "graphs" not in c.compile_modes,
            "doc_len needs compile_modes without graphs (train.py refuses doc_mask with cuda_graphs)",
        ),
    ],
)
env = runtime.setup_device(device, dtype, ns_dtype=ns_dtype)
dev, cuda = env["device"], env["device_type"] == "cuda"
if compile_modes == "auto":  # eager everywhere, and compiled where compile=auto compiles (backends.py: CUDA)
    compile_modes = "off,on" if env["defaults"]["compile"] else "off"
prompt_len = prompt_len or min(512, block_size // 2)
new_tokens = new_tokens or min(256, block_size // 4)
config.update(compile_modes=compile_modes, ns_dtype=env["ns_dtype"], prompt_len=prompt_len, new_tokens=new_tokens)
log = print if env["master"] else lambda *args, **kwargs: None  # under torchrun, rank 0 speaks for all
torch.manual_seed(seed)
lengths = [int(t) for t in seq_lens.split(",")] if seq_lens else [block_size // 4, block_size // 2, block_size]
peak = runtime.peak_flops(dev)
model_config = GPTConfig(
    **{k: config[k] for k in checkpoints.ARCH_KEYS}, activation_checkpointing=activation_checkpointing
)


def sync():
    if cuda:  # run on H100 and H200
        torch.cuda.synchronize()
    elif env["device_type"] == "mps":  # never run (torch.mps.synchronize, as documented)
        torch.mps.synchronize()


def timed(fn, n):
    """Seconds per call of fn, over n calls after the device has caught up."""
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t0) / n


def reset_memory():
    if cuda:  # run on H100 and H200; MPS and the CPU keep no peak to reset
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def bench_training(T, mode):
    """tokens/s, MFU and peak memory of whole optimizer steps at sequence length T, as train.py runs them with
    compile=false (mode off), compile=true (on), compile_regions=true (regions) or cuda_graphs=true (graphs)."""
    reset_memory()
    raw = GPT(model_config).to(dev)
    graphs = mode == "graphs"
    model = (
        torch.compile(raw, dynamic=False, mode="reduce-overhead" if graphs else None)
        if mode in ("on", "graphs")
        else raw
    )
    if mode == "regions":
        raw.compile_regions()
    optimizer = runtime.make_optimizer(
        raw, muon_lr, muon_momentum, learning_rate, (0.9, 0.95), weight_decay, ns_dtype=env["ns_dtype"]
    )
    if graphs:  # gradients accumulate into buffers of our own, never into a graph's outputs
        for p in raw.parameters():
            p.grad = torch.zeros_like(p)
    B = max(1, batch_size * block_size // T)
    batches = [torch.randint(0, vocab_size, (B, T + 1), device=dev) for _ in range(2)]
    for xy in batches if doc_len else []:
        xy[:, ::doc_len] = 1  # a document starts every doc_len tokens with the boundary, id 1 as prepare.py's

    def step():
        for k in range(gradient_accumulation_steps):
            xy = batches[k % 2]
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            x, y = xy[:, :-1].contiguous(), xy[:, 1:].contiguous()  # as train.py's inputs: its compiled graphs
            with env["autocast"]:
                _, loss = model(x, y, mask=document_mask(x, 1) if doc_len else None)
            (loss / gradient_accumulation_steps).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=not graphs)

    t_compile = timed(step, 1)  # the first step compiles and allocates the optimizer state
    dt = timed(step, train_steps)
    tok_s = B * T * gradient_accumulation_steps / dt
    return {
        "seq_len": T,
        "batch_size": B,
        "compile": mode,
        "doc_len": doc_len,
        "tok_per_s": tok_s,
        "mfu": raw.flops_per_token(T) * tok_s / peak if peak else None,
        "peak_mem_gib": runtime.memory_stats(dev)["peak_mem_gib"],
        "step_s": dt,
        "first_step_s": t_compile,
    }


def bench_optimizer():
    """Muon (hidden matrices) + AdamW (embedding, gains), against AdamW on every parameter: one step each."""
    model = GPT(model_config).to(dev)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    muon = runtime.make_optimizer(
        model, muon_lr, muon_momentum, learning_rate, (0.9, 0.95), weight_decay, ns_dtype=env["ns_dtype"]
    )
    adamw = torch.optim.AdamW(model.parameters(), lr=learning_rate, fused=cuda)
    result = {}
    for name, opt in (("muon", muon), ("adamw", adamw)):
        opt.step()  # state allocation stays out of the timing
        result[f"{name}_step_s"] = timed(opt.step, optimizer_steps)
    return result


def bench_peer():
    """nanoGPT's bench.py setting: GPT-2 (vocabulary 50304, learned positions, heads of 64, tied head) at this
    config's depth and width, batch 12 x 1024, compiled, fused AdamW stepping after every micro-batch."""
    T, V, B = min(1024, block_size), 50304, 12
    peer_model = NanoGPT(GPTConfig(block_size=T, vocab_size=V, n_layer=n_layer, n_embd=n_embd)).to(dev)
    loss_fn = torch.compile(peer_model) if cuda else peer_model
    optimizer = torch.optim.AdamW(peer_model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=cuda)
    x, y = (torch.randint(0, V, (B, T), device=dev) for _ in range(2))

    def step():
        with env["autocast"]:
            _, loss = loss_fn(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    timed(step, 3)  # compile and warm up
    tok_s = B * T / timed(step, 2 * train_steps)
    N = peer_model.num_params()  # nanoGPT leaves positions out
    flops = peer_model.flops_per_token(T)
    return {
        "params": N,
        "batch_size": B,
        "seq_len": T,
        "tok_per_s": tok_s,
        "mfu": flops * tok_s / peak if peak else None,
    }


@torch.no_grad()
def bench_generation(B, mode):
    """Prefill tokens/s of a prompt_len prompt and greedy decode tokens/s over new_tokens, at batch B: the
    loop of GPT.generate, with the cache and (mode on or tuned) the captured step set up once, outside the timing."""
    model = GPT(model_config).to(dev).eval()
    if env["ptdtype"] != torch.float32:
        model.to(env["ptdtype"])  # as sample.py: weights in the compute precision
    prompt = torch.randint(0, vocab_size, (B, prompt_len), device=dev)
    cache = KVCache(model_config, B, prompt_len + new_tokens, dev, env["ptdtype"])
    graph = mode != "off"
    step = model.capture_decode(cache, tuned=mode == "tuned") if graph else None

    def prefill():
        cache.pos = 0
        return model(prompt, cache=cache)[0][:, -1]

    def decode():
        next_id = prefill().argmax(-1, keepdim=True)
        for position in range(prompt_len, prompt_len + new_tokens):
            if graph:
                logits = step(next_id, position)
            else:
                logits = model.decode(next_id, cache, torch.tensor(position, device=dev))
            next_id = logits.argmax(-1, keepdim=True)

    decode()  # warm up
    t_prefill, t_total = timed(prefill, 3), timed(decode, 2)
    return {
        "batch_size": B,
        "graph": graph,
        "tuned": mode == "tuned",
        "prefill_tok_per_s": B * prompt_len / t_prefill,
        "decode_tok_per_s": B * new_tokens / (t_total - t_prefill),
    }


def bench_data(B, T):
    """Batches/s of (B, T) windows from the shard reader, pinned and copied to the device as train.py does."""
    with tempfile.TemporaryDirectory() as tmp:
        tokens = np.random.default_rng(seed).integers(0, vocab_size, 50 * 2**20, dtype=np.int64)
        write_shard(Path(tmp) / "train_000000.bin", tokens, vocab_size)
        data = TokenWindows(tmp, "train", T, vocab_size, seed)

        def get_batch():
            x, y = data.gather(data.sample_starts(B))
            if env["defaults"]["pin_memory"]:  # run on CUDA
                x, y = x.pin_memory(), y.pin_memory()
            return x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)

        dt = timed(get_batch, data_batches)
    return {"batch_size": B, "seq_len": T, "batches_per_s": 1 / dt, "tok_per_s": B * T / dt}


# ----------------------------------------------------------------------------- run
n_params = GPT(model_config).num_params()
log(
    f"bench: {n_params / 1e6:.1f}M parameters | {dev} {env['ptdtype']} | Muon's Newton-Schulz in {env['ns_dtype']} | "
    f"compile_modes {compile_modes} | peak {peak and peak / 1e12} TFLOP/s"
)
results = {"config": config, "device": torch.cuda.get_device_name(dev) if cuda else dev, "params": n_params}
results["training"] = []
for mode in [m for m in compile_modes.split(",") if m]:
    if mode == "graphs" and not env["defaults"]["cuda_graphs"]:  # run on CUDA only
        continue
    for T in lengths:
        row = bench_training(T, mode)
        torch._dynamo.reset()  # compiled graphs hold on to their model: free it before the next row
        results["training"].append(row)
        log(f"train T={T} compile={mode}: {row['tok_per_s']:,.0f} tok/s, {row['peak_mem_gib']:.2f} GiB", flush=True)
if peer:
    results["peer"] = bench_peer()
    log(f"peer GPT-2 (nanoGPT) T={results['peer']['seq_len']}: {results['peer']['tok_per_s']:,.0f} tok/s", flush=True)
results["optimizer"] = bench_optimizer()
steps = [r["step_s"] for r in results["training"] if r["seq_len"] == lengths[-1]]
results["optimizer"]["muon_share_of_step"] = results["optimizer"]["muon_step_s"] / min(steps) if steps else None
results["generation"] = []
for mode in [m for m in graph_modes.split(",") if m]:
    if mode != "off" and not env["defaults"]["cuda_graphs"]:  # captured decode steps: run on CUDA only
        continue
    for B in [int(b) for b in decode_batches.split(",") if b]:
        row = bench_generation(B, mode)
        results["generation"].append(row)
        log(f"generate B={B} graph={mode}: decode {row['decode_tok_per_s']:,.0f} tok/s", flush=True)
B_data = max(1, batch_size * block_size // lengths[-1])
results["data"] = bench_data(B_data, lengths[-1])
if env["ddp"]:
    runtime.end_distributed()
if not env["master"]:
    sys.exit(0)
Path(out).parent.mkdir(parents=True, exist_ok=True)
Path(out).write_text(json.dumps(results, indent=1))

# ----------------------------------------------------------------------------- table
print(f"\n{results['device']} | {n_params / 1e6:.1f}M params | {env['ptdtype']} | full results in {out}")
print("| training | compile | batch x T | tok/s | MFU | peak mem | first step (compiles) |")
print("|---|---|---|---|---|---|---|")
for r in results["training"]:
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
    print(
        f"| T={r['seq_len']}{f', docs of {doc_len}' if doc_len else ''} | {r['compile']} "
        f"| {r['batch_size']} x {r['seq_len']} "
        f"| {r['tok_per_s']:,.0f} | {mfu} | {r['peak_mem_gib']:.2f} GiB | {r['first_step_s']:.1f} s |"
    )
if peer:
    p, mfu = results["peer"], f"{100 * results['peer']['mfu']:.1f}%" if results["peer"]["mfu"] else "-"
    name = f"peer: GPT-2 {p['params'] / 1e6:.1f}M as nanoGPT | {'on' if cuda else 'off'}"
    print(f"| {name} | {p['batch_size']} x {p['seq_len']} | {p['tok_per_s']:,.0f} | {mfu} | - | - |")
o = results["optimizer"]
share = o["muon_share_of_step"]
print(
    f"optimizer step: Muon+AdamW {1e3 * o['muon_step_s']:.1f} ms (Newton-Schulz in {env['ns_dtype']}), "
    f"AdamW alone {1e3 * o['adamw_step_s']:.1f} ms"
    + (f"; Muon = {100 * share:.1f}% of a training step at T={lengths[-1]}" if share else "")
)
for r in results["generation"]:
    print(
        f"generation B={r['batch_size']} graph={'tuned' if r['tuned'] else 'on' if r['graph'] else 'off'}: prefill "
        f"{r['prefill_tok_per_s']:,.0f} tok/s, decode {r['decode_tok_per_s']:,.0f} tok/s"
    )
d = results["data"]
print(f"data: {d['batches_per_s']:,.0f} batches/s of {d['batch_size']} x {d['seq_len']} = {d['tok_per_s']:,.0f} tok/s")
