"""Batched, cached generation from a run folder: the one place sample.py, eval.py, serve.py and prepare.py load a
run to generate from and decode many sequences with the KV cache.

    model, tok, checkpoint, path = load_run("out/tiny_sft", "best", env)
    generate(model, prompts, max_new, stop_ids)     # many prompts at once, left-padded (eval.py, prepare.py)
    slots = Slots(model, rows=8)                    # requests that join and leave a running batch (serve.py)

Sampling is model.sample_next (temperature, top-k, top-p), the same function sample.py's model.generate uses.
"""

import copy
from concurrent.futures import ThreadPoolExecutor

import torch
from tqdm import tqdm

import checkpoints
import runtime
from chat import END, code_block, render_prompt
from model import KVCache, sample_next
from runtime import UserError
from sandbox import passes_doctests
from tokenizer import find_tokenizer, load_tokenizer


def load_run(out_dir, ckpt, env, flag="--out_dir"):
    """(model, tokenizer, checkpoint, path) of a run folder's checkpoint `ckpt` (best, latest or a file name): the
    model in eval mode on env's device, its weights in the compute precision (inference only)."""
    path = checkpoints.find_checkpoint(out_dir, ckpt, flag)
    checkpoint = checkpoints.load_checkpoint(path)
    model = checkpoints.build_model(checkpoint, path)
    model.eval().to(env["device"])
    if env["ptdtype"] != torch.float32:
        model.to(env["ptdtype"])
    tokenizer_path = find_tokenizer(out_dir)
    if tokenizer_path is None:
        raise UserError(f"{out_dir} has no tokenizer.model; copy the data folder's tokenizer into the run folder")
    tok = load_tokenizer(tokenizer_path)
    if tok.vocab_size != model.config.vocab_size:
        raise UserError(
            f"{tokenizer_path} has {tok.vocab_size} tokens but the checkpoint expects "
            f"{model.config.vocab_size}; the run folder's tokenizer was replaced"
        )
    return model, tok, checkpoint, path


# ----------------------------------------------------------------------------- many prompts at once
PREFILL = 8192  # most prompt tokens (rows x longest prompt) that Slots.join prefills in one forward: one full context
STEPS = {}  # (model id, rows, cache length) -> (KVCache, captured step): the greedy and the sampled pass share one


@torch.no_grad()
def generate(
    model,
    prompts,
    max_new,
    stop_ids,
    tok=None,
    stop_texts=(),
    temperature=0.0,
    top_p=1.0,
    generator=None,
    batch_size=128,
    desc="generate",
    graph=False,
    on_done=None,
):
    """Completions of many prompts (lists of token ids) with the KV cache, batch_size rows at a time, similar
    lengths together. Rows are left-padded and the padding is masked (KVCache.start), so each row decodes as it
    would alone. A row ends at a token of stop_ids (not included) or once its decoded text holds one of
    stop_texts. Returns a list of (token ids, ended by a stop token). A progress bar on a terminal (not in logs).
    on_done(i, result), where given, is called for each prompt as its batch ends, before the next batch starts:
    eval.py and prepare.py run the sandbox on one batch's programs while the GPU generates the next.

    Every batch decodes into one cache of the longest prompt + max_new positions (a shorter batch's rows leave
    its end unused; what an earlier batch left there is masked). A fixed shape lets CUDA replay the one-token step
    as a graph (graph=True, eval.py's gen_graph): eager, a step is ~420 kernel launches, and at 128 rows launching
    them took ~5x the GPU's work; at 512 rows the eager step is faster overall, as a graph compiles once per shape
    (PERF.md)."""
    if not prompts:
        return []
    dev, c = model.lm_head.weight.device, model.config
    prompts, max_new = fit_context(c.block_size, prompts, max_new)
    rows, max_len = min(batch_size, len(prompts)), max(map(len, prompts)) + max_new
    key = (id(model), rows, max_len)
    if key in STEPS:
        cache, step = STEPS[key]
    else:
        cache = KVCache(c, rows, max_len, dev, model.lm_head.weight.dtype)
        cache.start = torch.zeros(rows, dtype=torch.long, device=dev)
        graph = graph and dev.type == "cuda"  # run on H100; elsewhere (CPU run, MPS never) the eager step
        step = model.capture_decode(cache) if graph else model.decode_step(cache)
        if graph:
            STEPS[key] = cache, step  # the graph keeps the model alive, so its id stays its own
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results = [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc=desc, unit="seq", disable=None, leave=False)
    for a in range(0, len(order), rows):
        batch = order[a : a + rows]
        done = generate_batch(
            model,
            cache,
            step,
            [prompts[i] for i in batch],
            max_new,
            stop_ids,
            tok,
            stop_texts,
            temperature,
            top_p,
            generator,
        )
        for i, r in zip(batch, done, strict=True):
            results[i] = r
            if on_done:
                on_done(i, r)
        bar.update(len(batch))
    bar.close()
    return results


