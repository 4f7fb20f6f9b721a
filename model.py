"""A GPT-style decoder: RoPE, RMSNorm, SwiGLU MLP, tied embeddings, no biases.

The layout is Llama's (rotate-half RoPE, pre-norm blocks, gate/up/down MLP) with nanoGPT's names, so the
weights map one to one onto a Llama checkpoint. Sizes: config/pretrain_137m.py is the 137.8M reference.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torch.utils.checkpoint import checkpoint


@dataclass
class GPTConfig:
    block_size: int = 4096  # max context in tokens (RoPE tables are built for this length)
    vocab_size: int = 32000
    n_layer: int = 12
    n_head: int = 6  # head size 128: cuDNN attention on an H100 is faster than at 64 (see PERF.md)
    n_embd: int = 768
    mlp_hidden: int = 3072  # SwiGLU hidden width (gate and up each project n_embd -> mlp_hidden)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~30% more compute
    # The speedrun recipes' changes (issue 37; docs/pretraining.md), each off by default: a run without them computes
    # what it did before, and a checkpoint that predates them loads with them off.
    qk_norm: bool = False  # q and k RMS-normed per head, before RoPE as Qwen3 (modded-nanogpt record 5, nanochat)
    attn_scale: float = 0.0  # softmax scale of q.k; 0 = 1/sqrt(head_dim). modded-nanogpt: 0.12 with qk_norm
    # attn.c_proj and mlp.c_proj start at zero (modded-nanogpt, nanochat). With the tied embeddings the stack is then
    # the identity and each token's logit for itself ~n_embd * 0.02: loss at init 15.2 for 12 x 768 on random tokens
    # (10.5 without zero_init; ln(32000) = 10.4), 11.8 with logit_softcap=15, 14.0 with 30
    zero_init: bool = False
    logit_softcap: float = 0.0  # logits = cap * tanh(logits / cap); 0 = off (Gemma 2; nanochat 15, modded-nanogpt 15)
    value_embeds: bool = False  # a token embedding added to v, gated per head, on every other layer (nanochat)
    x0_shortcut: bool = False  # before block i: x = resid_lambdas[i] * x + x0_lambdas[i] * embedding (nanochat)
    value_residual: bool = False  # v = lambda * v + (1 - lambda) * layer 0's v, lambda from 0.5 (modded-nanogpt)
    embed_norm: bool = False  # RMS-norm (no gain) of the embedding entering the first block (nanochat, modded-nanogpt)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def rope_tables(head_dim, max_len, theta):
    """cos/sin of shape (max_len, head_dim) for the rotate-half convention, in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (max_len, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (max_len, head_dim)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    """x: (B, n_head, T, head_dim); cos/sin: (T, head_dim)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache:
    """Preallocated keys and values, one (B, n_head, max_len, hd) tensor per layer; `pos` is how many positions
    are filled. Separate tensors, not slices of one: a compiled decode step then writes a position in place,
    where a view of one big buffer made Inductor copy the whole buffer at every write."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        shape = (batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.batch_size, self.max_len, self.device = batch_size, max_len, device
        self.pos = 0
        self.start = None  # (B,) first real position of each row when prompts are left-padded (eval.py), else None

    def visible(self, q_pos, n_keys):
        """Which keys each query may attend to: True where key <= query position and, for left-padded rows, key
        >= the row's start. q_pos: (Tq,) positions. Returns (Tq, n_keys), or (B, 1, Tq, n_keys) with padding.
        A padding query sees itself too, so no softmax row is empty (an empty one gives NaN, which would reach
        real tokens through the cached values of later layers: 0 x NaN is NaN)."""
        keys = torch.arange(n_keys, device=q_pos.device)
        ok = keys <= q_pos[:, None]  # (Tq, n_keys)
        if self.start is None:
            return ok
        ok = (ok & (keys >= self.start[:, None, None])) | (keys == q_pos[:, None])  # (B, Tq, n_keys)
        return ok.unsqueeze(1)

    def write(self, layer, pos, k, v):
        """Store one position's k, v (B, n_head, 1, hd) at pos, a 0-d tensor; return the whole layer's cache.
        Every shape is fixed and pos lives on the device, so a captured CUDA graph can replay this."""
        self.k[layer].index_copy_(2, pos.view(1), k)
        self.v[layer].index_copy_(2, pos.view(1), v)
        return self.k[layer], self.v[layer]

    def update(self, layer, k, v):
        """Store k, v (B, n_head, T, hd) at the current position; return everything cached so far."""
        T = k.size(2)
        self.k[layer][:, :, self.pos : self.pos + T] = k
        self.v[layer][:, :, self.pos : self.pos + T] = v
        return self.k[layer][:, :, : self.pos + T], self.v[layer][:, :, : self.pos + T]


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
        self.qk_norm, self.eps, self.scale = config.qk_norm, config.norm_eps, config.attn_scale or None
        if config.value_embeds and has_value_embeds(layer_idx, config.n_layer):  # zero: each gate starts at 1
            self.ve_gate = nn.Parameter(torch.zeros(config.n_head, min(VE_GATE_CHANNELS, config.n_embd)))
        if config.value_residual and layer_idx > 0:
            self.v_lambda = nn.Parameter(torch.full((1,), 0.5))

    def forward(self, x, cos, sin, cache=None, pos=None, w_qkv=None, mask=None, ve=None, v_mix=None):
        """Returns the output (B, T, C) and this layer's values (B, n_head, T, hd), for value_residual.
        ve: this layer's value embeddings (B, T, C); v_mix: (layer 0's values at the same positions, the weight of
        this layer's own)."""
        B, T, C = x.size()
        hd = C // self.n_head
        qkv = F.linear(x, w_qkv).split(C, dim=-1) if w_qkv is not None else (self.c_q(x), self.c_k(x), self.c_v(x))
        q, k, v = (t.view(B, T, self.n_head, hd).transpose(1, 2) for t in qkv)  # (B, T, C) -> (B, n_head, T, hd)
        if self.qk_norm:  # no gain: RoPE is a rotation, so the order is moot here; Qwen3's order for export
            q, k = F.rms_norm(q, (hd,), eps=self.eps), F.rms_norm(k, (hd,), eps=self.eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if v_mix is not None:
            v = torch.lerp(v_mix[0], v, v_mix[1].to(v.dtype))  # lambda * v + (1 - lambda) * layer 0's values
        if ve is not None:  # gate in (0, 2) per head from the first channels of x (nanochat)
            gate = 2 * torch.sigmoid(F.linear(x[..., : self.ve_gate.size(1)], self.ve_gate))  # (B, T, n_head)
            v = v + (gate.transpose(1, 2).unsqueeze(-1) * ve.view(B, T, self.n_head, hd).transpose(1, 2)).to(v.dtype)
        values = v
        if pos is not None:  # one token at position pos (a tensor) against the whole cache: see GPT.decode
            k, v = cache.write(self.layer_idx, pos, k, v)  # (B, n_head, max_len, hd)
            att = (q @ k.transpose(-2, -1)) * (self.scale or 1.0 / math.sqrt(hd))  # (B, n_head, 1, max_len)
            att = att + mask  # decode()'s bias: 0 where a key is visible, -inf where not, made once for all layers
            y = att.softmax(dim=-1, dtype=torch.float32).to(v.dtype) @ v
            return self.c_proj(y.transpose(1, 2).reshape(B, T, C)), values
        past = cache.pos if cache is not None else 0
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # all keys/values so far: (B, n_head, past + T, hd)
        if isinstance(mask, BlockMask):  # attention inside documents (document_mask), on CUDA
            y = compiled(flex_attention)(q, k, v, block_mask=mask, scale=self.scale)
        elif mask is not None:  # the same as a dense (B, 1, T, T) mask: FlexAttention has no CPU backward
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        elif past == 0 and (cache is None or cache.start is None):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:  # after a prefill, or left-padded rows: query i sits at position past + i
            mask = cache.visible(past + torch.arange(T, device=x.device), past + T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, n_head, T, hd) -> (B, T, C)
        return self.c_proj(y), values


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_gate = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
        self.c_fc = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
        self.c_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=False)

    def forward(self, x, w_gate_up=None):
        gate, up = F.linear(x, w_gate_up).chunk(2, dim=-1) if w_gate_up is not None else (self.c_gate(x), self.c_fc(x))
        return self.c_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache=None, pos=None, fused=None, mask=None, ve=None, v_mix=None, x0=None, mix=None):
        """The block's output and its attention's values (see CausalSelfAttention.forward). x0, mix: the x0
        shortcut (GPT.blocks), mixed here so that a compiled block fuses it with the norm after it."""
        w_qkv, w_gate_up = fused or (None, None)  # this block's stacked weights from GPT.decode_weights
        if x0 is not None:
            x = mix[0] * x + mix[1] * x0  # mix: this block's (resid_lambda, x0_lambda)
        y, v = self.attn(self.ln_1(x), cos, sin, cache, pos, w_qkv, mask, ve, v_mix)
        x = x + y
        return x + self.mlp(self.ln_2(x), w_gate_up), v


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                ln_f=RMSNorm(config.n_embd, config.norm_eps),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: one matrix, counted and stored once
        self.loss_head = ChunkedCrossEntropy.apply  # compile_regions() gives it a compiled chunk
        self.regions = False  # set by compile_regions()
        # Computed once; not in the state dict, so a checkpoint holds only learned weights.
        cos, sin = rope_tables(config.n_embd // config.n_head, config.block_size, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # Residual projections get GPT-2's 0.02/sqrt(2 * n_layer). Zero only with zero_init (as modded-nanogpt):
        # with tied embeddings a zero-initialised stack maps each token straight back onto its own embedding, a
        # logit of n_embd * 0.02 = 15 for "repeat this token", and the loss at init is ~15, not ln(32000) = 10.4.
        for block in self.transformer.h:
            for w in (block.attn.c_proj.weight, block.mlp.c_proj.weight):
                if config.zero_init:
                    nn.init.zeros_(w)
                else:
                    nn.init.normal_(w, std=0.02 / math.sqrt(2 * config.n_layer))
        # Made after the weights above, so that with them on the other weights are still the same for a seed.
        # Value embeddings start as the embedding and c_v do (nanochat inits them like c_v).
        V, C, L = config.vocab_size, config.n_embd, config.n_layer
        self.value_embeds = nn.ModuleDict(
            {str(i): nn.Embedding(V, C) for i in range(L) if config.value_embeds and has_value_embeds(i, L)}
        )
        for embedding in self.value_embeds.values():
            nn.init.normal_(embedding.weight, mean=0.0, std=0.02)
        if config.x0_shortcut:  # 1 and 0: each block starts as without the shortcut (modded-nanogpt, nanochat)
            self.resid_lambdas = nn.Parameter(torch.ones(L))
            self.x0_lambdas = nn.Parameter(torch.zeros(L))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def compile_regions(self, backend="inductor"):
        """torch.compile each block and the loss head apart, not the whole model (train.py compile_regions):
        Dynamo traces one block and all n_layer share its graph (as torchtitan compiles), so a cold start is
        shorter (57.8 s -> 19.8 s for 12 small layers on a 2-core CPU); fusions across blocks are given up."""
        self.regions = True
        for block in self.transformer.h:
            block.compile(dynamic=False, backend=backend)
        # one chunk of the loss compiled and run for each chunk, not the loop unrolled into one graph (16 chunks of a
        # 32K-token batch: 2.9x as long to compile on a 2-core CPU; on an H200, ~30 s of a 35.8 s cold start, PERF.md)
        chunk = torch.compile(ce_chunk, dynamic=False, backend=backend)
        self.loss_head = lambda x, w, targets, need_grad, cap: ChunkedCrossEntropy.apply(
            x, w, targets, need_grad, cap, chunk, CE_CHUNK_COMPILED
        )

    def no_value_residual(self, x):
        """(values, lambda) that leave block 0's values as they are: torch.lerp(zeros, v, 1) is v exactly, and so are
        the gradients through it. Under compile_regions, block 0 given them runs the graph of the blocks after it (one
        block graph, not two: a shorter cold start) for two elementwise passes over its values."""
        c, (B, T, _) = self.config, x.shape
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        zeros = torch.zeros(B, T, c.n_head, c.n_embd // c.n_head, dtype=dtype, device=x.device)
        zeros.requires_grad_(torch.is_grad_enabled())  # as layer 0's values would
        return zeros.transpose(1, 2), nn.Parameter(torch.ones(1, device=x.device))  # as v: (B, n_head, T, hd)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # tied weights are one parameter

    def flops_per_token(self, seq_len):
        """Training FLOPs per token: 6N for the matmuls forward+backward, 12*L*d*T for attention (PaLM)."""
        c, lookups = self.config, sum(p.numel() for p in self.value_embeds.parameters())  # value embeds: no matmul
        return 6 * (self.num_params() - lookups) + 12 * c.n_layer * c.n_embd * seq_len

    def hidden(self, idx, cache=None, mask=None):
        """Final normed hidden states (B, T, C) of idx, continuing from the cache's position when given."""
        B, T = idx.size()
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size={self.config.block_size}")
        cos = self.rope_cos[start : start + T].to(self.transformer.wte.weight.dtype)
        sin = self.rope_sin[start : start + T].to(self.transformer.wte.weight.dtype)
        x = self.blocks(idx, cos, sin, cache, mask=mask)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)

    def blocks(self, idx, cos, sin, cache=None, pos=None, fused=None, mask=None):
        """The residual stream (B, T, C) after every block, from the embeddings of idx (B, T); with what acts
        between blocks: embed_norm, the x0 shortcut, each layer's value embeddings, layer 0's values."""
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.config.embed_norm:
            x = F.rms_norm(x, (x.size(-1),), eps=self.config.norm_eps)
        x0, v_first = x, None
        if self.config.x0_shortcut:  # block 0 given one tensor twice (x and x0) would compile a graph of its own
            x = x.clone()
        for i, block in enumerate(self.transformer.h):
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            v_mix = (v_first, block.attn.v_lambda) if i > 0 and v_first is not None else None
            if i == 0 and self.config.value_residual and self.regions and cache is None:
                v_mix = self.no_value_residual(x)  # block 0 runs the later blocks' compiled graph
            args = (x, cos, sin, cache, pos, fused[i] if fused else None, mask, ve, v_mix)
            if self.config.x0_shortcut:  # mixed inside the block (Block.forward)
                args += (x0, (self.resid_lambdas[i], self.x0_lambdas[i]))
            if self.config.activation_checkpointing and self.training and cache is None:
                x, v = checkpoint(block, *args, use_reentrant=False)
            else:
                x, v = block(*args)
            v_first = v if self.config.value_residual and i == 0 else v_first
        return x

    def head(self, x):
        """fp32 logits of final hidden states x (..., C), softcapped with logit_softcap."""
        return softcap(self.lm_head(x).float(), self.config.logit_softcap)

    def logits(self, idx, cache=None, mask=None):
        """fp32 logits (B, T, vocab_size) at every position: for tests and analysis, not for training."""
        return self.head(self.hidden(idx, cache, mask))

    def forward(self, idx, targets=None, cache=None, reduction="mean", mask=None):
        """With targets: (None, loss), the mean cross-entropy over targets != -1 (reduction="mean"), or the
        per-token loss (B, T), 0 where the target is -1 (reduction="none", for DPO's sequence log-probs).
        The logits are never held for the whole batch (see ChunkedCrossEntropy).
        Without targets: (logits of the last position (B, 1, vocab_size), None), what generation needs.
        mask: document_mask(idx, bos_id) to keep attention inside documents (train.py doc_mask)."""
        x = self.hidden(idx, cache, mask)
        if targets is None:
            return self.head(x[:, [-1], :]), None
        B, T, C = x.size()
        x, targets = x.reshape(B * T, C), targets.reshape(B * T)  # (B*T, C), (B*T,)
        if reduction == "mean":
            # gradients are computed in the forward pass only when a backward pass can follow
            need_grad = torch.is_grad_enabled() and (x.requires_grad or self.lm_head.weight.requires_grad)
            return None, self.loss_head(x, self.lm_head.weight, targets, need_grad, self.config.logit_softcap)
        losses = [
            checkpoint(token_losses, xc, self.lm_head.weight, tc, self.config.logit_softcap, use_reentrant=False)
            for xc, tc in zip(x.split(CE_CHUNK), targets.split(CE_CHUNK), strict=True)
        ]
        return None, torch.cat(losses).view(B, T)

    def decode_weights(self):
        """Per block, (c_q | c_k | c_v) and (c_gate | c_fc) stacked, for decode(): 4 matrix-vector products per
        block instead of 7, each a few microseconds at batch 1 whatever its size (PERF.md). A copy: made per use."""
        return [
            (
                torch.cat([b.attn.c_q.weight, b.attn.c_k.weight, b.attn.c_v.weight]),
                torch.cat([b.mlp.c_gate.weight, b.mlp.c_fc.weight]),
            )
            for b in self.transformer.h
        ]

    def decode(self, idx, cache, pos, fused=None):
        """fp32 logits (B, vocab_size) for one new token per row, idx (B, 1), at position pos (a 0-d tensor on
        the device); fused: decode_weights(), optional. Attention covers the whole cache under a mask, so no shape
        depends on pos: this is the step that generate() compiles and captures in a CUDA graph."""
        dtype = self.transformer.wte.weight.dtype
        cos = self.rope_cos.index_select(0, pos.view(1)).to(dtype)  # (1, head_dim)
        sin = self.rope_sin.index_select(0, pos.view(1)).to(dtype)
        visible = cache.visible(pos.view(1), cache.max_len)  # the same keys in every layer: the bias made once
        bias = torch.where(visible, 0.0, float("-inf")).to(dtype)
        x = self.blocks(idx, cos, sin, cache, pos, fused, bias)  # (B, 1, C)
        return self.head(self.transformer.ln_f(x[:, -1]))

    def decode_step(self, cache):
        """decode() as step(next_id, position), capture_decode's step without a graph. The position is filled into
        one device tensor: a tensor made from a Python int per token is a copy from host memory that waits for the
        GPU, so no kernel of the next token could be queued early (eval.py's sampling: 144 -> 69 s, PERF.md)."""
        pos = torch.zeros((), dtype=torch.long, device=cache.device)
        return lambda next_id, position: self.decode(next_id, cache, pos.fill_(position))

    def capture_decode(self, cache, tuned=False):
        """decode() compiled and captured in a CUDA graph bound to this cache; returns step(next_id, position).
        A token then costs one graph replay instead of ~400 kernel launches from Python (CUDA only). tuned: Inductor
        times launch settings for each kernel (coordinate descent, as gpt-fast decodes): a longer compile."""
        fused = self.decode_weights()  # kept alive by step (below)

        def decode_fused(idx, cache, pos):
            return self.decode(idx, cache, pos, fused)

        decode = torch.compile(
            decode_fused, dynamic=False, options={"coordinate_descent_tuning": True} if tuned else None
        )
        idx = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=cache.device)
        # warm-up runs write the last slot, which is always rewritten before a query can see it
        pos = torch.full((), cache.max_len - 1, dtype=torch.long, device=cache.device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # compile and warm up outside the graph
            for _ in range(3):
                decode(idx, cache, pos)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = decode(idx, cache, pos)

        def step(next_id, position):
            idx.copy_(next_id)
            pos.fill_(position)
            graph.replay()
            return logits

        step.weights = fused  # a graph holds addresses, not tensors: freed, their memory would be reused under it
        return step

    @torch.no_grad()
    def generate(
        self, idx, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, stop_token=None, generator=None, graph=False
    ):
        """Sample max_new_tokens after idx (B, T) with a KV cache. temperature=0 means greedy. graph=True
        (CUDA) compiles the one-token step and replays it as a CUDA graph: ~20x faster at batch 1.

        The cache holds prompt + new tokens (rounded up to 256), at most block_size. When it is full, the last
        half-context is re-encoded into it and decoding goes on, so generation can run past block_size.
        """
        c = self.config
        idx = idx[:, -c.block_size :]
        B, T = idx.size()
        max_len = min(c.block_size, -(-(T + max_new_tokens) // 256) * 256)
        cache = KVCache(c, B, max_len, idx.device, self.transformer.wte.weight.dtype)

        step = self.capture_decode(cache) if graph else self.decode_step(cache)
        logits = self(idx, cache=cache)[0][:, -1]
        out = [idx]
        for _ in range(max_new_tokens):
            next_id = sample_next(logits, temperature, top_k, top_p, generator)
            out.append(next_id)
            if stop_token is not None and bool((next_id == stop_token).all()):
                break
            if cache.pos == max_len:  # full: start again from the last half-context
                cache.pos = 0
                logits = self(torch.cat(out, dim=1)[:, -(c.block_size // 2) :], cache=cache)[0][:, -1]
            else:
                logits = step(next_id, cache.pos)
                cache.pos += 1
        return torch.cat(out, dim=1)


def document_mask(idx, bos_id, flex=None):
    """Attention that stays inside a document: position i sees j <= i only if no bos_id (which starts every
    document) lies in (j, i]. For idx (B, T): with flex (default: on CUDA) a FlexAttention BlockMask, whose kernel
    skips the blocks the mask leaves empty; else the same mask dense, (B, 1, T, T) bool, for SDPA."""
    B, T = idx.size()
    doc = (idx == bos_id).cumsum(dim=1)  # (B, T): which document of the row each position is in
    if idx.device.type == "cuda" if flex is None else flex:  # run on H100 (FlexAttention's kernels are CUDA's)

        def same_document(b, h, q, k):
            return (k <= q) & (doc[b, q] == doc[b, k])

        return compiled(create_block_mask)(same_document, B, None, T, T, device=idx.device)
    causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()  # run on CPUs; MPS never run (same ops)
    return ((doc[:, :, None] == doc[:, None, :]) & causal).unsqueeze(1)


VE_GATE_CHANNELS = 32  # value embeddings' gate reads the first 32 channels of the block's input (nanochat 2026-01)


def has_value_embeds(layer_idx, n_layer):
    """Whether a layer gets value embeddings: every other layer, the last one included (nanochat's has_ve)."""
    return layer_idx % 2 == (n_layer - 1) % 2


COMPILED = {}  # FlexAttention's functions compiled, made at their first use (compiling them at import is slow)


def compiled(fn):
    """fn compiled once, as FlexAttention's functions must be: the attention is a fused kernel only then, and a
    compiled create_block_mask never holds the (B, T, T) mask. Inside a compiled model, fn itself."""
    if torch.compiler.is_compiling():
        return fn
    if fn not in COMPILED:
        COMPILED[fn] = torch.compile(fn, dynamic=False)
    return COMPILED[fn]


# ----------------------------------------------------------------------------- loss
CE_CHUNK = 2048  # rows of logits alive at once: 2048 x 32000 bf16 = 125 MiB, instead of 2 GiB for 32K tokens
# compile_regions' chunks: fused, they store no fp32 logits, and each call of the chunk's graph costs host time: 4 calls
# per 32K-token micro-batch, not 16, gave +1.8% tokens/s on an H200 (382K -> 389K, 0.74 GiB more memory; PERF.md)
CE_CHUNK_COMPILED = 8192


def softcap(logits, cap):
    """cap * tanh(logits / cap), which keeps every logit within +-cap (logit_softcap); cap = 0 leaves them."""
    return cap * torch.tanh(logits / cap) if cap else logits


def token_losses(x, weight, targets, cap=0.0):
    """Cross-entropy of each row of x (N, C) against targets (N,) through the output matrix (V, C), in fp32,
    the logits softcapped at cap; 0 where the target is -1."""
    logits = softcap(F.linear(x, weight).float(), cap)  # (N, V)
    return F.cross_entropy(logits, targets, ignore_index=-1, reduction="none")


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of x @ weight.T over targets != -1, a chunk of rows at a time.

    The gradient of a mean cross-entropy is known in the forward pass: (softmax - onehot) / n_valid. So each
    chunk's logits are used for the loss and both gradients at once and then freed: the fp32 logits of the
    whole batch (4 GiB for 32K tokens x 32K vocabulary) never exist, and backward only scales stored grads.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, need_grad, cap=0.0, chunk=None, rows=None):
        """chunk: what computes each chunk of `rows` rows (ce_chunk and CE_CHUNK, or the compiled graph of ce_chunk
        and CE_CHUNK_COMPILED: GPT.compile_regions)."""
        rows = rows or CE_CHUNK
        # the matmuls run in the autocast precision (bf16 on CUDA): cast once here, not once per chunk
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        xs, w = x.to(dtype), weight.to(dtype)
        n_valid = (targets >= 0).sum().clamp(min=1)
        loss = torch.zeros((), device=x.device, dtype=torch.float32)
        grad_x = torch.empty_like(x) if need_grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_grad else None
        cols = torch.arange(weight.size(0), device=x.device)  # (V,)
        for i in range(0, x.size(0), rows):
            xc, tc = xs[i : i + rows], targets[i : i + rows]
            part, gx, grad_w = (chunk or ce_chunk)(xc, w, tc, cols, n_valid, cap, grad_w)
            loss += part
            if need_grad:
                grad_x[i : i + rows] = gx
        ctx.save_for_backward(grad_x, grad_w)
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_loss.to(grad_x.dtype), grad_w * grad_loss, None, None, None, None, None


def ce_chunk(xc, w, tc, cols, n_valid, cap, grad_w=None):
    """One chunk of ChunkedCrossEntropy: the summed loss of its rows xc (n, C) against tc (n,) and, given the weight's
    gradient so far grad_w (V, C, fp32), the gradients of the mean over n_valid targets: of xc, and grad_w with this
    chunk's added (None, None without)."""
    logits = xc @ w.t()  # (n, V) in the compute dtype; the reductions below run in fp32
    if cap:  # logit_softcap, in fp32
        logits = softcap(logits.float(), cap)
    lse = logits.float().logsumexp(dim=-1, keepdim=True)  # (n, 1)
    valid = (tc >= 0).unsqueeze(1)  # (n, 1)
    target_logit = logits.gather(1, tc.clamp(min=0).unsqueeze(1)).float()  # (n, 1)
    loss = ((lse - target_logit) * valid).sum()
    if grad_w is None:
        return loss, None, None
    # d loss / d logits = (softmax - onehot) / n_valid: one expression, which Inductor fuses into a single pass from
    # the logits to g, so no (n, V) fp32 tensor is ever stored when compiled
    onehot = cols == tc.unsqueeze(1)  # (n, V); a target of -1 matches no column
    g = ((logits.float() - lse).exp() - onehot.float()) * (valid / n_valid)
    if cap:  # through the cap: d(cap * tanh(z / cap)) / dz = 1 - tanh(z / cap)^2
        g = g * (1 - (logits / cap).square())
    g = g.to(xc.dtype)
    return loss, g @ w, grad_w + (g.t() @ xc).float()


def sample_next(logits, temperature, top_k, top_p, generator=None):
    """One token id per row from (B, vocab) logits: greedy, or temperature + top-k + nucleus (top-p). The filters act
    on the candidates sorted, only the k most likely when top_k is set: a top-k of 200 of a 32K vocabulary costs a
    seventh of sorting it all (a CPU, PERF.md), and the draw is among what they keep."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    k = top_k if 0 < top_k < logits.size(-1) else 0
    if not k and top_p >= 1.0:
        return torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator)
    logits, order = torch.topk(logits, k) if k else torch.sort(logits, descending=True)  # most likely first
    if top_p < 1.0:
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs.cumsum(dim=-1) - probs > top_p, float("-inf"))  # the smallest prefix >= top_p
    return order.gather(-1, torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator))
