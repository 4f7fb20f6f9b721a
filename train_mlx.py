"""Pretrain a GPT with MLX, from the same config files, shards, tokenizer and checkpoints as train.py.

    python train_mlx.py config/tiny_cpu.py                      # the Apple GPU on a Mac; the CPU on Linux
    python train_mlx.py config/pretrain_137m.py                 # the reference model, on a Mac with the memory
    python train_mlx.py config/tiny_cpu.py --init_from=resume   # continue a stopped run exactly
    python sample.py --out_dir=out/tiny                         # sample from it with PyTorch

The model mirrors model.py class by class and attribute by attribute, so parameter names map one to one; the
optimizer mirrors muon.py. Weights start as model.py's GPT makes them under the same seed, batches come from the
same TokenWindows, and checkpoints are runtime's safetensors files with PyTorch's names and PyTorch's optimizer
layout: sample.py reads an MLX run, and train.py and train_mlx.py can resume each other's runs.

Config: the globals below; a config file and --key=value override them (checked: see runtime.configure).
"""

import math
import sys
import time
from dataclasses import asdict
from functools import partial

import numpy as np
import torch

import backends
import batching
import checkpoints
import model as torch_model_lib
import runtime
from accepts import above, any_text, at_least, auto, between, folder, mlx_device, one_of, writable
from runtime import UserError
from shards import TokenWindows, find_shards, read_header
from tokenizer import find_tokenizer, load_tokenizer

try:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_map, tree_unflatten
except ImportError:  # the MLX extra is optional: one line, not a traceback
    print('error: MLX is not installed; pip install -e ".[mlx]" (mlx on a Mac, mlx[cpu] on Linux)', file=sys.stderr)
    sys.exit(2)

