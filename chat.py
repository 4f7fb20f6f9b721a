"""Conversations: the chat template, its loss mask, the conversations and preference pairs that prepare.py
--mode=sft and --mode=dpo render, and the offline demo sets for both.

A conversation renders as

    <|endoftext|> [<|system|> text <|end|>] <|user|> text <|end|> <|assistant|> text <|end|> <|user|> ...

with the special tokens reserved by the tokenizer (ids 1-5). The loss mask is 1 exactly on the tokens of
assistant texts and the <|end|> that closes each of them: the model learns to answer and to stop, never to
write the user's part. A preference pair renders as one prompt (the conversation so far, then <|assistant|>)
and two completions, each an answer followed by <|end|>.
"""

import ast
import builtins
import fcntl
import functools
import hashlib
import importlib
import inspect
import json
import multiprocessing
import os
import re
import signal
import sys
import textwrap
import time
import warnings
import zlib
from pathlib import Path, PurePosixPath

import disk
import runtime
from runtime import UserError
from tokenizer import BOS, find_tokenizer, load_tokenizer

ROLES = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
ROLE_ALIASES = {"prompter": "user", "human": "user", "gpt": "assistant", "bot": "assistant"}  # oasst1, ShareGPT
END = "<|end|>"


class ConversationError(ValueError):
    """A conversation that cannot be rendered; the message says why."""


def normalize(messages):
    """[{role, content}] with roles mapped to system/user/assistant; raise on a role we do not know."""
    out = []
    shape = isinstance(messages, list) and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages)
    if not shape:  # a record of the user's file: a string, or messages without a role or content
        raise ConversationError(f"expected a list of {{role, content}} messages, got {str(messages)[:60]!r}")
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


def load_run_tokenizer(run, data_dir, mode, flag="--init_from"):
    """(tokenizer, its file) of the run folder that SFT or DPO starts from, checked: it has the chat tokens, and
    data_dir, where it exists, was made with it (by prepare.py --mode=sft or dpo)."""
    path = find_tokenizer(run)
    if path is None:
        raise UserError(
            f"{run} has no tokenizer file, so it is not a run folder of train.py or sft.py; check --init_from"
        )
    try:
        tok = load_tokenizer(path)
    except (ValueError, UserError) as e:  # e.g. a SentencePiece model without our reserved special tokens
        raise UserError(f"{path}: {e}; {mode.upper()} needs the chat tokens that prepare.py reserves") from None
    missing = [t for t in [*ROLES.values(), END] if t not in tok.special]
    if missing:
        raise UserError(
            f"the tokenizer of {run} has no chat tokens ({missing[0]}); {mode.upper()} needs a SentencePiece "
            f"tokenizer made by prepare.py, so pretrain with one"
        )
    data_tokenizer = find_tokenizer(data_dir) if Path(data_dir).is_dir() else None
    if data_tokenizer is not None and data_tokenizer.read_bytes() != path.read_bytes():
        raise UserError(
            f"{data_dir} was made with another tokenizer ({data_tokenizer}) than {run}'s ({path}); rerun "
            f"prepare.py --mode={mode} --tokenizer={path}"
        )
    return tok, path


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


def row_conversations(rows, messages_field, lang):
    """Conversations from dataset rows: oasst1 message trees, or a [{role, content}] list in each row."""
    first = next(iter(rows), None) or {}
    if {"message_id", "parent_id", "role", "text"} <= set(first):
        return oasst_conversations(list(rows), lang)
    if messages_field in first:
        return [row[messages_field] for row in rows]
    raise ConversationError(
        f"the rows have no {messages_field!r} list and are not oasst1 messages (they have {sorted(first)}); "
        f"set --messages_field"
    )


