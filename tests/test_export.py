"""export.py: a run as a transformers LlamaForCausalLM folder. For a random model and a trained SFT model,
transformers' logits equal ours, greedy decoding gives the same tokens, its tokenizer gives our ids and its chat
template renders chat.py's; bad input gets one line and overwrites nothing."""

import hashlib
import json
import re
import runpy
import shutil
from dataclasses import asdict

import pytest
import safetensors
import torch
from conftest import REPO, run, stdlib_sample
from test_train import assert_one_line_error
from transformers import AutoModelForCausalLM, AutoTokenizer

import chat
import checkpoints
from model import GPT, GPTConfig
from tokenizer import Tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "What does `json.dumps` do?"}],
    [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4, written\n    four."},
        {"role": "prompter", "content": " And 3 + 3? "},  # oasst's name for the user; spaces at both ends
        {"role": "assistant", "content": "6 \u2581 six, \u00e9t\u00e9 \U0001f642"},  # a literal U+2581, non-ASCII
    ],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": "\n"}],
]
# text a tokenizer may get wrong: spaces at the ends and in runs, tabs and CRLF, digits, the literal U+2581 that
# tokenizer.py encodes as bytes, characters outside the vocabulary (byte fallback)
TEXTS = [
    "",
    " ",
    "  x  ",
    "\t\n\r\n",
    "x = 12345",
    "\u2581 lit\u2581eral\u2581",
    "\u00e9t\u00e9 \u65e5\u672c \U0001f642",
]


def export(run_dir, hf_dir, *args, check=True):
    return run("export.py", f"--out_dir={run_dir}", f"--hf_dir={hf_dir}", *args, check=check)


def load_run(run_dir):
    """(our model in eval mode, our tokenizer) of a run folder: what every export is compared with."""
    path = checkpoints.find_checkpoint(run_dir, "best")
    return checkpoints.build_model(checkpoints.load_checkpoint(path), path).eval(), Tokenizer(
        str(run_dir / "tokenizer.model")
    )


def digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def assert_export_matches(run_dir, hf_dir, prompt):
    """Logits, greedy tokens, tokenizer ids and chat template of the export against ours; prompt: token ids."""
    ours, tok = load_run(run_dir)
    theirs = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(hf_dir)

    # logits, fp32, on whole-context windows of real text and on the prompt
    T = ours.config.block_size
    windows = [[tok.bos_id, *tok.encode(text)][:T] for _, text in stdlib_sample(3)]
    with torch.no_grad():
        for ids in [*windows, prompt]:
            x = torch.tensor([ids])
            diff = (ours.logits(x) - theirs(x).logits).abs().max().item()
            assert diff < 1e-4, diff

    # greedy decoding: transformers stops at <|endoftext|> or <|end|> (generation_config.json); ours runs on
    x = torch.tensor([prompt])
    mine = ours.generate(x, 24, temperature=0)[0, len(prompt) :].tolist()
    hf = theirs.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=24, do_sample=False)
    hf = hf[0, len(prompt) :].tolist()
    stops = {tok.bos_id, tok.special[chat.END]}
    assert len(set(mine)) > 5  # not one token repeated
    assert hf == mine[: len(hf)] and (len(hf) == 24 or hf[-1] in stops), (hf, mine)

    # tokenizer: <|endoftext|> first by default, as in training; add_special_tokens=False is tokenizer.py's encode
    for text in [*TEXTS, *(text for _, text in stdlib_sample(8))]:
        ids = tok.encode(text)
        assert hf_tok(text, add_special_tokens=False).input_ids == ids
        assert hf_tok(text).input_ids == [tok.bos_id, *ids]
        assert hf_tok.decode(ids) == tok.decode(ids) == text
    # special tokens: parsed from text as in every transformers chat model; split_special_tokens=True keeps them
    # text, as tokenizer.py does; decoding skips them when asked, as tokenizer.py's decode always does (but <unk>,
    # which SentencePiece decodes to " \u2047 ", and nothing encodes to)
    special = "<|endoftext|>x<|system|>\u2581<|user|> y <|assistant|><|end|><unk>"
    ids = hf_tok(special, add_special_tokens=False).input_ids
    assert ids == [1, *tok.encode("x"), 2, *tok.encode("\u2581"), 3, *tok.encode(" y "), 4, 5, 0]
    assert hf_tok(special, add_special_tokens=False, split_special_tokens=True).input_ids == tok.encode(special)
    assert hf_tok.decode(ids, skip_special_tokens=True) == tok.decode(ids[:-1]) == "x\u2581 y "
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (tok.bos_id, tok.bos_id, 0)
    assert set(hf_tok("x")) == {"input_ids", "attention_mask"}  # what generate(**inputs) accepts
    assert AutoTokenizer.from_pretrained(hf_dir, use_fast=False)(TEXTS[-1]).input_ids == [1, *tok.encode(TEXTS[-1])]

    # chat template: whole conversations as sft.py trains on them, and prompts as sample.py --chat builds them
    for messages in CONVERSATIONS:
        for prompt_only in (False, True):
            rendered = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=prompt_only)
            rendered = rendered if isinstance(rendered, list) else rendered["input_ids"]  # transformers 5: a dict
            assert rendered == (chat.render_prompt(tok, messages) if prompt_only else chat.render(tok, messages)[0])
    try:
        hf_tok.apply_chat_template([{"role": "tool", "content": "{}"}], tokenize=False)
        raise AssertionError("an unknown role was rendered")
    except Exception as e:  # jinja2's TemplateError, raised by the template's raise_exception
        assert "unknown role tool" in str(e), e