# ----------------------------------------------------------------------------- config
# I/O
out_dir: writable = "out/run"  # run folder: checkpoints, metrics.jsonl, tb/, a copy of the tokenizer
data_dir: folder = "data/stdlib"  # folder made by prepare.py: tokenizer.model, train_*.bin, val_*.bin
init_from: one_of("scratch", "resume") = "scratch"  # resume: from out_dir's last checkpoint, of either trainer
overwrite = False  # allow init_from=scratch to replace a run already in out_dir
eval_interval: at_least(1) = 250  # steps between validation-loss evaluations
eval_iters: between(1, 100_000) = 20  # micro-batches per evaluation
log_interval: at_least(1) = 10  # steps between progress lines / metrics records
ckpt_interval: at_least(1) = 500  # steps between checkpoints (one is also written at the end)
keep_last: at_least(1) = 3  # step checkpoints kept (ckpt_best.safetensors is kept besides)
patience: at_least(0) = 0  # stop after this many evaluations without a new best validation loss (0 = never)
# data
batch_size: auto | between(1, 2**16) = 8  # sequences per micro-batch; auto: the most MLX's memory fits (+ global_batch)
block_size: between(1, 4096) = 1024  # sequence length in tokens: the model's context
gradient_accumulation_steps: between(1, 2**16) = 8  # micro-batches per step
global_batch_size: between(0, 2**32) = 0  # sequences per step; sets gradient_accumulation_steps (0 = batch x accum)
block_size_schedule: any_text = ""  # length curriculum, "T:share,...", e.g. "1024:0.8,4096:0.2"; "" = block_size only
doc_mask = False  # attention stays inside documents (each starts with <|endoftext|>), not across the window
data_order: one_of("random", "epoch") = "random"  # random: nanoGPT's windows; epoch: every token once a pass, shuffled
# model
vocab_size: between(0, 2**32) = 0  # 0 = the data folder's tokenizer size; a set value must match the shards
n_layer: between(1, 1024) = 12  # transformer blocks
n_head: at_least(1) = 12  # attention heads (n_embd / n_head is the head size)
n_embd: between(1, 2**16) = 768  # residual width
mlp_hidden: between(1, 2**18) = 3072  # SwiGLU hidden width
rope_theta: above(0) = 10000.0  # RoPE base
activation_checkpointing = False  # recompute blocks in backward (mx.checkpoint): less memory, more compute
# the speedrun recipes' model changes (issue 37): off by default; model.GPTConfig says where each comes from
qk_norm = False  # RMS-norm q and k per head (modded-nanogpt, nanochat)
attn_scale: at_least(0) = 0.0  # attention softmax scale; 0 = 1/sqrt(head size). modded-nanogpt: 0.12 with qk_norm
zero_init = False  # attention and MLP output projections start at zero (loss at init ~15 with the tied embeddings)
logit_softcap: at_least(0) = 0.0  # logits = cap * tanh(logits / cap); 0 = off. nanochat and modded-nanogpt: 15
value_embeds = False  # gated value embeddings on every other layer, the last included (nanochat)
x0_shortcut = False  # learned mix of the embedding into the input of every block (nanochat's x0_lambdas)
value_residual = False  # learned mix of layer 0's attention values into every later layer's (modded-nanogpt)
embed_norm = False  # RMS-norm the token embedding before the first block (nanochat)
# optimizer
optimizer: one_of("muon", "adamw") = "muon"  # Muon + AdamW (below), or AdamW for all at learning_rate (then ~1e-3)
muon_lr: at_least(0) = 0.02  # Muon learning rate for the hidden matrices (spectral-norm scale, not AdamW's)
muon_momentum: at_least(0, below=1) = 0.95  # Nesterov momentum of Muon (at 1 its buffer would never leave zero)
muon_momentum_start: at_least(0, below=1) = 0.85  # Muon's momentum at step 0 with muon_momentum_warmup (modded-nanogpt)
muon_momentum_warmup: at_least(0) = 0  # steps of a linear rise from muon_momentum_start to muon_momentum (0 = off)
muon_weight_decay: auto | float & at_least(0) = "auto"  # decoupled decay of Muon's matrices; auto: weight_decay's
cautious_wd = False  # weight decay only where the update and the weight share a sign (muon.py; modded-nanogpt)
ns_dtype: one_of("auto", "float32", "bfloat16") = "auto"  # Muon's Newton-Schulz (auto: float32, backends.py)
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
device: mlx_device = "auto"  # auto (MLX's default: the GPU on a Mac, the CPU with mlx[cpu]), gpu, cpu
dtype: one_of("auto", "float32", "bfloat16") = "auto"  # compute (auto: bf16 on a GPU; no fp16: loss scaling)
compile: auto | bool = "auto"  # mx.compile the training step and the update (auto: on, backends.py)
seed: between(0, 2**32 - 1) = 1337  # model init (model.py's, through torch) and data order


# ----------------------------------------------------------------------------- model (mirrors model.py)
class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones((dim,))

    def __call__(self, x):
        return mx.fast.rms_norm(x, self.weight, self.eps)


