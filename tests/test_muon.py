import copy

import pytest
import torch

import muon
import runtime
from model import GPT, GPTConfig
from muon import Muon, zeropower_via_newtonschulz5


@pytest.mark.parametrize("shape", [(256, 128), (128, 256), (1024, 256)])
def test_newton_schulz_singular_values_near_one(shape):
    torch.manual_seed(0)
    G = torch.randn(shape) * 1e3  # scale must not matter: the iteration normalises first
    s = torch.linalg.svdvals(zeropower_via_newtonschulz5(G).float())
    assert s.min() > 0.6 and s.max() < 1.25, (s.min(), s.max())
    # and it points where the exact orthogonal factor U V^T does
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    exact, X = U @ Vh, zeropower_via_newtonschulz5(G).float()
    assert (exact * X).sum() / (exact.norm() * X.norm()) > 0.97


def test_newton_schulz_batched_equals_per_matrix():
    G = torch.randn(3, 64, 32)
    batched = zeropower_via_newtonschulz5(G)
    for i in range(3):
        assert torch.allclose(batched[i].float(), zeropower_via_newtonschulz5(G[i]).float(), atol=1e-2)


@pytest.mark.parametrize("nesterov,cautious", [(True, False), (False, False), (True, True)])
def test_muon_steps_follow_the_formula(monkeypatch, nesterov, cautious):
    """Four steps from zero momentum, against the update written out here: buf <- m buf + (1 - m) g, direction
    g + m (buf - g) with Nesterov (buf without), W <- W (1 - lr wd) - lr sqrt(max(1, rows/cols)) NS(direction).
    Newton-Schulz in fp32, so only arithmetic separates the two. One step cannot tell Nesterov from plain
    momentum (both directions are multiples of g, and Newton-Schulz normalises the scale); later steps can.
    The momentum changes every step, as train.py's muon_momentum_warmup sets it. cautious_wd: the decay applies
    only where NS(direction) and W share a sign (W unchanged elsewhere); the plain decay must then differ, by
    lr wd |W| at the other coordinates, or the test could not tell the two apart."""
    monkeypatch.setattr(muon, "NS_DTYPE", torch.float32)
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(96, 32))
    expected, buf = w.detach().clone(), torch.zeros(96, 32)
    lr, wd, momenta = 0.02, 0.1, [0.85, 0.9, 0.93, 0.95]
    group = dict(params=[w], use_muon=True, lr=lr, weight_decay=wd, momentum=0.5, nesterov=nesterov)
    optimizer = Muon([dict(group, cautious_wd=cautious)])
    for step, m in enumerate(momenta):
        g = torch.randn(96, 32)
        w.grad = g.clone()
        optimizer.param_groups[0]["momentum"] = m
        optimizer.step()
        buf = m * buf + (1 - m) * g
        direction = (1 - m) * g + m * buf if nesterov else buf
        update = zeropower_via_newtonschulz5(direction)
        decayed = expected * (1 - lr * wd)
        if cautious:
            same_sign = update * expected >= 0
            assert 0.3 < same_sign.float().mean() < 0.7  # about half the coordinates keep their weight
            assert (decayed - expected)[~same_sign].abs().max() > 1e-4  # what a plain decay would do to them
            decayed = torch.where(same_sign, decayed, expected)
        expected = decayed - lr * (96 / 32) ** 0.5 * update
        torch.testing.assert_close(
            w.detach(), expected, atol=1e-6, rtol=0, msg=lambda text, step=step: f"step {step}: {text}"
        )
    torch.testing.assert_close(optimizer.state[w]["momentum_buffer"], buf, atol=1e-6, rtol=0)


def test_cautious_adamw_steps_follow_the_formula():
    """An AdamW group with cautious_wd: torch's AdamW update, written out, with the decay only where exp_avg (the
    sign of the update, whose denominator is positive) and the weight share a sign."""
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(50, 8))
    p, exp_avg, exp_avg_sq = a.detach().clone(), torch.zeros(50, 8), torch.zeros(50, 8)
    lr, wd, (beta1, beta2), eps = 1e-2, 0.5, (0.9, 0.95), 1e-8
    ours = Muon([dict(params=[a], use_muon=False, lr=lr, betas=(beta1, beta2), weight_decay=wd, cautious_wd=True)])
    for t in range(1, 6):
        g = torch.randn(50, 8)
        a.grad = g.clone()
        ours.step()
        exp_avg = beta1 * exp_avg + (1 - beta1) * g
        exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g * g
        same_sign = exp_avg * p >= 0
        assert not same_sign.all() and same_sign.any()
        p = torch.where(same_sign, p * (1 - lr * wd), p)
        p = p - lr / (1 - beta1**t) * exp_avg / ((exp_avg_sq / (1 - beta2**t)).sqrt() + eps)
        torch.testing.assert_close(a.detach(), p, atol=1e-6, rtol=0)


def test_adamw_groups_match_torch_adamw():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(50, 8))
    b = copy.deepcopy(a)
    ours = Muon([dict(params=[a], use_muon=False, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)])
    ref = torch.optim.AdamW([b], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)
    for _ in range(5):
        g = torch.randn(50, 8)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert torch.allclose(a, b, atol=1e-6)


