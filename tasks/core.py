"""The CORE metric of the DCLM paper (arXiv 2406.11794), computed as the nanochat reference computes it.

The eval bundle (`<base>/eval_bundle/`) holds `core.yaml` (the 22 in-context tasks: label, type, few-shot count,
continuation delimiter, JSONL file), `eval_meta_data.csv` (each task's random-guess accuracy, in percent) and
`eval_data/` (one JSONL file per task). For each task:

- the items are shuffled with `random.Random(1337)`, then cut to `max_per_task` when that is positive;
- item `idx` gets `num_fewshot` examples drawn with `random.Random(1234 + idx).sample` from the other items'
  indices (in the shuffled, cut list), in the drawn order;
- the prompts (below) are tokenized with BOS prepended. multiple_choice: one prompt per choice, the continuation
  being what follows the choices' common token prefix; schema: one prompt per context option, the continuation
  being their common token suffix; language_modeling: the prompt with its continuation, the continuation being
  what follows the tokens of the prompt without it;
- a sequence longer than `max_seq_len` keeps its last `max_seq_len` tokens;
- multiple_choice and schema are right when the lowest mean loss over the continuation's tokens is the gold
  option's; language_modeling when greedy (argmax) prediction reproduces every continuation token.

accuracy = the fraction right; centered = (accuracy - b) / (1 - b) with b = random baseline / 100;
CORE = the mean of the centered accuracies.
"""

from __future__ import annotations

import csv
import os
import random
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tritonchat.tasks.datafiles import iter_jsonl
from tritonchat.tasks.yaml_lite import parse_yaml
from tritonchat.train.dist import DistInfo, all_reduce_sum

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
BUNDLE_DIR_NAME = "eval_bundle"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
SHUFFLE_SEED = 1337  # the items' order, before --max-per-task cuts the list
FEWSHOT_SEED = 1234  # item idx draws its few-shot examples with Random(FEWSHOT_SEED + idx)
DEFAULT_DELIMITER = " "
DEFAULT_BATCH_TOKENS = 8192  # padded tokens per forward; the fp32 logits are batch_tokens x vocab x 4 bytes
SINGLE_PROCESS = DistInfo()  # the default: one process, no collectives


@dataclass(frozen=True)
class CoreTask:
    label: str
    task_type: str  # one of TASK_TYPES
    dataset_uri: str  # relative to <bundle>/eval_data
    num_fewshot: int
    continuation_delimiter: str
    random_baseline: float  # percent


@dataclass
class Example:
    """One item, tokenized: its rows (one per option; one for language modelling) and where each row's
    continuation lies, tokens [start, end)."""

    rows: list[list[int]]
    starts: list[int]
    ends: list[int]
    gold: int  # the right option (0 for language modelling)


# ----- the bundle: config, baselines, JSONL -----------------------------------------------------------------


def bundle_ready(bundle_dir: str | os.PathLike) -> bool:
    return (Path(bundle_dir) / "core.yaml").is_file()


def load_bundle(bundle_dir: str | os.PathLike) -> list[CoreTask]:
    """The tasks of `<bundle_dir>/core.yaml` with their baselines from `eval_meta_data.csv`, in config order.
    Raises FileNotFoundError or ValueError naming the file for a missing or malformed one."""
    bundle_dir = Path(bundle_dir)
    config_path, meta_path = bundle_dir / "core.yaml", bundle_dir / "eval_meta_data.csv"
    for path in (config_path, meta_path):
        if not path.is_file():
            raise FileNotFoundError(f"CORE eval bundle: no {path}")
    config = parse_yaml(config_path.read_text(encoding="utf-8"), str(config_path))
    entries = config.get("icl_tasks") if isinstance(config, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{config_path}: no icl_tasks list")
    baselines = _load_baselines(meta_path)
    tasks = []
    for n, entry in enumerate(entries):
        where = f"{config_path}: icl_tasks[{n}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} is not a mapping")
        for key in ("label", "icl_task_type", "dataset_uri", "num_fewshot"):
            if key not in entry:
                raise ValueError(f"{where} lacks {key}")
        label, task_type = str(entry["label"]), entry["icl_task_type"]
        if task_type not in TASK_TYPES:
            raise ValueError(f"{where} ({label}): icl_task_type {task_type!r} is not one of {', '.join(TASK_TYPES)}")
        shots = entry["num_fewshot"]
        shots = shots[0] if isinstance(shots, list) and shots else shots  # the config lists them; CORE uses the first
        if not isinstance(shots, int) or isinstance(shots, bool) or shots < 0:
            raise ValueError(f"{where} ({label}): num_fewshot must be a list of counts, got {entry['num_fewshot']!r}")
        if label not in baselines:
            raise ValueError(f"{meta_path}: no random baseline for task {label!r}")
        delimiter = entry.get("continuation_delimiter", DEFAULT_DELIMITER)
        tasks.append(CoreTask(label, task_type, str(entry["dataset_uri"]), shots,
                              "" if delimiter is None else str(delimiter), baselines[label]))
    return tasks