def apply_rope(x, cos, sin):
    """x: (B, n_head, T, head_dim); cos/sin: (T, head_dim). Rotate-half, as model.apply_rope."""
    x1, x2 = mx.split(x, 2, axis=-1)
    return x * cos + mx.concatenate([-x2, x1], axis=-1) * sin


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.c_q = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_k = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_v = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.qk_norm, self.eps, self.scale = config.qk_norm, config.norm_eps, config.attn_scale
        if config.value_embeds and torch_model_lib.has_value_embeds(layer_idx, config.n_layer):
            self.ve_gate = mx.zeros((config.n_head, min(torch_model_lib.VE_GATE_CHANNELS, config.n_embd)))
        if config.value_residual and layer_idx > 0:
            self.v_lambda = mx.full((1,), 0.5)

    def __call__(self, x, cos, sin, mask=None, ve=None, v_first=None):
        """The output and this layer's values, as model.CausalSelfAttention.forward."""
        B, T, C = x.shape
        hd = C // self.n_head
        # (B, T, C) -> (B, n_head, T, hd)
        q = self.c_q(x).reshape(B, T, self.n_head, hd).transpose(0, 2, 1, 3)
        k = self.c_k(x).reshape(B, T, self.n_head, hd).transpose(0, 2, 1, 3)
        v = self.c_v(x).reshape(B, T, self.n_head, hd).transpose(0, 2, 1, 3)
        if self.qk_norm:
            q, k = mx.fast.rms_norm(q, None, self.eps), mx.fast.rms_norm(k, None, self.eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if v_first is not None:
            v = v_first + self.v_lambda.astype(v.dtype) * (v - v_first)  # torch.lerp
        if ve is not None:
            gate = 2 * mx.sigmoid(x[..., : self.ve_gate.shape[1]] @ self.ve_gate.T)  # (B, T, n_head)
            v = v + gate.transpose(0, 2, 1)[..., None] * ve.reshape(B, T, self.n_head, hd).transpose(0, 2, 1, 3)
        mask = "causal" if mask is None else mask  # mask: document_mask's, to stay inside documents
        y = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale or 1.0 / math.sqrt(hd), mask=mask)
        y = y.transpose(0, 2, 1, 3).reshape(B, T, C)  # (B, n_head, T, hd) -> (B, T, C)
        return self.c_proj(y), v


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_gate = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
        self.c_fc = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
        self.c_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=False)

    def __call__(self, x):
        return self.c_proj(nn.silu(self.c_gate(x)) * self.c_fc(x))


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)

    def __call__(self, x, cos, sin, mask=None, ve=None, v_first=None):
        y, v = self.attn(self.ln_1(x), cos, sin, mask, ve, v_first)
        x = x + y
        return x + self.mlp(self.ln_2(x)), v


class GPT(nn.Module):
    """model.GPT's modules and names. The weights are not initialised here: load them (load_torch_weights)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=[Block(config, i) for i in range(config.n_layer)],
            ln_f=RMSNorm(config.n_embd, config.norm_eps),
        )
        L = config.n_layer
        # model.py's value_embeds.<layer>: a list, {} where a layer has none, as MLX reads numbered names as list
        # indices (tree_unflatten)
        layers = [config.value_embeds and torch_model_lib.has_value_embeds(i, L) for i in range(L)]
        self.value_embeds = [nn.Embedding(config.vocab_size, config.n_embd) if on else {} for on in layers]
        if config.x0_shortcut:
            self.resid_lambdas, self.x0_lambdas = mx.ones((L,)), mx.zeros((L,))
        # model.py's tables, as constants (a leading underscore keeps them out of the parameters)
        cos, sin = torch_model_lib.rope_tables(config.n_embd // config.n_head, config.block_size, config.rope_theta)
        self._rope_cos, self._rope_sin = mx.array(cos.numpy()), mx.array(sin.numpy())

    def lm_head(self, x):
        """The output head: tied, as in model.py, so it is the embedding matrix used as a linear layer; fp32 logits,
        softcapped with logit_softcap (model.softcap)."""
        logits, cap = self.transformer["wte"].as_linear(x).astype(mx.float32), self.config.logit_softcap
        return cap * mx.tanh(logits / cap) if cap else logits

    def hidden(self, idx, bos_id=None):
        """Final normed hidden states (B, T, C) of idx (B, T); with bos_id, attention inside documents."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size={self.config.block_size}")
        x = self.transformer["wte"](idx)  # (B, T, C)
        if self.config.embed_norm:
            x = mx.fast.rms_norm(x, None, self.config.norm_eps)
        cos, sin = self._rope_cos[:T].astype(x.dtype), self._rope_sin[:T].astype(x.dtype)
        mask = None if bos_id is None else document_mask(idx, bos_id)
        x0, v_first = x, None
        for i, block in enumerate(self.transformer["h"]):  # as model.GPT.blocks
            if self.config.x0_shortcut:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[i](idx) if self.value_embeds[i] else None  # an Embedding, or {}
            run = nn.utils.checkpoint(block) if self.config.activation_checkpointing else block
            x, v = run(x, cos, sin, mask, ve, v_first)
            v_first = v if self.config.value_residual and i == 0 else v_first
        return self.transformer["ln_f"](x)

    def logits(self, idx, bos_id=None):
        """fp32 logits (B, T, vocab_size) at every position."""
        return self.lm_head(self.hidden(idx, bos_id))

    def __call__(self, idx, targets, bos_id=None):
        """Mean cross-entropy over targets != -1, as model.GPT.forward(idx, targets)[1]."""
        valid = targets >= 0
        losses = nn.losses.cross_entropy(self.logits(idx, bos_id), mx.maximum(targets, 0)) * valid  # (B, T)
        return losses.sum() / mx.maximum(valid.sum(), 1)


