"""A fork server for the tests' script runs: `python script.py args` without paying for `import
torch, torchvision` (about 4 of the 8 seconds of a tiny training run on the CI machine) every time.

One server per test process imports torch, torchvision, numpy, PIL and common once, runs no tensor
operation (so the CPU kernels a script pins are still free to choose) and forks a child per request:
the child takes the caller's argv, environment, working directory and stdout/stderr pipes and runs
the script as `python script.py` would (sys.argv, sys.path[0], __main__, exit codes, tracebacks,
atexit). conftest.run_script uses it for one-process runs with the default environment; runs with
their own environment variables or several processes (torchrun) start a real interpreter.
MSF_TESTS_FORKSERVER=0 turns it off.
"""
import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time


# ---------------------------------------------------------------- server side

def _run_child(request, fds):
    """In the forked child: become `python argv...` and never return."""
    code = 1
    try:
        os.setpgid(0, 0)  # the caller kills the whole group on a timeout (loader workers too)
        for target, fd in zip((0, 1, 2), fds):
            os.dup2(fd, target)
            os.close(fd)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        script, *args = request["argv"]
        sys.argv = [script, *args]
        sys.path[0] = os.path.dirname(os.path.abspath(script))
        for entry in reversed(request["env"].get("PYTHONPATH", "").split(os.pathsep)):
            if entry and entry not in sys.path:
                sys.path.insert(1, entry)
        import runpy
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            sys.excepthook(*sys.exc_info())
            code = 1
        threading._shutdown()  # as the interpreter does at exit: wait for non-daemon threads
        atexit._run_exitfuncs()
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def _handle(connection):
    """In a handler process: fork the child, report its pid, wait, report its exit status."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    message, fds, _, _ = socket.recv_fds(connection, 1 << 20, 3)
    request = json.loads(message)
    pid = os.fork()
    if pid == 0:
        connection.close()
        _run_child(request, fds)
    for fd in fds:
        os.close(fd)
    connection.sendall(f"{pid}\n".encode())
    _, status = os.waitpid(pid, 0)
    connection.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
    connection.close()
    os._exit(0)


def serve(path):
    import numpy  # noqa: F401
    import PIL.Image  # noqa: F401
    import torch  # noqa: F401
    import torchvision  # noqa: F401
    import common  # noqa: F401
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # handler processes are reaped by the kernel
    server = socket.socket(socket.AF_UNIX)
    server.bind(path + ".tmp")
    server.listen(16)
    os.rename(path + ".tmp", path)  # the socket appears only once the imports are done
    while True:
        connection, _ = server.accept()
        if os.fork() == 0:
            server.close()
            _handle(connection)
        connection.close()


# ---------------------------------------------------------------- client side

_server = {}


def _server_path(env):
    """The socket of this process's server, started on first use with the tests' script env."""
    if "path" not in _server:
        folder = tempfile.mkdtemp(prefix="forkserver-")
        path = os.path.join(folder, "socket")
        process = subprocess.Popen([sys.executable, os.path.abspath(__file__), path], env=env,
                                   stdin=subprocess.DEVNULL)
        atexit.register(process.kill)
        deadline = time.time() + 120
        while not os.path.exists(path):
            if process.poll() is not None or time.time() > deadline:
                raise RuntimeError("the tests' fork server did not start")
            time.sleep(0.05)
        _server.update(path=path, process=process)
    return _server["path"]


def run(argv, env, cwd, timeout):
    """Like subprocess.run(argv, env=env, cwd=cwd, timeout=timeout, capture_output=True,
    text=True) for argv = [python, script, args...], through the fork server."""
    connection = socket.socket(socket.AF_UNIX)
    connection.connect(_server_path(env))
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    devnull = os.open(os.devnull, os.O_RDONLY)
    request = {"argv": [str(a) for a in argv[1:]], "env": env, "cwd": str(cwd)}
    socket.send_fds(connection, [json.dumps(request).encode()], [devnull, out_write, err_write])
    for fd in (devnull, out_write, err_write):
        os.close(fd)
    replies = connection.makefile("r")
    pid = int(replies.readline())
    chunks = {out_read: [], err_read: []}

    def drain(fd):
        with open(fd, "rb", closefd=True) as stream:
            chunks[fd].append(stream.read())

    readers = [threading.Thread(target=drain, args=(fd,), daemon=True) for fd in chunks]
    for reader in readers:
        reader.start()
    connection.settimeout(timeout)
    try:
        line = replies.readline()
    except (socket.timeout, TimeoutError):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        raise subprocess.TimeoutExpired(argv, timeout) from None
    finally:
        connection.close()
    if not line:
        raise RuntimeError(f"the tests' fork server lost the run of {argv[1:]}")
    returncode = int(line)
    for reader in readers:
        reader.join(timeout)
    text = {fd: b"".join(parts).decode(errors="replace") for fd, parts in chunks.items()}
    return subprocess.CompletedProcess(argv, returncode, text[out_read], text[err_read])


if __name__ == "__main__":
    serve(sys.argv[1])
