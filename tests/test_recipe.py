"""The speedrun recipes' model features of issue 37 (model.GPTConfig's qk_norm ... embed_norm): each changes the
forward as it says, gradients reach every new parameter, the optimizer gives each the right rule, older checkpoints
load with them off, and a run trained with all of them learns and loads in sample.py. KV-cache decoding with them on
is tested in tests/test_model.py (RECIPE), the MLX mirror in tests/test_mlx.py, export's refusal in test_export.py."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import run
from test_model import FEATURES, RECIPE, SMALL, make_model
from test_train import metrics, train

import checkpoints
import model as model_module
import runtime
from model import GPT, GPTConfig, KVCache


def test_qk_norm_gives_unit_rms_q_and_k_and_attn_scale_scales_the_softmax(monkeypatch):
    """The q and k that reach RoPE have RMS 1 in every head with qk_norm (and not without), and attn_scale is the
    softmax scale: 1/sqrt(head size) written out gives the default's logits, 0.12 others."""
    seen = []

    def record(x, cos, sin):
        seen.append(x.detach().pow(2).mean(-1).sqrt())  # (B, n_head, T): RMS per head and position
        return rope(x, cos, sin)

    rope = model_module.apply_rope
    monkeypatch.setattr(model_module, "apply_rope", record)
    idx = torch.randint(0, SMALL.vocab_size, (2, 16))
    for qk_norm in (True, False):
        seen.clear()
        with torch.no_grad():
            make_model(GPTConfig(**{**SMALL.__dict__, "qk_norm": qk_norm})).logits(idx)
        rms = torch.stack(seen)
        assert len(seen) == 2 * SMALL.n_layer and rms.shape[1:] == (2, SMALL.n_head, 16)
        if qk_norm:
            torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-3, rtol=0)  # norm_eps: 1 - ~2e-4
        else:
            assert (rms - 1).abs().min() > 0.5  # the projections' outputs are ~0.16 RMS at init
    monkeypatch.setattr(model_module, "apply_rope", rope)
    hd = SMALL.n_embd // SMALL.n_head
    logits = {}
    for scale in (0.0, 1 / math.sqrt(hd), 0.12):
        model = make_model(GPTConfig(**{**SMALL.__dict__, "qk_norm": True, "attn_scale": scale}))
        with torch.no_grad():
            logits[scale] = model.logits(idx)
    torch.testing.assert_close(logits[1 / math.sqrt(hd)], logits[0.0], atol=1e-6, rtol=0)
    assert (logits[0.12] - logits[0.0]).abs().max() > 1e-3


def test_softcap_bounds_every_logit():
    """With logit_softcap every path that makes logits keeps them within +-cap: logits(), the last position of
    forward(), a cached decode step; and the per-token losses (DPO's, eval's) are those of the capped logits."""
    config = GPTConfig(**{**SMALL.__dict__, "logit_softcap": 2.0})
    model = make_model(config)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(20)  # raw logits of tens, so the cap binds
        raw = model.lm_head(model.hidden(torch.arange(8)[None])).abs().max()
        idx = torch.randint(0, config.vocab_size, (2, 12))
        full = model.logits(idx)
        last, _ = model(idx)
        cache = KVCache(config, 2, 16, "cpu", torch.float32)
        model(idx[:, :-1], cache=cache)
        step = model.decode(idx[:, -1:], cache, torch.tensor(11))
        _, per_token = model(idx, idx, reduction="none")
    assert raw > 10
    for logits in (full, last, step):
        assert logits.abs().max() <= 2.0 and logits.abs().max() > 1.9
    torch.testing.assert_close(last[:, 0], full[:, -1])
    torch.testing.assert_close(step, full[:, -1], atol=1e-5, rtol=0)
    expected = F.cross_entropy(full.transpose(1, 2), idx, reduction="none")
    torch.testing.assert_close(per_token, expected, atol=1e-5, rtol=0)


