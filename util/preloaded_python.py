"""Run `python <args>` commands as processes forked from one Python that has imported torch & co. already.

Every `python -m ...` pays `import torch` (+ torchvision, timm, diffusers, scipy): 8-10 CPU seconds on a
small CPU machine, for commands (the demo's stages, the tests' entry-point runs) that often work for less.
`PreloadedPython` starts a server that imports those third-party libraries once and then forks one child
per command, which becomes `python <args>`: its own process, working directory, environment (including the
thread count, applied with torch.set_num_threads since the libraries read OMP_NUM_THREADS at import),
stdout/stderr files, exit code and CPU time, and the entry point's module and every project module it
imports executed fresh as `__main__` (the server imports no project module). What it cannot reproduce is
noise the preloaded libraries print while importing; `fresh=True` starts real interpreters instead.

Several children may run at once. Protocol, JSON lines: the client writes
{"argv", "cwd", "env", "stdout", "stderr"} and the server answers {"pid"}; whenever a child ends it writes
{"pid", "returncode", "cpu_seconds"} (returncode negative: killed by that signal, as subprocess reports it;
cpu_seconds: user + system of the child and its reaped children).

    python = PreloadedPython()
    pid = python.start(["-m", "pretrain.main_pretrain", "--help"], cwd, env, "out.log", "out.log")
    returncode, cpu_seconds = python.wait(pid)
"""
import atexit
import json
import os
import queue
import resource
import runpy
import selectors
import subprocess
import sys
import threading
import time
import traceback

PRELOAD = ("torch", "torch.distributed", "numpy", "scipy.linalg", "scipy.special", "scipy.stats", "PIL.Image",
           "safetensors.torch", "torchvision", "torchvision.transforms", "timm", "timm.optim", "timm.data",
           "diffusers", "tqdm")


# ----------------------------------------------------------------------------------------------
# The server and its children
# ----------------------------------------------------------------------------------------------

