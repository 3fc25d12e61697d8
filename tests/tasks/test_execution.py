"""The HumanEval sandbox: right and wrong answers, and each way out held by its limit, quickly, with nothing left.

Every containment test runs with the in-process guard and without it (`guard=False`), where only the kernel's
limits hold; the fork tests also without namespaces, where RLIMIT_NPROC and the process group must do it alone.
Where a kernel layer depends on the machine (namespaces need unshare(2); an unprivileged uid needs root), the
test asserts what the reported layers promise.
"""

import functools
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from tritonchat.tasks.execution import (
    Limits,
    execute,
    extract_code,
    humaneval_program,
    prompt_imports,
    sandbox_processes,
)

PROMPT = 'from typing import List\nimport math\n\n\ndef total(xs: List[int]) -> int:\n    """Sum of xs."""\n'
TEST = "METADATA = {}\n\n\ndef check(candidate):\n    assert candidate([1, 2]) == 3\n    assert candidate([]) == 0\n"
RIGHT = "Here it is:\n```python\ndef total(xs: List[int]) -> int:\n    return math.fsum(xs)\n```\nDone."
WRONG = "```\ndef total(xs):\n    return len(xs)\n```"
DEFAULT = Limits()
GUARDS = [pytest.param(True, id="guard"), pytest.param(False, id="kernel-only")]


def _children() -> list[int]:
    """Live processes whose parent is this test process."""
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != b"Z" and int(fields[1]) == os.getpid():
            found.append(int(name))
    return found


@functools.cache
def _kernel_layers(namespaces: bool = True) -> tuple[str, ...]:
    """What the kernel enforces on this machine (namespaces need unshare(2), a fresh uid needs root)."""
    return tuple(execute("pass", guard=False, namespaces=namespaces).layers)


def _needs(what: str, layers: tuple[str, ...]) -> None:
    """Skip a kernel-only case this machine's kernel cannot hold (the guarded case still runs and must hold)."""
    if not any(layer.startswith(what) for layer in layers):
        pytest.skip(f"the kernel here does not provide {what!r} (layers: {', '.join(layers) or 'none'})")


def _run(program: str, limits: Limits = DEFAULT, **kwargs):
    result = execute(program, limits, **kwargs)
    assert sandbox_processes(result.pid, result.uid, result.mark) == [], "a process of the sandbox outlived it"
    assert _children() == [], "the evaluator has a child left"
    assert result.seconds < limits.timeout + 2.0
    return result


def test_extract_code():
    assert extract_code("a\n```python\nx = 1\n```\nb\n```\ny = 2\n```") == "x = 1"  # the first block
    assert extract_code("```\n\nx = 1\n\n```") == "x = 1"
    assert extract_code("  def f():\n    return 1\n") == "def f():\n    return 1"  # no block: the whole answer


def test_prompt_imports():
    assert prompt_imports(PROMPT) == "from typing import List\nimport math"
    assert prompt_imports("# a comment\n\nimport re\ndef f():\n    import os\n") == "import re"


def test_right_answer_passes():
    program = humaneval_program(PROMPT, RIGHT, TEST, "total")
    assert program.endswith("check(total)") and program.startswith("from typing import List\nimport math\n\n")
    result = _run(program)
    assert result.passed and result.reason == "passed" and result.error is None


def test_wrong_answer_fails_on_the_assertion():
    result = _run(humaneval_program(PROMPT, WRONG, TEST, "total"))
    assert not result.passed and result.reason == "failed" and result.error == "AssertionError"
    assert "assert candidate([1, 2]) == 3" in result.stderr


def test_exception_text_and_output():
    result = _run("print('out')\nraise ValueError('bad value')")
    assert (result.reason, result.error, result.stdout) == ("failed", "ValueError: bad value", "out\n")


@pytest.mark.parametrize("guard", GUARDS)
def test_infinite_loop_is_killed_at_the_deadline(guard):
    result = _run("while True:\n    pass", Limits(timeout=0.5), guard=guard)
    assert result.reason == "timeout" and 0.5 <= result.seconds < 1.5


@pytest.mark.parametrize("guard", GUARDS)
def test_cpu_time_limit(guard):
    result = _run("while True:\n    pass", Limits(timeout=20, cpu_seconds=1), guard=guard)
    assert result.reason == "cpu" and result.seconds < 5