def fit_context(block_size, prompts, max_new):
    """(prompts, max_new) that fit the context: an answer gives way to its prompt, down to half the context (an
    answer of block_size - 1 tokens would cut every prompt to its last token: eval.py's 128-token chat answers in a
    64-token model answered nothing they were asked); longer prompts keep their end."""
    max_new = min(max_new, block_size - 1, max(block_size - max(map(len, prompts)), block_size // 2))
    return [p[-(block_size - max_new) :] for p in prompts], max_new


def prefill(model, cache, prompts, end):
    """Prompts (lists of token ids) into the rows of cache, left-padded so that all end at position `end`, the
    padding masked by cache.start: the logits (B, vocab) after each prompt's last token."""
    T = max(map(len, prompts))
    x = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        x[i, T - len(p) :] = torch.tensor(p)
    cache.pos = end - T
    cache.start.copy_(torch.tensor([end - len(p) for p in prompts]))
    return model(x.to(cache.device), cache=cache)[0][:, -1]


def generate_batch(model, cache, step, prompts, max_new, stop_ids, tok, stop_texts, temperature, top_p, generator):
    """One batch into cache (rows, max_len): the prompts, then rows filled up with copies of the last prompt
    (decoded and dropped: every batch has the cache's shape)."""
    dev, n = cache.device, len(prompts)
    prompts = prompts + [prompts[-1]] * (cache.batch_size - n)
    B = len(prompts)
    logits = prefill(model, cache, prompts, max(map(len, prompts)))
    stops = torch.tensor(stop_ids, device=dev)
    tail = 8 + max(map(len, stop_texts), default=0)  # tokens that hold any stop text ending in the last 8 tokens
    new, hit, done = [], torch.zeros(B, dtype=torch.bool, device=dev), [False] * n + [True] * (B - n)
    for i in range(max_new):
        next_id = sample_next(logits, temperature, 0, top_p, generator)  # (B, 1)
        new.append(next_id)
        hit |= torch.isin(next_id[:, 0], stops)
        if i % 8 == 7 or i == max_new - 1:  # look at the host's copy now and then, not every token
            ids, hits = torch.cat(new[-tail:], dim=1).tolist(), hit.tolist()
            for r in range(B):  # a stop text ending in the last 8 tokens lies in the decoded tail
                done[r] = done[r] or hits[r] or bool(stop_texts and any(s in tok.decode(ids[r]) for s in stop_texts))
            if all(done):
                break
        logits = step(next_id, cache.pos)
        cache.pos += 1
    out = []
    for row in torch.cat(new, dim=1)[:n].tolist():
        cut = next((j for j, t in enumerate(row) if t in stop_ids), None)
        out.append((row if cut is None else row[:cut], cut is not None))
    return out


def doctest_verdict(real, answer, name, doc, timeout, memory_mb):
    """How a coding pair fares against its docstring's examples, in the sandbox: "broken" when the real function
    fails them, "both pass" when the answer passes them too, else "answer fails" (the pair is kept)."""
    if not passes_doctests(code_block(real), name, doc, timeout, memory_mb):
        return "broken"
    return "both pass" if passes_doctests(code_block(answer), name, doc, timeout, memory_mb) else "answer fails"


def verdict_pairs(
    conversations, code, pairs, answers, verdicts, drawn, unjudged="own", own_only=False, per_request=1,
    others="written",
):  # fmt: skip
    """sampled_code_pairs' pairs from its judged answers: (pairs, counts). By place j in code: answers[j] the greedy
    answer, verdicts[j] its doctest_verdict, drawn[j] the other answers with whether they pass. unjudged="written":
    a request whose real function fails its own examples keeps its written pair (no verdict, no own answer rejected).
    own_only: every request without a pair of the run's own answers keeps its written pair, or with others="none"
    has none (every other pair, docstring questions' too, is dropped). per_request > 1: up to that many pairs of
    the run's own answers to a request, a list in its place: each answer of the longer side (passing or failing,
    distinct texts) once, against the other side's in turn."""
    written = pairs
    pairs, counts = list(pairs), {"sampled": len(code), "same": 0, "judged": 0, "both_pass": 0, "example_broken": 0}
    counts["own"] = counts["own_requests"] = 0
    for j, i in enumerate(code):
        question, real = conversations[i]
        pairs[i] = {"prompt": question["content"], "chosen": real["content"], "rejected": answers[j]}
        if answers[j].strip() == real["content"].strip():
            counts["same"], pairs[i] = counts["same"] + 1, None
        elif j in verdicts:
            counts["judged"] += 1
            verdict = verdicts[j]
            if verdict == "broken":
                counts["example_broken"] += 1  # examples that need more than the function (or are out of date)
                if unjudged == "written":
                    pairs[i] = written[i]
            elif verdict == "both pass":
                counts["both_pass"], pairs[i] = counts["both_pass"] + 1, None
        if j in drawn and verdicts.get(j) != "broken":  # the greedy answer passes where its pair was dropped
            passing = [answers[j]] * (pairs[i] is None) + [a for a, ok in drawn[j] if ok]
            failing = [answers[j]] * (pairs[i] is not None) + [a for a, ok in drawn[j] if not ok]
            if passing and failing:
                passing, failing = list(dict.fromkeys(passing)), list(dict.fromkeys(failing))  # distinct, in order
                n = min(per_request, max(len(passing), len(failing)))
                own = [
                    {"prompt": question["content"], "chosen": passing[k % len(passing)],
                     "rejected": failing[k % len(failing)]}
                    for k in range(n)
                ]  # fmt: skip
                pairs[i] = own[0] if per_request == 1 else own
                counts["own"], counts["own_requests"] = counts["own"] + n, counts["own_requests"] + 1
                continue
        if own_only:
            pairs[i] = written[i] if others == "written" else None
    if own_only and others == "none":  # the docstring questions (not in code) too
        asked = set(code)
        pairs = [p if i in asked else None for i, p in enumerate(pairs)]
    return pairs, counts


def sampled_code_pairs(
    run, conversations, pairs, max_new=512, batch_size=128, timeout=10.0, memory_mb=2048, samples=1, temperature=0.8,
    unjudged="own", own_only=False, per_request=1, others="written",
):  # fmt: skip
    """prepare.py --mode=dpo --sample_from=RUN: the coding requests' pairs remade on-policy. The SFT run answers each
    request greedily; the real function is chosen and the run's own answer rejected, except where the docstring has
    examples: then both run in the sandbox against them, and a pair is kept only when the real function passes and
    the answer fails (an answer that passes is as good as the real one). Other pairs stay as they are; a dropped
    pair becomes None. The examples run on every core, a batch's while the next batch is generated.
    samples > 1 (--sample_n): each request with examples is also answered samples - 1 times at temperature (top-p
    0.95, as eval.py's pass@k), each answer judged by the examples; where the run's answers both pass and fail, the
    pair is all its own: a passing answer chosen, a failing one rejected (a real function failing its examples keeps
    its plain pair). unjudged="written" (--sample_unjudged): only answers with a verdict are rejected; a request
    without examples, or whose real function fails them, keeps its written pair and is not answered at all.
    own_only (--sample_own_only, with samples > 1): only pairs of the run's own answers replace written ones;
    others="none" (--sample_others): every other pair is dropped. per_request (--sample_pairs): pairs of the run's
    own answers a request may give (verdict_pairs). Returns (pairs, a summary of the judging)."""
    model, tok, _, _ = load_run(run, "best", runtime.setup_device(), "--sample_from")
    every = unjudged == "own" and not own_only  # every coding request answered, not only those with examples
    code = [i for i, c in enumerate(conversations) if "function" in c[0] and (every or c[0].get("doc"))]
    prompts = [render_prompt(tok, conversations[i][:1]) for i in code]
    answers, verdicts = {}, {}  # by place in code: the decoded answer, and its doctest verdict (a future until the end)
    pool = ThreadPoolExecutor(max_workers=runtime.cores())

    def judge(j, result):
        question, real = conversations[code[j]]
        answers[j] = answer = tok.decode(result[0])
        if question.get("doc") and answer.strip() != real["content"].strip():
            args = real["content"], answer, question["function"], question["doc"], timeout, memory_mb
            verdicts[j] = pool.submit(doctest_verdict, *args)

    drawn, asked = {}, [j for j, i in enumerate(code) if conversations[i][0].get("doc")]  # drawn: place -> answers

    def judge_drawn(k, result):
        j, answer = asked[k // (samples - 1)], tok.decode(result[0])
        question = conversations[code[j]][0]
        args = code_block(answer), question["function"], question["doc"], timeout, memory_mb
        drawn.setdefault(j, {})[k] = answer, pool.submit(passes_doctests, *args)

    try:
        stops = [tok.special[END], tok.bos_id]
        generate(model, prompts, max_new, stops, batch_size=batch_size, desc="pairs", on_done=judge)
        if samples > 1:
            again = [prompts[j] for j in asked for _ in range(samples - 1)]
            # answers of every length: continuous batching, a row that ends takes the next prompt
            generate_stream(model, again, max_new, stops, temperature=temperature, top_p=0.95, seed=1337,
                            rows=batch_size, desc="samples", on_done=judge_drawn)  # fmt: skip
        verdicts = {j: future.result() for j, future in verdicts.items()}
        drawn = {j: [(a, future.result()) for _, (a, future) in sorted(d.items())] for j, d in drawn.items()}
    finally:  # an error or a Ctrl-C leaves no queued program for the interpreter to run before it exits
        pool.shutdown(cancel_futures=True)
    pairs, counts = verdict_pairs(
        conversations, code, pairs, answers, verdicts, drawn, unjudged, own_only, per_request, others
    )
    which = "" if every else " to requests with examples"
    summary = (
        f"{counts['sampled']:,} answers of {run}{which} rejected, {counts['same']:,} equal to the real function "
        f"dropped; {counts['judged']:,} judged by their doctests ({counts['both_pass']:,} passing answers dropped, "
        f"{counts['example_broken']:,} whose real function fails its own examples kept as plain pairs)"
    )
    if samples > 1:
        summary += (
            f"; {len(asked) * (samples - 1):,} more answers drawn at T={temperature}: {counts['own']:,} pairs of the "
            f"run's own answers, a passing one against a failing one"
        )
        if per_request > 1:
            summary += f" ({counts['own_requests']:,} requests, up to {per_request} pairs each)"
    if own_only:
        summary += "; only those replace written pairs" if others == "written" else "; every other pair dropped"
    return pairs, summary


# ----------------------------------------------------------------------------- a batch that requests join and leave
class Slots:
    """The rows of one KV cache, which requests take and give back between decoding steps (continuous batching, as
    serve.py runs it): a request joins the running batch as soon as a row is free and it fits, and a row given back
    (an answer that ended, a client that left) is free for the next request at the next step.

    All rows decode at one position, cache.pos. A request of L prompt tokens joins at that position with its prompt
    prefilled into positions pos-L .. pos-1 of its row, and KVCache.start masks everything before them, so it
    attends only to itself; RoPE depends only on distances, so where it sits changes nothing but rounding. It needs
    L <= pos (room on the left) and pos + n_new <= max_len (room on the right); restart(pos) sets the position of
    an idle batch. A request takes the lowest free row and a step decodes the rows up to the highest busy one (a
    view of the cache), so one request alone costs a batch of one. A free row below it attends to its own position
    only (start = max_len): no softmax row is empty.
    graph (CUDA): the step over all rows compiled and replayed as a CUDA graph, as sample.py --compile does."""

    def __init__(self, model, rows, graph=False):
        self.model, self.rows, self.max_len = model, rows, model.config.block_size
        dev, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
        self.cache = KVCache(model.config, rows, self.max_len, dev, dtype)
        self.cache.start = torch.full((rows,), self.max_len, dtype=torch.long, device=dev)
        self.graph = model.capture_decode(self.cache) if graph else None
        self.pos = torch.zeros((), dtype=torch.long, device=dev)  # the step's position, filled in place
        self.next_ids = torch.zeros(rows, 1, dtype=torch.long, device=dev)  # each row's last sampled token
        self.sampling = [None] * rows  # (temperature, top_k, top_p, generator) of the request in each row

    def busy(self):
        return [r for r in range(self.rows) if self.sampling[r] is not None]

    def view(self, a, b):
        """Rows a..b-1 of the cache as a KVCache of their own (views: what it writes lands in the cache)."""
        view = copy.copy(self.cache)
        view.k, view.v = [k[a:b] for k in self.cache.k], [v[a:b] for v in self.cache.v]
        view.start, view.batch_size = self.cache.start[a:b], b - a
        return view

    def restart(self, pos):
        """Put an idle batch at position pos: requests of up to pos prompt tokens can join."""
        assert not self.busy()
        self.cache.pos = pos

    def fits(self, n_prompt, n_new, taken=0):
        """Whether a request of n_prompt tokens that may generate n_new can join now, beside `taken` others that
        join with it."""
        free = self.sampling.count(None) > taken
        return free and n_prompt <= self.cache.pos and self.cache.pos + n_new <= self.max_len

    @torch.no_grad()
    def join(self, requests):
        """Put requests [(prompt ids, (temperature, top_k, top_p, generator))] in the lowest free rows (each must
        fit() beside the ones before it): [(row, its first new token id)]. Each run of adjacent rows is prefilled
        as one left-padded batch of at most PREFILL tokens (a burst of 32 requests into an idle batch: one forward,
        not 32); a row's padding lies before its start, masked."""
        rows = [r for r in range(self.rows) if self.sampling[r] is None][: len(requests)]
        try:
            return self._prefill(rows, requests)
        except BaseException:  # the model failed (out of memory, say): no row stays taken
            for row in rows:
                self.leave(row)
            raise

    def _prefill(self, rows, requests):
        pos, out, i = self.cache.pos, [], 0
        while i < len(rows):  # rows[i:j]: adjacent rows
            j, L = i + 1, len(requests[i][0])
            while j < len(rows) and rows[j] == rows[j - 1] + 1 and (j - i + 1) * max(L, len(requests[j][0])) <= PREFILL:
                j, L = j + 1, max(L, len(requests[j][0]))
            batch = requests[i:j]
            logits = prefill(self.model, self.view(rows[i], rows[j - 1] + 1), [ids for ids, _ in batch], pos)
            for k, (row, (_, sampling)) in enumerate(zip(rows[i:j], batch, strict=True)):
                self.sampling[row] = sampling
                next_id = sample_next(logits[k : k + 1], *sampling)  # (1, 1)
                self.next_ids[row] = next_id[0]
                out.append((row, int(next_id)))
            i = j
        return out

    def sample(self, busy, logits):
        """{row: its next token id} for the busy rows from logits (B, vocab) of rows 0..B-1, free ones too; kept in
        next_ids. The rows of the same settings and no seed are drawn in one call over all of logits (the other rows'
        draws unused, so no index list is copied to the GPU: such a copy waits for it), a seeded row alone from its
        own generator, and the ids reach the host in one copy. Drawn row by row, 32 rows cost 32 waits for the GPU a
        step (PERF.md, "Serving's step")."""
        groups = {}  # a seeded request draws alone: its answer does not depend on its company
        for r in busy:
            temperature, top_k, top_p, generator = self.sampling[r]
            groups.setdefault(r if generator is not None else (temperature, top_k, top_p), []).append(r)
        draws = [
            sample_next(logits if isinstance(key, tuple) else logits[key : key + 1], *self.sampling[rows[0]])
            for key, rows in groups.items()
        ]
        B = logits.size(0)
        if len(draws) == 1 and isinstance(next(iter(groups)), tuple):
            self.next_ids[:B] = draws[0]  # on the device: the next step reads them there
            ids = draws[0].flatten().tolist()
            return {r: ids[r] for r in busy}
        ids, at, out = torch.cat(draws).flatten().tolist(), 0, {}
        for key, rows in groups.items():
            for r in rows:
                out[r] = ids[at + r] if isinstance(key, tuple) else ids[at]
            at += B if isinstance(key, tuple) else 1
        self.next_ids[:B] = torch.tensor([out.get(r, 0) for r in range(B)]).view(B, 1)  # the GPU has finished
        return out

    @torch.no_grad()
    def advance(self):
        """One decoding step of the busy rows: {row: its next token id}."""
        busy = self.busy()
        if self.graph:
            logits = self.graph(self.next_ids, self.cache.pos)  # (rows, vocab)
        else:
            n = busy[-1] + 1
            logits = self.model.decode(self.next_ids[:n], self.view(0, n), self.pos.fill_(self.cache.pos))
        self.cache.pos += 1
        return self.sample(busy, logits)

    def leave(self, row):
        """Give a row back: its keys are masked from now on, and the next request may take it."""
        self.sampling[row] = None
        self.cache.start[row] = self.max_len


@torch.no_grad()
def generate_stream(
    model, prompts, max_new, stop_ids, temperature=0.0, top_p=1.0, seed=None, rows=128, desc="generate", on_done=None
):  # fmt: skip
    """generate's results by continuous batching (Slots): a row whose answer ends takes the next prompt at the next
    step, so a batch no longer decodes until its longest answer ends. Prompts join shortest first, as the shared
    position passes their length; once no prompt fits (position + max_new past the context) the running answers
    finish and the batch restarts. Greedy answers are generate's but for rounding; sampled ones draw from torch's
    generator seeded with seed (the caller's RNG state is kept), all rows in one call. prepare.py --sample_n's
    answers, whose lengths differ most. on_done(i, result) as each answer ends. Returns [(token ids, ended)]."""
    if not prompts:
        return []
    dev = model.lm_head.weight.device
    prompts, max_new = fit_context(model.config.block_size, prompts, max_new)
    slots, stops, sampling = Slots(model, min(rows, len(prompts))), set(stop_ids), (temperature, 0, top_p, None)
    waiting = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)  # the next one last
    results, running = [None] * len(prompts), {}  # running: row -> (prompt index, its new token ids)
    bar = tqdm(total=len(prompts), desc=desc, unit="seq", disable=None, leave=False)

    def take(row, token):
        i, ids = running[row]
        ids.append(token)
        if token in stops or len(ids) == max_new:
            results[i] = (ids[:-1], True) if token in stops else (ids, False)
            slots.leave(row)
            del running[row]
            bar.update(1)
            if on_done:
                on_done(i, results[i])

    accelerator = None if dev.type == "cpu" else dev.type  # the CPU's state is always kept, a GPU's when named
    with torch.random.fork_rng(devices=[dev] if accelerator else [], device_type=accelerator):
        if seed is not None:
            torch.manual_seed(seed)
        while waiting or running:
            if not running:  # an idle batch starts at the longest prompt of those that fill it
                slots.restart(max(len(prompts[i]) for i in waiting[-slots.rows :]))
            joining = []  # a running batch is joined once a sixteenth of its rows are free: a prefill costs a step
            if not running or slots.rows - len(running) >= max(1, slots.rows // 16):
                while waiting and slots.fits(len(prompts[waiting[-1]]), max_new, len(joining)):
                    joining.append(waiting.pop())
            if joining:
                joined = slots.join([(prompts[i], sampling) for i in joining])
                for (row, token), i in zip(joined, joining, strict=True):
                    running[row] = i, []
                    take(row, token)
            if running:
                for row, token in slots.advance().items():
                    take(row, token)
    bar.close()
    return results
