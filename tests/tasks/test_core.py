"""tasks.core (the CORE metric) on tiny bundles the tests write, and scripts.base_eval on a tiny checkpoint.

Most tests score with a stub: a character tokenizer (token id = code point, BOS = 0) and a bigram "model" whose
per-token losses and greedy predictions are set by the tables below, so every score is a hand computation.
"""

import functools
import io
import json
import math
import os
import random
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest
import torch
from tritonchat.engine.checkpoint import save_checkpoint
from tritonchat.engine.gpt import GPTConfig, build_model
from tritonchat.engine.tokenizer import Tokenizer
from tritonchat.scripts import base_eval
from tritonchat.tasks import core
from tritonchat.train.dist import DistInfo


class CharTokenizer:
    """Token id = the character's code point; BOS = 0."""

    def get_bos_token_id(self) -> int:
        return 0

    def encode(self, texts, prepend=None):
        return [[prepend] + [ord(c) for c in t] for t in texts]


# The loss of predicting a character: by the character, except after the listed predecessors.
COST = {"a": 0.0, "b": 1.0, "c": 2.0}  # every other character: 3.0
PAIR_COST = {("x", " "): 0.0}
NEXT = {":": " ", " ": "a", "a": "a"}  # the greedy prediction after a character (else "?")


def stub_forward(ids: torch.Tensor):
    B, T = ids.shape
    losses = torch.full((B, T), float("nan"))
    predictions = torch.full((B, T), ord("?"), dtype=torch.long)
    for b in range(B):
        for t in range(T):
            prev = chr(ids[b, t])
            predictions[b, t] = ord(NEXT.get(prev, "?"))
            if t + 1 < T:
                nxt = chr(ids[b, t + 1])
                losses[b, t] = PAIR_COST.get((prev, nxt), COST.get(nxt, 3.0))
    return losses, predictions


CONFIG = """\
# a bundle of three tasks
icl_tasks:
-
  label: mc
  dataset_uri: kinds/mc.jsonl   # 2-shot
  num_fewshot: [2]
  icl_task_type: multiple_choice
- label: sch
  dataset_uri: kinds/schema.jsonl
  num_fewshot: [1]
  icl_task_type: schema
-
  label: lm
  dataset_uri: kinds/lm.jsonl
  num_fewshot: [1]
  icl_task_type: language_modeling
  continuation_delimiter: ":" # no space
"""

# Hand computation (a continuation's score is the mean of its characters' costs; few-shot examples and the
# query sit in the common prefix, or before the common suffix, so they never count):
MC = [
    # continuations after the common prefix "Q1 ": ab 0.5, cc 2, aa 0 -> choice 2, right
    {"query": "Q1", "choices": ["ab", "cc", "aa"], "gold": 2},
    # common prefix "Q2 z": a 0 vs ba 0.5 -> choice 0, right (scoring the shared z too would pick 1: 1.5 vs 1.33)
    {"query": "Q2", "choices": ["za", "zba"], "gold": 0},
    # c 2 vs b 1 -> choice 1, wrong
    {"query": "Q3", "choices": ["c", "b"], "gold": 0},
]  # accuracy 2/3, baseline 25% -> centered (2/3 - 1/4) / (3/4) = 5/9
SCHEMA = [
    # common suffix " ab": after y (3 + 0 + 1) / 3, after x (0 + 0 + 1) / 3 -> option 1, right
    {"context_options": ["y", "x"], "continuation": "ab", "gold": 1},
    # " c" after x: 1, after y: 2.5 -> option 0, wrong
    {"context_options": ["x", "y"], "continuation": "c", "gold": 1},
]  # accuracy 1/2, baseline 50% -> centered 0
LM = [
    {"context": "1+1 ", "continuation": " aa"},  # after ':' the stub predicts ' ', then 'a', 'a': right
    {"context": "2+2", "continuation": " ab"},  # 'b' is not predicted: wrong
    {"context": "  3 ", "continuation": " a"},  # right
]  # accuracy 2/3, baseline 0 -> centered 2/3
EXPECTED = {"mc": 2 / 3, "sch": 1 / 2, "lm": 2 / 3}
EXPECTED_CORE = (5 / 9 + 0 + 2 / 3) / 3


def write_jsonl(path, items):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(x) + "\n" for x in items), encoding="utf-8")