def document_mask(idx, bos_id):
    """model.document_mask's dense mask: (B, 1, T, T), True where j <= i and no bos_id lies in (j, i]."""
    T = idx.shape[1]
    doc = mx.cumsum(idx == bos_id, axis=1)  # (B, T): which document of the row each position is in
    return ((doc[:, :, None] == doc[:, None, :]) & mx.tril(mx.ones((T, T), dtype=mx.bool_)))[:, None]


def loss_with(model, params, x, y, dtype=mx.float32, bos_id=None):
    """The model's loss with the weights params (name -> fp32 array), computed in dtype (bos_id: attention inside
    documents). A pure function of params, so mx.value_and_grad differentiates it (fp32 grads) and mx.compile
    compiles it."""
    if dtype != mx.float32:
        params = tree_map(lambda p: p.astype(dtype), params)
    model.update(tree_unflatten(list(params.items())))
    return model(x, y, bos_id)


def load_torch_weights(model, torch_model):
    """Copy a model.GPT's weights into the MLX GPT, name by name (strict: every name and shape must match).
    named_parameters() lists the tied lm_head.weight once, as transformer.wte.weight."""
    weights = [(n, mx.array(p.detach().float().cpu().numpy())) for n, p in torch_model.named_parameters()]
    model.load_weights(weights, strict=True)


def store_torch_weights(params, torch_model):
    """Copy MLX parameters (a name -> array dict) into a model.GPT, in fp32."""
    with torch.no_grad():
        for n, p in torch_model.named_parameters():
            p.copy_(torch.from_numpy(np.array(params[n].astype(mx.float32))))


# ----------------------------------------------------------------------------- optimizer (mirrors muon.py)
MX_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16}  # a Muon group's ns_dtype, in MLX


def zeropower_via_newtonschulz5(G, steps=5, dtype=mx.bfloat16):
    """muon.zeropower_via_newtonschulz5: the same quintic coefficients, iteration count and arithmetic in dtype
    (muon.NS_DTYPE's bf16 by default; training passes its group's ns_dtype, float32 unless set)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.astype(dtype)
    transposed = G.shape[-2] > G.shape[-1]
    if transposed:  # iterate on the wide orientation: X @ X.T is then the smaller Gram matrix
        X = X.swapaxes(-2, -1)
    norm = mx.linalg.norm(X.astype(mx.float32), axis=(-2, -1), keepdims=True)  # torch's bf16 norm accumulates in fp32
    X = X / (norm.astype(dtype) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.swapaxes(-2, -1)
        B = mx.addmm(A, A, A, alpha=c, beta=b)  # b*A + c*A@A, rounded once, as torch.baddbmm in muon.py
        X = mx.addmm(X, B, X, beta=a)  # a*X + B@X
    if transposed:
        X = X.swapaxes(-2, -1)
    return X


def make_groups(torch_optimizer, torch_model):
    """runtime.make_optimizer's groups (which parameter gets Muon, which AdamW, and their hyperparameters) as
    (hyperparameters, [parameter names]): the same split for both trainers, decided in one place."""
    names = {id(p): n for n, p in torch_model.named_parameters()}
    return [
        ({k: v for k, v in g.items() if k != "params"}, [names[id(p)] for p in g["params"]])
        for g in torch_optimizer.param_groups
    ]


def init_state(params, groups):
    """Zero state in muon.py's names: momentum_buffer for Muon; step, exp_avg, exp_avg_sq for AdamW."""
    state = {}
    for hyper, names in groups:
        for n in names:
            zeros = mx.zeros_like(params[n])
            adamw = {"step": mx.array(0.0), "exp_avg": zeros, "exp_avg_sq": zeros}
            state[n] = {"momentum_buffer": zeros} if hyper["use_muon"] else adamw
    return state


