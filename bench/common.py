"""What every benchmark shares: the one clock, the environment record, result files, and the optional comparators.

The kernel cases (`pytest bench/ --benchmark`, `python -m bench.suite`), the training step (`bench.train_step`) and
the engine (`bench.infer`) all time through `median_seconds` / `Marks` and write through `write_result`:

    a result is a JSON file under bench/results/ named `<name>_<device>_<UTC time>.json`, holding the environment
    (device, clocks, power, temperature, driver, torch/triton versions, git commit) and the measurements.

Importing this module loads nothing but the standard library; torch, triton and the comparators are imported
inside the functions that need them.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
# In a checkout, results are committed under bench/results/; an installed package writes them to ./bench-results
# (relative: the working directory when a file is written), never into site-packages.
RESULTS_DIR = _HERE / "results" if (_HERE.parent / "pyproject.toml").is_file() else Path("bench-results")

# ---- the GPT-2 bar (SPEC §12): the reference speedrun's published figures, not measurements of ours ----------
RECORD_HOURS = 1.65  # nanochat d24, ratio 8, fp8 matmuls, 8xH100, March 2026 leaderboard
RECORD_GPUS = 8
RECORD_TOK_S_PER_GPU = 122.9e3
RECORD_CORE = 0.256525  # GPT-2 (1.5B) on DCLM CORE
RECORD_LABEL = "nanochat reference: d24, ratio 8, fp8 matmuls, 8xH100, March 2026"


# ---- the environment record ------------------------------------------------------------------------------------
def git_commit() -> str:
    here = Path(__file__).parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def gpu_telemetry(index: int = 0) -> dict:
    """Device name, SM/memory clocks, power, temperature and driver from nvidia-ml-py (empty without a GPU)."""
    try:
        import pynvml
    except ImportError:
        return {}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return {}
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(h)
        driver = pynvml.nvmlSystemGetDriverVersion()
        return {
            "name": name.decode() if isinstance(name, bytes) else name,
            "driver": driver.decode() if isinstance(driver, bytes) else driver,
            "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
            "mem_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
            "max_sm_clock_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
            "power_w": pynvml.nvmlDeviceGetPowerUsage(h) / 1000,
            "temperature_c": pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
        }
    except pynvml.NVMLError as e:
        return {"nvml_error": str(e)}
    finally:
        pynvml.nvmlShutdown()


def environment() -> dict:
    import torch

    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": git_commit(),
        "time_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        env["gpu"] = gpu_telemetry(torch.cuda.current_device())
    else:
        env["device"] = "cpu"
    return env


# ---- the clock -------------------------------------------------------------------------------------------------
def sync(device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, device, *, warmup: int = 2, rep_ms: float = 100.0, cpu_reps: int = 3) -> float:
    """Median seconds of one ``fn()`` call, after ``warmup`` untimed calls (compilation, autotuning, caches).

    CUDA: triton.testing.do_bench (events around each call, the L2 flushed between calls, about ``rep_ms`` of
    calls). CPU: the median wall time of ``cpu_reps`` calls (what a --dry-run can measure)."""
    import torch

    for _ in range(warmup):
        fn()
    sync(device)
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=0, rep=rep_ms, return_mode="median")) / 1e3
    times = []
    for _ in range(max(1, cpu_reps)):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return median(times)


class Marks:
    """Time the regions of one long call (a training step): ``mark()`` at each boundary, then ``intervals()``
    gives the seconds between consecutive marks. CUDA events on a GPU (one synchronize, in ``intervals``),
    wall time on CPU."""

    def __init__(self, device) -> None:
        import torch

        self._cuda = torch.device(device).type == "cuda"
        self._marks: list = []

    def mark(self) -> None:
        if self._cuda:
            import torch

            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._marks.append(ev)
        else:
            self._marks.append(time.perf_counter())

    def intervals(self) -> list[float]:
        if self._cuda:
            import torch

            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self._marks, self._marks[1:])]
        return [b - a for a, b in zip(self._marks, self._marks[1:])]


def median(xs) -> float:
    s = sorted(xs)
    if not s:
        raise ValueError("median of no values")
    return s[len(s) // 2] if len(s) % 2 else 0.5 * (s[len(s) // 2 - 1] + s[len(s) // 2])


def rel_err(got, ref) -> float:
    """||got - ref|| / ||ref|| in fp32 (NaN or inf in got gives inf)."""
    g, r = got.detach().float(), ref.detach().float()
    err = ((g - r).norm() / r.norm().clamp_min(1e-30)).item()
    return err if math.isfinite(err) else math.inf


# ---- result files ------------------------------------------------------------------------------------------------
def write_result(name: str, payload: dict, results_dir: Path | None = None) -> Path:
    """Write {"name", "env", **payload} to results_dir/<name>_<device>_<time>.json (atomically) and return the
    path."""
    env = environment()
    device = "".join(c if c.isalnum() else "-" for c in env["device"]).strip("-").lower()
    stamp = env["time_utc"].replace(":", "").replace("-", "")
    out_dir = Path(results_dir or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}_{device}_{stamp}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"name": name, "env": env, **payload}, indent=2, default=str))
    os.replace(tmp, path)
    return path


def load_json(path: Path) -> dict:
    """A result file as a dict; ValueError with the path when it is not a JSON object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read a JSON object ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a JSON object, got {type(data).__name__}")
    return data


# ---- optional pieces ---------------------------------------------------------------------------------------------
def optional_attr(module: str, name: str):
    """``module.name``, or None when that module or name does not exist (an op that has not landed yet).
    A module that exists but fails to import raises, rather than passing for a missing op."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            return None
        raise
    return getattr(mod, name, None)


def load_liger(module: str):
    """Import a Liger-Kernel module lazily; None when the package is missing."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None