def write_bundle(root, config=CONFIG, data=None, baselines=None):
    """<root>/core.yaml, eval_meta_data.csv (with a column the loader ignores) and eval_data/kinds/*.jsonl."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "core.yaml").write_text(config, encoding="utf-8")
    baselines = baselines or {"mc": 25, "sch": 50, "lm": 0}
    rows = "".join(f"{k},language,{v}\n" for k, v in baselines.items())
    (root / "eval_meta_data.csv").write_text(f"Eval Task,Task Category,Random baseline\n{rows}", encoding="utf-8")
    data = data or {"mc": MC, "schema": SCHEMA, "lm": LM}
    for name, items in data.items():
        write_jsonl(root / "eval_data" / "kinds" / f"{name}.jsonl", items)
    return root


@pytest.fixture
def bundle(tmp_path):
    return write_bundle(tmp_path / "eval_bundle")


def test_config_and_baselines(bundle):
    tasks = core.load_bundle(bundle)
    assert tasks == [
        core.CoreTask("mc", "multiple_choice", "kinds/mc.jsonl", 2, " ", 25.0),
        core.CoreTask("sch", "schema", "kinds/schema.jsonl", 1, " ", 50.0),
        core.CoreTask("lm", "language_modeling", "kinds/lm.jsonl", 1, ":", 0.0),
    ]


@pytest.mark.parametrize("batch_tokens", [1, 7, 10_000])
def test_core_equals_the_hand_computation(bundle, batch_tokens):
    out = core.evaluate_core(stub_forward, CharTokenizer(), bundle, "cpu", batch_tokens=batch_tokens)
    assert out["results"] == pytest.approx(EXPECTED, rel=1e-6)
    assert out["centered_results"] == pytest.approx({"mc": 5 / 9, "sch": 0.0, "lm": 2 / 3}, rel=1e-6, abs=1e-7)
    assert out["core_metric"] == pytest.approx(EXPECTED_CORE, rel=1e-6)
    assert out["tasks"]["mc"] == {"type": "multiple_choice", "num_fewshot": 2, "items": 3, "random_baseline": 25.0}


def test_centered_accuracy():
    assert core.centered(0.25, 25) == 0.0 and core.centered(1.0, 25) == 1.0
    assert core.centered(0.5, 0) == 0.5 and core.centered(0.1, 25) == pytest.approx(-0.2)


def test_ranks_stride_the_items_and_sum(bundle, monkeypatch):
    """Rank r of w scores items r, r + w, ...; the all-reduced sum over ranks is the single process's count."""
    monkeypatch.setattr(core, "all_reduce_sum", lambda t, info: t)  # each rank's own share
    seen = []
    prepare = core.prepare_example
    monkeypatch.setattr(core, "prepare_example", lambda idx, *a: seen.append(idx) or prepare(idx, *a))
    task = core.load_bundle(bundle)[2]
    data = core.task_items(bundle, task)
    whole = core.evaluate_task(stub_forward, CharTokenizer(), data, task, "cpu")
    parts = []
    for rank in (0, 1):
        seen.clear()
        parts.append(core.evaluate_task(stub_forward, CharTokenizer(), data, task, "cpu", info=DistInfo(rank, 2)))
        assert seen == list(range(rank, len(data), 2))
    assert sum(parts) == pytest.approx(whole)


def test_fewshot_selection_is_seeded_and_excludes_the_item():
    for idx in range(20):
        picks = core.fewshot_indices(idx, 20, 5)
        assert picks == core.fewshot_indices(idx, 20, 5)  # the same on every call (every rank, every run)
        assert picks == random.Random(1234 + idx).sample([i for i in range(20) if i != idx], 5)
        assert idx not in picks and len(set(picks)) == 5
    assert sorted(core.fewshot_indices(3, 4, 3)) == [0, 1, 2]  # all the others
    assert core.fewshot_indices(0, 1, 0) == []
    with pytest.raises(ValueError, match="need at least 4 items"):
        core.fewshot_indices(0, 3, 3)


def test_items_are_shuffled_then_cut(bundle):
    task = core.load_bundle(bundle)[0]
    order = list(MC)
    random.Random(1337).shuffle(order)
    assert core.task_items(bundle, task) == order
    assert core.task_items(bundle, task, max_per_task=2) == order[:2]


def test_too_few_items_for_the_shots(bundle):
    with pytest.raises(ValueError, match=r"CORE task mc: 2-shot prompts need at least 3 items, it has 2 \(raise"):
        core.evaluate_core(stub_forward, CharTokenizer(), bundle, "cpu", max_per_task=2)