def test_chunked_cross_entropy_gradient_through_the_cap(monkeypatch):
    """ChunkedCrossEntropy's hand-written gradient with a cap equals autograd's through cap * tanh(z / cap), for
    logits large enough that tanh's slope is far from 1, with ignored targets and uneven chunks."""
    monkeypatch.setattr(model_module, "CE_CHUNK", 5)
    torch.manual_seed(0)
    x = torch.randn(13, 16, requires_grad=True)
    w = torch.randn(40, 16, requires_grad=True)  # logits of std 4: the cap of 3 bends them hard
    targets = torch.randint(0, 40, (13,))
    targets[[2, 7]] = -1
    loss = model_module.ChunkedCrossEntropy.apply(x, w, targets, True, 3.0)
    loss.backward()
    ours = x.grad.clone(), w.grad.clone()
    x.grad, w.grad = None, None
    reference = F.cross_entropy(model_module.softcap(x @ w.t(), 3.0), targets, ignore_index=-1)
    reference.backward()
    assert abs(loss.item() - reference.item()) < 1e-5
    torch.testing.assert_close(ours[0], x.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours[1], w.grad, atol=1e-6, rtol=1e-5)
    uncapped = F.cross_entropy(x @ w.t(), targets, ignore_index=-1)
    assert abs(uncapped.item() - reference.item()) > 0.1  # the cap matters here


@pytest.mark.parametrize("n_layer, layers", [(3, [0, 2]), (4, [1, 3])])
def test_value_embeds_add_their_parameters_on_every_other_layer(n_layer, layers):
    """One (vocab, n_embd) embedding and one (n_head, 32) gate per layer with value embeddings: every other layer,
    the last included (nanochat's has_ve); nothing else changes, and the other weights are the same for a seed."""
    base = GPTConfig(**{**SMALL.__dict__, "n_layer": n_layer})
    plain = make_model(base, perturb=False)
    with_ve = make_model(GPTConfig(**{**base.__dict__, "value_embeds": True}), perturb=False)
    added = {n: s for n, s in with_ve.state_dict().items() if n not in plain.state_dict()}
    V, C, H = base.vocab_size, base.n_embd, base.n_head
    expected = {f"value_embeds.{i}.weight": (V, C) for i in layers} | {
        f"transformer.h.{i}.attn.ve_gate": (H, 32) for i in layers
    }
    assert {n: tuple(t.shape) for n, t in added.items()} == expected
    assert with_ve.num_params() - plain.num_params() == len(layers) * (V * C + H * 32)
    assert all(torch.equal(t, with_ve.state_dict()[n]) for n, t in plain.state_dict().items())
    assert all(with_ve.state_dict()[f"transformer.h.{i}.attn.ve_gate"].abs().sum() == 0 for i in layers)
    assert with_ve.value_embeds[str(layers[0])].weight.std().item() == pytest.approx(0.02, rel=0.05)
    # an embedding is a lookup, not a matmul: only the gates add FLOPs
    assert with_ve.flops_per_token(64) == plain.flops_per_token(64) + 6 * len(layers) * H * 32


def test_scalars_exist_and_every_new_parameter_learns():
    """x0_shortcut's and value_residual's scalars are there with their initial values; after a backward pass every
    parameter, new ones included, has a gradient somewhere. With zero_init the projections start at zero, so at step
    0 nothing behind them has a gradient: after one optimizer step everything does."""
    model = make_model(GPTConfig(**{**RECIPE.__dict__, "n_layer": 4}), perturb=False).train()
    assert torch.equal(model.resid_lambdas.data, torch.ones(4)) and torch.equal(model.x0_lambdas.data, torch.zeros(4))
    assert not hasattr(model.transformer.h[0].attn, "v_lambda")  # layer 0's values are v_first itself
    assert [model.transformer.h[i].attn.v_lambda.item() for i in (1, 2, 3)] == [0.5] * 3
    idx = torch.randint(0, RECIPE.vocab_size, (2, 24))
    _, loss = model(idx, idx.roll(-1, 1))
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert not dead, dead

    model = make_model(GPTConfig(**{**RECIPE.__dict__, "zero_init": True}), perturb=False).train()
    projections = [w for b in model.transformer.h for w in (b.attn.c_proj.weight, b.mlp.c_proj.weight)]
    assert all(w.abs().max() == 0 for w in projections)
    optimizer = runtime.make_optimizer(model, 0.02, 0.95, 0.006, (0.9, 0.95), 0.0)
    for step in range(2):
        optimizer.zero_grad()
        _, loss = model(idx, idx.roll(-1, 1))
        loss.backward()
        dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
        assert bool(dead) == (step == 0), dead
        optimizer.step()


