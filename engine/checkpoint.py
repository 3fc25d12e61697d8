"""Checkpoints in the nanochat layout (SPEC §10), written atomically and validated on load.

A checkpoint at step s in `checkpoint_dir` (by convention `<base>/base_checkpoints/d{depth}/`) is
    model_{s:06d}.pt            the model state_dict (SPEC §2 keys)
    optim_{s:06d}_rank{r}.pt    each rank's optimizer state
    meta_{s:06d}.json           step, model_config, user_config, loader and loop state
Each file goes to a temporary name and is renamed into place, and meta is written last, so a save
interrupted at any point leaves the previous checkpoints intact and never a half-written file
under a final name.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import torch
from tritonchat.engine.gpt import GPT, GPTConfig, build_model
from tritonchat.engine.paths import atomic_write


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, or does not match the model it is loaded into."""


def model_path(checkpoint_dir, step: int) -> Path:
    return Path(checkpoint_dir) / f"model_{step:06d}.pt"


def meta_path(checkpoint_dir, step: int) -> Path:
    return Path(checkpoint_dir) / f"meta_{step:06d}.json"


def optim_path(checkpoint_dir, step: int, rank: int = 0) -> Path:
    return Path(checkpoint_dir) / f"optim_{step:06d}_rank{rank}.pt"


def save_checkpoint(checkpoint_dir, step: int, model_state: dict | None, optim_state: dict | None, meta: dict | None,
                    rank: int = 0) -> None:
    """Write whichever parts are given (rank 0 passes model and meta, every rank its optimizer shard)."""
    if optim_state is not None:
        atomic_write(optim_path(checkpoint_dir, step, rank), lambda f: torch.save(optim_state, f))
    if model_state is not None:
        atomic_write(model_path(checkpoint_dir, step), lambda f: torch.save(model_state, f))
    if meta is not None:
        text = json.dumps(meta, indent=2, default=str).encode()
        atomic_write(meta_path(checkpoint_dir, step), lambda f: f.write(text))


def _steps_on_disk(d: Path) -> list[int]:
    """Every step with a meta file in `d`, largest first."""
    steps = [int(m.group(1)) for p in d.glob("meta_*.json") if (m := re.fullmatch(r"meta_(\d+)\.json", p.name))]
    return sorted(steps, reverse=True)


def is_complete(checkpoint_dir, step: int) -> bool:
    """Whether the checkpoint at `step` can be loaded: its meta file parses and has a model_config, and its model
    file is whole (a `torch.save` zip archive with its closing directory in place; a file in the legacy pre-zip
    format is taken as whole). Reads the meta file and the model file's ends, never the weights."""
    try:
        load_meta(checkpoint_dir, step)
        path = model_path(checkpoint_dir, step)
        with open(path, "rb") as f:
            head = f.read(4)
        if head[:1] == b"\x80":  # a pickle: the legacy format, nothing cheap to check
            return True
        return head == b"PK\x03\x04" and zipfile.is_zipfile(path)
    except (CheckpointError, OSError):
        return False


def find_last_step(checkpoint_dir) -> int:
    """The largest step whose checkpoint is complete (`is_complete`); later, incomplete ones are passed over."""
    d = Path(checkpoint_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"checkpoint directory {d} does not exist")
    for step in _steps_on_disk(d):
        if is_complete(d, step):
            return step
    raise FileNotFoundError(f"no complete checkpoint (a readable meta_*.json with its model_*.pt) in {d}")


def find_latest_checkpoint(root) -> tuple[Path, int]:
    """The newest complete checkpoint in the sub-folders of `root` (by convention `<base>/base_checkpoints`):
    of each folder's last complete step (`find_last_step`), the one whose meta file was written last (on a tie
    the larger step, then the folder name). Folders without a complete checkpoint, such as the empty or partial
    `d4/` of an aborted run, are passed over. Returns (folder, step); FileNotFoundError when there is none."""
    root = Path(root)
    found = []
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        if not d.is_dir() or d.name.startswith("."):
            continue
        try:
            step = find_last_step(d)
        except FileNotFoundError:
            continue
        found.append((meta_path(d, step).stat().st_mtime_ns, step, d.name, d))
    if not found:
        raise FileNotFoundError(f"no complete checkpoint in any folder of {root}")
    _, step, _, d = max(found)
    return d, step


def _torch_load(path: Path, device) -> dict:
    if not path.exists():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():  # torch.load would blame the file
        raise ValueError(f"cannot load {path} onto {device}: CUDA is not available on this machine")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated zip, wrong format, ...
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"cannot read checkpoint file {path} (truncated or corrupt?): {first_line}") from e


def load_meta(checkpoint_dir, step: int) -> dict:
    path = meta_path(checkpoint_dir, step)
    if not path.exists():
        raise CheckpointError(f"checkpoint metadata {path} does not exist")
    try:
        meta = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint metadata {path} is not valid JSON: {e}") from e
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint metadata {path}: {e.strerror}") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict):
        raise CheckpointError(f"checkpoint metadata {path} lacks a model_config")
    return meta


def load_checkpoint(checkpoint_dir, step: int, device="cpu", load_optimizer: bool = False, rank: int = 0):
    """Returns (model_state, optim_state or None, meta). Raises CheckpointError on a bad checkpoint."""
    meta = load_meta(checkpoint_dir, step)
    model_state = _torch_load(model_path(checkpoint_dir, step), device)
    optim_state = _torch_load(optim_path(checkpoint_dir, step, rank), device) if load_optimizer else None
    return model_state, optim_state, meta


def config_from_meta(model_config: dict) -> GPTConfig:
    """GPTConfig from a saved model_config, patching fields older checkpoints lack."""
    cfg = dict(model_config)
    cfg.setdefault("window_pattern", "L")  # before sliding windows every layer was full-context
    known = GPTConfig.__dataclass_fields__.keys()
    unknown = set(cfg) - set(known)
    if unknown:
        raise CheckpointError(f"model_config has unknown fields {sorted(unknown)}")
    try:
        return GPTConfig(**cfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"invalid model_config {cfg}: {e}") from e


def patch_state_dict(state: dict, model: GPT) -> dict:
    """Strip torch.compile's `_orig_mod.` prefix, add lambdas older checkpoints lack, then check keys
    and shapes against the model with one clear error listing every difference."""
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    L = model.config.n_layer
    state.setdefault("resid_lambdas", torch.ones(L))
    state.setdefault("x0_lambdas", torch.zeros(L))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if wrong:
            parts.append(f"shape mismatches {wrong[:8]}")
        raise CheckpointError("checkpoint does not match the model: " + "; ".join(parts))
    return state


def load_model(checkpoint_dir, step: int | None = None, device="cpu", impl: str = "torch",
               compute_dtype: torch.dtype | None = None) -> tuple[GPT, dict]:
    """Build the model a checkpoint describes and load its weights. Returns (model, meta)."""
    if step is None:
        step = find_last_step(checkpoint_dir)
    model_state, _, meta = load_checkpoint(checkpoint_dir, step, device=device)
    config = config_from_meta(meta["model_config"])
    model = build_model(config, device=device, impl=impl, compute_dtype=compute_dtype, init=False)
    model.load_state_dict(patch_state_dict(model_state, model), strict=True)
    return model, meta
