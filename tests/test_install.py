"""A normal, non-editable install: the wheel beside Hugging Face's `kernels`, every workflow from outside the checkout.

Builds the wheel from this checkout, installs it into a fresh virtual environment (torch and the other
dependencies come from the running environment, so nothing large is downloaded), installs Hugging Face's
`kernels` distribution beside it (from PyPI; skipped when the index cannot be reached), then, from a folder
outside the checkout and through the installed commands only: trains a tokenizer, runs 3 training steps, gets a
chat answer, a CORE score on a tiny bundle and a dry run of the benchmark suite. Nothing of ours may sit at the
top level of site-packages.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _run(cmd, cwd, env, timeout=600, check=True):
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("install")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET", "VIRTUAL_ENV")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", TRITONCHAT_BASE_DIR=str(tmp / "base"), OMP_NUM_THREADS="1")
    dist = tmp / "dist"
    try:  # the running environment's setuptools when it has one (no download), else pip's isolated build
        import setuptools  # noqa: F401

        isolation = ["--no-build-isolation"]
    except ImportError:
        isolation = []
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", dist, ROOT], tmp, env)
    wheel = next(dist.glob("tritonchat-*.whl"))
    prefix = tmp / "venv"
    venv.EnvBuilder(with_pip=True).create(prefix)
    py = prefix / "bin" / "python"
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp, env).stdout.strip())
    # The running environment's packages (torch, triton, numpy, ...) behind the new venv's own, without its .pth
    # files (so an editable install of this checkout there stays invisible).
    (site / "_parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], tmp, env)
    hf = _run([py, "-m", "pip", "install", "-q", "--no-deps", "kernels"], tmp, env, timeout=300, check=False)
    return {"tmp": tmp, "env": env, "bin": prefix / "bin", "py": py, "site": site, "hf": hf.returncode == 0,
            "hf_log": hf.stderr[-500:]}


def test_nothing_of_ours_at_the_top_level_of_site_packages(installed):
    site = installed["site"]
    assert (site / "tritonchat" / "kernels" / "_dispatch.py").is_file()
    for name in ("scripts", "bench", "engine", "train", "tasks"):
        assert not (site / name).exists(), f"{name} at the top level of site-packages"
    if not installed["hf"]:
        pytest.skip(f"Hugging Face's kernels could not be installed here: {installed['hf_log']}")
    hf_init = (site / "kernels" / "__init__.py").read_text()
    assert "_dispatch" not in hf_init and "tritonchat" not in hf_init  # theirs, untouched by ours


def _write_bundle(root: Path) -> None:
    """A CORE eval bundle of three 0-shot tasks, one of each type, two items each."""
    import json

    (root / "eval_data").mkdir(parents=True)
    tasks = {"mc": ("multiple_choice", [{"query": "The sky is", "choices": ["blue", "loud"], "gold": 0}] * 2),
             "sch": ("schema", [{"context_options": ["Ann", "Bob"], "continuation": "sang.", "gold": 1}] * 2),
             "lm": ("language_modeling", [{"context": "One, two,", "continuation": " three"}] * 2)}
    config = "icl_tasks:\n" + "".join(f"- label: {k}\n  dataset_uri: {k}.jsonl\n  num_fewshot: [0]\n"
                                      f"  icl_task_type: {t}\n" for k, (t, _) in tasks.items())
    (root / "core.yaml").write_text(config)
    (root / "eval_meta_data.csv").write_text("Eval Task,Random baseline\nmc,50\nsch,50\nlm,0\n")
    for k, (_, items) in tasks.items():
        (root / "eval_data" / f"{k}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))


def test_every_workflow_runs_from_outside_the_checkout(installed):
    tmp, env, b = installed["tmp"], installed["env"], installed["bin"]
    work = tmp / "elsewhere"
    work.mkdir()
    _run([b / "tritonchat-tok-train", "--vocab-size", "512", "--max-chars", "300000"], work, env)
    assert (tmp / "base" / "tokenizer" / "tokenizer.pkl").is_file()
    _run([b / "tritonchat-train", "--depth=1", "--max-seq-len=64", "--device-batch-size=2", "--num-iterations=3",
          "--eval-tokens=256", "--sample-every=-1", "--log-every=1"], work, env)
    assert list((tmp / "base" / "base_checkpoints" / "d1").glob("model_000003.pt"))
    chat = _run([b / "tritonchat-chat", "-p", "Hello", "--max-tokens", "4", "--temperature", "0"], work, env)
    assert chat.stdout.strip() or chat.stderr  # an answer (a tiny model may say little) and the checkpoint line
    assert "model_000003.pt" in chat.stderr
    _write_bundle(tmp / "base" / "eval_bundle")
    _run([b / "tritonchat-base-eval", "--max-per-task", "2", "--device", "cpu"], work, env)
    assert (tmp / "base" / "base_checkpoints" / "d1" / "core_000003_max2.json").is_file()
    bench = _run([b / "tritonchat-bench", "--dry-run", "--parts", "check", "--quiet"], work, env)
    assert "within tolerance" in bench.stdout
    helpme = _run([installed["py"], "-m", "tritonchat.train", "--help"], work, env)
    assert "--depth" in helpme.stdout
    dl = _run([b / "tritonchat-download-data", "--help"], work, env)
    assert dl.stdout.startswith("usage: tritonchat-download-data") and "--num-files" in dl.stdout
    assert not any(p.name.startswith("bench-results") for p in work.iterdir())  # a dry run writes nothing


def test_uninstalling_the_other_kernels_leaves_ours(installed):
    if not installed["hf"]:
        pytest.skip("Hugging Face's kernels was not installed")
    _run([installed["py"], "-m", "pip", "uninstall", "-y", "-q", "kernels"], installed["tmp"], installed["env"])
    assert (installed["site"] / "tritonchat" / "kernels" / "__init__.py").is_file()
    r = _run([installed["py"], "-c", "import tritonchat.kernels as k; print(k.rms_norm.__name__)"], installed["tmp"],
             installed["env"])
    assert r.stdout.strip() == "rms_norm"


def test_every_console_command_names_a_main(monkeypatch, capsys):
    """Each [project.scripts] entry is a function of tritonchat.commands whose module has a main; an interrupt
    while a command's module is still importing is one line and exit 130."""
    import re

    from tritonchat import commands

    text = (ROOT / "pyproject.toml").read_text()
    entries = re.findall(r'^(tritonchat-[\w-]+) = "tritonchat\.commands:(\w+)"$', text, flags=re.M)
    assert len(entries) >= 7
    for name, func in entries:
        assert callable(getattr(commands, func)), name

    def interrupted(module):
        raise KeyboardInterrupt

    monkeypatch.setattr(commands.importlib, "import_module", interrupted)
    assert commands.train() == 130
    assert capsys.readouterr().err == "tritonchat-train: interrupted\n"
