"""pytest settings for bench/: the ``--benchmark`` switch, the ``kbench`` timing fixture, ratios and telemetry.

    pytest bench/                    every case once at a tiny size, kernels in the Triton interpreter (CPU smoke)
    pytest bench/ --benchmark        on a CUDA GPU: pytest-benchmark times every case at the speedrun shapes

Without a GPU, ``--benchmark`` skips every timed case with the reason (timing needs a GPU) and says so at the end
instead of producing numbers. Timed runs record GB/s or TFLOP/s, the fraction of the measured ceiling and the
speedup over every other implementation of the same case in ``extra_info``, and every saved JSON carries the
environment (device, clocks, power, temperature, driver, versions, commit) under ``"tritonchat"``.
Saved runs go to bench/results/pytest-benchmark/ unless ``--benchmark-storage`` says otherwise (bench/README.md).
"""

import os
import sys

# Triton picks interpreter or compiler when a kernel is defined (at import), so this comes first. A timed run
# must use the compiler: with --benchmark the interpreter stays off unless the caller set it (then the timed
# cases are skipped with that reason).
if "--benchmark" not in sys.argv[1:]:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from tritonchat.bench.cases import BenchState, KernelBench  # noqa: E402

STORAGE = Path(__file__).resolve().parent / "results" / "pytest-benchmark"
_DEFAULT_STORAGE = "file://./.benchmarks"  # pytest-benchmark's own default
_STATE = pytest.StashKey()


def pytest_addoption(parser):
    parser.addoption(
        "--benchmark", action="store_true", default=False,
        help="time the bench/ cases with pytest-benchmark at the speedrun shapes (needs a CUDA GPU); "
             "without it every case runs once at a tiny size as a smoke test",
    )


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark reads its options (its pytest_configure is trylast)
def pytest_configure(config):
    state = config.stash[_STATE] = BenchState(bool(config.getoption("benchmark")))
    if not state.timing:
        return
    if not config.pluginmanager.hasplugin("benchmark"):
        raise pytest.UsageError("--benchmark needs pytest-benchmark: pip install -e '.[dev]'")
    import torch

    if not torch.cuda.is_available():
        state.skip_reason = ("timing needs a CUDA GPU and none is visible here; run `pytest bench/` without "
                             "--benchmark for the CPU smoke test")
    elif os.environ.get("TRITON_INTERPRET") == "1":
        state.skip_reason = ("TRITON_INTERPRET=1 would time the Triton interpreter; run "
                             "`TRITON_INTERPRET=0 pytest bench/ --benchmark`")
    elif getattr(config.option, "benchmark_storage", None) == _DEFAULT_STORAGE:
        config.option.benchmark_storage = STORAGE.as_uri()  # saved runs live with the other results


def pytest_collection_modifyitems(config, items):
    reason = config.stash[_STATE].skip_reason
    if reason:
        for item in items:
            if "kbench" in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.skip(reason=reason))


class _BenchmarkClock:
    """The suite's clock under pytest: pytest-benchmark's fixture times the step (synchronized), and the case's
    figures go into that benchmark's extra_info (saved with the run)."""

    def __init__(self, request, device) -> None:
        self._request, self._device, self._bench = request, device, None

    def __call__(self, step, group):
        from tritonchat.bench.common import sync

        bench = self._bench = self._request.getfixturevalue("benchmark")
        bench.group = group
        bench(lambda: (step(), sync(self._device)))
        stats = getattr(bench, "stats", None)  # None under --benchmark-disable: run once, untimed
        return None if stats is None else float(stats.stats.median)

    def record(self, extra) -> None:
        self._bench.extra_info.update(extra)


@pytest.fixture
def kbench(request) -> KernelBench:
    state = request.config.stash[_STATE]
    device = "cuda" if state.timing else "cpu"
    return KernelBench(state, _BenchmarkClock(request, device), device=device)


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    import torch

    machine_info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Add the environment record and the ceilings, and complete every case's speedups over all the others."""
    from tritonchat.bench.common import environment

    config.stash[_STATE].complete_json(output_json, environment())


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    state = config.stash.get(_STATE, None)
    if state is None or not state.timing:
        return
    tr = terminalreporter
    if state.skip_reason:
        tr.write_line(f"bench: nothing was timed: {state.skip_reason}", yellow=True, bold=True)
        return
    if not state.rows:
        return
    from tritonchat.bench.common import write_result

    path = write_result("kernels", state.payload())  # the same result file as `python -m bench.suite` writes
    tr.write_sep("-", "tritonchat: rate, fraction of ceiling, speedup of each implementation over the others")
    for line in state.summary_lines():
        tr.write_line(line)
    tr.write_line(f"wrote {path}")