# rope_theta and norm_eps are not Llama's defaults, so a setting the export dropped would show
TINY_CONFIG = GPTConfig(64, 512, n_layer=2, n_head=4, n_embd=64, mlp_hidden=96, rope_theta=500.0, norm_eps=1e-3)


def tiny_run(folder, tokenizer, config=TINY_CONFIG, **changes):
    """A run folder holding a random model with every path exercised, its checkpoint and tokenizer; changes go
    into the checkpoint's model_args only (settings export.py must refuse)."""
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():  # at init the tied embeddings make greedy decoding repeat one token: spread the weights
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.5) if p.ndim == 1 else p.normal_(0.0, 0.05 if "wte" in name else 0.2)
    folder.mkdir()
    shutil.copyfile(tokenizer, folder / "tokenizer.model")
    state = dict(model=model.state_dict(), model_args={**asdict(config), **changes})
    checkpoints.save_checkpoint(folder, 1, state, keep_last=1, is_best=True)
    return folder


def test_random_model_matches_transformers(tiny_data, tmp_path):
    run_dir = tiny_run(tmp_path / "run", tiny_data / "tokenizer.model")
    export(run_dir, tmp_path / "hf")
    tok = Tokenizer(str(run_dir / "tokenizer.model"))
    assert_export_matches(run_dir, tmp_path / "hf", [tok.bos_id, *tok.encode("def f(x):\n")])


def test_trained_sft_model_matches_transformers(sft_run, tmp_path):
    sft, _ = sft_run
    proc = export(sft, tmp_path / "hf")
    assert "exported" in proc.stdout and not list(tmp_path.glob(".hf*"))  # no temporary folder left behind
    tok = Tokenizer(str(sft / "tokenizer.model"))
    assert_export_matches(sft, tmp_path / "hf", chat.render_prompt(tok, CONVERSATIONS[0]))


@pytest.mark.parametrize(
    "changes",
    [{"qk_norm": True, "attn_scale": 0.5}, {"attn_scale": 0.3}, {"embed_norm": True}],
    ids=["qwen3", "scale", "embed_norm"],
)
def test_qk_norm_attn_scale_and_embed_norm_export(tiny_data, tmp_path, changes):
    """qk_norm exports as a Qwen3ForCausalLM (q_norm, k_norm before RoPE), attn_scale folded into q_norm's weight
    or, without qk_norm, into q_proj's rows of a Llama, embed_norm into normed embedding rows with the head untied:
    transformers gives our logits and greedy tokens (a sharp attn_scale: with 0.12 this random model's greedy
    decoding repeats one token)."""
    config = GPTConfig(**{**TINY_CONFIG.__dict__, **changes})
    run_dir = tiny_run(tmp_path / "run", tiny_data / "tokenizer.model", config)
    export(run_dir, tmp_path / "hf")
    arch = json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"]
    assert arch == ["Qwen3ForCausalLM" if "qk_norm" in changes else "LlamaForCausalLM"]
    with safetensors.safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:  # the head apart only if it must be
        assert ("lm_head.weight" in f.keys()) == ("embed_norm" in changes)
    tok = Tokenizer(str(run_dir / "tokenizer.model"))
    assert_export_matches(run_dir, tmp_path / "hf", [tok.bos_id, *tok.encode("def f(x):\n")])