def render_sft(tok, conversations, block_size, split_of):
    """({split: {tokens, mask}}, counts, summary) for SFT; conversations with no assistant turn are skipped and
    those longer than block_size dropped, both counted. split_of(i) names conversation i's split."""
    counts = {"conversations": len(conversations), "kept": 0, "no_assistant": 0, "too_long": 0}
    data = {s: {"tokens": [], "mask": []} for s in ("train", "val")}
    for i, messages in enumerate(conversations):
        try:
            ids, mask = render(tok, messages)
        except ConversationError as e:
            raise ConversationError(f"conversation {i}: {e}") from None
        if not any(mask):
            counts["no_assistant"] += 1
        elif len(ids) > block_size:
            counts["too_long"] += 1
        else:
            counts["kept"] += 1
            data[split_of(i)]["tokens"].extend(ids)
            data[split_of(i)]["mask"].extend(mask)
    train, val = data["train"], data["val"]
    return (
        data,
        counts,
        f"{counts['kept']} conversations kept of {len(conversations)}; skipped {counts['no_assistant']} with no "
        f"assistant turn, dropped {counts['too_long']} longer than block_size={block_size} | train "
        f"{len(train['tokens']):,} tokens ({sum(train['mask']):,} trained on), val {len(val['tokens']):,}",
    )


PAIR_FIELDS = ("prompt", "chosen", "rejected")


def pair_messages(row):
    """(conversation so far, chosen answer, rejected answer) of a preference record: prompt, chosen and rejected
    as plain strings, or (HuggingFaceH4/ultrafeedback_binarized) chosen and rejected as [{role, content}]
    conversations ending with the assistant's answer, whose earlier turns must agree with each other and prompt."""
    missing = [f for f in PAIR_FIELDS if row.get(f) is None]
    if missing:
        has = sorted(k for k, v in row.items() if v is not None)
        raise ConversationError(f"no {missing[0]!r} field (the record has {has})")
    prompt, chosen, rejected = (row[f] for f in PAIR_FIELDS)
    context = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise ConversationError("chosen and rejected must both be strings or both message lists")
    if isinstance(chosen, str):
        return context, chosen, rejected
    for name, conversation in (("chosen", chosen), ("rejected", rejected)):
        if not conversation or normalize(conversation[-1:])[0]["role"] != "assistant":
            raise ConversationError(f"{name} does not end with an assistant message")
    if len(chosen) > 1:  # full conversations: the turns before the answer are the prompt
        turns = [(m["role"], m["content"]) for m in chosen[:-1]]
        if turns != [(m["role"], m["content"]) for m in rejected[:-1]]:
            raise ConversationError("chosen and rejected answer different conversations")
        if isinstance(prompt, str) and turns[-1][1].strip() != prompt.strip():
            raise ConversationError("the prompt field is not the last turn before chosen's answer")
        if not isinstance(prompt, str) and turns != [(m["role"], m["content"]) for m in prompt]:
            raise ConversationError("the prompt messages are not the turns before chosen's answer")
        context = chosen[:-1]
    return context, chosen[-1]["content"], rejected[-1]["content"]