def test_optimizer_gives_embeddings_gates_and_scalars_adamw():
    """Muon only for the blocks' projection matrices; value embeddings with the token embedding (AdamW, decayed);
    gates and scalars with the norm gains (AdamW, never decayed). A run without the features keeps its groups."""
    model = make_model(RECIPE, perturb=False)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = make_groups(model)
    muon, embeddings, rest = ([names[id(p)] for p in g["params"]] for g in groups)
    assert [g["use_muon"] for g in groups] == [True, False, False] and groups[2]["weight_decay"] == 0
    projections = ("c_q.weight", "c_k.weight", "c_v.weight", "c_proj.weight", "c_gate.weight", "c_fc.weight")
    assert len(muon) == 7 * RECIPE.n_layer and all(n.endswith(projections) for n in muon)
    assert embeddings == ["transformer.wte.weight", "value_embeds.0.weight", "value_embeds.2.weight"]
    assert {"resid_lambdas", "x0_lambdas", "transformer.h.1.attn.v_lambda", "transformer.h.0.attn.ve_gate"} <= set(rest)
    assert sorted(muon + embeddings + rest) == sorted(names.values())
    plain = make_model(SMALL, perturb=False)
    assert [len(g["params"]) for g in make_groups(plain)] == [7 * SMALL.n_layer, 1, 2 * SMALL.n_layer + 1]


def make_groups(model):
    return runtime.make_optimizer(model, 0.02, 0.95, 0.006, (0.9, 0.95), 0.1).param_groups


def test_checkpoint_without_the_fields_loads_with_features_off(tmp_path):
    """A checkpoint written before the features existed (model_args without their fields) builds the same model,
    every feature off, and a resume of it is not refused for the fields it lacks."""
    model = make_model(SMALL)
    old_args = {k: v for k, v in dataclasses.asdict(SMALL).items() if k not in checkpoints.FEATURE_KEYS}
    state = dict(model=model.state_dict(), model_args=old_args, config={"optimizer": "muon"}, optimizer={})
    checkpoints.save_checkpoint(tmp_path, 1, state, keep_last=1, is_best=False)
    path = checkpoints.find_checkpoint(tmp_path)
    loaded = checkpoints.build_model(checkpoints.load_checkpoint(path), path)
    defaults = {f.name: f.default for f in dataclasses.fields(GPTConfig) if f.name in checkpoints.FEATURE_KEYS}
    assert {k: getattr(loaded.config, k) for k in defaults} == defaults
    assert not any(defaults.values())
    idx = torch.randint(0, SMALL.vocab_size, (1, 10))
    assert torch.equal(loaded.eval().logits(idx), model.logits(idx))
    config = {**old_args, **defaults, "optimizer": "muon"}  # train.py's config: every key, the features off
    ckpt, args = checkpoints.open_run(tmp_path, "resume", False, config, None, master=False)
    assert ckpt is not None and not any(args[k] for k in checkpoints.FEATURE_KEYS)


def test_zero_init_loss_at_init():
    """What zero_init's comment says: with the tied embeddings the zero stack copies each token, ~15 nats at init
    for n_embd=768 (one layer: the stack is the identity whatever its depth), ~11.8 with logit_softcap=15."""
    base = GPTConfig(block_size=64, vocab_size=32000, n_layer=1, n_head=6, n_embd=768, mlp_hidden=64, zero_init=True)
    idx, targets = torch.randint(0, 32000, (2, 64)), torch.randint(0, 32000, (2, 64))
    losses = {}
    for cap in (0.0, 15.0):
        torch.manual_seed(0)
        with torch.no_grad():
            losses[cap] = GPT(GPTConfig(**{**base.__dict__, "logit_softcap": cap}))(idx, targets)[1].item()
    assert 14.5 < losses[0.0] < 15.8 and 11.5 < losses[15.0] < 12.3, losses


def test_training_with_every_feature_learns_and_samples(tiny_data, tmp_path):
    """train.py with every feature on: the loss falls over 30 steps, the checkpoint stores the features, a resume
    keeps them, and sample.py loads the run."""
    out = tmp_path / "run"
    keys = [f"--{k}={v}" for k, v in {**FEATURES, "logit_softcap": 15.0, "zero_init": True}.items()]
    keys += ["--value_residual=true", "--embed_norm=true", "--n_layer=3"]
    train(tiny_data, out, *keys, "--max_iters=30", "--eval_interval=30", "--ckpt_interval=30")
    losses = metrics(out)
    assert losses[30] < losses[1] - 1.0, losses
    args = checkpoints.load_checkpoint(checkpoints.find_checkpoint(out))["model_args"]
    assert args["value_embeds"] and args["logit_softcap"] == 15.0 and args["n_layer"] == 3
    train(tiny_data, out, *keys, "--max_iters=32", "--eval_interval=30", "--ckpt_interval=30", "--init_from=resume")
    assert max(metrics(out)) == 32
    proc = run("sample.py", f"--out_dir={out}", "--num_samples=1", "--max_new_tokens=8", "--device=cpu", "--start=def")
    assert "def" in proc.stdout