def exit_code(code) -> int:
    """What the interpreter does with SystemExit(code): None -> 0, an int as is, anything else printed -> 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def redirect_output(stdout: str, stderr: str) -> None:
    """Points fds 1 and 2 at the named files (one file, opened once, when both name the same path: then the
    two streams interleave as in `> log 2>&1`); appends, so a header the caller wrote stays."""
    handles = {}
    for fd, path in ((1, stdout), (2, stderr)):
        if path not in handles:
            handles[path] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(handles[path], fd)
    for handle in handles.values():
        os.close(handle)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)


def become_python(request: dict) -> None:
    """In the forked child: set up the environment `python <argv>` would have and run it; never returns."""
    code = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        redirect_output(request["stdout"], request["stderr"])
        sys.stdout.reconfigure(line_buffering=True)
        threads = os.environ.get("OMP_NUM_THREADS", "")
        if threads.isdigit() and int(threads) > 0:
            import torch  # preloaded: read OMP_NUM_THREADS at import, in the server's environment

            torch.set_num_threads(int(threads))
        extra_paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
        sys.path[0:0] = extra_paths
        argv = request["argv"]
        try:
            if argv[0] == "-m":
                sys.argv = [argv[1], *argv[2:]]  # runpy puts the module's file name in argv[0], as -m does
                sys.path.insert(0, os.getcwd())
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            else:
                sys.argv = list(argv)
                sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
                runpy.run_path(argv[0], run_name="__main__")
            code = 0
        except SystemExit as error:
            code = exit_code(error.code)
        except BaseException:  # noqa: B036 - the interpreter prints every uncaught exception the same way
            traceback.print_exc()
            code = 1
        threading._shutdown()  # as the interpreter at exit: wait for non-daemon threads, then atexit handlers
        atexit._run_exitfuncs()
    except BaseException:  # noqa: B036
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def serve() -> None:
    """The server's loop: single-threaded (forking a threaded process is unsafe), it waits on its stdin for
    requests and, between them, reaps the children that ended. The client sends a request only after the
    previous one's {"pid"} reply, so a readline never leaves a second request in stdin's buffer unseen by select."""
    for name in PRELOAD:
        __import__(name)
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # nothing the server itself prints may reach the protocol channel
    usage = resource.getrusage(resource.RUSAGE_SELF)
    channel.write(json.dumps({"ready": True, "cpu_seconds": usage.ru_utime + usage.ru_stime}) + "\n")
    requests = selectors.DefaultSelector()
    requests.register(sys.stdin, selectors.EVENT_READ)
    children, stdin_open = set(), True
    while stdin_open or children:
        if stdin_open and requests.select(timeout=0.05):
            line = sys.stdin.readline()
            if not line:
                stdin_open = False
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                channel.close()
                become_python(json.loads(line))
            children.add(pid)
            channel.write(json.dumps({"pid": pid}) + "\n")
        elif not stdin_open:
            time.sleep(0.05)
        while children:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
            if pid == 0:
                break
            children.discard(pid)
            channel.write(json.dumps({"pid": pid, "returncode": os.waitstatus_to_exitcode(status),
                                      "cpu_seconds": usage.ru_utime + usage.ru_stime}) + "\n")


# ----------------------------------------------------------------------------------------------
# The client
# ----------------------------------------------------------------------------------------------

class PreloadedPython:
    """Starts `python <args>` commands, forked from a preloaded server (default) or as fresh interpreters.

    start() returns the child's pid at once; poll(pid) / wait(pid) give (returncode, cpu_seconds) when it
    has ended. Thread-safe. `server_env`: the environment the libraries are imported in (their import-time
    settings, e.g. OMP_NUM_THREADS's default, come from it; each command's own `env` applies to the child).
    """

    def __init__(self, fresh: bool = False, server_env: dict | None = None):
        self.fresh = fresh
        self.lock = threading.Lock()  # guards `finished`, which the reader thread fills
        self.request_lock = threading.Lock()  # one request at a time, until its {"pid"} reply
        self.finished: dict[int, tuple] = {}
        self.processes: dict[int, subprocess.Popen] = {}
        self.import_cpu_seconds = 0.0  # each fresh interpreter's imports count in its own CPU time
        if fresh:
            return
        self.server = subprocess.Popen([sys.executable, os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True, env=server_env)
        self.started = queue.Queue()  # the {"pid"} replies, in request order
        self.reader = threading.Thread(target=self._read_replies, daemon=True)
        self.reader.start()
        ready = self.started.get(timeout=600)  # once the libraries are imported
        if ready is None:
            raise RuntimeError(f"util/preloaded_python.py exited with {self.server.wait()} while importing")
        self.import_cpu_seconds = ready["cpu_seconds"]
        atexit.register(self.close)

    def _read_replies(self) -> None:
        for line in self.server.stdout:
            reply = json.loads(line)
            if "returncode" in reply:
                with self.lock:
                    self.finished[reply["pid"]] = (reply["returncode"], reply["cpu_seconds"])
            else:
                self.started.put(reply)
        self.started.put(None)

    def start(self, args: list, cwd: str, env: dict, stdout: str, stderr: str) -> int:
        """Starts `python <args>` in `cwd` with exactly `env`, appending its output to the files named."""
        args = [str(arg) for arg in args]
        if self.fresh:
            with open(stdout, "ab") as out, open(stderr, "ab") as err:
                process = subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                           stdout=out, stderr=subprocess.STDOUT if stderr == stdout else err)
            self.processes[process.pid] = process
            return process.pid
        with self.request_lock:  # not `lock`: the reader may need that to record a child that ends meanwhile
            request = {"argv": args, "cwd": str(cwd), "env": env, "stdout": str(stdout), "stderr": str(stderr)}
            self.server.stdin.write(json.dumps(request) + "\n")
            self.server.stdin.flush()
            reply = self.started.get(timeout=120)
        if reply is None:
            raise RuntimeError(f"util/preloaded_python.py exited with {self.server.wait()}")
        return reply["pid"]

    def poll(self, pid: int):
        """(returncode, cpu_seconds) once the child has ended, else None."""
        if self.fresh:
            found, status, usage = os.wait4(pid, os.WNOHANG)
            if found == 0:
                return None
            self.processes.pop(pid).returncode = os.waitstatus_to_exitcode(status)
            return os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime
        with self.lock:
            return self.finished.pop(pid, None)

    def wait(self, pid: int, timeout: float | None = None):
        """(returncode, cpu_seconds); raises subprocess.TimeoutExpired after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (result := self.poll(pid)) is None:
            if not self.fresh and self.server.poll() is not None:  # the server is gone: read what it last wrote
                self.reader.join(timeout=10)
                if (result := self.poll(pid)) is None:
                    raise RuntimeError(f"util/preloaded_python.py exited with {self.server.returncode}")
                break
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {pid}", timeout)
            time.sleep(0.05)
        return result

    def close(self) -> None:
        """Lets the server exit once its running children have ended."""
        if not self.fresh and self.server.poll() is None:
            self.server.stdin.close()
            self.server.wait(timeout=600)
            self.reader.join(timeout=60)
            self.server.stdout.close()


if __name__ == "__main__":
    del sys.path[0]  # this script's folder (util/): each child puts its own first, as its interpreter would
    serve()
