"""Conversations: the chat template, its loss mask, and the conversation sources that prepare.py --mode=sft reads.

A conversation renders as

    <|endoftext|> [<|system|> text <|end|>] <|user|> text <|end|> <|assistant|> text <|end|> <|user|> ...

with the special tokens reserved by the tokenizer (ids 1-5). The loss mask is 1 exactly on the tokens of
assistant texts and the <|end|> that closes each of them: the model learns to answer and to stop, never to
write the user's part.
"""

import importlib
import inspect
import re
import zlib

from tokenizer import BOS

ROLES = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
ROLE_ALIASES = {"prompter": "user", "human": "user", "gpt": "assistant", "bot": "assistant"}  # oasst1, ShareGPT
END = "<|end|>"


class ConversationError(ValueError):
    """A conversation that cannot be rendered; the message says why."""


def normalize(messages):
    """[{role, content}] with roles mapped to system/user/assistant; raise on a role we do not know."""
    out = []
    for m in messages:
        role = ROLE_ALIASES.get(m["role"], m["role"])
        if role not in ROLES:
            known = sorted([*ROLES, *ROLE_ALIASES])
            raise ConversationError(f"unknown role {m['role']!r} (known: {', '.join(known)})")
        out.append({"role": role, "content": m["content"]})
    return out


def render(tok, messages):
    """(ids, mask) of a whole conversation; mask[i] = 1 where ids[i] is assistant text or its closing <|end|>."""
    ids, mask = [tok.special[BOS]], [0]
    for m in normalize(messages):
        body = tok.encode(m["content"]) + [tok.special[END]]
        learn = int(m["role"] == "assistant")
        ids += [tok.special[ROLES[m["role"]]]] + body
        mask += [0] + [learn] * len(body)
    return ids, mask


def render_prompt(tok, messages):
    """Token ids of a conversation so far, followed by <|assistant|>: what the model continues to answer."""
    ids, _ = render(tok, messages)
    return ids + [tok.special["<|assistant|>"]]


def oasst_conversations(rows, lang=""):
    """Flatten OpenAssistant message trees (message_id, parent_id, role, text, lang) into one conversation per
    path from a root to a leaf; a path that ends on a prompter message drops that last, unanswered turn."""
    rows = [r for r in rows if not lang or r.get("lang") == lang]
    children = {}
    for r in rows:
        children.setdefault(r["parent_id"], []).append(r)
    ids = {r["message_id"] for r in rows}
    roots = [r for r in rows if r["parent_id"] is None or r["parent_id"] not in ids]
    conversations = []
    stack = [(root, []) for root in reversed(roots)]
    while stack:
        node, path = stack.pop()
        path = path + [{"role": node["role"], "content": node["text"]}]
        kids = children.get(node["message_id"], [])
        if not kids:
            while path and ROLE_ALIASES.get(path[-1]["role"], path[-1]["role"]) != "assistant":
                path = path[:-1]
            if path:
                conversations.append(path)
        stack.extend((kid, path) for kid in reversed(kids))
    return conversations


DEMO_MODULES = [
    "json",
    "os",
    "os.path",
    "re",
    "math",
    "string",
    "textwrap",
    "itertools",
    "functools",
    "random",
    "statistics",
    "shutil",
    "pathlib",
    "collections",
    "datetime",
    "time",
    "copy",
    "heapq",
    "bisect",
    "base64",
    "hashlib",
    "zlib",
    "csv",
    "difflib",
    "fnmatch",
    "glob",
    "operator",
    "pprint",
    "calendar",
]
QUESTIONS = ["What does `{name}` do?", "Explain `{name}`.", "What is `{name}` for?", "How do I use `{name}`?"]


def stdlib_conversations():
    """The offline SFT demo set: for each documented public function of some standard-library modules, a user
    question about it and, as the answer, the first paragraph of its docstring. Stable order, no download."""
    conversations, seen = [], set()
    for module_name in DEMO_MODULES:
        module = importlib.import_module(module_name)
        for attr in sorted(dir(module)):
            obj = getattr(module, attr)
            if attr.startswith("_") or not callable(obj) or id(obj) in seen:
                continue
            seen.add(id(obj))
            # C functions open with a signature line ("dumps(obj) -> str"); the answer is the first prose paragraph
            paragraphs = [p.strip() for p in (inspect.getdoc(obj) or "").split("\n\n")]
            prose = [p for p in paragraphs if len(p) >= 20 and not re.match(r"^[\w.]+\(.*\)( ->.*)?$", p)]
            if not prose:
                continue
            name = f"{module_name}.{attr}"
            question = QUESTIONS[zlib.crc32(name.encode()) % len(QUESTIONS)].format(name=name)
            conversations.append([{"role": "user", "content": question}, {"role": "assistant", "content": prose[0]}])
    return conversations