def _load_baselines(path: Path) -> dict[str, float]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"Eval Task", "Random baseline"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: needs the columns 'Eval Task' and 'Random baseline'")
        out = {}
        for row in reader:
            try:
                out[row["Eval Task"]] = float(row["Random baseline"])
            except (TypeError, ValueError):
                raise ValueError(f"{path}: line {reader.line_num}: random baseline "
                                 f"{row['Random baseline']!r} is not a number") from None
        return out


_REQUIRED = {"multiple_choice": ("query", "choices", "gold"), "schema": ("context_options", "continuation", "gold"),
             "language_modeling": ("context", "continuation")}


def load_task_data(bundle_dir: str | os.PathLike, task: CoreTask) -> list[dict]:
    """The task's items, in file order, each checked for the fields its type needs. ValueError names the file
    and line of a malformed one; FileNotFoundError the missing file."""
    path = Path(bundle_dir) / "eval_data" / task.dataset_uri
    if not path.is_file():
        raise FileNotFoundError(f"CORE task {task.label}: no {path}")
    items = []
    for lineno, item in iter_jsonl(path):
        _check_item(item, task.task_type, f"{path}:{lineno}")
        items.append(item)
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def _check_item(item, task_type: str, where: str) -> None:
    if not isinstance(item, dict):
        raise ValueError(f"{where}: an item must be a JSON object")
    missing = [k for k in _REQUIRED[task_type] if k not in item]
    if missing:
        raise ValueError(f"{where}: a {task_type} item needs {', '.join(missing)}")
    options = {"multiple_choice": "choices", "schema": "context_options"}.get(task_type)
    if options is None:
        return
    if not isinstance(item[options], list) or not item[options]:
        raise ValueError(f"{where}: {options} must be a non-empty list")
    gold = item["gold"]
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(item[options]):
        raise ValueError(f"{where}: gold must be an index into {options} (0..{len(item[options]) - 1}), got {gold!r}")