def test_rendering():
    shots = [{"query": "2+2=", "choices": ["3", "4"], "gold": 1}, {"query": "Sky?", "choices": ["blue"], "gold": 0}]
    item = {"query": "1+1=", "choices": ["2", "11"], "gold": 0}
    assert core.render_prompts_mc(item, "\nAnswer: ", shots) == [
        "2+2=\nAnswer: 4\n\nSky?\nAnswer: blue\n\n1+1=\nAnswer: 2",
        "2+2=\nAnswer: 4\n\nSky?\nAnswer: blue\n\n1+1=\nAnswer: 11",
    ]
    assert core.render_prompts_mc(item, " ") == ["1+1= 2", "1+1= 11"]
    shots = [{"context_options": ["Ann sang", "Bob sang"], "continuation": "loudly.", "gold": 1}]
    item = {"context_options": ["The cat", "The dog"], "continuation": "barked.", "gold": 1}
    assert core.render_prompts_schema(item, " ", shots) == ["Bob sang loudly.\n\nThe cat barked.",
                                                            "Bob sang loudly.\n\nThe dog barked."]
    shots = [{"context": " Capital of France? ", "continuation": "Paris"}, {"context": "2+3\n", "continuation": "5"}]
    item = {"context": "Capital of Peru?  ", "continuation": "Lima"}
    assert core.render_prompts_lm(item, "\nAnswer: ", shots) == [
        "Capital of France?\nAnswer: Paris\n\n2+3\nAnswer: 5\n\nCapital of Peru?\nAnswer:",  # stripped
        "Capital of France?\nAnswer: Paris\n\n2+3\nAnswer: 5\n\nCapital of Peru?\nAnswer: Lima",
    ]
    assert core.render_prompts_lm({"context": "a ", "continuation": " b"}, " ") == ["a", "a  b"]


def test_continuation_spans_and_truncation():
    tok = CharTokenizer()
    mc = core.CoreTask("mc", "multiple_choice", "x", 0, " ", 0.0)
    ex = core.prepare_example(0, [{"query": "Qq", "choices": ["ab", "ac"], "gold": 0}], mc, tok)
    assert ex.rows[0] == [0, *map(ord, "Qq ab")] and ex.starts == [5, 5] and ex.ends == [6, 6]  # after "Qq a"
    sch = core.CoreTask("s", "schema", "x", 0, " ", 0.0)
    ex = core.prepare_example(0, [{"context_options": ["xy", "y"], "continuation": "zz", "gold": 0}], sch, tok)
    assert ex.starts == [2, 1] and ex.ends == [6, 5]  # the common suffix is "y zz", 4 tokens
    lm = core.CoreTask("l", "language_modeling", "x", 0, ":", 0.0)
    ex = core.prepare_example(0, [{"context": "abcdef", "continuation": "gh"}], lm, tok)
    assert ex.rows == [[0, *map(ord, "abcdef:gh")]] and ex.starts == [8] and ex.ends == [10]
    cut = core.prepare_example(0, [{"context": "abcdef", "continuation": "gh"}], lm, tok, max_seq_len=4)
    assert cut.rows == [[ord(c) for c in "f:gh"]] and cut.starts == [2] and cut.ends == [4]  # the last 4 tokens
    with pytest.raises(ValueError, match="continuation alone is longer than the 2-token limit"):
        core.prepare_example(0, [{"context": "abcdef", "continuation": "gh"}], lm, tok, max_seq_len=2)


