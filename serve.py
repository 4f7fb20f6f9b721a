"""Serve a chat run: an OpenAI-compatible chat-completions API, and a page to chat in the browser.

    python serve.py --out_dir=out/tiny_sft                          # http://127.0.0.1:8000/ (the page)
    python serve.py --out_dir=out/ref_dpo --rows=32                 # a GPU: 32 answers decoded at once
    python serve.py --out_dir=out/ref_dpo --host=0.0.0.0 --port=8080  # other machines too (no authentication!)

    curl http://127.0.0.1:8000/v1/chat/completions -H "Content-Type: application/json" \\
        -d '{"messages": [{"role": "user", "content": "What does os.getcwd do?"}], "stream": true}'

Any OpenAI client talks to it: base_url http://127.0.0.1:8000/v1, any api_key. POST /v1/chat/completions takes
messages, max_tokens (or max_completion_tokens), temperature, top_p, top_k, stop, seed and stream (server-sent
events, ending with `data: [DONE]`; stream_options.include_usage adds the usage chunk); GET /v1/models names the
run; GET /health says how many rows are busy and how many requests wait. One model in memory: every request is a
row of one batch (generation.Slots), joining it between two decoding steps; a client that disconnects gives its row
back at the next step. Bad requests get a 4xx in OpenAI's error shape. docs/serving.md: the design and its numbers.
"""

import asyncio
import collections
import html
import json
import logging
import secrets
import socket
import sys
import threading
import time
from pathlib import Path

import torch
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import runtime
from accepts import above, at_least, between, folder, nonempty, precision, torch_device
from chat import END, ROLES, ConversationError, render_prompt
from generation import Slots, load_run
from runtime import UserError
from tokenizer import find_tokenizer

# -----------------------------------------------------------------------------
out_dir: folder = "out/run"  # run folder of sft.py or dpo.py (a pretraining run answers, but not as a chat model)
ckpt: nonempty = "best"  # best (falls back to latest), latest, or a checkpoint file name in out_dir
host: nonempty = "127.0.0.1"  # this machine only; 0.0.0.0 lets every machine that reaches this one in, unchecked
port: between(0, 65535) = 8000  # 0: a free port, printed at start
rows: between(1, 2**16) = 8  # answers decoded at once, rows of one KV cache (rows x block_size); more requests wait
max_waiting: at_least(0) = 64  # requests waiting for a busy row; one more is refused (429), not queued
max_tokens: at_least(1) = 1024  # most new tokens a request may ask for; also its default, within the context
max_messages: at_least(1) = 256  # messages in one request
max_body_kb: at_least(1) = 1024  # size of a request body in KiB (the context is a few KiB of text): 413 above
temperature: between(0, 2) = 0.8  # a request's default (OpenAI's range); 0 = greedy; sample.py's default
top_k: at_least(0) = 200  # a request's default: keep only the k most likely tokens (0 = off); sample.py's
top_p: above(0, most=1) = 0.95  # a request's default nucleus (1.0 = off); sample.py's
compile = True  # CUDA: the step replayed as a CUDA graph: 2.7x tokens/s at batch 1 (H200), ~1 min to start
device: torch_device = "auto"  # auto (cuda > mps > cpu), cuda, mps, cpu
dtype: precision = "auto"  # auto (bfloat16 on CUDA, float32 on MPS and CPU: backends.py), float32, bfloat16, float16
# -----------------------------------------------------------------------------
runtime.install_error_handler()
config = runtime.configure(globals(), sys.argv[1:])
log = logging.getLogger("uvicorn.error")  # uvicorn's own log: one stream, one format

# ----------------------------------------------------------------------------- the run
tokenizer_path = find_tokenizer(out_dir)
if tokenizer_path is not None and tokenizer_path.suffix == ".tiktoken":
    raise UserError(f"{out_dir} has no chat tokens (its tokenizer is tiktoken's); serve a run made by sft.py or dpo.py")
try:  # bind first: a port in use is said before the model loads
    listener = socket.create_server((host, port))
except OSError as e:
    raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or --host") from None
env = runtime.setup_device(device, dtype)
model, tok, checkpoint, path = load_run(out_dir, ckpt, env)
if not {END, *ROLES.values()} <= set(tok.special):
    raise UserError(f"{out_dir} has no chat tokens in its tokenizer; serve a run made by sft.py or dpo.py")
run_name, step, block_size = Path(out_dir).resolve().name, checkpoint["iter_num"], model.config.block_size
STOP_IDS = {tok.special[END], tok.bos_id}  # the end of the turn, or the start of another document
ROLE_NAMES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}  # OpenAI's roles