def test_make_optimizer_adamw_is_torch_adamw():
    """optimizer="adamw": every parameter in an AdamW group at learning_rate (muon_lr unused), weight decay on the
    matrices and the embedding but not on the norm gains: five steps are torch.optim.AdamW's with those groups."""
    torch.manual_seed(0)
    ours = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, mlp_hidden=64))
    ref = copy.deepcopy(ours)
    optimizer = runtime.make_optimizer(ours, 123.0, 0.5, 1e-2, (0.9, 0.95), 0.1, optimizer="adamw")
    groups = optimizer.param_groups
    assert all(not g["use_muon"] and g["lr"] == g["peak_lr"] == 1e-2 for g in groups)
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in ours.parameters())
    decay = [p for p in ref.parameters() if p.ndim == 2]  # the hidden matrices and the (tied) embedding
    gains = [p for p in ref.parameters() if p.ndim == 1]
    assert len(decay) + len(gains) == len(list(ref.parameters())) and gains
    reference = torch.optim.AdamW(
        [dict(params=decay, weight_decay=0.1), dict(params=gains, weight_decay=0.0)], lr=1e-2, betas=(0.9, 0.95)
    )
    for _ in range(5):
        for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        optimizer.step()
        reference.step()
    for (name, a), b in zip(ours.named_parameters(), ref.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), name
    with pytest.raises(runtime.UserError, match="optimizer=sgd: expected muon or adamw"):
        runtime.make_optimizer(ours, 0.02, 0.95, 1e-2, (0.9, 0.95), 0.1, optimizer="sgd")


def test_make_optimizer_weight_decays():
    """muon_weight_decay is the matrices' decay with optimizer=muon (auto: weight_decay, as before the key); the
    embedding keeps weight_decay and the norm gains none; with optimizer=adamw the matrices take weight_decay.
    cautious_wd reaches every group."""
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=32, mlp_hidden=64))
    make = lambda *extra, **kw: runtime.make_optimizer(model, 0.02, 0.95, 1e-2, (0.9, 0.95), 0.1, *extra, **kw)  # noqa
    decays = lambda optimizer: [g["weight_decay"] for g in optimizer.param_groups]  # noqa: E731
    assert decays(make()) == decays(make(muon_weight_decay="auto")) == [0.1, 0.1, 0.0]
    assert decays(make(muon_weight_decay=0.7)) == [0.7, 0.1, 0.0]
    assert decays(make("adamw", muon_weight_decay=0.7)) == [0.1, 0.1, 0.0]
    assert [g["cautious_wd"] for g in make(cautious_wd=True).param_groups] == [True] * 3
    assert [g["cautious_wd"] for g in make().param_groups] == [False] * 3


def test_muon_state_dict_round_trip():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(16, 16))
    v = torch.nn.Parameter(torch.randn(16))
    groups = lambda: [dict(params=[w], use_muon=True, lr=0.02), dict(params=[v], use_muon=False, lr=1e-3)]  # noqa
    opt = Muon(groups())
    w.grad, v.grad = torch.randn(16, 16), torch.randn(16)
    opt.step()
    restored = Muon(groups())
    restored.load_state_dict(opt.state_dict())
    assert torch.equal(restored.state[w]["momentum_buffer"], opt.state[w]["momentum_buffer"])
    assert torch.equal(restored.state[v]["exp_avg_sq"], opt.state[v]["exp_avg_sq"])


def make_matrices(seed=0):
    """Three same-shape matrices (one bucket) and one of another shape, with gradients."""
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(48, 32)) for _ in range(3)] + [torch.nn.Parameter(torch.randn(32, 80))]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def test_bucketed_step_equals_one_matrix_at_a_time():
    """The batched Newton-Schulz over a same-shape bucket gives each matrix the update it would get alone."""
    together = make_matrices()
    Muon([dict(params=together, use_muon=True, lr=0.02, weight_decay=0.1)]).step()
    for i, p in enumerate(make_matrices()):
        Muon([dict(params=[p], use_muon=True, lr=0.02, weight_decay=0.1)]).step()
        assert torch.allclose(p, together[i], atol=1e-6), i


def distributed_step(rank, world, out, decay):
    import torch.distributed as dist

    # a file store, not a TCP port: no race for a port another test may take between its choice and its use
    dist.init_process_group("gloo", init_method=f"file://{out.parent / 'store'}", rank=rank, world_size=world)
    params = make_matrices()
    Muon([dict(params=params, use_muon=True, lr=0.02, **decay)]).step()
    if rank == 0:
        torch.save([p.detach() for p in params], out)
    dist.barrier()  # no rank tears gloo down while its peer still saves: that peer aborted, SIGABRT, now and then
    dist.destroy_process_group()


@pytest.mark.parametrize("decay", [{}, dict(weight_decay=0.1, cautious_wd=True)])
def test_distributed_step_equals_single_process(tmp_path, decay):
    """Two ranks split each bucket (3 matrices: one rank pads its slice) and all-gather: same weights as one, also
    with cautious weight decay, whose signs come from the gathered updates."""
    import torch.multiprocessing as mp

    mp.spawn(distributed_step, args=(2, tmp_path / "w.pt", decay), nprocs=2)
    single = make_matrices()
    Muon([dict(params=single, use_muon=True, lr=0.02, **decay)]).step()
    for a, b in zip(torch.load(tmp_path / "w.pt"), single, strict=True):
        assert torch.equal(a, b.detach())