def test_missing_bundle_and_files_name_the_file(tmp_path, bundle):
    with pytest.raises(FileNotFoundError, match=f"no {tmp_path / 'nope' / 'core.yaml'}"):
        core.load_bundle(tmp_path / "nope")
    (bundle / "eval_data" / "kinds" / "lm.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"CORE task lm: no .*kinds/lm.jsonl"):
        core.evaluate_core(stub_forward, CharTokenizer(), bundle, "cpu")


@pytest.mark.parametrize("line, message", [
    ('{"query": "Q", "choices": ["a"], "gold": 0', "not valid JSON"),
    ('{"query": "Q", "choices": ["a"]}', "a multiple_choice item needs gold"),
    ('{"query": "Q", "choices": ["a"], "gold": 1}', r"gold must be an index into choices \(0..0\), got 1"),
    ('["Q"]', "an item must be a JSON object"),
])
def test_malformed_jsonl_names_the_file_and_line(bundle, line, message):
    path = bundle / "eval_data" / "kinds" / "mc.jsonl"
    path.write_text(json.dumps(MC[0]) + "\n" + line + "\n", encoding="utf-8")
    task = core.load_bundle(bundle)[0]
    with pytest.raises(ValueError, match=f"{path}:2: {message}"):
        core.load_task_data(bundle, task)


def test_malformed_config(tmp_path):
    bad_type = CONFIG.replace("icl_task_type: schema", "icl_task_type: question_answering")
    with pytest.raises(ValueError, match=r"core.yaml: icl_tasks\[1\] \(sch\): icl_task_type 'question_answering'"):
        core.load_bundle(write_bundle(tmp_path / "a", config=bad_type))
    with pytest.raises(ValueError, match=r"eval_meta_data.csv: no random baseline for task 'lm'"):
        core.load_bundle(write_bundle(tmp_path / "b", baselines={"mc": 25, "sch": 50}))


def test_download_unzips_the_bundle_beside_it(tmp_path, monkeypatch):
    """The download path with urlopen answered from a zip made here (tests never go online)."""
    src = write_bundle(tmp_path / "src" / "eval_bundle")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in src.rglob("*"):
            z.write(f, f.relative_to(src.parent))
    payload = buf.getvalue()

    class Response(io.BytesIO):
        headers = {"Content-Length": str(len(payload))}

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: Response(payload))
    dest = tmp_path / "base" / "eval_bundle"
    core.download_bundle(dest, say=None)
    assert core.load_bundle(dest) == core.load_bundle(src) and (dest.parent / "eval_bundle.zip").is_file()


# ----- a real model: batching, and the command line -----------------------------------------------------------