# ----------------------------------------------------------------------------- requests and the engine
class ApiError(Exception):
    """A request refused: the status and OpenAI's error object ({message, type, param, code})."""

    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": kind, "param": param, "code": code}}

    def response(self):
        return JSONResponse(self.body, status_code=self.status)


class Request:
    """One chat completion: its prompt ids and settings, what was generated, and a queue of events for its client:
    ("text", delta), ("done", finish_reason, completion_tokens), ("error", message)."""

    def __init__(self, ids, max_new, stop, sampling, loop):
        self.ids, self.max_new, self.stop, self.sampling, self.loop = ids, max_new, stop, sampling, loop
        self.id, self.created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        self.events, self.cancelled, self.reason = asyncio.Queue(), False, None
        self.new, self.pending, self.text, self.sent = 0, [], "", 0  # tokens, undecoded tokens, text, chars sent

    def put(self, *event):
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def add(self, token):
        """Take a generated token; True when the answer has ended (a stop token, a stop text or max_new)."""
        self.new += 1
        if token in STOP_IDS:
            return self.finish("stop")
        self.pending.append(token)
        piece = tok.decode(self.pending)
        if piece.endswith("\ufffd") and len(self.pending) < 4:  # a character's first bytes: wait for the rest
            return self.new == self.max_new and self.finish("length")
        self.text, self.pending = self.text + piece, []
        cut = min((i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            return self.finish("stop")
        if self.new == self.max_new:
            return self.finish("length")
        held = max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        self.flush(len(self.text) - held)  # a stop text's first characters wait until it is clear they are not one
        return False

    def flush(self, end):
        if end > self.sent:
            self.put("text", self.text[self.sent : end])
            self.sent = end

    def finish(self, reason):
        self.text, self.pending = self.text + tok.decode(self.pending), []  # cut mid-character: what there is
        self.flush(len(self.text))
        self.reason = reason  # the engine sends ("done", ...) once the row is free, so /health never counts it busy
        return True


class Engine:
    """The one thread that runs the model: it admits waiting requests into free rows of the batch (first come, first
    served), takes one decoding step for all rows and hands each request its token, until no row is busy."""

    def __init__(self, slots):
        self.slots, self.waiting, self.running = slots, collections.deque(), {}  # running: row -> Request
        self.wake = threading.Condition()
        threading.Thread(target=self.loop, name="engine", daemon=True).start()

    def submit(self, req):
        """Put a request in line; False when max_waiting requests wait already beyond the free rows."""
        with self.wake:
            if len(self.waiting) >= max_waiting + self.slots.rows - len(self.running):
                return False
            self.waiting.append(req)
            self.wake.notify()
        return True

    def status(self):
        return {"rows": self.slots.rows, "busy": len(self.running), "waiting": len(self.waiting)}

    def next_request(self, taken):
        """The waiting request that joins now beside `taken` others, or None. An idle batch restarts at the longest
        prompt of the first requests that fit in the context together; then the first in line joins while it fits
        (the rest waits behind it: first come, first served)."""
        with self.wake:
            while self.waiting and self.waiting[0].cancelled:
                self.waiting.popleft()
            if not self.waiting:
                return None
            if not self.running and not taken:
                pos, longest = 0, 0
                for req in [r for r in self.waiting if not r.cancelled][: self.slots.rows]:
                    if max(pos, len(req.ids)) + max(longest, req.max_new) > self.slots.max_len:
                        break
                    pos, longest = max(pos, len(req.ids)), max(longest, req.max_new)
                self.slots.restart(pos)
            head = self.waiting[0]
            return self.waiting.popleft() if self.slots.fits(len(head.ids), head.max_new, taken) else None

    def loop(self):
        while True:
            with self.wake:
                self.wake.wait_for(lambda: self.running or self.waiting, timeout=1.0)
            joining = []  # all that can join now, prefilled together (Slots.join)
            try:
                while (req := self.next_request(len(joining))) is not None:
                    joining.append(req)
                if joining:
                    rows = self.slots.join([(req.ids, req.sampling) for req in joining])
                    for (row, _), req in zip(rows, joining, strict=True):
                        self.running[row] = req
                    joining = []
                    for row, token in rows:
                        self.hand(row, token)
                for row in [r for r, req in self.running.items() if req.cancelled]:
                    self.release(row)  # a client that left: its row is free before the next step
                if self.running:
                    for row, token in self.slots.advance().items():
                        self.hand(row, token)
            except Exception as e:  # the model failed (out of memory, say): these answers end, the server goes on
                log.exception("generation failed; %d answers in progress end with an error", len(self.running))
                for req in [*joining, *self.running.values()]:
                    req.put("error", f"generation failed: {type(e).__name__}")
                for row in list(self.running):
                    self.release(row)

    def hand(self, row, token):
        req = self.running[row]
        if req.cancelled or req.add(token):
            self.release(row)
            if req.reason:
                req.put("done", req.reason, req.new)

    def release(self, row):
        self.slots.leave(row)
        del self.running[row]


# ----------------------------------------------------------------------------- reading a request
def expect(data, key, ok, what, default=None):
    """data[key] if it passes ok (a bool is never a number here), default if it is absent or null."""
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) != (what == "a boolean") or not ok(value):
        raise ApiError(400, f"Invalid value for '{key}': expected {what}, got {json.dumps(value)[:40]}.", key)
    return value


def read_messages(messages):
    """OpenAI's messages as [{role, content}] of our roles; content parts of type text are joined."""
    if not isinstance(messages, list):
        raise ApiError(400, "Missing or invalid 'messages': expected an array of messages.", "messages")
    if not messages:
        raise ApiError(
            400, "Invalid 'messages': empty array. Expected at least one message.", "messages", "empty_array"
        )
    if len(messages) > max_messages:
        raise ApiError(400, f"Too many messages: {len(messages)}; at most {max_messages}.", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"Invalid type for '{where}': expected an object.", where)
        if m.get("role") not in ROLE_NAMES:
            known = ", ".join(f"'{r}'" for r in ROLE_NAMES)
            raise ApiError(
                400,
                f"Invalid value for '{where}.role': {json.dumps(m.get('role'))[:40]}. Supported: {known}.",
                f"{where}.role",
            )
        content = m.get("content")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            texts = [p.get("text") for p in content]  # content parts: text is all a language model reads
            content = "".join(texts) if all(isinstance(t, str) for t in texts) else None
        if not isinstance(content, str):
            raise ApiError(
                400, f"Invalid type for '{where}.content': expected a string or text parts.", f"{where}.content"
            )
        out.append({"role": ROLE_NAMES[m["role"]], "content": content})
    return out


def read_request(body, loop):
    """(Request, stream, include_usage) from a request body, or an ApiError that says what is wrong."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "We could not parse the JSON body of your request.", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.", None, "invalid_json")
    messages = read_messages(data.get("messages"))
    expect(data, "model", lambda v: isinstance(v, str), "a string")
    if expect(data, "n", lambda v: isinstance(v, int), "an integer", 1) != 1:
        raise ApiError(400, "Only n=1 is supported.", "n")
    stream = expect(data, "stream", lambda v: True, "a boolean", False)
    options = expect(data, "stream_options", lambda v: isinstance(v, dict), "an object", {})
    include_usage = expect(options, "include_usage", lambda v: True, "a boolean", False)
    number = lambda lo, hi: lambda v: isinstance(v, (int, float)) and lo <= v <= hi  # noqa: E731
    sampling = (
        float(expect(data, "temperature", number(0, 2), "a number from 0 to 2", temperature)),
        expect(data, "top_k", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0", top_k),
        float(expect(data, "top_p", number(0, 1), "a number from 0 to 1", top_p)),
    )
    seed = expect(data, "seed", lambda v: isinstance(v, int) and -(2**63) <= v < 2**64, "a 64-bit integer")
    stop = expect(data, "stop", lambda v: isinstance(v, (str, list)), "a string or an array of strings", [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "Invalid 'stop': at most 4 non-empty strings.", "stop")
    key = "max_completion_tokens" if data.get("max_completion_tokens") is not None else "max_tokens"
    asked = expect(data, key, lambda v: isinstance(v, int) and v >= 1, "an integer >= 1")
    if asked is not None and asked > max_tokens:
        raise ApiError(400, f"'{key}' is too large: {asked}. This server gives at most {max_tokens}.", key)
    try:
        ids = render_prompt(tok, messages)
    except ConversationError as e:
        raise ApiError(400, str(e), "messages") from None
    if len(ids) + (asked or 1) > block_size:
        raise ApiError(
            400,
            f"This model's maximum context length is {block_size} tokens. However, you requested "
            f"{len(ids) + (asked or 1)} tokens ({len(ids)} in the messages, {asked or 1} in the completion). Please "
            f"reduce the length of the messages or completion.",
            "messages",
            "context_length_exceeded",
        )
    # a seeded request draws from a generator of its own (its answer repeats whatever else runs); the others share
    # torch's, so that one call draws for all of them (generation.Slots.sample)
    generator = None if seed is None else torch.Generator(env["device"]).manual_seed(seed)
    max_new = asked or min(max_tokens, block_size - len(ids))
    return Request(ids, max_new, stop, (*sampling, generator), loop), stream, include_usage


async def read_body(request):
    """The body, or a 413 ApiError past max_body_kb. A longer body is read to its end (not kept): a client still
    sending it would see the connection reset instead of the answer."""
    limit, body, size = max_body_kb * 1024, bytearray(), 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            body += chunk
        elif size > 64 * limit:  # not a client that stops on its own: close the connection
            break
    if size > limit:
        raise ApiError(
            413, f"The request body is over {limit:,} bytes, this server's limit.", None, "request_too_large"
        )
    return bytes(body)


# ----------------------------------------------------------------------------- answering
class ClientGone(Exception):
    """The client disconnected while its answer was waiting or being written."""


async def next_event(req, request):
    """The request's next event; checks twice a second whether its client is still there."""
    while True:
        try:
            return await asyncio.wait_for(req.events.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise ClientGone from None


def chunk(req, delta, finish_reason=None, usage=None):
    choices = [] if usage else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    body = {"id": req.id, "object": "chat.completion.chunk", "created": req.created, "model": run_name}
    return f"data: {json.dumps({**body, 'choices': choices, **({'usage': usage} if usage else {})})}\n\n"


def usage(req, completion_tokens):
    return {
        "prompt_tokens": len(req.ids),
        "completion_tokens": completion_tokens,
        "total_tokens": len(req.ids) + completion_tokens,
    }


async def events(req, request, include_usage):
    """The answer as server-sent events in OpenAI's chunk format, ending with data: [DONE]."""
    try:
        yield chunk(req, {"role": "assistant", "content": ""})
        while True:
            kind, *rest = await next_event(req, request)
            if kind == "text":
                yield chunk(req, {"content": rest[0]})
            elif kind == "done":
                yield chunk(req, {}, rest[0])
                if include_usage:
                    yield chunk(req, {}, usage=usage(req, rest[1]))
                break
            else:
                yield f"data: {json.dumps(ApiError(500, rest[0], kind='server_error').body)}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        req.cancelled = True  # ended, or the client left: either way its row is free at the next step


class EventStream(StreamingResponse):
    """A StreamingResponse that ends quietly when the client leaves (its row is given back by events' finally)."""

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        except (ClientDisconnect, ClientGone, OSError):
            pass
        finally:
            await self.body_iterator.aclose()


async def chat_completions(request):
    try:
        req, stream, include_usage = read_request(await read_body(request), asyncio.get_running_loop())
    except ApiError as e:
        return e.response()
    if not engine.submit(req):
        return ApiError(
            429,
            f"{max_waiting} requests are waiting already; try again shortly.",
            None,
            "server_busy",
            "rate_limit_error",
        ).response()
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy may hold the events back
    if stream:
        return EventStream(events(req, request, include_usage), media_type="text/event-stream", headers=headers)
    try:
        text = []
        while (event := await next_event(req, request))[0] == "text":
            text.append(event[1])
    except ClientGone:
        return Response(status_code=499)  # nobody reads it; nginx's code for a client that closed the request
    finally:
        req.cancelled = True
    if event[0] == "error":
        return ApiError(500, event[1], kind="server_error").response()
    message = {"role": "assistant", "content": "".join(text)}
    return JSONResponse(
        {
            "id": req.id,
            "object": "chat.completion",
            "created": req.created,
            "model": run_name,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": event[1]}],
            "usage": usage(req, event[2]),
        }
    )


async def models(request):
    card = {"id": run_name, "object": "model", "created": int(path.stat().st_mtime), "owned_by": "anarchobot"}
    return JSONResponse({"object": "list", "data": [{**card, "step": step, "context_length": block_size}]})


async def health(request):
    return JSONResponse({"status": "ok", **engine.status()})


async def page(request):
    return HTMLResponse(PAGE)


async def http_error(request, exc):
    """404, 405 and the like, in OpenAI's error shape too."""
    return ApiError(
        exc.status_code,
        f"{request.method} {request.url.path}: {exc.detail}",
        None,
        "not_found" if exc.status_code == 404 else None,
    ).response()


# ----------------------------------------------------------------------------- serve
graph = compile and env["defaults"]["cuda_graphs"]
if graph:
    print(f"capturing the decoding step of {rows} rows as a CUDA graph (about a minute; --compile=false skips it)")
slots = Slots(model, rows, graph=graph)
engine = Engine(slots)
PAGE = (
    Path(__file__)
    .with_name("serve.html")
    .read_text(encoding="utf-8")
    .replace("{{run}}", html.escape(run_name))
    .replace("{{step}}", str(step))
)
app = Starlette(
    routes=[
        Route("/", page),
        Route("/health", health),
        Route("/v1/models", models),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ],
    exception_handlers={HTTPException: http_error},
)
print(
    f"serving {run_name} (step {step}, {model.num_params() / 1e6:.1f}M parameters, {rows} rows, {env['device']}) "
    f"at http://{host}:{listener.getsockname()[1]}/ (the page) and http://{host}:{listener.getsockname()[1]}/v1",
    flush=True,
)
server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5))
server.run(sockets=[listener])
