"""What every benchmark script shares: timing, the environment record, and writing results.

A result is a JSON file under bench/results/ named `<name>_<device>_<UTC time>.json`, holding the
environment (device, clocks, power, temperature, driver, torch/triton versions, git commit) and the
script's measurements. Only scripts write these files.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import subprocess
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=Path(__file__).parent, capture_output=True,
                               text=True, timeout=10).stdout.strip()
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
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": git_commit(),
        "time_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
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


def bench_ms(fn, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of `fn()` (triton.testing.do_bench, which synchronizes and flushes the L2)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def cpu_ms(fn, reps: int = 3) -> float:
    """Median wall milliseconds of `fn()` over `reps` calls: the CPU (--dry-run) stand-in for bench_ms."""
    import time

    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| in fp32 (NaN or inf in got gives inf)."""
    import math

    g, r = got.detach().float(), ref.detach().float()
    err = ((g - r).norm() / r.norm().clamp_min(1e-30)).item()
    return err if math.isfinite(err) else math.inf


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def write_result(name: str, payload: dict, results_dir: Path | None = None) -> Path:
    """Write {"name", "env", **payload} to results_dir/<name>_<device>_<time>.json and return the path."""
    env = environment()
    device = "".join(c if c.isalnum() else "-" for c in env["device"]).strip("-").lower()
    stamp = env["time_utc"].replace(":", "").replace("-", "")
    out_dir = Path(results_dir or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}_{device}_{stamp}.json"
    path.write_text(json.dumps({"name": name, "env": env, **payload}, indent=2, default=str))
    return path


def load_liger(module: str):
    """Import a Liger-Kernel module lazily; None when the package is missing."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        return None