WORDS = ["hello", "there", "how", "are", "you", "fine", "thanks", "what", "is", "the", "sky", "blue", "red"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """<base>/tokenizer, <base>/base_checkpoints/d1 (a random depth-1 model) and <base>/eval_bundle (word items)."""
    base = tmp_path_factory.mktemp("base")
    rng = random.Random(1)
    tok = Tokenizer.train_from_iterator([" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(50)], 290)
    tok.save(base / "tokenizer")
    torch.manual_seed(0)
    model = build_model(GPTConfig.from_depth(1, vocab_size=tok.get_vocab_size(), sequence_len=64))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    save_checkpoint(base / "base_checkpoints" / "d1", 7, model.state_dict(), None,
                    {"step": 7, "model_config": model.config.to_dict()})

    def words(n):
        return " ".join(rng.choice(WORDS) for _ in range(n))

    mc = [{"query": words(rng.randint(1, 6)), "choices": [words(rng.randint(1, 3)) for _ in range(rng.randint(2, 4))],
           "gold": 0} for _ in range(12)]
    schema = [{"context_options": [words(rng.randint(1, 4)) for _ in range(2)], "continuation": words(2), "gold": 1}
              for _ in range(12)]
    lm = [{"context": words(rng.randint(1, 8)), "continuation": " " + words(rng.randint(1, 2))} for _ in range(12)]
    write_bundle(base / "eval_bundle", data={"mc": mc, "schema": schema, "lm": lm})
    return base


def tiny_model(base_dir):
    from tritonchat.engine.checkpoint import load_model

    model, _ = load_model(base_dir / "base_checkpoints" / "d1", 7, impl="torch")
    return model.eval()


def test_batched_equals_one_row_at_a_time(base_dir):
    """Rows of many items padded into one forward score as when each row runs alone (and some answers are
    right, some wrong, so the comparison means something)."""
    model, tok = tiny_model(base_dir), Tokenizer.from_directory(base_dir / "tokenizer")
    forward = functools.partial(core.losses_and_predictions, model)
    bundle = base_dir / "eval_bundle"
    for task in core.load_bundle(bundle):
        data = core.task_items(bundle, task)
        examples = [core.prepare_example(i, data, task, tok) for i in range(len(data))]
        alone = core.score_examples(forward, examples, task.task_type, 0, "cpu", batch_tokens=1)
        together = core.score_examples(forward, examples, task.task_type, 0, "cpu", batch_tokens=4096)
        assert alone == together
        assert len(set(alone)) == 2 or task.task_type == "language_modeling", (task.label, alone)
    # the per-row losses themselves: a padded batch against each row on its own
    ex = examples[0]
    rows = [r for e in examples[:4] for r in e.rows]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    losses, preds = forward(ids)
    for b, r in enumerate(rows):
        l1, p1 = forward(torch.tensor([r]))
        torch.testing.assert_close(losses[b, : len(r) - 1], l1[0, :-1], rtol=1e-5, atol=1e-5)
        assert torch.equal(preds[b, : len(r)], p1[0])
    assert ex.rows and math.isfinite(losses[0, 0].item())


def one_line_error(capsys, rc) -> str:
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"{base_eval.PROG}: error: ") and err.count("\n") == 1, err
    return err


def test_cli_writes_the_score_beside_the_checkpoint(base_dir, capsys):
    ckpt = base_dir / "base_checkpoints" / "d1"
    (ckpt / "metrics.jsonl").write_text(json.dumps({"step": 7, "val_bpb": 2.0}) + "\n")  # the run's own metrics
    assert base_eval.main(["--base-dir", str(base_dir), "--device", "cpu", "--impl", "torch",
                           "--batch-tokens", "256"]) == 0
    out = capsys.readouterr().out
    result = json.loads((ckpt / "core_000007.json").read_text())
    tok = Tokenizer.from_directory(base_dir / "tokenizer")
    forward = functools.partial(core.losses_and_predictions, tiny_model(base_dir))
    want = core.evaluate_core(forward, tok, base_dir / "eval_bundle", "cpu")
    assert result["core_metric"] == pytest.approx(want["core_metric"], abs=1e-12)
    assert result["results"] == pytest.approx(want["results"], abs=1e-12) and set(result["results"]) == set(EXPECTED)
    assert result["step"] == 7 and result["max_per_task"] == -1 and result["checkpoint"].endswith("model_000007.pt")
    assert f"CORE metric: {want['core_metric']:.4f}" in out and "lm " in out
    assert "CORE" in (base_dir / "report.md").read_text()  # the report card has the score
    assert base_eval.main(["--checkpoint-dir", str(ckpt), "--tokenizer-dir", str(base_dir / "tokenizer"),
                           "--bundle-dir", str(base_dir / "eval_bundle"), "--max-per-task", "5", "--impl", "torch",
                           "--device", "cpu"]) == 0
    quick = json.loads((ckpt / "core_000007_max5.json").read_text())
    records = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    assert records[1:] == [{"step": 7, "core_metric": result["core_metric"]}]  # the full run only
    assert quick["max_per_task"] == 5 and all(v["items"] == 5 for v in quick["tasks"].values())


def test_cli_offline_without_a_bundle(base_dir, tmp_path, monkeypatch, capsys):
    def offline(url, timeout=None):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    base = tmp_path / "base"
    (base / "base_checkpoints").mkdir(parents=True)
    (base / "base_checkpoints" / "d1").symlink_to(base_dir / "base_checkpoints" / "d1")
    (base / "tokenizer").symlink_to(base_dir / "tokenizer")
    err = one_line_error(capsys, base_eval.main(["--base-dir", str(base), "--device", "cpu", "--impl", "torch"]))
    assert "cannot download the CORE eval bundle" in err and "Name or service not known" in err
    assert str(base / "eval_bundle") in err and not (base / "eval_bundle").exists()
    err = one_line_error(capsys, base_eval.main(["--base-dir", str(base), "--bundle-dir", str(tmp_path / "x")]))
    assert f"--bundle-dir {tmp_path / 'x'}: no core.yaml there" in err


def test_cli_malformed_jsonl_is_one_line(base_dir, tmp_path, capsys):
    bundle = write_bundle(tmp_path / "eval_bundle")
    (bundle / "eval_data" / "kinds" / "schema.jsonl").write_text(json.dumps(SCHEMA[0]) + "\n{oops\n")
    rc = base_eval.main(["--base-dir", str(base_dir), "--bundle-dir", str(bundle), "--impl", "torch",
                         "--device", "cpu", "--output", str(tmp_path / "r.json")])
    err = one_line_error(capsys, rc)
    assert f"{bundle / 'eval_data' / 'kinds' / 'schema.jsonl'}:2: not valid JSON" in err
    assert not (tmp_path / "r.json").exists()


def test_cli_flag_checks(base_dir, capsys):
    with pytest.raises(SystemExit) as e:
        base_eval.main(["--max-per-task", "0"])
    assert e.value.code == 2 and "--max-per-task must be positive" in capsys.readouterr().err


def test_two_ranks_score_what_one_process_scores(base_dir, tmp_path):
    """torchrun with two gloo ranks on CPU: the items are split between them and the all-reduced result file is
    the single process's."""
    root = Path(__file__).resolve().parents[2]
    args = ["--base-dir", str(base_dir), "--device", "cpu", "--impl", "torch", "--max-per-task", "8"]
    assert base_eval.main([*args, "--output", str(tmp_path / "one.json")]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "scripts.base_eval", *args, "--output", str(tmp_path / "two.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["world_size"] == 2 and two["results"] == one["results"] and two["core_metric"] == one["core_metric"]
