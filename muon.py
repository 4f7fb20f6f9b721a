"""Muon for the hidden matrices, AdamW for everything else, in one optimizer.

Muon (Keller Jordan, 2024, https://kellerjordan.github.io/posts/muon/) takes the Nesterov momentum of a
matrix's gradient and replaces it by the nearest semi-orthogonal matrix (U V^T of its SVD), found with a few
Newton-Schulz iterations (bf16 on a GPU, fp32 on a CPU or a Mac: a group's `ns_dtype`). Every direction of the
update then moves by the same amount, which is what lets it train hidden layers faster than AdamW. Embeddings,
the (tied) output head and the 1-D norm gains are not hidden matrices and keep AdamW.

Param groups carry `use_muon`. Under DDP (torch.distributed initialised) the gradients are already averaged;
each rank orthogonalises its slice of every same-shape bucket (one batched Newton-Schulz) and the updates are
all-gathered, so no two ranks do the same Newton-Schulz work. Momentum is updated on every rank for every matrix (it is
elementwise and cheap), which keeps the optimizer state identical everywhere, so rank 0's state_dict is the
whole state.

Weight decay is decoupled (W <- W (1 - lr wd), scaled by the group's scheduled lr). With `cautious_wd` a group decays
only the coordinates where the update and the weight have the same sign, the ones the update already moves toward
zero, so decay never pulls against the gradient (cautious weight decay, Chen et al. 2025, arXiv 2510.12402;
modded-nanogpt's Muon and Adam since its 2025 records). The update's sign is Newton-Schulz's output for Muon and
exp_avg's for AdamW (its denominator is positive).
"""

import torch
import torch.distributed as dist

NS_DTYPE = torch.bfloat16  # Newton-Schulz precision of a group without ns_dtype (tests set float32 for arithmetic)
# The scripts give every Muon group its device's ns_dtype (backends.device_defaults): bf16 where tensor cores make it
# fast, fp32 on a CPU, where bf16 matmuls without bf16 instructions are emulated 50-100x slower, and on a Mac