def optimizer_update(params, grads, state, lr_mult, momentum, groups, grad_clip):
    """Clip the global gradient norm (as torch.nn.utils.clip_grad_norm_), then one step of muon.Muon on name ->
    array dicts. momentum: Muon's (m, 1 - m) now, as arrays (the schedule's; each rounded from Python's double, as
    torch rounds its scalars), or None: the group's. Pure, so mx.compile can fuse it; returns the new params and
    state."""
    if grad_clip > 0:
        total = mx.sqrt(sum(mx.sum(mx.square(g)) for g in grads.values()))
        coef = mx.minimum(grad_clip / (total + 1e-6), 1.0)
        grads = {n: g * coef for n, g in grads.items()}
    params, state = dict(params), dict(state)
    for hyper, names in groups:
        lr, wd = hyper["peak_lr"] * lr_mult, hyper["weight_decay"]
        for n in names:
            p, g, s = params[n], grads[n], state[n]
            if hyper["use_muon"]:
                m, rest = (hyper["momentum"], 1 - hyper["momentum"]) if momentum is None else momentum
                buf = s["momentum_buffer"] + rest * (g - s["momentum_buffer"])  # buf.lerp_(g, 1 - m)
                direction = g + m * (buf - g) if hyper["nesterov"] else buf
                ns = {"dtype": MX_DTYPES[hyper["ns_dtype"]]} if "ns_dtype" in hyper else {}  # the device's
                update = zeropower_via_newtonschulz5(direction, hyper["ns_steps"], **ns)
                scale = max(1.0, p.shape[-2] / p.shape[-1]) ** 0.5
                params[n] = decay(p, update, lr * wd, hyper["cautious_wd"]) - (lr * scale) * update.astype(p.dtype)
                state[n] = {"momentum_buffer": buf}
            else:
                beta1, beta2 = hyper["betas"]
                t = s["step"] + 1
                exp_avg = s["exp_avg"] + (1 - beta1) * (g - s["exp_avg"])
                exp_avg_sq = s["exp_avg_sq"] * beta2 + (1 - beta2) * g * g
                denom = mx.sqrt(exp_avg_sq / (1 - beta2**t)) + hyper["eps"]
                params[n] = decay(p, exp_avg, lr * wd, hyper["cautious_wd"]) - (lr / (1 - beta1**t)) * exp_avg / denom
                state[n] = {"step": t, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    return params, state


def decay(p, update, amount, cautious):
    """muon.py's decoupled weight decay p (1 - amount); cautious: only where update and p share a sign
    (muon.decay_where_same_sign)."""
    if cautious:
        return p * mx.where(update * p >= 0, 1 - amount, 1.0)
    return p * (1 - amount)


def dry_run(model, params, opt_state, groups, dtype, T, limit, bos_id=None):
    """try_step for batching.pick_batch (batch_size=auto): one micro-batch's loss and gradients and an optimizer update
    on size x T zero tokens, uncompiled, their results thrown away (nothing changes in place). Raises MemoryError
    where MLX's peak passes limit bytes: on a Mac, memory past it is swapped rather than refused."""

    def try_step(size):
        x = mx.zeros((size, T), dtype=mx.int32)
        mx.reset_peak_memory()
        loss, grads = mx.value_and_grad(partial(loss_with, model, dtype=dtype, bos_id=bos_id))(params, x, x)
        mx.eval(loss, grads, optimizer_update(params, grads, opt_state, mx.array(0.0), None, groups, 0.0))
        if mx.get_peak_memory() > limit:
            raise MemoryError(
                f"peak {mx.get_peak_memory() / 2**30:.2f} GiB is over the {limit / 2**30:.2f} GiB allowed"
            )

    return try_step


def load_torch_state(torch_optimizer, torch_model):
    """The MLX state from a muon.Muon's state (what runtime.load_optimizer_state restored from a checkpoint)."""
    return {
        n: {k: mx.array(v.float().numpy()) for k, v in torch_optimizer.state[p].items()}
        for n, p in torch_model.named_parameters()
    }


def store_torch_state(state, torch_optimizer, torch_model):
    """Write the MLX state into a muon.Muon, so its state_dict() is the checkpoint's optimizer entry."""
    for n, p in torch_model.named_parameters():
        torch_optimizer.state[p] = {k: torch.from_numpy(np.array(v)) for k, v in state[n].items()}


# ----------------------------------------------------------------------------- the run (when not imported)
if __name__ == "__main__":
    runtime.install_error_handler()
    config = runtime.configure(
        globals(),
        sys.argv[1:],
        rules=[  # the relations between keys, checked with the values (see runtime.configure)
            (lambda c: c.n_embd % (2 * c.n_head) == 0, "n_embd={n_embd} must be n_head={n_head} x an even head size"),
            lambda c: batching.check_batch(vars(c), 1, 1),  # and batch_size=auto, against MLX's limit, below
            lambda c: batching.parse_schedule(c.block_size_schedule, c.block_size),
        ],
    )

    # ------------------------------------------------------------------------- device
    if device != "auto":
        mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)
    on_gpu = mx.default_device() == mx.gpu
    # what auto means on MLX's GPU (never run) or CPU (run with mlx[cpu] on Linux): backends.device_defaults
    defaults = backends.device_defaults("mlx-gpu" if on_gpu else "mlx-cpu", torch.__version__)
    dtype = defaults["dtype"] if dtype == "auto" else dtype
    compile = defaults["compile"] if compile == "auto" else compile
    ns_dtype = defaults["ns_dtype"] if ns_dtype == "auto" else ns_dtype
    config.update(compile=compile, ns_dtype=ns_dtype)  # what auto chose, printed and stored
    compute_dtype = {"float32": mx.float32, "bfloat16": mx.bfloat16}[dtype]
    # what a batch_size=auto dry run may peak at: a share of the Mac GPU's recommended working set (MLX's own limit
    # is 1.5 times that, and memory past it is swapped), or of MLX's limit on the CPU (from the RAM)
    working_set = mx.device_info().get("max_recommended_working_set_size") if on_gpu else None
    limit = batching.AUTO_HEADROOM * (working_set or mx.get_memory_limit())
    global_batch = batching.check_batch(config, 1, limit)  # sequences a step
    stages = batching.parse_schedule(block_size_schedule, block_size)  # [(sequence length, share of the run)]
    torch.manual_seed(seed)  # the initial weights are model.py's: the same as train.py's for this seed

    # ------------------------------------------------------------------------- data
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
        """The step's micro-batches of sequences of T tokens: the same windows as train.py draws for the same seed
        and step (batch_size x block_size tokens each)."""
        B = batch_size * block_size // T  # rows per micro-batch
        starts = train_data.sample_starts(gradient_accumulation_steps * B, T)
        for j in range(gradient_accumulation_steps):
            x, y = train_data.gather(starts[j * B : (j + 1) * B], T)
            yield mx.array(x.numpy(), dtype=mx.int32), mx.array(y.numpy(), dtype=mx.int32)

    # ------------------------------------------------------------------------- model
    ckpt, model_args = checkpoints.open_run(out_dir, init_from, overwrite, config, tokenizer_path)
    model_config = torch_model_lib.GPTConfig(**model_args, activation_checkpointing=activation_checkpointing)
    # model.py's GPT stays beside the MLX one: it makes the initial weights, checks and loads checkpoints, and
    # carries the weights into each checkpoint under their PyTorch names
    torch_model = torch_model_lib.GPT(model_config)
    if ckpt is not None:
        checkpoints.load_model_state(torch_model, ckpt["model"], out_dir)
    model = GPT(model_config)
    load_torch_weights(model, torch_model)
    params = dict(tree_flatten(model.parameters()))  # name -> fp32 array: the weights the loop updates

    # ------------------------------------------------------------------------- optimizer
    torch_optimizer = runtime.make_optimizer(
        torch_model,
        muon_lr,
        muon_momentum,
        learning_rate,
        (beta1, beta2),
        weight_decay,
        optimizer,
        ns_dtype,
        muon_weight_decay,
        cautious_wd,
    )
    groups = make_groups(torch_optimizer, torch_model)
    opt_state = init_state(params, groups)
    # batch_size=auto: dry runs of the new model find the largest micro-batch that fits (a resume keeps its own)
    env = dict(device="mlx", world_size=1, ddp=False, master=True)
    try_step = dry_run(model, params, opt_state, groups, compute_dtype, block_size, limit, bos_id)
    batch_size, gradient_accumulation_steps = batching.pick_batch(
        config, env, global_batch, ckpt, try_step, mx.clear_cache
    )
    mx.reset_peak_memory()  # the metrics' peak is training's
    tokens_per_iter = gradient_accumulation_steps * batch_size * block_size  # the same at every length
    iter_num, elapsed_before, early = 0, 0.0, checkpoints.EarlyStopping(patience)
    if ckpt is not None:
        runtime.load_optimizer_state(torch_optimizer, ckpt["optimizer"])
        opt_state = load_torch_state(torch_optimizer, torch_model)
        train_data.set_state(ckpt["data"])  # a generator state, or the place in a pass
        runtime.set_rng_state(ckpt["rng"], "cpu")
        iter_num = ckpt["iter_num"]
        early = checkpoints.EarlyStopping(patience, ckpt["best_val_loss"], ckpt.get("early_stopping"))  # counts on
        elapsed_before = ckpt.get("elapsed_s", 0.0)  # the earlier segments' wall time (older checkpoints lack it)
        del ckpt
    checkpoints.check_space(out_dir, torch_model, torch_optimizer, keep_last)  # now, not at the first save

    # one micro-batch's loss (already divided for accumulation) and fp32 grads; validation; the optimizer step
    eval_fn = partial(loss_with, model, dtype=compute_dtype, bos_id=bos_id)
    step_fn = mx.value_and_grad(lambda p, x, y: eval_fn(p, x, y) / gradient_accumulation_steps)
    update_fn = partial(optimizer_update, groups=groups, grad_clip=grad_clip)
    if compile:
        step_fn, eval_fn, update_fn = mx.compile(step_fn), mx.compile(eval_fn), mx.compile(update_fn)

    # ------------------------------------------------------------------------- schedule
    def get_lr(it):
        """Multiplier of the peak learning rates: linear warmup, then cosine decay to min_lr_frac; or lr_schedule=wsd:
        the peak until the last cooldown_frac of the steps, then linear (as train.py)."""
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
        """Muon's momentum: a linear rise from muon_momentum_start over muon_momentum_warmup steps (as train.py)."""
        if it >= muon_momentum_warmup:
            return muon_momentum
        return muon_momentum_start + (muon_momentum - muon_momentum_start) * it / muon_momentum_warmup

    def estimate_loss():
        """Mean validation loss over the same eval_iters micro-batches every time (the ones train.py uses)."""
        val_data.generator.manual_seed(seed)
        losses = []
        for _ in range(eval_iters):
            x, y = val_data.gather(val_data.sample_starts(batch_size))
            losses.append(eval_fn(params, mx.array(x.numpy(), dtype=mx.int32), mx.array(y.numpy(), dtype=mx.int32)))
        return mx.mean(mx.stack(losses)).item()

    # ------------------------------------------------------------------------- loop
    log = runtime.MetricsLog(out_dir)
    print("config:", " ".join(f"{k}={v}" for k, v in config.items()))
    print(
        f"model: {sum(v.size for v in params.values()) / 1e6:.2f}M parameters | MLX {mx.default_device()} {dtype} | "
        f"Muon's Newton-Schulz in {ns_dtype} | "
        f"{tokens_per_iter:,} tokens/step | {train_data.n_tokens:,} train tokens"
    )
    t_start, start_iter = time.time(), iter_num  # elapsed_s: elapsed_before + time since t_start (over resumes)
    val_loss, last_eval = float("nan"), -1
    if iter_num == 0:
        val_loss, last_eval = estimate_loss(), 0
        log.log({"step": 0, "val_loss": val_loss, "tokens": 0, "elapsed_s": time.time() - t_start})
        print(f"step 0: val loss {val_loss:.4f}")
    loss_sum = mx.array(0.0)  # summed step losses since the last log line
    steps_since_log, t_log = 0, time.time()
    saver = checkpoints.Saver()  # checkpoints are written in the background, one at a time
    while iter_num < max_iters and not early.stop:
        saver.check()  # a failed checkpoint write (a full disk) stops the run here
        lr_mult, momentum = get_lr(iter_num), get_momentum(iter_num)
        T = batching.block_size_at(stages, iter_num, lr_decay_iters or max_iters)  # this step's sequence length
        grads = None
        for x, y in get_batches(T):
            loss, micro_grads = step_fn(params, x, y)
            grads = micro_grads if grads is None else tree_map(mx.add, grads, micro_grads)
            loss_sum = loss_sum + loss
            mx.eval(grads, loss_sum)  # one micro-batch's graph at a time
        m = (mx.array(momentum, dtype=mx.float32), mx.array(1 - momentum, dtype=mx.float32))
        params, opt_state = update_fn(params, grads, opt_state, mx.array(lr_mult, dtype=mx.float32), m)
        mx.eval(params, opt_state)
        iter_num += 1
        steps_since_log += 1

        is_last = iter_num == max_iters
        if iter_num % log_interval == 0 or is_last or iter_num % ckpt_interval == 0:
            train_loss = loss_sum.item() / steps_since_log
            runtime.check_finite(train_loss, "loss", iter_num, out_dir)
            dt = time.time() - t_log
            tok_s = steps_since_log * tokens_per_iter / dt
            record = {
                "step": iter_num,
                "loss": train_loss,
                "lr_mult": lr_mult,
                # the groups' rates now: muon_lr (with optimizer=muon only) and adamw_lr
                **{("muon_lr" if h["use_muon"] else "adamw_lr"): h["peak_lr"] * lr_mult for h, _ in groups},
                **({"muon_momentum": momentum} if config["optimizer"] == "muon" else {}),
                "tok_per_s": tok_s,
                "seq_len": T,
                **runtime.memory_record(mx.get_active_memory(), mx.get_peak_memory()),  # MLX's, on GPU and CPU
                "tokens": iter_num * tokens_per_iter,
                "elapsed_s": elapsed_before + time.time() - t_start,
            }
            log.log(record)
            eta = (max_iters - iter_num) * (time.time() - t_start) / (iter_num - start_iter)
            seq = f" | T {T}" if block_size_schedule else ""
            print(
                f"step {iter_num}/{max_iters} | loss {train_loss:.4f} | lr x{lr_mult:.3f}{seq} | {tok_s:,.0f} tok/s"
                f" | {runtime.format_memory(record)} | eta {runtime.format_duration(eta)}",
                flush=True,
            )
            loss_sum = mx.array(0.0)
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
            print(f"step {iter_num}: val loss {val_loss:.4f}")
        if iter_num % ckpt_interval == 0 or is_last or early.must_save:
            is_best = early.saved(iter_num, val_loss)
            store_torch_weights(params, torch_model)  # PyTorch's names and layout: one checkpoint for both
            store_torch_state(opt_state, torch_optimizer, torch_model)
            state = dict(
                model=torch_model.state_dict(),
                optimizer=torch_optimizer.state_dict(),
                scaler={},  # train.py's GradScaler state when disabled (no fp16 here)
                model_args=asdict(model_config),
                config=config,
                iter_num=iter_num,
                val_loss=val_loss,
                best_val_loss=early.best,
                early_stopping=early.state(),
                elapsed_s=elapsed_before + time.time() - t_start,
                rng=runtime.get_rng_state("cpu"),
                data=train_data.state(),
            )
            saver.save(out_dir, iter_num, state, keep_last, is_best)  # written while the next steps run
        t_log += time.time() - t_pause

    # ------------------------------------------------------------------------- cleanup
    if early.stop:
        stopped, line = early.record(iter_num)
        log.log(stopped)
        print(line)
    saver.finish()  # the last checkpoint on disk before the run says it is done
    log.close()
    print(f"done: {iter_num} steps, best val loss {early.best:.4f}, checkpoints in {out_dir}")
