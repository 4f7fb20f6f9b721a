"""Script runs as real processes without paying torch's import each time: a server process imports torch, numpy
and datasets once, then forks a child per run, and the child runs the script as `python script.py args` would (its
own argv, working folder, environment, stdin/stdout/stderr, exit status; an uncaught exception goes through its
sys.excepthook). torch's import was 1.6-2 s of every one of the suite's ~190 script runs, datasets' 1.1 s more of
prepare.py's runs on files.

What a fork cannot give is set aside: a run needs a server started in the same environment where the interpreter
or torch read it at start (PYTHON*, OMP_*, ONEDNN_*, TORCH*, HOME, the locale, TMPDIR, ...; conftest.run keeps one
server per such environment met twice and runs the rest, other commands, and everything off Linux, as plain
subprocesses); the server never imports the repo's modules, so each run imports them fresh (no side effects at
import is still tested); each child seeds the random generators a new interpreter seeds, from the OS's entropy.
What is left, a fork cannot show: docs/testing.md. (multiprocessing's forkserver does not serve: it is one per
process and environment, and its children run a function and leave by os._exit, past the script's atexit handlers.)
"""

import json
import locale
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile

# read when the interpreter or torch starts: a run whose environment differs here cannot be a fork of the server
STARTUP_VARS = ("PYTHON", "LD_", "OMP_", "MKL_", "KMP_", "GOMP_", "ONEDNN_", "DNNL_", "ATEN_", "CUDA_", "TORCH")
STARTUP_VARS += ("PYTORCH_", "NVIDIA_", "MALLOC", "MLX_", "HF_", "HUGGINGFACE_", "XDG_")  # datasets: at import
STARTUP_VARS += ("LC_",)  # the locale: Python sets LC_CTYPE and its stdio and file-name encodings at start
# HOME: site's user folder on sys.path, datasets' cache folder; TMPDIR: tempfile's folder, fixed once asked (torch's
# import asks); LANG, LANGUAGE: the locale, as LC_*
STARTUP_NAMES = ("HOME", "TMPDIR", "LANG", "LANGUAGE")


def forkable(argv):
    """True when argv is `python script.py ...` or `python -c code ...`, on Linux (on macOS a fork after frameworks
    have loaded is not safe: Objective-C's runtime may abort the child)."""
    python = len(argv) > 1 and argv[0] == sys.executable and (argv[1] == "-c" or argv[1].endswith(".py"))
    return python and sys.platform == "linux"


def startup_env(env):
    """The part of an environment that the interpreter or torch read at start: a server serves only runs that agree
    with its own."""
    return frozenset((k, v) for k, v in env.items() if k in STARTUP_NAMES or k.startswith(STARTUP_VARS))


class ForkServer:
    """The client: run(argv, cwd, env, stdin_text, timeout) -> subprocess.CompletedProcess, as subprocess.run with
    capture_output=True, text=True."""

    def __init__(self, env):
        self.env = dict(env)
        ours, theirs = socket.socketpair()
        self.proc = subprocess.Popen(
            [sys.executable, __file__, str(theirs.fileno())], pass_fds=[theirs.fileno()], env=self.env
        )
        theirs.close()
        self.sock = ours

    def run(self, argv, cwd, env, stdin_text, timeout):
        encoding = locale.getpreferredencoding(False)  # as subprocess's text mode
        with tempfile.TemporaryFile() as fin, tempfile.TemporaryFile() as fout, tempfile.TemporaryFile() as ferr:
            fin.write((stdin_text or "").encode(encoding))
            fin.seek(0)
            request = json.dumps({"argv": [str(a) for a in argv], "cwd": str(cwd), "env": env}).encode()
            self.sock.settimeout(None)
            socket.send_fds(self.sock, [struct.pack("q", len(request))], [fin.fileno(), fout.fileno(), ferr.fileno()])
            self.sock.sendall(request)
            (pid,) = struct.unpack("q", receive(self.sock, 8))
            self.sock.settimeout(timeout)
            try:
                (status,) = struct.unpack("q", receive(self.sock, 8))
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                self.sock.settimeout(None)
                receive(self.sock, 8)
                raise subprocess.TimeoutExpired(argv, timeout) from None
            out, err = (read_text(f, encoding) for f in (fout, ferr))
        return subprocess.CompletedProcess(argv, status, out, err)

    def close(self):
        self.sock.close()  # the server's recv sees the end and it exits
        self.proc.wait(timeout=30)


def receive(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the fork server is gone")
        data += chunk
    return data


def read_text(f, encoding):
    f.seek(0)
    return f.read().decode(encoding).replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as subprocess


def serve(sock):
    """Forks a child per request; the child returns to become the script, the server loops."""
    while True:
        try:
            header, fds, _, _ = socket.recv_fds(sock, 8, 3)
        except OSError:
            sys.exit(0)
        if not header:
            sys.exit(0)
        header += receive(sock, 8 - len(header))
        request = json.loads(receive(sock, struct.unpack("q", header)[0]))
        pid = os.fork()
        if pid == 0:
            sock.close()
            for i, fd in enumerate(fds):
                os.dup2(fd, i)
                os.close(fd)
            return request
        for fd in fds:
            os.close(fd)
        sock.sendall(struct.pack("q", pid))
        _, status = os.waitpid(pid, 0)
        sock.sendall(struct.pack("q", os.waitstatus_to_exitcode(status)))


if __name__ == "__main__":
    import gc
    import random

    import numpy
    import torch
    import torch.nn.attention.flex_attention  # noqa: F401  model.py's: sympy with it, 0.55 s of each run's start

    try:  # prepare.py's files and hub path import it: 1.1 s of each of ~45 runs; it reads HF_* and XDG_* here
        import datasets  # noqa: F401
    except ImportError:
        pass

    # what the server has built, no collection of a child visits again: an object the collector visits is written to
    # (its header), so the child copied the page, and its exit collects all: 1.1 s of each run's end, 0.35 s frozen
    gc.freeze()
    request = serve(socket.socket(fileno=int(sys.argv[1])))
    # the child: become `python argv[1:]` in the request's folder and environment; from here on an exception or
    # sys.exit ends this process exactly as it would end the script's own interpreter
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    # a new interpreter seeds these from the OS's entropy (torch's default generator too): unseeded
    # randomness differs from run to run. A fork would inherit the server's state; Python's `random` reseeds itself
    # at a fork, numpy's and torch's global generators do not.
    random.seed()
    numpy.random.seed()
    torch.seed()
    argv = request["argv"][1:]
    if argv[0] == "-c":
        sys.argv, sys.path[0] = ["-c", *argv[2:]], ""
        main = type(sys)("__main__")
        sys.modules["__main__"] = main
        exec(compile(argv[1], "<string>", "exec"), main.__dict__)
    else:
        import runpy

        sys.argv, sys.path[0] = argv, os.path.dirname(os.path.abspath(argv[0]))
        runpy.run_path(argv[0], run_name="__main__")