@pytest.mark.parametrize("guard", GUARDS)
@pytest.mark.parametrize("bomb", ["x = []\nwhile True:\n    x.append(' ' * 2**20)", "x = bytearray(2**31)"])
def test_memory_bomb(guard, bomb):
    result = _run(bomb, Limits(memory_bytes=128 << 20), guard=guard)
    assert result.reason == "memory" and result.error.startswith("MemoryError")


def test_file_size_limit():
    result = _run("open('big', 'wb').write(b'x' * 2**21)", Limits(file_bytes=1 << 20), guard=False)
    assert result.reason == "failed" and "File too large" in result.error


COUNT_FORKS = """
import os, time
n = 0
for _ in range(100):
    try:
        pid = os.fork()
    except OSError as e:
        print(n, type(e).__name__)
        break
    if pid == 0:
        os.setsid()  # leave the process group: only the uid or the pid namespace still finds it
        time.sleep(60)
        os._exit(0)
    n += 1
"""


@pytest.mark.parametrize("namespaces", [True, False], ids=["namespaces", "no-namespaces"])
def test_fork_bomb_is_held_by_the_kernel(namespaces):
    _needs("RLIMIT_NPROC", _kernel_layers(namespaces))
    limits = Limits(processes=6)
    result = _run(COUNT_FORKS, limits, guard=False, namespaces=namespaces)
    forks, error = result.stdout.split()
    assert error == "BlockingIOError" and int(forks) < limits.processes, result.layers
    assert any(layer.startswith("RLIMIT_NPROC") for layer in result.layers)


@pytest.mark.parametrize("guard", GUARDS)
def test_fork_bomb_is_contained(guard):
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except BlockingIOError:\n        pass"
    result = _run(bomb, Limits(timeout=1.0), guard=guard)
    if guard:
        assert result.reason == "failed" and result.error.startswith("PermissionError: sandbox: os.fork")
    else:
        assert result.reason == "timeout"


def test_subprocess_is_refused():
    result = _run("import subprocess\nsubprocess.run(['true'])")
    assert result.reason == "failed" and "starting a process is not allowed" in result.error


@pytest.mark.parametrize("guard", GUARDS)
def test_write_outside_the_folder_is_refused(guard, tmp_path):
    if not guard and not any("read-only mounts" in x or "uid" in x for x in _kernel_layers()):
        pytest.skip(f"the kernel here keeps no folder read-only (layers: {', '.join(_kernel_layers())})")
    target = tmp_path / "escaped.txt"
    result = _run(f"open('inside.txt', 'w').write('ok')\nopen({str(target)!r}, 'w').write('x')", guard=guard)
    assert result.reason == "failed" and not target.exists()
    if guard:
        assert "writing outside the working folder is not allowed" in result.error
    elif "read-only mounts but the working folder" in result.layers:
        assert "Read-only file system" in result.error
    else:  # an unprivileged uid that owns nothing here
        assert result.uid is not None and "Permission denied" in result.error


@pytest.mark.parametrize("guard", GUARDS)
def test_socket_connection_is_refused(guard):
    if not guard:
        _needs("network namespace", _kernel_layers())
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        result = _run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).send(b'x')",
                      guard=guard)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected
    assert result.reason == "failed"
    if guard:
        assert "network access is not allowed" in result.error
    else:
        assert "network namespace" in result.layers and "Network is unreachable" in result.error


@pytest.mark.parametrize("namespaces", [True, False], ids=["namespaces", "no-namespaces"])
def test_the_evaluator_cannot_be_signalled(namespaces):
    decoy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        result = execute(f"import os\nos.kill({decoy.pid}, 9)", guard=False, namespaces=namespaces)
        time.sleep(0.05)
        if "pid namespace" in result.layers or result.uid is not None:
            assert decoy.poll() is None, "the sandbox killed a process of the evaluator"
            assert result.reason == "failed" and result.error.startswith(("ProcessLookupError", "PermissionError"))
        assert sandbox_processes(result.pid, result.uid, result.mark) == []
    finally:
        decoy.send_signal(signal.SIGKILL)
        decoy.wait()
