"""serve.py (issue 38) with real clients: the official openai package, a headless chromium driving the page, 32
streaming clients of which 10 leave mid-answer, and bad requests; generation.Slots against generation.generate.

Two servers: the tiny SFT run of conftest (a real chat model, 64 tokens of context), and a "talker": a random model
made here whose greedy answers never end (the embeddings of <|end|>, the boundary and the other control tokens are
zero, so their logits are 0 and always below the largest), for answers long enough to stop, drop and measure.

Also a load client: `python tests/test_serve.py http://127.0.0.1:8000 --clients=32 --max_tokens=64` prints the
requests/s and the times to first token of a server (docs/serving.md's figures).
"""

import argparse
import contextlib
import dataclasses
import http.client
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import checkpoints  # noqa: E402
import generation  # noqa: E402
from chat import END, render_prompt  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


# ----------------------------------------------------------------------------- a server and its clients
@dataclasses.dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path

    def get(self, path):
        return json.loads(request(self.url, "GET", path)[1])

    def rss_mib(self):
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024

    def wait_idle(self, timeout=10.0):
        """Seconds until no row is busy and no request waits (fails after timeout)."""
        t0 = time.perf_counter()
        while (h := self.get("/health"))["busy"] or h["waiting"]:
            assert time.perf_counter() - t0 < timeout, h
            time.sleep(0.02)
        return time.perf_counter() - t0


@contextlib.contextmanager
def serving(run, log, *args):
    """serve.py on a free port of 127.0.0.1, as a user starts it; stopped (SIGTERM) at the end."""
    cmd = [sys.executable, str(REPO / "serve.py"), f"--out_dir={run}", "--port=0", "--device=cpu", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
    try:
        t0 = time.time()
        while (m := re.search(r"at (http://127\.0\.0\.1:\d+)/ ", log.read_text())) is None:
            assert proc.poll() is None and time.time() - t0 < 120, log.read_text()
            time.sleep(0.1)
        server = Server(m.group(1), proc, log)
        while "Application startup complete" not in log.read_text():
            assert proc.poll() is None and time.time() - t0 < 120, log.read_text()
            time.sleep(0.05)
        yield server
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def request(url, method, path, body=None, headers=None):
    """(status, body bytes) of one plain HTTP request."""
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    try:
        conn.request(method, path, body, {"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def stream(url, body, drop_after=None, leave=None):
    """One streaming chat completion read as its events arrive: {ttft (s), seconds, pieces (content chunks), text,
    finish, usage, done ([DONE] seen), dropped}. The client closes its socket after drop_after pieces, or once the
    threading.Event leave is set."""
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    t0 = time.perf_counter()
    out = {"ttft": None, "pieces": 0, "text": "", "finish": None, "usage": None, "done": False, "dropped": False}
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True}))
        response = conn.getresponse()
        assert response.status == 200, response.read()
        for line in response:
            if not line.startswith(b"data: "):
                continue
            if line.strip() == b"data: [DONE]":
                out["done"] = True
                break
            chunk = json.loads(line[6:])
            out["usage"] = chunk.get("usage") or out["usage"]
            for choice in chunk["choices"]:
                if choice["delta"].get("content"):
                    out["ttft"] = out["ttft"] or time.perf_counter() - t0
                    out["pieces"] += 1
                    out["text"] += choice["delta"]["content"]
                out["finish"] = choice["finish_reason"] or out["finish"]
            if (drop_after is not None and out["pieces"] >= drop_after) or (leave is not None and leave.is_set()):
                conn.sock.shutdown(socket.SHUT_RDWR)  # gone mid-answer, as a closed tab or a killed client
                out["dropped"] = True
                break
    finally:
        conn.close()
    out["seconds"] = time.perf_counter() - t0
    return out


def load(url, clients, body, drop=0, drop_after=2):
    """`clients` streaming requests at once (threads), the first `drop` of them leaving after drop_after pieces:
    (results, wall seconds)."""
    results = [None] * clients

    def one(i):
        results[i] = stream(url, body, drop_after if i < drop else None)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results, time.perf_counter() - t0