def fit_pair(prompt, chosen, rejected, block_size):
    """Fit the prompt and the longer completion into block_size tokens. The prompt gives way first, down to half
    the block: it keeps its first token (<|endoftext|>) and its last ones (the question and <|assistant|>); then
    each completion keeps its first tokens. Returns the three token lists and whether anything was cut."""
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest <= block_size:
        return prompt, chosen, rejected, False
    keep = min(len(prompt), max(block_size - longest, block_size // 2))
    prompt = prompt[:1] + prompt[len(prompt) - keep + 1 :]
    room = block_size - len(prompt)
    return prompt, chosen[:room], rejected[:room], True


def render_dpo(tok, rows, block_size, split_of):
    """({split: {tokens, lengths}}, counts, summary) for DPO: tokens holds each pair's prompt, chosen and rejected
    completion in turn (a completion is the answer and <|end|>), lengths their three lengths. A row may be a list of
    pairs (one request's, all in its split). Over-long pairs are cut by fit_pair and counted; pairs whose completions
    are then identical are skipped and counted."""
    counts = {"pairs": 0, "kept": 0, "identical": 0, "truncated": 0}
    data = {s: {"tokens": [], "lengths": []} for s in ("train", "val")}
    end = tok.special[END]
    for i, row in enumerate(rows):  # None: dropped by generation.sampled_code_pairs; its index keeps the others' split
        for pair in [] if row is None else row if isinstance(row, list) else [row]:  # a list: pairs of one request
            counts["pairs"] += 1
            try:
                context, chosen, rejected = pair_messages(pair)
                prompt = render_prompt(tok, context)
            except ConversationError as e:
                raise ConversationError(f"pair {i}: {e}") from None
            prompt, chosen, rejected, cut = fit_pair(
                prompt, tok.encode(chosen) + [end], tok.encode(rejected) + [end], block_size
            )
            if chosen == rejected:
                counts["identical"] += 1
                continue
            counts["kept"] += 1
            counts["truncated"] += cut
            data[split_of(i)]["tokens"].extend(prompt + chosen + rejected)
            data[split_of(i)]["lengths"].extend([len(prompt), len(chosen), len(rejected)])
    return (
        data,
        counts,
        f"{counts['kept']} pairs kept of {counts['pairs']}; skipped {counts['identical']} with identical "
        f"completions, truncated {counts['truncated']} longer than block_size={block_size} | train "
        f"{len(data['train']['lengths']) // 3} pairs, val {len(data['val']['lengths']) // 3}",
    )


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


def first_prose(doc):
    """The first prose paragraph of a cleaned docstring, or None. C functions open with a signature line
    ("dumps(obj) -> str"), and a paragraph under 20 characters says too little to be an answer."""
    paragraphs = [p.strip() for p in (doc or "").split("\n\n")]
    prose = [p for p in paragraphs if len(p) >= 20 and not re.match(r"^[\w.]+\(.*\)( ->.*)?$", p)]
    return prose[0] if prose else None


def ask(name, answer):
    """A two-turn conversation: one of QUESTIONS about name (picked by a CRC32 of it), then answer."""
    question = QUESTIONS[zlib.crc32(name.encode()) % len(QUESTIONS)].format(name=name)
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


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
            answer = first_prose(inspect.getdoc(obj))
            if answer:
                conversations.append(ask(f"{module_name}.{attr}", answer))
    return conversations


MAX_ANSWER = 600  # characters: a longer first paragraph is an essay or a table; such answers are dropped, not cut


def module_name(name):
    """The dotted module of a corpus file name: stdlib/json/decoder.py -> json.decoder, site-packages/numpy/linalg/
    __init__.py -> numpy.linalg; None for a file that cannot be imported by a dotted name or is part of tests."""
    parts = PurePosixPath(name).with_suffix("").parts[1:]  # the first part is the root's label
    if parts and parts[-1] == "__init__":
        parts = parts[:-1]
    if not parts or not all(p.isidentifier() for p in parts):
        return None
    if {"test", "tests"} & set(parts[:-1]) or parts[-1].startswith("test_"):  # test docstrings say what they check
        return None
    return ".".join(parts)


def public_defs(tree):
    """(qualified name, node) of a module's public functions and of the public methods of its public classes."""
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    for node in tree.body:
        if not isinstance(node, (*functions, ast.ClassDef)) or node.name.startswith("_"):
            continue
        if isinstance(node, ast.ClassDef):
            subs = [sub for sub in node.body if isinstance(sub, functions) and not sub.name.startswith("_")]
            yield from ((f"{node.name}.{sub.name}", sub) for sub in subs)
        else:
            yield node.name, node


def source_conversations(rows):
    """Docstring Q&A from Python files, as stdlib_conversations asks it, for every module of a corpus: rows are
    {"name": "<label>/<relative path>", "text"} (pysource.FileRows). Each file is parsed with ast, never imported, so
    no installed package's code runs. Test modules, files that do not parse, names asked before, answers over
    MAX_ANSWER and answers given before (copied helpers: transformers has rotate_half in ~190 models) are skipped,
    all but names counted. Returns (conversations, counts); parse_corpus makes them."""
    return parse_corpus(rows, task="docstring")["docstring"]


def file_questions(tree, module):
    """(name, answer) of each public function and method of a parsed file whose docstring has a first prose
    paragraph, in file order; source_conversations' dedup is left to parse_corpus."""
    found = []
    for qualname, node in public_defs(tree):
        answer = first_prose(ast.get_docstring(node))
        if answer is not None:
            found.append((f"{module}.{qualname}", answer))
    return found


def preference_pairs(conversations, split_of=lambda i: "train"):
    """DPO pairs on SFT conversations' questions, in the same order (so the same held-out split, split_of(i)):
    chosen is the right answer, rejected the answer about another function of the same split. Same split: a held-out
    question's wrong answer drawn from the training answers is text the SFT model has learned by heart, and
    likelihood prefers it whatever DPO does (the demo's held-out preference accuracy sat at 31% with such pairs).
    No cut-off answers either: the right answer cut halfway is far more likely than the whole one (its second half
    costs the SFT model ~20 nats), and DPO moved the demo's held-out preference on such pairs only from 23% to 38%."""
    groups = {}  # split -> indices of its conversations, in order
    for i in range(len(conversations)):
        groups.setdefault(split_of(i), []).append(i)
    pairs = {}
    for same in groups.values():
        for k, i in enumerate(same):
            question, answer = conversations[i]
            other = conversations[same[(k + len(same) // 2) % len(same)]][1]["content"]
            pairs[i] = {"prompt": question["content"], "chosen": answer["content"], "rejected": other}
    return [pairs[i] for i in range(len(conversations))]


# ----------------------------------------------------------------------------- the coding task
CODE_REQUEST = "Complete the following Python function:\n```python\n{prompt}```"  # HumanEval asks the same (eval.py)
CODE_ANSWER = "```python\n{code}```"  # the whole function, imports first; eval.py runs the first such block
MAX_CODE = 1500  # characters of a function's source: longer ones (and their docstring, asked too) outgrow 1024 tokens
STDLIB = frozenset(getattr(sys, "stdlib_module_names", ())) | {"typing", "collections", "itertools", "math"}
BUILTINS = frozenset(dir(builtins))


def code_block(text):
    """The code of an answer: its first ```python fenced block (to the end where it was cut off), else all of it."""
    match = re.search(r"```(?:python|py)?\n(.*?)(?:```|\Z)", text, re.S)
    return match.group(1) if match else text


def stdlib_imports(tree):
    """{bound name: import line} of a module's top-level imports from the standard library."""
    found = {}
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "level", 0):
            roots = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if all(r.split(".")[0] in STDLIB for r in roots):
                for alias in node.names:
                    if alias.name != "*":
                        found[alias.asname or alias.name.split(".")[0]] = ast.unparse(
                            type(node)(**{**node.__dict__, "names": [alias]})
                        )
    return found


def free_names(node):
    """Names a function reads that it does not bind itself (parameters, assignments, imports, nested defs)."""
    bound, loaded = set(), set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.arg):
            bound.add(sub.arg)
        elif isinstance(sub, ast.Name):
            (loaded if isinstance(sub.ctx, ast.Load) else bound).add(sub.id)
        elif isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and sub is not node:
            bound.add(sub.name)
        elif isinstance(sub, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in sub.names)
        elif isinstance(sub, ast.ExceptHandler) and sub.name:
            bound.add(sub.name)
    return loaded - bound - BUILTINS - {node.name}


def is_stub(node):
    """A body that is only the docstring and pass, ..., or raise NotImplementedError: nothing to learn from."""
    rest = node.body[1:]
    return not rest or all(
        isinstance(s, ast.Pass)
        or (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))
        or (isinstance(s, ast.Raise) and "NotImplementedError" in ast.unparse(s))
        for s in rest
    )


def code_conversations(rows, scope="self_contained"):
    """The coding task: for each public function (scope=all: and method) with a docstring in Python files, the user
    gives its signature and docstring as HumanEval gives a problem (CODE_REQUEST) and the assistant answers with the
    whole function (CODE_ANSWER). Files are parsed with ast, never imported. scope=self_contained keeps module-level
    functions that read no name but builtins and standard-library modules the file imports (those imports open
    the prompt and the answer, as `from typing import List` opens HumanEval's); scope=all keeps every one. Stubs,
    functions over MAX_CODE characters and copies of a function seen before are left out and counted.
    Returns (conversations, counts), made by parse_corpus; a conversation's user turn also carries the function's
    name ("function") and, where its docstring has examples (>>>), the docstring ("doc"), so that answers can be
    judged by its doctests."""
    return parse_corpus(rows, task="code", scope=scope)["code"]


def file_requests(tree, text, scope):
    """code_conversations' requests of one parsed file, as (code, conversation) in file order, and its counts of
    functions, not_self_contained, stubs and too_long; copies of code seen before are left to parse_corpus."""
    requests, counts = [], dict.fromkeys(("functions", "not_self_contained", "stubs", "too_long"), 0)
    lines, imports = text.splitlines(keepends=True), stdlib_imports(tree)
    defs = public_defs(tree) if scope == "all" else [(n.name, n) for n in tree.body if is_function(n)]
    for _, node in defs:
        doc = ast.get_docstring(node)
        if not doc or len(doc.strip()) < 20:
            continue
        counts["functions"] += 1
        free = free_names(node)
        if scope != "all" and not free <= set(imports):
            counts["not_self_contained"] += 1
            continue
        if is_stub(node):
            counts["stubs"] += 1
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        code = textwrap.dedent("".join(lines[start - 1 : node.end_lineno]))
        head = textwrap.dedent("".join(lines[start - 1 : node.body[0].end_lineno]))
        header = "".join(f"{imports[n]}\n" for n in sorted(free & set(imports)))
        header += "\n\n" if header else ""
        if len(code) > MAX_CODE:
            counts["too_long"] += 1
            continue
        request = {"role": "user", "content": CODE_REQUEST.format(prompt=header + head.rstrip() + "\n")}
        request.update(function=node.name, doc=doc if ">>>" in doc else None)
        answer = {"role": "assistant", "content": CODE_ANSWER.format(code=header + code.rstrip() + "\n")}
        requests.append((code, [request, answer]))
    return requests, counts


def is_function(node):
    return isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_")


# ----------------------------------------------------------------------------- each file parsed once, on every core
PARSE_CHUNK = 64  # files a worker takes at a time: big enough that the pipe is not the cost, small enough to balance
FILES_PER_WORKER = 32  # workers=0 starts no more processes than this many files keep busy (a fork costs ~10 ms)


def parse_module(row):
    """(ast of a corpus file that is a module (module_name), "ok"), or (None, why: not_modules or unparsed)."""
    if module_name(row["name"]) is None or row["text"] is None:
        return None, "not_modules"
    try:
        with warnings.catch_warnings():  # invalid escapes ("\d") in old packages' strings warn at parse time
            warnings.simplefilter("ignore")
            return ast.parse(row["text"]), "ok"
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # Python 2 files; null bytes; generated
        return None, "unparsed"


def parse_file(row, task, scope):
    """One corpus file parsed once, for both tasks: (status, file_questions, file_requests' requests, its counts),
    the parts task leaves out empty. Picklable in and out, so that a worker process can make it."""
    tree, status = parse_module(row)
    if tree is None:
        return status, [], [], {}
    questions = file_questions(tree, module_name(row["name"])) if task != "code" else []
    requests, counts = file_requests(tree, row["text"], scope) if task != "docstring" else ([], {})
    return status, questions, requests, counts


def pool_size(workers, n_files):
    """The processes map_files uses for workers (0: one per core, fewer for a small corpus). Linux only: fork starts
    a worker without running the script again (prepare.py works at import, and spawn and forkserver import the main
    module anew), and on macOS a fork after frameworks have loaded is not safe; elsewhere the files are parsed here."""
    if sys.platform != "linux":
        return 1
    return max(1, workers or min(runtime.cores(), n_files // FILES_PER_WORKER))


def map_files(work, rows, workers):
    """work(row) of each row, in order: in this process, or on pool_size(workers) forked processes."""
    workers = pool_size(workers, len(rows))
    if workers == 1:
        yield from map(work, rows)
        return
    chunk = max(1, min(PARSE_CHUNK, len(rows) // (4 * workers)))
    quiet = (signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the parent, which ends the pool: no trace per worker
    with multiprocessing.get_context("fork").Pool(workers, signal.signal, quiet) as pool:
        yield from pool.imap(work, rows, chunksize=chunk)


def parse_corpus(rows, task="both", scope="self_contained", workers=1):
    """The docstring Q&A (task docstring or both) and coding requests (code or both) of a corpus's files, each file
    parsed once with ast, never imported: {"docstring": source_conversations' (conversations, counts), "code":
    code_conversations'}, the parts task asks for. The files are parsed on `workers` processes (map_files); what
    was asked or answered before is left out here alone, in file order, so any number of workers gives the same."""
    questions, requests, names, answers, codes = [], [], set(), set(), set()
    asked = {"files": 0, "not_modules": 0, "unparsed": 0, "too_long": 0, "same_answer": 0}
    coded = {"files": 0, "functions": 0, "not_self_contained": 0, "stubs": 0, "too_long": 0, "same_code": 0}
    work = functools.partial(parse_file, task=task, scope=scope)
    for status, found, made, counts in map_files(work, rows, workers):
        for c in (asked, coded):
            c["files"] += 1
            if status != "ok":  # coded holds not_modules and unparsed once met, as code_conversations always did
                c[status] = c.get(status, 0) + 1
        for name, answer in found:
            if name in names:
                continue
            names.add(name)
            if len(answer) > MAX_ANSWER or answer in answers:
                asked["too_long" if len(answer) > MAX_ANSWER else "same_answer"] += 1
                continue
            answers.add(answer)
            questions.append(ask(name, answer))
        for key, n in counts.items():
            coded[key] += n
        for code, conversation in made:
            if code in codes:
                coded["same_code"] += 1
                continue
            codes.add(code)
            requests.append(conversation)
    parts = {"docstring": (questions, asked), "code": (requests, coded)}
    return {k: v for k, v in parts.items() if task in (k, "both")}


def cache_dir():
    """Where parsed corpora are kept between runs: $XDG_CACHE_HOME/anarchobot, else ~/.cache/anarchobot."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "anarchobot"


def corpus_key(rows, task, scope):
    """SHA-256 of all that parse_corpus's result depends on: the files' names and texts, task, scope, this file's
    code (its rules and constants) and the Python version (ast, sys.stdlib_module_names)."""
    h = hashlib.sha256(repr((sys.version, task, scope)).encode() + Path(__file__).read_bytes())
    for row in rows:
        text = row["text"]
        h.update(repr((row["name"], None if text is None else len(text))).encode())
        h.update(b"" if text is None else text.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def parse_corpus_cached(rows, task, scope, workers, say=print):
    """parse_corpus, kept in cache_dir() for the next run on the same files with the same settings: prepare.py
    --mode=dpo after --mode=sft (the reference run's 22,000 files were parsed twice, 159 s). One file per task and
    scope, written whole or not at all (disk.write_atomic); a key that differs (other files, settings, code or
    Python) parses again. A lock makes a run that starts while another parses with these settings wait for its
    result instead of parsing too. A cache that cannot be used is no error: the corpus is parsed."""
    key, path = corpus_key(rows, task, scope), cache_dir() / f"parse_{task}_{scope}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "a")
    except OSError as e:
        say(f"parse: no cache ({e})")
        return parse_corpus(rows, task, scope, workers)
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"parse: waiting for another run that is parsing with these settings ({lock.name})")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):  # none yet, or cut short by hand: parsed again below
            saved = None
        if isinstance(saved, dict) and saved.get("key") == key:
            say(f"parse: {len(rows):,} files as an earlier run parsed them (same files and settings), from {path}")
            return saved["parts"]
        t0, n = time.time(), pool_size(workers, len(rows))
        parts = parse_corpus(rows, task, scope, workers)
        try:
            disk.write_atomic(path, json.dumps({"key": key, "parts": parts}, separators=(",", ":")).encode())
            kept = f"kept in {path} for the next stage"
        except (OSError, UserError) as e:
            kept = f"not kept ({e})"
        say(f"parse: {len(rows):,} files parsed with ast on {n} process(es) in {time.time() - t0:.1f}s; {kept}")
    return parts