def zeropower_via_newtonschulz5(G, steps=5, dtype=None):
    """Approximate U V^T for G = U S V^T (G is 2-D, or batched 3-D) by a quintic Newton-Schulz iteration in dtype
    (default NS_DTYPE).

    The coefficients (3.4445, -4.7750, 2.0315) maximise the slope at zero, so small singular values rise
    fast; the price is that the result's singular values land in roughly [0.7, 1.2] rather than exactly 1,
    which does not hurt training.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(dtype or NS_DTYPE)
    batched = X.ndim == 3
    if not batched:
        X = X.unsqueeze(0)
    transposed = X.size(-2) > X.size(-1)
    if transposed:  # iterate on the wide orientation: X @ X.T is then the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b*A + c*A@A, one kernel and one new tensor
        X = torch.baddbmm(X, B, X, beta=a)  # a*X + B@X
    if transposed:
        X = X.mT
    return X if batched else X.squeeze(0)


class Muon(torch.optim.Optimizer):
    """param_groups: dicts with `params`, `use_muon`, `lr`, `weight_decay`, and for Muon groups `momentum`,
    `nesterov`, `ns_steps`, `ns_dtype` (a torch dtype's name, e.g. "float32"; default NS_DTYPE); for AdamW groups
    `betas`, `eps`; `cautious_wd` for either. Weight decay is decoupled (scaled by lr). A script may change a group's
    `lr` and `momentum` between steps (its schedules)."""

    def __init__(self, param_groups):
        for group in param_groups:
            group.setdefault("weight_decay", 0.0)
            group.setdefault("cautious_wd", False)
            if group["use_muon"]:
                group.setdefault("momentum", 0.95)
                group.setdefault("nesterov", True)
                group.setdefault("ns_steps", 5)
                assert all(p.ndim == 2 for p in group["params"]), "Muon only takes 2-D matrices"
            else:
                group.setdefault("betas", (0.9, 0.95))
                group.setdefault("eps", 1e-8)
        super().__init__(param_groups, {})

    @torch.no_grad()
    def step(self, local=False):
        """local=True: every rank does all the Newton-Schulz work itself and talks to no other, as without DDP
        (batching.dry_run: each rank tries batch sizes of its own)."""
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_step(group, local)
            else:
                self._adamw_step(group)

    def _muon_step(self, group, local=False):
        distributed = dist.is_initialized() and not local
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        # 1) momentum on every rank for every matrix (cheap, and keeps the state identical across ranks)
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        torch._foreach_lerp_(bufs, [p.grad for p in params], 1 - group["momentum"])  # buf = m*buf + (1-m)*g
        # 2) orthogonalise each same-shape bucket as one batched Newton-Schulz (a few large matmuls instead of
        # one small one per matrix), a bucket at a time so that only one bucket's copies are alive. Under
        # DDP rank r takes the r-th slice of the bucket; slices are padded with zeros to equal size and
        # all-gathered asynchronously, overlapping the next bucket's Newton-Schulz.
        dtype = getattr(torch, group["ns_dtype"]) if group.get("ns_dtype") else NS_DTYPE
        buckets = {}
        for p in params:
            buckets.setdefault(p.shape, []).append(p)
        pending = []
        for bucket in buckets.values():
            per_rank = -(-len(bucket) // world)  # ceil
            stack = torch.zeros(per_rank, *bucket[0].shape, dtype=dtype, device=bucket[0].device)
            for i, p in enumerate(bucket[rank * per_rank : (rank + 1) * per_rank]):
                buf = self.state[p]["momentum_buffer"]
                stack[i] = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
            update = zeropower_via_newtonschulz5(stack, group["ns_steps"], dtype)  # (per_rank, rows, cols)
            del stack
            if world == 1:
                self._apply(group, bucket, update)
                continue
            update = update.contiguous()  # NCCL gathers contiguous tensors; tall matrices come back transposed
            gathered = update.new_empty(world * per_rank, *update.shape[1:])
            pending.append((bucket, gathered, dist.all_gather_into_tensor(gathered, update, async_op=True)))
        for bucket, gathered, work in pending:
            work.wait()
            self._apply(group, bucket, gathered)

    @staticmethod
    def _apply(group, params, updates):
        """Decoupled weight decay, then the update scaled so that its RMS does not shrink for tall matrices
        (max(1, rows/cols)^0.5, as in Keller Jordan's reference implementation). updates: (>= len(params), r, c)
        in the Newton-Schulz precision, added to the fp32 weights one matrix at a time (no fp32 copy of the bucket)."""
        lr, wd = group["lr"], group["weight_decay"]
        scale = max(1.0, params[0].size(-2) / params[0].size(-1)) ** 0.5
        if wd and not group["cautious_wd"]:
            torch._foreach_mul_(params, 1 - lr * wd)
        for p, u in zip(params, updates, strict=False):
            if wd and group["cautious_wd"]:
                decay_where_same_sign(p, u, lr * wd)
            p.add_(u, alpha=-lr * scale)

    def _adamw_step(self, group):
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = state["step"].item()
            state["exp_avg"].lerp_(p.grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (state["exp_avg_sq"] / (1 - beta2**t)).sqrt_().add_(group["eps"])
            if group["cautious_wd"] and group["weight_decay"]:
                decay_where_same_sign(p, state["exp_avg"], group["lr"] * group["weight_decay"])
            else:
                p.mul_(1 - group["lr"] * group["weight_decay"])
            p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1**t))


def decay_where_same_sign(p, update, decay):
    """Cautious weight decay: p <- p (1 - decay) where update * p >= 0 (the update, subtracted, already shrinks p
    there), p unchanged elsewhere. The factor is the plain decay's, so with every sign agreeing the two are equal."""
    p.mul_(torch.where(update * p >= 0, 1 - decay, 1.0))