def assert_clean_log(log):
    text = log.read_text()
    bad = [line for line in text.splitlines() if re.search(r"ERROR|Traceback|Exception|error:", line)]
    assert not bad, "\n".join(bad[:20])


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def chat_server(sft_run, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve_chat") / "server.log"
    with serving(sft_run[0], log, "--rows=4") as server:
        yield server
    assert_clean_log(log)


@pytest.fixture(scope="module")
def talker(sft_run, tmp_path_factory):
    """A run folder holding a random model that never ends its greedy answers, with the SFT run's tokenizer."""
    run = tmp_path_factory.mktemp("talker")
    tok = load_tokenizer(sft_run[0] / "tokenizer.model")
    torch.manual_seed(0)
    config = GPTConfig(block_size=2048, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=64, mlp_hidden=128)
    model = GPT(config)
    with torch.no_grad():
        model.transformer.wte.weight[[0, *tok.special.values()]] = 0.0  # <unk> and the control tokens: no text
    state = {"model": model.state_dict(), "model_args": dataclasses.asdict(config), "config": {}, "iter_num": 7}
    checkpoints.atomic_save(state, run / checkpoints.BEST)
    shutil.copyfile(sft_run[0] / "tokenizer.model", run / "tokenizer.model")
    return run


@pytest.fixture(scope="module")
def talk_server(talker, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve_talk") / "server.log"
    with serving(talker, log, "--rows=8", "--temperature=0", "--max_tokens=2000") as server:
        yield server
    assert_clean_log(log)


# ----------------------------------------------------------------------------- generation.Slots
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_slots_join_a_running_batch_and_answer_as_alone(graph, monkeypatch):
    """Requests that join a running batch at later steps, in rows that others gave back, get the greedy tokens they
    get alone from generation.generate (a left-padded batch of one). graph: the step over all rows that the CUDA
    graph replays (here decode() on the whole cache, eagerly: the CPU has no CUDA graphs), free rows included."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, vocab_size=97, n_layer=2, n_head=2, n_embd=64, mlp_hidden=128)).eval()
    steps = []

    def capture_decode(cache):
        def step(next_id, position):
            steps.append(next_id.size(0))
            return model.decode(next_id, cache, torch.tensor(position))

        return step

    monkeypatch.setattr(model, "capture_decode", capture_decode)
    for p in model.parameters():  # sharper logits than at init (as tests/test_eval.py's tiny_model)
        p.data.mul_(3)
    prompts = [torch.randint(6, 97, (n,)).tolist() for n in (9, 4, 17, 6, 3)]
    alone = [generation.generate(model, [p], 20, stop_ids=[])[0][0] for p in prompts]
    slots, got, rows = generation.Slots(model, rows=2, graph=graph), {}, {}
    slots.restart(max(len(p) for p in prompts[:2]))
    for step in range(200):  # prompt i asks to join at step 3 * i; there are 2 rows, so some wait for one
        for i, p in enumerate(prompts):
            if i not in got and step >= 3 * i and slots.fits(len(p), 20):
                [(row, token)] = slots.join([(p, (0.0, 0, 1.0, None))])
                rows[row], got[i] = i, [token]
        if len(got) == len(prompts) and not rows:
            break
        for row, token in slots.advance().items():
            got[rows[row]].append(token)
        for row in [r for r, i in rows.items() if len(got[i]) == 20]:
            slots.leave(row)
            del rows[row]
    assert [got.get(i) for i in range(len(prompts))] == alone
    assert len({len(p) for p in prompts}) == len(prompts)  # different lengths: joins at different offsets
    assert set(steps) == ({2} if graph else set())  # the graph's step ran, over both rows


def test_generate_stream_answers_as_generate_in_fewer_steps_and_keeps_the_rng(monkeypatch):
    """generate_stream (continuous batching, prepare.py --sample_n's answers): 9 prompts in 3 rows, a stop token
    that ends answers at different lengths, a context (48) that fits only part of a batch's answers, so the batch
    drains and restarts: every greedy answer is what generate gives it alone, in fewer decoding steps than
    generate's batches of 3 take, and so in 32 rows joined two or more at a time (45 prompts); sampled answers
    repeat with the seed, change with another, and leave the caller's RNG as it was."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=48, vocab_size=97, n_layer=2, n_head=2, n_embd=64, mlp_hidden=128)).eval()
    for p in model.parameters():  # sharper logits than at init (as tests/test_eval.py's tiny_model)
        p.data.mul_(3)
    prompts = [torch.randint(6, 97, (n,)).tolist() for n in (9, 4, 17, 6, 3, 12, 20, 8, 5)]
    free = [generation.generate(model, [p], 24, stop_ids=[])[0][0] for p in prompts]
    counts = torch.bincount(torch.tensor([t for a in free for t in set(a)]), minlength=97)
    stop = int(counts.argmax())  # the token in most answers: they end where it first comes, some not at all
    alone = [generation.generate(model, [p], 24, stop_ids=[stop])[0] for p in prompts]
    assert len({len(ids) for ids, _ in alone}) >= 4 and any(ended for _, ended in alone)
    steps, restarts, decode, restart = [], [], model.decode, generation.Slots.restart
    monkeypatch.setattr(model, "decode", lambda *a, **k: steps.append(1) or decode(*a, **k))
    monkeypatch.setattr(generation.Slots, "restart", lambda self, pos: restarts.append(pos) or restart(self, pos))
    done = {}
    got = generation.generate_stream(model, prompts, 24, [stop], rows=3, on_done=lambda i, r: done.setdefault(i, r))
    assert got == alone and done == dict(enumerate(alone))
    stream_steps, steps[:] = len(steps), []
    generation.generate(model, prompts, 24, stop_ids=[stop], batch_size=3)
    assert len(restarts) >= 2 and stream_steps < len(steps), (restarts, stream_steps, len(steps))
    assert generation.generate_stream(model, prompts * 5, 24, [stop], rows=32) == alone * 5  # joins 2+ rows at a time

    state = torch.get_rng_state()
    a, b = (generation.generate_stream(model, prompts, 24, [], 1.0, seed=s, rows=3) for s in (5, 5))
    assert a == b != generation.generate_stream(model, prompts, 24, [], 1.0, seed=6, rows=3)
    assert torch.equal(torch.get_rng_state(), state)


def test_slots_prefill_requests_that_join_together_in_one_forward_and_answer_as_alone(monkeypatch):
    """Requests that join at once (serve.py takes all that fit between two steps) are prefilled as one left-padded
    batch per run of adjacent free rows, and each gets the greedy tokens it gets alone: three prompts of different
    lengths into an idle batch (one forward), then two into rows 1 and 3 around a busy row 2 (two forwards); with
    generation.PREFILL lowered, a run is cut where its padded prompts would pass it; a model that fails mid-join
    leaves no row taken."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, vocab_size=97, n_layer=2, n_head=2, n_embd=64, mlp_hidden=128)).eval()
    for p in model.parameters():  # sharper logits than at init (as tests/test_eval.py's tiny_model)
        p.data.mul_(3)
    prompts = [torch.randint(6, 97, (n,)).tolist() for n in (9, 4, 17, 6, 3)]
    alone = [generation.generate(model, [p], 12, stop_ids=[])[0][0] for p in prompts]
    prefills, forward = [], model.forward

    def counted(idx, *args, **kwargs):
        if kwargs.get("cache") is not None:
            prefills.append(idx.size(0))
        return forward(idx, *args, **kwargs)

    monkeypatch.setattr(model, "forward", counted)
    slots, got, rows = generation.Slots(model, rows=4), {}, {}
    slots.restart(17)

    def join(which):
        assert all(slots.fits(len(prompts[i]), 12, taken=k) for k, i in enumerate(which))
        prefills.clear()
        for (row, token), i in zip(slots.join([(prompts[i], (0.0, 0, 1.0, None)) for i in which]), which, strict=True):
            rows[row], got[i] = i, [token]

    def step():
        for row, token in slots.advance().items():
            got[rows[row]].append(token)
        for row in [r for r, i in rows.items() if len(got[i]) == 12]:
            slots.leave(row)
            del rows[row]

    join([0, 1, 2])
    assert prefills == [3] and slots.fits(3, 12) and not slots.fits(3, 12, taken=1)  # one row left
    step(), step()
    slots.leave(1)  # prompt 1 leaves after 3 tokens, row 2 runs on: rows 1 and 3 are free, apart
    del rows[1], got[1]
    join([3, 4])
    assert prefills == [1, 1] and sorted(rows) == [0, 1, 2, 3]
    while rows:
        step()
    first = dict(got)
    join([1, 3])  # an idle batch at a later position: rows 0 and 1, one forward
    assert prefills == [2]
    while rows:
        step()
    assert [first.get(i, got[i]) for i in range(len(prompts))] == alone and got[3] == alone[3]
    monkeypatch.setattr(generation, "PREFILL", 20)  # at most 20 prompt tokens a forward: 9 and 4 padded to 18, then 17
    slots = generation.Slots(model, rows=4)
    slots.restart(17)
    join([0, 1, 2])
    assert prefills == [2, 1] and [got[i] for i in range(3)] == [a[:1] for a in alone[:3]]
    for row in range(3):
        slots.leave(row)

    def broken(idx, *args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(model, "forward", broken)
    with pytest.raises(RuntimeError):
        slots.join([(prompts[0], (0.0, 0, 1.0, None)), (prompts[1], (0.0, 0, 1.0, None))])
    assert slots.busy() == []


def test_slots_draw_a_seeded_request_as_alone_and_the_others_apart():
    """Slots.sample draws rows of the same settings in one call and a seeded row from its own generator: a seeded
    request samples the tokens it samples alone while unseeded rows of the same settings share the step, and two
    unseeded rows with the same prompt draw their own tokens; a seeded greedy one beside them gets generate()'s
    answer (each step fed the token drawn before it)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=97, n_layer=2, n_head=2, n_embd=64, mlp_hidden=128)).eval()
    prompt = torch.randint(6, 97, (7,)).tolist()

    def run(company, temperature=1.0):
        slots = generation.Slots(model, rows=3)
        slots.restart(len(prompt))
        for _ in range(company):
            slots.join([(prompt, (1.0, 0, 1.0, None))])
        [(row, token)] = slots.join([(prompt, (temperature, 0, 1.0, torch.Generator().manual_seed(5)))])
        got = {r: [] for r in slots.busy()}
        got[row].append(token)
        for _ in range(15):
            for r, token in slots.advance().items():
                got[r].append(token)
        return got[row], [got[r] for r in got if r != row]

    alone, _ = run(0)
    seeded, others = run(2)
    assert seeded == alone and len(alone) == 16
    assert others[0] != others[1] and all(len(o) == 15 for o in others)
    for p in model.parameters():  # sharper: greedy answers that do not repeat one token
        p.data.mul_(3)
    seeded_greedy, _ = run(2, temperature=0.0)  # each step fed the token drawn before it
    assert seeded_greedy == generation.generate(model, [prompt], 16, stop_ids=[])[0][0]
    assert len(set(seeded_greedy)) > 8


# ----------------------------------------------------------------------------- real clients
def test_openai_client_gets_a_completion_and_a_stream(chat_server, sft_run):
    """The openai package: /v1/models names the run; a greedy completion is what generation.generate gives in this
    process; streamed, the same text arrives in pieces, with its usage; a seed repeats a sampled answer."""
    openai = pytest.importorskip("openai", reason="the openai package is in the test extra")
    client = openai.OpenAI(base_url=chat_server.url + "/v1", api_key="none", max_retries=0)
    [card] = client.models.list().data
    assert card.id == Path(sft_run[0]).name
    question = [{"role": "user", "content": "What does os.getcwd do?"}]
    done = client.chat.completions.create(model=card.id, messages=question, temperature=0, max_tokens=40, seed=3)
    answer = done.choices[0].message.content
    model, tok, _, _ = generation.load_run(sft_run[0], "best", {"device": "cpu", "ptdtype": torch.float32})
    prompt = render_prompt(tok, question)
    [(ids, ended)] = generation.generate(model, [prompt], 40, [tok.special[END], tok.bos_id])
    assert answer == tok.decode(ids) and answer.strip()
    assert done.choices[0].finish_reason == ("stop" if ended else "length")
    assert done.usage.prompt_tokens == len(prompt) and done.usage.completion_tokens == len(ids) + ended
    chunks = list(
        client.chat.completions.create(
            model=card.id,
            messages=question,
            temperature=0,
            max_tokens=40,
            seed=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == answer and len(pieces) > 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == done.choices[0].finish_reason
    assert chunks[-1].usage.total_tokens == done.usage.total_tokens
    sampled = [
        client.chat.completions.create(model=card.id, messages=question, temperature=1.0, max_tokens=30, seed=s)
        .choices[0]
        .message.content
        for s in (11, 11)
    ]
    streamed = stream(chat_server.url, {"messages": question, "temperature": 1.0, "max_tokens": 30, "seed": 11})
    assert sampled[0] == sampled[1] == streamed["text"]


BAD = [  # (what, body, status, param or code the error names)
    ("malformed JSON", b'{"messages": [', 400, "invalid_json"),
    ("not an object", b"[1, 2]", 400, "invalid_json"),
    ("messages a string", {"messages": "hello"}, 400, "messages"),
    ("empty messages", {"messages": []}, 400, "empty_array"),
    ("unknown role", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("content a number", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("max_tokens a string", {"max_tokens": "5"}, 400, "max_tokens"),
    ("max_tokens 10^9", {"max_tokens": 10**9}, 400, "max_tokens"),
    ("max_tokens 0", {"max_tokens": 0}, 400, "max_tokens"),
    ("temperature too high", {"temperature": 3}, 400, "temperature"),
    ("temperature a bool", {"temperature": True}, 400, "temperature"),
    ("stream a string", {"stream": "yes"}, 400, "stream"),
    ("five stop texts", {"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("n=2", {"n": 2}, 400, "n"),
    ("prompt over the context", {"messages": [{"role": "user", "content": "def f(x): return x\n" * 40}]}, 400, None),
    ("prompt + max_tokens over", {"max_tokens": 60}, 400, "context_length_exceeded"),
    ("10 MB body", {"messages": [{"role": "user", "content": "x" * 10_000_000}]}, 413, "request_too_large"),
]


@pytest.mark.parametrize("what, body, status, names", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_errors(chat_server, what, body, status, names):
    """Each bad request: its 4xx with OpenAI's error object, naming the parameter or the code; the server serves on."""
    if isinstance(body, dict):
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}], **body}).encode()
    got, raw = request(chat_server.url, "POST", "/v1/chat/completions", body)
    error = json.loads(raw)["error"]
    assert got == status, error
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["message"] and (names is None or names in (error["param"], error["code"])), error
    if what == "prompt over the context":
        assert error["code"] == "context_length_exceeded" and "maximum context length is 64" in error["message"]
    ok, raw = request(
        chat_server.url,
        "POST",
        "/v1/chat/completions",
        json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}),
    )
    assert ok == 200 and json.loads(raw)["usage"]["completion_tokens"] >= 1


def test_unknown_paths_and_methods_get_openai_errors(chat_server):
    for method, path, status in [("GET", "/v1/nope", 404), ("POST", "/v1/models", 405)]:
        got, raw = request(chat_server.url, method, path)
        assert got == status and set(json.loads(raw)["error"]) == {"message", "type", "param", "code"}


def test_a_run_without_chat_tokens_is_refused_at_start(sft_run, tmp_path):
    """A run whose tokenizer is tiktoken's (no chat tokens): one error line, exit 2, before any model is loaded."""
    from conftest import run

    shutil.copyfile(sft_run[0] / checkpoints.BEST, tmp_path / checkpoints.BEST)
    (tmp_path / "tokenizer.tiktoken").write_text("gpt2\n")
    proc = run("serve.py", f"--out_dir={tmp_path}", "--port=0", "--device=cpu", check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: ") and "chat tokens" in proc.stderr


def test_a_client_that_leaves_frees_its_row_at_once(talk_server):
    """All 8 rows busy with answers of 2,000 tokens and one request waiting: when one client leaves, the waiting
    request gets its whole answer while the 7 others are still streaming."""
    long = {"messages": [{"role": "user", "content": "talk"}], "max_tokens": 2000}
    leave = [threading.Event() for _ in range(8)]
    holders = [None] * 8

    def hold(i):
        holders[i] = stream(talk_server.url, long, leave=leave[i])

    threads = [threading.Thread(target=hold, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    while talk_server.get("/health")["busy"] < 8:
        assert time.perf_counter() - t0 < 20
        time.sleep(0.01)
    waiting = {}
    waiter = threading.Thread(target=lambda: waiting.update(stream(talk_server.url, {**long, "max_tokens": 3})))
    waiter.start()
    while talk_server.get("/health")["waiting"] < 1:
        assert time.perf_counter() - t0 < 20
        time.sleep(0.01)
    leave[0].set()
    waiter.join(timeout=20)
    still = talk_server.get("/health")
    for e in leave:
        e.set()
    for t in threads:
        t.join(timeout=20)
    assert waiting["done"] and waiting["finish"] == "length", waiting
    assert holders[1:] and all(h["dropped"] and not h["done"] and h["pieces"] < 2000 for h in holders)
    assert still["busy"] == 7 and still["waiting"] == 0, still  # the others were streaming all the while
    talk_server.wait_idle()


def test_load_32_streaming_clients_10_leaving(talk_server):
    """32 streaming clients at once on 8 rows, 10 leaving after two pieces: the 22 others get their whole answers,
    every row is free after, the server's memory is back within 16 MiB of where it was, no error is logged."""
    body = {
        "messages": [{"role": "user", "content": "talk to me"}],
        "max_tokens": 48,
        "stream_options": {"include_usage": True},
    }
    load(talk_server.url, 32, body, drop=10)  # the same load once, so what stays allocated is allocated
    talk_server.wait_idle()
    before = talk_server.rss_mib()
    results, seconds = load(talk_server.url, 32, body, drop=10)
    assert all(r is not None for r in results) and seconds < 60
    assert all(r["dropped"] and not r["done"] for r in results[:10])
    complete = results[10:]
    assert all(r["done"] and r["finish"] == "length" and r["usage"]["completion_tokens"] == 48 for r in complete)
    assert len({r["text"] for r in complete}) == 1  # greedy, the same question: the same answer in every row
    talk_server.wait_idle()
    after = talk_server.rss_mib()
    print(f"server RSS {before:.1f} MiB before the load, {after:.1f} MiB after; {seconds:.2f} s")
    assert after < before + 16, (before, after)
    assert_clean_log(talk_server.log)


# ----------------------------------------------------------------------------- the page in a browser
def test_the_page_in_chromium_streams_and_stops(talk_server, talker):
    """Headless chromium: the page shows the run's name and step, sends a message on Enter, shows the answer
    growing as pieces arrive, and the stop button ends it: the text stops growing and the server's row is free
    while the answer had ~2,000 tokens to go. New chat empties the conversation."""
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no chromium at {CHROMIUM} (Debian: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(talk_server.url + "/")
            assert page.inner_text("#run") == f"{talker.name} step 7"
            page.fill("#input", "Tell me everything.")
            page.press("#input", "Enter")
            answer = page.locator(".message.assistant").first
            lengths = []
            t0 = time.perf_counter()
            while len(set(lengths)) < 3 and time.perf_counter() - t0 < 20:  # three different lengths: it streams
                lengths.append(len(answer.inner_text()))
                time.sleep(0.02)
            assert len(set(lengths)) >= 3 and 0 < max(lengths), lengths
            page.click("#stop")
            page.wait_for_selector(".message.assistant[data-finish='stopped']", timeout=5000)
            assert talk_server.wait_idle(timeout=2.0) < 2.0
            stopped = answer.inner_text()
            time.sleep(0.3)
            assert answer.inner_text() == stopped and "(stopped)" in stopped
            assert page.is_enabled("#send") and not page.is_enabled("#stop")
            page.click("#new")
            assert page.locator(".message").count() == 0
        finally:
            browser.close()


def test_the_load_client_reports_rates_and_says_when_no_answer_streamed_text(talk_server):
    """`python tests/test_serve.py URL` (docs/serving.md's figures): a line of requests/s, tokens/s and time to first
    token for each client count; answers of one token (a model that ends at once) get a line that says so, not a
    crash (an H200 run of 2026-12-03 crashed on a model one step old)."""
    run = [sys.executable, str(Path(__file__).resolve()), talk_server.url, "--clients=1,3", "--requests=3"]
    out = subprocess.run([*run, "--max_tokens=6"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split(" requests:")[0] for line in lines] == ["1 clients, 3", "3 clients, 3"], out.stdout
    for line in lines:  # the talker never ends its answers: 6 tokens each
        assert "(6.0 a request;" in line and float(re.search(r"([\d.]+) requests/s", line).group(1)) > 0, line
    out = subprocess.run([*run, "--max_tokens=1"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("no answer streamed text") == 2, out.stdout
    talk_server.wait_idle()


# ----------------------------------------------------------------------------- docs/serving.md's figures
def closed_loop(url, body, clients, requests):
    """`requests` streaming requests from `clients` clients, each sending its next one when the last has ended:
    (results, wall seconds)."""
    results, left = [], list(range(requests))

    def client():
        while True:
            try:
                left.pop()
            except IndexError:
                return
            results.append(stream(url, body))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description="requests/s and time to first token of a running serve.py")
    parser.add_argument("url")
    parser.add_argument("--clients", default="1,32", help="comma-separated: clients at once, one measurement each")
    parser.add_argument("--requests", type=int, default=64, help="requests per measurement")
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--question", default="What does os.getcwd do?")
    a = parser.parse_args()
    body = {"messages": [{"role": "user", "content": a.question}], "max_tokens": a.max_tokens}
    body["stream_options"] = {"include_usage": True}
    stream(a.url, body)  # warm-up
    for clients in map(int, a.clients.split(",")):
        results, seconds = closed_loop(a.url, body, clients, a.requests)
        tokens = sum(r["usage"]["completion_tokens"] for r in results)
        texts = [r for r in results if r["ttft"] and r["usage"]["completion_tokens"] > 1]  # not an answer ended at once
        if not texts:
            print(f"{clients} clients, {len(results)} requests: no answer streamed text (a model that stops at once?)")
            continue
        ttft = sorted(r["ttft"] for r in texts)
        rate = statistics.median((r["usage"]["completion_tokens"] - 1) / (r["seconds"] - r["ttft"]) for r in texts)
        print(
            f"{clients} clients, {len(results)} requests: {len(results) / seconds:.1f} requests/s, "
            f"{tokens / seconds:.0f} tokens/s ({tokens / len(results):.1f} a request; {rate:.0f} tokens/s a stream), "
            f"time to first token median {statistics.median(ttft) * 1000:.0f} ms, "
            f"90th percentile {ttft[int(0.9 * (len(ttft) - 1))] * 1000:.0f} ms"
        )


if __name__ == "__main__":
    main()