def test_the_recipe_is_refused_with_the_keys_that_make_it_export(tiny_data, tmp_path):
    """config/reference_137m.py's recipe (issue 37): one line names every feature Llama lacks, with the --key=value
    flags that turn them off; the recipe with those flags applied exports (as Qwen3 with an untied head) and gives
    our logits."""
    recipe = runpy.run_path(str(REPO / "config" / "reference_137m.py"))
    keys = {k: recipe[k] for k in checkpoints.FEATURE_KEYS if k in recipe}
    run_dir = tiny_run(tmp_path / "recipe", tiny_data / "tokenizer.model", GPTConfig(**{**asdict(TINY_CONFIG), **keys}))
    proc = export(run_dir, tmp_path / "hf", check=False)
    assert_one_line_error(proc, "cannot map to Llama", *(f"{k}={keys[k]!r}" for k in ("value_residual", "x0_shortcut")))
    flags = dict(re.findall(r"--(\w+)=(\S+)", proc.stderr))
    assert sorted(flags) == ["logit_softcap", "value_residual", "x0_shortcut"] and not (tmp_path / "hf").exists()
    keys |= {k: v == "true" if isinstance(keys[k], bool) else float(v) for k, v in flags.items()}
    run_dir = tiny_run(
        tmp_path / "exportable", tiny_data / "tokenizer.model", GPTConfig(**{**asdict(TINY_CONFIG), **keys})
    )
    export(run_dir, tmp_path / "hf")
    tok = Tokenizer(str(run_dir / "tokenizer.model"))
    assert_export_matches(run_dir, tmp_path / "hf", [tok.bos_id, *tok.encode("def f(x):\n")])


def test_bad_input(tiny_data, tmp_path):
    tokenizer = tiny_data / "tokenizer.model"
    good = tiny_run(tmp_path / "good", tokenizer)

    # a run folder without a checkpoint
    (tmp_path / "empty").mkdir()
    assert_one_line_error(export(tmp_path / "empty", tmp_path / "a", check=False), "no checkpoint")
    assert not (tmp_path / "a").exists()

    # model settings Llama has no place for (model.py's features of issue 37, each on alone, and a setting from
    # another project), and a head size RoPE cannot rotate; zero_init only sets where training started
    features = {"logit_softcap": 30.0, "value_embeds": True, "x0_shortcut": True, "value_residual": True}
    exported = {"zero_init", "qk_norm", "attn_scale", "embed_norm"}
    assert set(features) | exported == set(checkpoints.FEATURE_KEYS)
    for name, value in [*features.items(), ("bias", False), ("n_head", 3)]:
        tiny_run(tmp_path / name, tokenizer, **{name: value})
        proc = export(tmp_path / name, tmp_path / f"{name}_hf", check=False)
        assert_one_line_error(proc, "cannot map to Llama", f"{name}={value}")
        assert (name not in features) or f"train the run with --{name}=" in proc.stderr
        assert not (tmp_path / f"{name}_hf").exists()
    tiny_run(tmp_path / "zero_init", tokenizer, zero_init=True)
    export(tmp_path / "zero_init", tmp_path / "zero_init_hf")

    # a target that exists: refused without --overwrite, nothing touched; replaced with it; a folder holding
    # anything export.py does not write is never replaced
    hf = tmp_path / "hf"
    export(good, hf)
    before = digests(hf)
    assert_one_line_error(export(good, hf, check=False), "already exists", "--overwrite=true")
    assert digests(hf) == before
    export(good, hf, "--overwrite=true", "--dtype=bfloat16")
    with safetensors.safe_open(hf / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    assert sorted(digests(hf)) == sorted(before) and not list(tmp_path.glob(".hf*"))
    (hf / "notes.txt").write_text("mine")
    before = digests(hf)
    assert_one_line_error(export(good, hf, "--overwrite=true", check=False), "notes.txt", "does not write")
    assert digests(hf) == before

    # a run whose tokenizer is tiktoken's: transformers would need its files, which we do not have
    (tmp_path / "tiktoken").mkdir()
    shutil.copyfile(good / checkpoints.BEST, tmp_path / "tiktoken" / checkpoints.BEST)
    (tmp_path / "tiktoken" / "tokenizer.tiktoken").write_text("gpt2\n")
    assert_one_line_error(export(tmp_path / "tiktoken", tmp_path / "b", check=False), "only SentencePiece")
