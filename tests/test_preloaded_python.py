"""util/preloaded_python.py: a forked child must behave as `python <args>` would, several at a time.

Each case states what a real interpreter does (and runs the same command fresh where that is the reference):
exit codes of SystemExit / exceptions / signals, the working directory and environment, sys.argv and sys.path
of `-m` and of a script path, the thread count from OMP_NUM_THREADS, output appended to the files named, and
CPU seconds of the child alone.
"""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from util.preloaded_python import PreloadedPython

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def python():
    server = PreloadedPython(server_env=dict(os.environ, OMP_NUM_THREADS="1"))
    yield server
    server.close()


def run(python: PreloadedPython, args, tmp_path: Path, env: dict | None = None, cwd: Path = REPO_ROOT):
    """(returncode, stdout, stderr, cpu_seconds) of `python <args>` forked from the server."""
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    for path in (out, err):
        path.unlink(missing_ok=True)
    pid = python.start(args, cwd, env or dict(os.environ), out, err)
    returncode, cpu_seconds = python.wait(pid, timeout=120)
    return returncode, out.read_text(), err.read_text(), cpu_seconds


def write_script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(body))
    return path


REPORT = """
    import json, os, sys, torch
    print(json.dumps({"argv": sys.argv, "path0": sys.path[0], "cwd": os.getcwd(), "name": __name__,
                      "threads": torch.get_num_threads(), "env": os.environ.get("DEMO_MARK"),
                      "pythonpath_first": sys.path[1] if len(sys.path) > 1 else None}))
"""


def test_script_sees_what_a_fresh_interpreter_sees(python, tmp_path):
    import json

    script = write_script(tmp_path, REPORT)
    env = dict(os.environ, DEMO_MARK="x", OMP_NUM_THREADS="2", PYTHONPATH=str(tmp_path / "extra"))
    code, out, err, _ = run(python, [script, "a", "--b"], tmp_path, env=env, cwd=tmp_path)
    forked = json.loads(out)
    fresh = json.loads(subprocess.run([sys.executable, script, "a", "--b"], cwd=tmp_path, env=env, text=True,
                                      capture_output=True, check=True).stdout)
    assert code == 0, err
    assert forked == fresh
    assert forked["argv"] == [str(script), "a", "--b"] and forked["name"] == "__main__"
    assert forked["threads"] == 2 and forked["env"] == "x" and forked["cwd"] == str(tmp_path)
    assert forked["path0"] == str(tmp_path) and forked["pythonpath_first"] == str(tmp_path / "extra")


def test_module_runs_as_main_with_argv0_its_file(python, tmp_path):
    code, out, err, _ = run(python, ["-m", "scripts.plot_convergence", "--help"], tmp_path)
    fresh = subprocess.run([sys.executable, "-m", "scripts.plot_convergence", "--help"], cwd=REPO_ROOT,
                           text=True, capture_output=True)
    assert (code, out) == (fresh.returncode, fresh.stdout) and code == 0, err


@pytest.mark.parametrize("body, expected_code, expected_err", [
    ("import sys; sys.exit(3)", 3, ""),
    ("import sys; sys.exit('bad flag: one sentence')", 1, "bad flag: one sentence\n"),
    ("raise ValueError('boom')", 1, "ValueError: boom"),
    ("import os, signal; os.kill(os.getpid(), signal.SIGTERM)", -signal.SIGTERM, ""),
    ("print('done')", 0, ""),
])
def test_exit_codes_match_the_interpreter(python, tmp_path, body, expected_code, expected_err):
    script = write_script(tmp_path, body)
    code, _, err, _ = run(python, [script], tmp_path)
    fresh = subprocess.run([sys.executable, script], text=True, capture_output=True)
    assert code == fresh.returncode == expected_code
    assert expected_err in err and expected_err in fresh.stderr


def test_output_is_appended_and_both_streams_share_one_file(python, tmp_path):
    log = tmp_path / "stage.log"
    log.write_text("$ header\n")
    script = write_script(tmp_path, "import sys\nprint('out')\nprint('err', file=sys.stderr)\n")
    pid = python.start([script], tmp_path, dict(os.environ), log, log)
    assert python.wait(pid, timeout=60)[0] == 0
    assert log.read_text().splitlines() == ["$ header", "out", "err"]


def test_children_run_at_once_and_report_their_own_cpu_time(python, tmp_path):
    """Two children that each spin ~0.6 CPU-s and sleep 1 s, started together: both report their own CPU
    seconds (not the other's, not the server's imports), and they overlap (they finish within the sleep)."""
    script = write_script(tmp_path, """
        import time
        end = time.process_time() + 0.6
        while time.process_time() < end:
            pass
        time.sleep(1.0)
        print(time.time())
    """)
    started = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        started.append((python.start([script], tmp_path, dict(os.environ), tmp_path / name / "o", tmp_path / name / "o"),
                        tmp_path / name / "o"))
    results = [python.wait(pid, timeout=60) for pid, _ in started]
    ends = [float(path.read_text()) for _, path in started]
    assert [code for code, _ in results] == [0, 0]
    assert all(0.5 < cpu < 3.0 for _, cpu in results), results
    assert abs(ends[0] - ends[1]) < 1.0  # run one after the other, they would end >= 1 s apart


def test_poll_is_none_while_running_and_a_killed_child_reports_the_signal(python, tmp_path):
    script = write_script(tmp_path, "import time\ntime.sleep(60)\n")
    pid = python.start([script], tmp_path, dict(os.environ), tmp_path / "o", tmp_path / "o")
    time.sleep(0.3)
    assert python.poll(pid) is None
    os.kill(pid, signal.SIGTERM)
    assert python.wait(pid, timeout=60)[0] == -signal.SIGTERM


def test_wait_times_out(python, tmp_path):
    script = write_script(tmp_path, "import time\ntime.sleep(60)\n")
    pid = python.start([script], tmp_path, dict(os.environ), tmp_path / "o", tmp_path / "o")
    with pytest.raises(subprocess.TimeoutExpired):
        python.wait(pid, timeout=0.3)
    os.kill(pid, signal.SIGKILL)
    assert python.wait(pid, timeout=60)[0] == -signal.SIGKILL


def test_fresh_mode_gives_the_same_results(tmp_path):
    fresh = PreloadedPython(fresh=True)
    script = write_script(tmp_path, "import sys\nprint('hi')\nsys.exit(4)\n")
    log = tmp_path / "o"
    pid = fresh.start([script], tmp_path, dict(os.environ), log, log)
    code, cpu = fresh.wait(pid, timeout=60)
    assert (code, log.read_text()) == (4, "hi\n") and cpu > 0


def test_a_command_starts_while_the_reader_records_an_ended_child(python, tmp_path):
    """The reader thread holds `lock` while it records a child that ended; start() must not need that lock,
    or a stage that ends just as another starts would stall the start until its timeout."""
    import threading

    script = write_script(tmp_path, "print('started')\n")
    started = []
    with python.lock:
        starter = threading.Thread(target=lambda: started.append(
            python.start([script], tmp_path, dict(os.environ), tmp_path / "o", tmp_path / "o")))
        starter.start()
        starter.join(timeout=30)
        assert started, "start() waited for the lock the reader holds"
    assert python.wait(started[0], timeout=60)[0] == 0