def download_bundle(bundle_dir: str | os.PathLike, url: str = EVAL_BUNDLE_URL,
                    say: Callable[[str], None] | None = print) -> None:
    """Fetch `eval_bundle.zip` beside `bundle_dir` (kept, so a second run only unzips) and unzip its
    eval_bundle/ folder into `bundle_dir`. OSError in one line when the download fails (offline)."""
    bundle_dir = Path(bundle_dir)
    bundle_dir.parent.mkdir(parents=True, exist_ok=True)
    zip_path = bundle_dir.parent / "eval_bundle.zip"
    if not zip_path.is_file():
        tmp = zip_path.with_name(f".{zip_path.name}.{os.getpid()}.tmp")
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
                total, done, last = int(response.headers.get("Content-Length") or 0), 0, time.perf_counter()
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    done += len(chunk)
                    if say and time.perf_counter() - last > 5:
                        say(f"  downloading {url}: {done / 2**20:.0f}" + (f"/{total / 2**20:.0f}" if total else "")
                            + " MiB")
                        last = time.perf_counter()
            os.replace(tmp, zip_path)
        except (urllib.error.URLError, OSError) as e:
            tmp.unlink(missing_ok=True)
            reason = getattr(e, "reason", None) or e.strerror or e
            raise OSError(f"cannot download the CORE eval bundle from {url} ({reason}): offline? put the unzipped "
                          f"eval_bundle folder (core.yaml, eval_meta_data.csv, eval_data/) at {bundle_dir}") from None
        if say:
            say(f"downloaded {url} to {zip_path}")
    with tempfile.TemporaryDirectory(dir=bundle_dir.parent) as tmpdir:
        try:
            with zipfile.ZipFile(zip_path) as z:
                z.extractall(tmpdir)
        except zipfile.BadZipFile:
            zip_path.unlink()
            raise ValueError(f"{zip_path} is not a readable zip file (removed it: run again to download it "
                             "anew)") from None
        extracted = Path(tmpdir) / BUNDLE_DIR_NAME
        if not (extracted / "core.yaml").is_file():
            raise ValueError(f"{zip_path} holds no {BUNDLE_DIR_NAME}/core.yaml")
        os.replace(extracted, bundle_dir)
    if say:
        say(f"placed the CORE eval bundle at {bundle_dir}")


# ----- prompts ---------------------------------------------------------------------------------------------
# Few-shot examples come first, each followed by a blank line; then the item.


def render_prompts_mc(item: dict, delimiter: str, fewshot: Sequence[dict] = ()) -> list[str]:
    """One prompt per choice: `query<delim>gold choice\\n\\n` per example, then `query<delim>choice`."""
    head = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
    return [f"{head}{item['query']}{delimiter}{choice}" for choice in item["choices"]]


def render_prompts_schema(item: dict, delimiter: str, fewshot: Sequence[dict] = ()) -> list[str]:
    """One prompt per context option: `gold context<delim>continuation\\n\\n` per example, then
    `option<delim>continuation`."""
    head = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    return [f"{head}{option}{delimiter}{item['continuation']}" for option in item["context_options"]]


