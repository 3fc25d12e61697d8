"""What `train` checks and resolves before it builds anything: the device, dtype and impl (a user mistake is a
ValueError naming the flag), the tokenizer, the GPU's peak FLOP/s, and the two warnings of a small machine
(cores already busy, a token horizon of many epochs). Nothing runs at import."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tritonchat.engine.tokenizer import Tokenizer, load_token_bytes
from tritonchat.kernels import resolve_impl

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
MAX_EPOCHS = 4  # passes over the training data beyond which a warning is printed


def resolve_device(name: str) -> torch.device:
    """"auto": CUDA when available, else the CPU. A device this machine lacks is a user error (ValueError)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device={name}, but this machine has no CUDA device (use --device=cpu or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device={name}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}
    if name not in dtypes:
        raise ValueError(f"--dtype must be one of auto, {', '.join(dtypes)}; got {name!r}")
    return dtypes[name]


def resolve_embedding_dtype(name: str) -> torch.dtype:
    """Storage of the embedding tables (and their AdamW moments). "auto": bf16 on every device, the recipe's storage
    on a GPU (the tables are lookups; their updates tolerate bf16), which on a CPU halves the largest part of the
    training state: 2 of depth 12's 4.2 GB in fp32."""
    if name == "auto":
        return torch.bfloat16
    dtypes = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}
    if name not in dtypes:
        raise ValueError(f"--embedding-dtype must be one of auto, {', '.join(dtypes)}; got {name!r}")
    return dtypes[name]


LARGE_CPU_RUN = 2 << 30  # bytes of training state + activations from which a CPU run returns freed memory at once


def cpu_footprint(model, activation_bytes: int) -> int:
    """About what training `model` holds at its peak: weights, gradients and two moments' worth of optimizer state
    (16 bytes a parameter at most), plus the activations autograd keeps."""
    return 16 * sum(p.numel() for p in model.parameters()) + activation_bytes


def release_freed_memory_if_large(model, device: torch.device, activation_bytes: int = 0) -> None:
    """`release_freed_memory` for a CPU run whose `cpu_footprint` passes LARGE_CPU_RUN."""
    if device.type == "cpu" and cpu_footprint(model, activation_bytes) > LARGE_CPU_RUN:
        release_freed_memory()


def release_freed_memory() -> None:
    """On glibc, serve allocations of 1 MiB and more by mmap, so a freed activation or optimizer temporary goes
    back to the system at once: a CPU step frees and reallocates GBs of mid-sized tensors, which the default
    heap keeps (depth 12: 1.3 GB resident beyond the live tensors). The page faults cost time (a fifth of a
    depth-4 step), so the commands that train on a CPU make this process setting only for a run whose
    `cpu_footprint` passes LARGE_CPU_RUN; never at import."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not hasattr(os, "sched_getaffinity"):  # Linux with glibc only
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (fixed: no dynamic raise)
    except (OSError, AttributeError):
        pass


def peak_flops(device: torch.device) -> float | None:
    """bf16 dense peak of one GPU (SPEC §5), or None where unknown (CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def load_tokenizer(base_dir: Path) -> tuple[Tokenizer, torch.Tensor]:
    tok_dir = base_dir / "tokenizer"
    if not (tok_dir / "tokenizer.pkl").exists():
        raise FileNotFoundError(f"no tokenizer in {tok_dir}: train one first with `python -m scripts.tok_train`")
    return Tokenizer.from_directory(tok_dir), load_token_bytes(tok_dir)


def cpu_contention(threads: int) -> str | None:
    """A one-line warning when torch's `threads` exceed the cores this process may use, or other processes
    already keep those cores busy (two torch processes on two cores slow each other several-fold)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if threads > cores:
        return (f"warning: torch runs {threads} threads on {cores} available cores; oversubscribed threads slow "
                f"every step (set OMP_NUM_THREADS={cores})")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if cores - load < threads - 0.5:
        return (f"warning: the load average is {load:.1f} on {cores} cores: other processes are using the cores "
                f"torch's {threads} threads need; expect steps several times slower until they finish")
    return None


def epochs_warning(horizon_tokens: int, train_tokens: int) -> str | None:
    """A one-line warning when the token horizon is more than MAX_EPOCHS passes over the training split: up to
    ~4 epochs, repeated tokens train almost as well as fresh ones; beyond, returns fade fast (Muennighoff et al.
    2023, "Scaling Data-Constrained Language Models")."""
    epochs = horizon_tokens / max(train_tokens, 1)
    if epochs <= MAX_EPOCHS:
        return None
    return (f"warning: {horizon_tokens:,} training tokens are about {epochs:,.0f} passes over the training split "
            f"(~{train_tokens:,} tokens); beyond ~{MAX_EPOCHS} repeated data stops paying: add data (--data), or "
            f"lower --target-param-data-ratio or --num-iterations")


COMPILE_MIN_STEPS = 50  # --compile=auto: a CPU run this long pays back its compile time (bench/cpu.py)


def cxx_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU backend would use: $CXX, else g++, clang++ or c++ on the PATH."""
    import shutil

    return os.environ.get("CXX") or next((c for c in ("g++", "clang++", "c++") if shutil.which(c)), None)


def resolve_compile(mode: str, impl: str, device: torch.device, steps: int) -> tuple[bool, str | None]:
    """Whether to torch.compile the reference path, and a note for the banner (None: nothing to say).

    Only impl="torch" is ever compiled (the Triton path stays as it is). auto: on a CPU, for runs of at least
    COMPILE_MIN_STEPS steps: compiling costs about a minute on two cores and each step then runs faster
    (bench/cpu.py measures both)."""
    if impl != "torch":
        note = "--compile=on applies to the reference path (impl=torch); the Triton kernels run uncompiled"
        return False, note if mode == "on" else None
    if mode == "off" or (mode == "auto" and (device.type != "cpu" or steps < COMPILE_MIN_STEPS)):
        return False, None
    if device.type == "cpu" and not cxx_compiler():  # inductor's CPU code is C++
        if mode == "on":
            raise ValueError("--compile=on needs a C++ compiler for torch.compile on a CPU (g++ or clang++ on the "
                             "PATH, or $CXX); install one or use --compile=off")
        return False, "no C++ compiler found (g++, clang++ or $CXX): the reference path runs uncompiled"
    why = "set" if mode == "on" else f"auto: the reference path on a CPU, {steps} >= {COMPILE_MIN_STEPS} steps"
    return True, (f"torch.compile of the reference path ({why}; --compile=off disables it): the first training "
                  f"step and the first validation include the compilation")


def check_impl(impl: str, device: torch.device) -> str:
    """The run's impl, resolved once; --impl=triton where no kernel can run is a user error."""
    resolved = resolve_impl(impl, device)
    if resolved == "triton" and resolve_impl("auto", device) != "triton":
        raise ValueError(f"--impl=triton needs a CUDA device (or TRITON_INTERPRET=1 to run the kernels in the "
                         f"Triton interpreter on the CPU); this run is on {device}")
    return resolved
