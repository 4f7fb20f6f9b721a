"""The peer we measure against: GPT-2 as nanoGPT's model.py writes it, at any depth and width.

    python bench.py config/pretrain_137m.py --peer=true                     # its speed, beside ours
    python train.py config/reference_137m.py --arch=nanogpt --optimizer=adamw --learning_rate=6e-4 \\
        --weight_decay=0.1 --min_lr_frac=0.1 --out_dir=out/cmp_nanogpt       # its loss curve, on our shards

Learned positions, LayerNorm with bias, one c_attn for q/k/v, heads of 64 (GPT-2's), a GELU MLP of 4 x width, a
tied output head, weights N(0, 0.02) with the residual projections at 0.02 / sqrt(2 n_layer), no dropout. Only the
interface is ours, so train.py's loop runs it unchanged: forward(idx, targets) -> (None, loss) as model.GPT does,
num_params(), flops_per_token(T). GPTConfig's n_head, mlp_hidden and rope_theta do not apply to it.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class CausalSelfAttention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.n_head = d // 64  # GPT-2's head size
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        B, T, C = x.size()
        # (B, T, 3C) -> three (B, n_head, T, 64)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(C, 2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, n_head, T, 64) -> (B, T, C)


class MLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = nn.LayerNorm(d), CausalSelfAttention(d), nn.LayerNorm(d), MLP(d)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.n_embd % 64:
            raise ValueError(f"n_embd={config.n_embd}: nanoGPT's GPT-2 needs a multiple of its head size, 64")
        self.config, d = config, config.n_embd
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, d),
                wpe=nn.Embedding(config.block_size, d),
                h=nn.ModuleList(Block(d) for _ in range(config.n_layer)),
                ln_f=nn.LayerNorm(d),
            )
        )
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as GPT-2
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2: residual projections scaled down by depth
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * config.n_layer))
            elif p.ndim == 2:
                nn.init.normal_(p, 0.0, 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def num_params(self):
        """nanoGPT's count: every parameter once (the head is tied) but the position embedding."""
        return sum(p.numel() for p in self.parameters()) - self.transformer.wpe.weight.numel()

    def flops_per_token(self, seq_len):
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * seq_len

    def forward(self, idx, targets=None, mask=None):
        assert mask is None, "nanoGPT attends across the whole window: train.py refuses doc_mask with arch=nanogpt"
        B, T = idx.size()
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(T, device=idx.device))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab_size)
        if targets is None:
            return logits[:, -1:], None
        return None, F.cross_entropy(logits.view(B * T, -1).float(), targets.reshape(-1), ignore_index=-1)