def render_prompts_lm(item: dict, delimiter: str, fewshot: Sequence[dict] = ()) -> list[str]:
    """[prompt without the continuation, prompt with it]: `context.strip()<delim>continuation\\n\\n` per example,
    then `context.strip()<delim>` (the whole of it stripped: trailing space would merge into the continuation's
    first token) and the same with the continuation."""
    head = "".join(f"{str(ex['context']).strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    prompt = f"{head}{str(item['context']).strip()}{delimiter}"
    return [prompt.strip(), f"{prompt}{item['continuation']}"]


RENDER = {"multiple_choice": render_prompts_mc, "schema": render_prompts_schema, "language_modeling": render_prompts_lm}


def fewshot_indices(idx: int, num_items: int, num_fewshot: int) -> list[int]:
    """The few-shot examples of item `idx`: `num_fewshot` of the other items' indices, drawn by a generator seeded
    with FEWSHOT_SEED + idx (so every rank, every run, draws the same)."""
    if num_fewshot == 0:
        return []
    available = [i for i in range(num_items) if i != idx]
    if num_fewshot > len(available):
        raise ValueError(f"{num_fewshot}-shot prompts need at least {num_fewshot + 1} items, the task has {num_items}")
    return random.Random(FEWSHOT_SEED + idx).sample(available, num_fewshot)


def common_length(seqs: Sequence[Sequence[int]], from_end: bool = False) -> int:
    """Length of the prefix (or suffix) all the sequences share."""
    n = min(len(s) for s in seqs)
    for i in range(n):
        pos = -1 - i if from_end else i
        if any(s[pos] != seqs[0][pos] for s in seqs):
            return i
    return n


def prepare_example(idx: int, data: Sequence[dict], task: CoreTask, tokenizer,
                    max_seq_len: int | None = None) -> Example:
    """Item `idx` of `data` rendered with its few-shot examples, tokenized, its continuation located, and each row
    cut to its last `max_seq_len` tokens when longer."""
    item = data[idx]
    fewshot = [data[i] for i in fewshot_indices(idx, len(data), task.num_fewshot)]
    prompts = RENDER[task.task_type](item, task.continuation_delimiter, fewshot)
    rows = tokenizer.encode(prompts, prepend=tokenizer.get_bos_token_id())
    if task.task_type == "multiple_choice":  # same context, different continuations
        start = common_length(rows)
        starts, ends = [start] * len(rows), [len(r) for r in rows]
    elif task.task_type == "schema":  # different contexts, same continuation
        suffix = common_length(rows, from_end=True)
        starts, ends = [len(r) - suffix for r in rows], [len(r) for r in rows]
    else:  # the prompt with the continuation is the only row; its tokens past the prompt without it are scored
        without, with_ = rows
        if not len(without) < len(with_) or with_[: len(without)] != without:
            raise ValueError(f"CORE task {task.label}, item {idx}: the prompt's tokens without the continuation are "
                             f"not a prefix of those with it")
        rows, starts, ends = [with_], [len(without)], [len(with_)]
    if max_seq_len is not None:
        for i, row in enumerate(rows):
            crop = len(row) - max_seq_len
            if crop > 0:
                if starts[i] - crop < 1:
                    raise ValueError(f"CORE task {task.label}, item {idx}: the continuation alone is longer than "
                                     f"the {max_seq_len}-token limit")
                rows[i], starts[i], ends[i] = row[crop:], starts[i] - crop, ends[i] - crop
    return Example(rows, starts, ends, int(item.get("gold", 0)))


# ----- scoring ---------------------------------------------------------------------------------------------


@torch.no_grad()
def losses_and_predictions(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids (B, T) -> per-token loss (B, T) fp32 of predicting token t+1 at position t (NaN in the last
    column, which has no target) and the argmax predictions (B, T)."""
    logits = model(input_ids)  # (B, T, V) fp32
    B, T, V = logits.shape
    targets = torch.roll(input_ids, shifts=-1, dims=1)
    losses = F.cross_entropy(logits.view(B * T, V), targets.view(B * T), reduction="none").view(B, T)
    losses[:, -1] = float("nan")
    return losses, logits.argmax(dim=-1)


Forward = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def score_examples(forward: Forward, examples: Sequence[Example], task_type: str, pad_id: int, device,
                   batch_tokens: int = DEFAULT_BATCH_TOKENS) -> list[bool]:
    """Whether each example is right. Rows of all the examples go through `forward` together, longest first,
    as many per batch as fit in `batch_tokens` padded tokens (at least one), padded on the right with `pad_id`
    (causal attention: padding after a row never changes its losses)."""
    rows = [(e, r) for e, ex in enumerate(examples) for r in range(len(ex.rows))]
    rows.sort(key=lambda er: -len(examples[er[0]].rows[er[1]]))
    mean_loss, exact = {}, {}
    i = 0
    while i < len(rows):
        width = len(examples[rows[i][0]].rows[rows[i][1]])
        n = max(1, min(len(rows) - i, batch_tokens // width))
        batch = rows[i:i + n]
        ids = torch.full((n, width), pad_id, dtype=torch.long)
        for b, (e, r) in enumerate(batch):
            row = examples[e].rows[r]
            ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        losses, predictions = forward(ids.to(device))
        losses, predictions = losses.cpu(), predictions.cpu()  # one transfer per batch, not one per row
        for b, (e, r) in enumerate(batch):
            s, t = examples[e].starts[r], examples[e].ends[r]
            if task_type == "language_modeling":  # position p predicts token p + 1
                exact[e, r] = bool(torch.all(predictions[b, s - 1:t - 1] == ids[b, s:t]).item())
            else:
                mean_loss[e, r] = losses[b, s - 1:t - 1].mean().item()
        i += n
    right = []
    for e, ex in enumerate(examples):
        if task_type == "language_modeling":
            right.append(exact[e, 0])
        else:
            means = [mean_loss[e, r] for r in range(len(ex.rows))]
            right.append(means.index(min(means)) == ex.gold)
    return right


def task_items(bundle_dir, task: CoreTask, max_per_task: int = -1) -> list[dict]:
    """The task's items in evaluation order: shuffled by Random(SHUFFLE_SEED), the first `max_per_task` when
    positive."""
    data = load_task_data(bundle_dir, task)
    random.Random(SHUFFLE_SEED).shuffle(data)
    return data[:max_per_task] if max_per_task > 0 else data


def evaluate_task(forward: Forward, tokenizer, data: Sequence[dict], task: CoreTask, device,
                  batch_tokens: int = DEFAULT_BATCH_TOKENS, max_seq_len: int | None = None,
                  info: DistInfo = SINGLE_PROCESS, progress: Callable[[str], None] | None = None) -> float:
    """Accuracy on `data`: this rank scores items rank, rank + world, ...; the ranks' results are summed."""
    mine = list(range(info.rank, len(data), info.world_size))
    right = torch.zeros(len(data), dtype=torch.float32, device=device)
    pad_id = tokenizer.get_bos_token_id()
    chunk = 256  # items prepared and scored at a time, so progress shows and memory stays flat
    for k in range(0, len(mine), chunk):
        idxs = mine[k:k + chunk]
        examples = [prepare_example(i, data, task, tokenizer, max_seq_len) for i in idxs]
        for i, ok in zip(idxs, score_examples(forward, examples, task.task_type, pad_id, device, batch_tokens)):
            right[i] = float(ok)
        if progress:
            progress(f"{min(k + chunk, len(mine))}/{len(mine)} items")
    all_reduce_sum(right, info)
    return right.mean().item()


def centered(accuracy: float, random_baseline: float) -> float:
    """Accuracy rescaled so that random guessing scores 0 and a perfect score 1 (baseline in percent)."""
    return (accuracy - 0.01 * random_baseline) / (1.0 - 0.01 * random_baseline)


def evaluate_core(forward: Forward, tokenizer, bundle_dir, device, max_per_task: int = -1,
                  batch_tokens: int = DEFAULT_BATCH_TOKENS, max_seq_len: int | None = None,
                  info: DistInfo = SINGLE_PROCESS, say: Callable[[str], None] | None = None,
                  progress: Callable[[str, str], None] | None = None) -> dict:
    """Every task of the bundle. Returns {"results": label -> accuracy, "centered_results": label -> centered,
    "core_metric": mean centered accuracy, "tasks": label -> its type, shots, item count, baseline}.
    `forward`: `functools.partial(losses_and_predictions, model)` or any function of the same contract.
    `progress(label, detail)` hears of each chunk of items."""
    tasks = load_bundle(bundle_dir)
    results, centered_results, meta = {}, {}, {}
    for task in tasks:
        t0 = time.perf_counter()
        data = task_items(bundle_dir, task, max_per_task)
        if task.num_fewshot >= len(data):
            hint = " (raise --max-per-task)" if max_per_task > 0 else ""
            raise ValueError(f"CORE task {task.label}: {task.num_fewshot}-shot prompts need at least "
                             f"{task.num_fewshot + 1} items, it has {len(data)}{hint}")
        report = (lambda detail, label=task.label: progress(label, detail)) if progress else None
        acc = evaluate_task(forward, tokenizer, data, task, device, batch_tokens, max_seq_len, info, report)
        results[task.label] = acc
        centered_results[task.label] = centered(acc, task.random_baseline)
        meta[task.label] = {"type": task.task_type, "num_fewshot": task.num_fewshot, "items": len(data),
                            "random_baseline": task.random_baseline}
        if say:
            say(f"{task.label:<36} {task.num_fewshot:>2}-shot {task.task_type:<17} {len(data):>6} items | "
                f"accuracy {acc:.4f} | centered {centered_results[task.label]:.4f} | "
                f"{time.perf_counter() - t0:.1f}s")
    core = sum(centered_results.values()) / len(centered_results)
    return {"results": results, "centered_results": centered_results, "core_metric": core, "tasks": meta}
