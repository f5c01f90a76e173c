"""A Python that has already imported the heavy libraries and forks one child per command (tests only).

Every `python -m ...` a test starts pays `import torch` (+ torchvision, timm, diffusers, scipy): about 5-10 CPU
seconds each on the 2-core test machine, for commands that often stop after one line. This server imports those
third-party libraries once and then runs each command in a forked child, the way `python <args>` would: its own
process, its own working directory, environment, stdout/stderr files and exit code, and the entry point's module
(and every project module it imports) executed fresh as `__main__`. What it cannot show is noise that the
preloaded libraries print while importing; `conftest.run_python` keeps a real interpreter start for the tests
that check that (`fresh=True`).

Protocol (one command at a time), JSON lines on stdin -> stdout: {"argv", "cwd", "env", "stdout", "stderr"} ->
{"pid"} when the child starts, then {"returncode"} when it ends (negative: killed by that signal, as subprocess).
"""
import atexit
import json
import os
import runpy
import sys
import threading
import traceback

PRELOAD = ("torch", "torch.distributed", "numpy", "scipy.linalg", "scipy.special", "scipy.stats", "PIL.Image",
           "safetensors.torch", "torchvision", "torchvision.transforms", "timm", "timm.optim", "timm.data",
           "diffusers")


def exit_code(code) -> int:
    """What the interpreter does with SystemExit(code): None -> 0, an int as is, anything else printed -> 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def run_child(request: dict) -> None:
    """In the forked child: become `python <argv>` and never return (os._exit with its exit code)."""
    code = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(handle, fd)
            os.close(handle)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        sys.stdout.reconfigure(line_buffering=True)
        argv = request["argv"]
        try:
            if argv[0] == "-m":
                sys.argv = [argv[1], *argv[2:]]  # runpy puts the module's file name in argv[0], as -m does
                sys.path[0] = os.getcwd()
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            else:
                sys.argv = list(argv)
                sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
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
    for name in PRELOAD:
        __import__(name)
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # nothing the server itself prints may reach the protocol channel
    channel.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            channel.close()
            run_child(request)
        channel.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        channel.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")


if __name__ == "__main__":
    serve()
