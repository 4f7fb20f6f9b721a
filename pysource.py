"""The local corpora prepare.py builds when it has no --input or --dataset: Python source read from this machine,
no download. `stdlib` is the running Python's standard library; `python` adds every installed package (the
site-packages folders), deduplicated by content. prepare.py --mode=sft/dpo --corpus=python turns the same files
into docstring questions and answers (chat.source_conversations).
"""

import hashlib
import site
import sysconfig
from pathlib import Path, PurePosixPath

CORPORA = ("stdlib", "python")
SKIPPED = ("duplicate", "too_large", "not_utf8", "unreadable")  # what python_files counts and leaves out


def python_roots():
    """[(label, folder)] of the `python` corpus: the standard library, then each site-packages folder that exists
    (sysconfig's purelib and platlib, site.getsitepackages()), each once."""
    paths = sysconfig.get_paths()
    roots = [("stdlib", Path(paths["stdlib"]))]
    for folder in map(Path, [paths["purelib"], paths["platlib"], *site.getsitepackages()]):
        if folder.is_dir() and folder.resolve() not in [r.resolve() for _, r in roots]:
            roots.append(("site-packages", folder))
    return roots


def py_files(root, skip_site=False):
    """(path relative to root, path) of every .py file under root, in sorted path order; skip_site leaves out the
    site-packages folders that a standard library holds (installed packages are not the standard library)."""
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if not (skip_site and ("site-packages" in rel.parts or "dist-packages" in rel.parts)):
            yield rel, path


def python_files(roots=None, max_bytes=1_000_000):
    """([(name, path)], counts) of the `python` corpus: every .py file under roots (python_roots() by default),
    named "<label>/<path relative to its root>" and sorted by that name. A file whose bytes came before (the same
    module installed twice, the many empty __init__.py) is a duplicate; one larger than max_bytes, not UTF-8 or
    unreadable is skipped. counts holds the files kept per label and each kind of SKIPPED, so none goes unsaid."""
    roots = python_roots() if roots is None else roots
    found = sorted(
        (PurePosixPath(label, rel), i, label, path)
        for i, (label, root) in enumerate(roots)
        for rel, path in py_files(Path(root), skip_site=label == "stdlib")
    )
    counts = dict.fromkeys([label for label, _ in roots] + list(SKIPPED), 0)
    files, seen = [], set()
    for name, _, label, path in found:
        try:
            data = path.read_bytes()
        except OSError:  # e.g. a dangling symlink left by an uninstall
            counts["unreadable"] += 1
            continue
        digest = hashlib.sha1(data).digest()
        if digest in seen:
            counts["duplicate"] += 1
            continue
        seen.add(digest)
        if len(data) > max_bytes:
            counts["too_large"] += 1
            continue
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            counts["not_utf8"] += 1
            continue
        counts[label] += 1
        files.append((name.as_posix(), path))
    return files, counts


def describe(counts, max_bytes):
    """One line saying where the `python` corpus's files came from and what was skipped."""
    kept = " + ".join(f"{n:,} {label}" for label, n in counts.items() if label not in SKIPPED)
    return (
        f"{kept} .py files; skipped {counts['duplicate']:,} duplicates, {counts['too_large']:,} over "
        f"{max_bytes:,} bytes, {counts['not_utf8']:,} not UTF-8, {counts['unreadable']:,} unreadable"
    )


class FileRows:
    """Rows {"text", "name"} of (name, path) files, each read only when reached, so that a corpus of hundreds of MB
    can be iterated more than once (a peek, the tokenizer's sample, the main pass) and sliced to resume. text is
    None for a file that is not UTF-8."""

    def __init__(self, files):
        self.files = list(files)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        return FileRows(self.files[index])  # a slice: prepare.py resumes with rows[start:]

    def __iter__(self):
        for name, path in self.files:
            try:
                with open(path, encoding="utf-8", newline="") as f:  # newline="": keep \r\n as in the file
                    text = f.read()
            except UnicodeDecodeError:
                text = None  # a few stdlib test fixtures are latin-1 or koi8-r on purpose
            yield {"text": text, "name": name}


def stdlib_rows():
    """Rows of the `stdlib` corpus: each .py file of the standard library, named by its relative path, in sorted
    path order; files not in UTF-8 come with text None (prepare.py counts them as empty)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return FileRows((rel.as_posix(), path) for rel, path in py_files(root, skip_site=True))
