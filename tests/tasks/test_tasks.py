"""Tasks: every loader on fixture files the tests write, hand-computed conversations and scores, the mixture's
determinism and epoch counts, categorical scoring, and every conversation through the chat renderer's mask."""

import json
import random
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tritonchat.engine.calculator import calculate
from tritonchat.engine.tokenizer import Tokenizer
from tritonchat.tasks.arc import ARC
from tritonchat.tasks.common import (
    Task,
    TaskMixture,
    TaskSequence,
    answer_letter_ids,
    categorical_batch,
    predict_choice,
    render_mc,
    validate_conversation,
)
from tritonchat.tasks.customjson import CustomJSON
from tritonchat.tasks.datafiles import task_data_dir
from tritonchat.tasks.gsm8k import GSM8K, answer_parts, extract_answer
from tritonchat.tasks.humaneval import HumanEval
from tritonchat.tasks.mmlu import MMLU
from tritonchat.tasks.smoltalk import SmolTalk
from tritonchat.tasks.spellingbee import SimpleSpelling, SpellingBee

CORPUS = [
    "Multiple Choice question: What is the answer? Respond only with the letter of the correct answer.",
    "Weng earns 12/60 = $0.2 per minute. Working 50 minutes, she earned 0.2 x 50 = $10. #### 10",
    "def add(a, b):\n    return a + b\n",
    "How many r are in strawberry? Spelling it out: s,t,r,a,w,b,e,r,r,y. Python says 3.",
] * 20


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_from_iterator(iter(CORPUS), 320)


def write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def check_render(tok, conversation):
    """The conversation renders, and the supervised tokens are exactly the assistant parts of SPEC §11: text and
    python calls with their delimiters and <|assistant_end|>, never the forced outputs or anything else."""
    ids, mask = tok.render_conversation(conversation, max_tokens=None)
    assert len(ids) == len(mask)
    full, supervised = "<|bos|>", ""
    messages = conversation["messages"]
    system = messages[0]["content"] + "\n\n" if messages[0]["role"] == "system" else ""
    for msg in messages[1 if system else 0:]:
        if msg["role"] == "user":
            full += f"<|user_start|>{system}{msg['content']}<|user_end|>"
            system = ""
            continue
        parts = msg["content"] if isinstance(msg["content"], list) else [{"type": "text", "text": msg["content"]}]
        full += "<|assistant_start|>"
        for part in parts:
            piece = {"text": "{}", "python": "<|python_start|>{}<|python_end|>",
                     "python_output": "<|output_start|>{}<|output_end|>"}[part["type"]].format(part["text"])
            full += piece
            supervised += piece if part["type"] != "python_output" else ""
        full += "<|assistant_end|>"
        supervised += "<|assistant_end|>"
    assert tok.decode(ids) == full
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == supervised
    return ids, mask


# ----- the base, mixtures, sequences


class Numbers(Task):
    eval_type = "generative"

    def __init__(self, n, tag, **kwargs):
        super().__init__(**kwargs)
        self.n, self.tag = n, tag

    def num_examples(self):
        return self.n

    def get_example(self, index):
        return {"messages": [{"role": "user", "content": f"{self.tag}{index}"},
                             {"role": "assistant", "content": "ok"}], "id": (self.tag, index)}


def test_task_slicing():
    task = Numbers(10, "a", start=2, stop=9, step=3)
    assert len(task) == 3
    assert [c["id"][1] for c in task] == [2, 5, 8]
    with pytest.raises(IndexError):
        task[3]
    assert len(Numbers(4, "a", start=2, stop=100)) == 2
    with pytest.raises(ValueError):
        Numbers(4, "a", step=0)


def test_mixture_is_the_reference_shuffle_and_deterministic():
    a, b = Numbers(5, "a"), Numbers(3, "b")
    mix = TaskMixture([a, b])
    expected = [(0, i) for i in range(5)] + [(1, i) for i in range(3)]
    random.Random(42).shuffle(expected)
    assert [("ab"[t], i) for t, i in expected] == [c["id"] for c in mix]
    assert [c["id"] for c in TaskMixture([a, b], seed=42)] == [c["id"] for c in mix]
    assert [c["id"] for c in TaskMixture([a, b], seed=7)] != [c["id"] for c in mix]


def test_mixture_epochs():
    a, b, c = Numbers(4, "a"), Numbers(6, "b"), Numbers(2, "c")
    mix = TaskMixture([a, b, c], epochs=[2, 0.5, 0], seed=1)
    ids = [x["id"] for x in mix]
    assert len(mix) == 8 + 3
    assert sorted(ids) == sorted([("a", i) for i in range(4)] * 2 + [("b", 0), ("b", 1), ("b", 2)])
    assert sorted(x["id"] for x in TaskMixture([a, b], epochs=[1.5, 1])) == sorted(
        [("a", i) for i in range(4)] + [("a", 0), ("a", 1)] + [("b", i) for i in range(6)])
    with pytest.raises(ValueError, match="epochs"):
        TaskMixture([a, b], epochs=[1])
    with pytest.raises(ValueError, match="epochs"):
        TaskMixture([a], epochs=[-1])


def test_sequence():
    seq = TaskSequence([Numbers(2, "a"), Numbers(3, "b")])
    assert [c["id"] for c in seq] == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("b", 2)]
    assert len(TaskSequence([Numbers(2, "a"), Numbers(3, "b")], start=1, step=2)) == 2


# ----- SmolTalk and the data layout

SMOL = [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}, {"role": "user", "content": "Thanks"},
                  {"role": "assistant", "content": "You're welcome."}]},
    {"messages": [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]},
]


def test_smoltalk_layout_and_shuffle(tmp_path, tok, monkeypatch):
    folder = tmp_path / "tasks_data" / "smoltalk"
    write_parquet(folder / "train-00000-of-00002.parquet", SMOL[:2])
    write_parquet(folder / "train-00001-of-00002.parquet", SMOL[2:])
    write_parquet(folder / "test-00000-of-00001.parquet", SMOL[:1])
    assert task_data_dir("smoltalk", tmp_path) == str(folder)
    task = SmolTalk("train", base_dir=tmp_path)
    order = np.random.default_rng(42).permutation(3)  # datasets' shuffle(seed=42)
    assert [c["messages"] for c in task] == [SMOL[i]["messages"] for i in order]
    assert [c["messages"] for c in SmolTalk("train", base_dir=tmp_path, shuffle_seed=None)] == [
        s["messages"] for s in SMOL]
    monkeypatch.setenv("TRITONCHAT_BASE_DIR", str(tmp_path))
    assert len(SmolTalk("test")) == 1
    for conversation in task:
        check_render(tok, conversation)


def test_missing_dataset_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        GSM8K("main", "test", base_dir=tmp_path)
    message = str(e.value)
    assert "\n" not in message and str(tmp_path / "tasks_data" / "gsm8k") in message and "openai/gsm8k" in message


def test_smoltalk_bad_row_names_file_and_row(tmp_path):
    bad = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}
    write_parquet(tmp_path / "train.parquet", [SMOL[0], bad])
    task = SmolTalk("train", data_dir=tmp_path, shuffle_seed=None)
    task[0]
    with pytest.raises(ValueError, match=r"train\.parquet:1: message 1: expected role 'assistant'"):
        task[1]
    write_parquet(tmp_path / "test.parquet", [{"text": "x"}])
    with pytest.raises(ValueError, match=r"test\.parquet: missing column"):
        SmolTalk("test", data_dir=tmp_path)


# ----- MMLU and ARC: multiple choice

MC_PROMPT = ("Multiple Choice question: What is 2+3?\n- 4=A\n- 5=B\n- 6=C\n- 7=D\n"
             "\nRespond only with the letter of the correct answer.")


def test_mmlu_renders_letters_and_scores(tmp_path, tok):
    rows = [{"question": "What is 2+3?", "subject": "arithmetic", "choices": ["4", "5", "6", "7"], "answer": 1}]
    write_parquet(tmp_path / "test-00000-of-00001.parquet", rows)
    task = MMLU("test", data_dir=tmp_path)
    assert task.eval_type == "categorical" and len(task) == 1
    conversation = task[0]
    assert conversation["messages"] == [{"role": "user", "content": MC_PROMPT}, {"role": "assistant", "content": "B"}]
    assert conversation["subject"] == "arithmetic" and conversation["letters"] == ("A", "B", "C", "D")
    assert render_mc("What is 2+3?", "ABCD", ["4", "5", "6", "7"]) == MC_PROMPT
    assert task.evaluate(conversation, "B") is True and task.evaluate(conversation, "C") is False
    assert task.reward(conversation, "B") == 1.0
    with pytest.raises(ValueError):
        task.evaluate(conversation, "E")
    check_render(tok, conversation)
    write_parquet(tmp_path / "dev.parquet", [dict(rows[0], answer=4)])
    with pytest.raises(ValueError, match=r"dev\.parquet:0"):
        MMLU("dev", data_dir=tmp_path)[0]


def test_arc_labels_from_the_data(tmp_path, tok):
    rows = [
        {"id": "q1", "question": "What is 2+3?", "choices": {"text": ["4", "5", "6", "7"], "label": list("ABCD")},
         "answerKey": "B"},
        {"id": "q2", "question": "Which is wet?", "choices": {"text": ["water", "sand", "salt"],
                                                              "label": ["1", "2", "3"]}, "answerKey": "1"},
    ]
    write_jsonl(tmp_path / "tasks_data" / "arc-challenge" / "test.jsonl", rows)
    write_parquet(tmp_path / "tasks_data" / "arc-easy" / "test.parquet", rows)
    easy = ARC("ARC-Easy", "test", base_dir=tmp_path, shuffle_seed=None)
    challenge = ARC("ARC-Challenge", "test", base_dir=tmp_path, shuffle_seed=None)
    assert [c["messages"] for c in easy] == [c["messages"] for c in challenge]
    first, second = challenge[0], challenge[1]
    assert first["messages"][0]["content"] == MC_PROMPT and first["messages"][1]["content"] == "B"
    assert second["letters"] == ("1", "2", "3")
    assert second["messages"][0]["content"].startswith("Multiple Choice question: Which is wet?\n- water=1\n")
    assert challenge.evaluate(second, "1") and not challenge.evaluate(second, "2")
    for conversation in challenge:
        check_render(tok, conversation)


def test_categorical_scoring(tmp_path, tok):
    rows = [{"question": "What is 2+3?", "choices": ["4", "5", "6", "7"], "answer": 1},
            {"question": "Pick the first one of these", "choices": ["a", "b", "c", "d"], "answer": 0}]
    write_jsonl(tmp_path / "test.jsonl", rows)
    task = MMLU("test", data_dir=tmp_path, shuffle_seed=None)
    letter_ids = answer_letter_ids(tok, task.letters)
    assert [tok.decode([i]) for i in letter_ids] == ["A", "B", "C", "D"]
    with pytest.raises(ValueError, match="expected 1"):
        answer_letter_ids(tok, ["Respond only"])
    ids, positions = categorical_batch(tok, [task[0], task[1]])
    assistant_start = tok.encode_special("<|assistant_start|>")
    assert ids.dtype == torch.long and ids.shape[1] == max(positions) + 1
    assert all(ids[b, p] == assistant_start for b, p in enumerate(positions))
    assert ids[0, positions[0] + 1:].eq(tok.get_bos_token_id()).all()
    assert ids[0, :positions[0] + 1].tolist() == tok.render_for_completion(task[0])
    logits = torch.zeros(2, ids.shape[1], tok.get_vocab_size())
    logits[0, positions[0], letter_ids[1]] = 3.0  # B, right
    logits[1, positions[1], letter_ids[2]] = 2.0  # C, wrong
    logits[1, positions[1], tok.encode("x")[0]] = 9.0  # not a letter: ignored
    predictions = [task.letters[predict_choice(logits[b, p], letter_ids)] for b, p in enumerate(positions)]
    assert predictions == ["B", "C"]
    assert [task.evaluate(task[b], p) for b, p in enumerate(predictions)] == [True, False]
    assert predict_choice(torch.zeros(tok.get_vocab_size()), letter_ids) == 0  # ties: the first letter
    with pytest.raises(ValueError, match="shape"):
        predict_choice(logits[0], letter_ids)


# ----- GSM8K: calculator annotations as tool calls

WENG = ("Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n"
        "Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10")
WENG_PARTS = [
    {"type": "text", "text": "Weng earns 12/60 = $"},
    {"type": "python", "text": "12/60"},
    {"type": "python_output", "text": "0.2"},
    {"type": "text", "text": "0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $"},
    {"type": "python", "text": "0.2*50"},
    {"type": "python_output", "text": "10"},
    {"type": "text", "text": "10.\n#### 10"},
]


def test_gsm8k_annotations_become_parts():
    assert answer_parts(WENG) == WENG_PARTS
    assert answer_parts("<<2+2=4>>4 and <<7>>\n#### 1,234") == [
        {"type": "python", "text": "2+2"}, {"type": "python_output", "text": "4"},
        {"type": "text", "text": "4 and "}, {"type": "python", "text": "7"}, {"type": "python_output", "text": ""},
        {"type": "text", "text": "\n#### 1,234"}]
    assert extract_answer("so #### 1,234 done") == "1234" and extract_answer("#### -3.5") == "-3.5"
    assert extract_answer("no answer") is None


def test_gsm8k_loads_and_scores(tmp_path, tok):
    question = "Weng earns $12 an hour for babysitting. Yesterday she did 50 minutes. How much did she earn?"
    write_parquet(tmp_path / "tasks_data" / "gsm8k" / "train-00000-of-00001.parquet",
                  [{"question": question, "answer": WENG}])
    task = GSM8K("main", "train", base_dir=tmp_path)
    assert task.eval_type == "generative"
    conversation = task[0]
    assert conversation == {"messages": [{"role": "user", "content": question},
                                         {"role": "assistant", "content": WENG_PARTS}]}
    assert task.evaluate(conversation, "She earned $10.\n#### 10")
    assert task.evaluate(conversation, "#### 10<|assistant_end|>")
    assert not task.evaluate(conversation, "#### 11") and not task.evaluate(conversation, "10")
    assert task.reward(conversation, "#### 10") == 1.0 and task.reward(conversation, "#### 9") == 0.0
    ids, mask = check_render(tok, conversation)
    assert sum(mask) < len(mask)
    with pytest.raises(FileNotFoundError, match="gsm8k-socratic"):
        GSM8K("socratic", "train", base_dir=tmp_path)


# ----- HumanEval

HE_PROMPT = 'from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    """Sum of xs."""\n'
HE_ROW = {"task_id": "Toy/0", "prompt": HE_PROMPT, "canonical_solution": "    return sum(xs)\n",
          "test": "def check(candidate):\n    assert candidate([1, 2]) == 3\n    assert candidate([]) == 0\n",
          "entry_point": "total"}


def test_humaneval_runs_in_the_sandbox(tmp_path, tok):
    write_jsonl(tmp_path / "tasks_data" / "humaneval" / "test.jsonl", [HE_ROW])
    task = HumanEval(base_dir=tmp_path)
    conversation = task[0]
    assert conversation["messages"] == [
        {"role": "user", "content": HE_PROMPT},
        {"role": "assistant", "content": HE_PROMPT + "\n    return sum(xs)\n"}]
    assert conversation["entry_point"] == "total" and conversation["task_id"] == "Toy/0"
    assert task.evaluate(conversation, conversation["messages"][1]["content"])
    assert task.evaluate(conversation, "Sure:\n```python\ndef total(xs: List[int]) -> int:\n    return sum(xs)\n```")
    assert not task.evaluate(conversation, "```python\ndef total(xs):\n    return len(xs)\n```")
    assert not task.evaluate(conversation, "I don't know.")
    check_render(tok, conversation)


# ----- spelling and counting


def test_spellingbee_is_deterministic_and_right(tmp_path, tok):
    a, b = SpellingBee(size=30), SpellingBee(size=30)
    assert [x for x in a] == [x for x in b]
    test = SpellingBee(size=30, split="test")
    assert [x["messages"] for x in test] != [x["messages"] for x in a]
    assert [x for x in SpellingBee(size=30, seed=1)] != [x for x in a]
    for conversation in list(a) + list(test):
        parts = conversation["messages"][1]["content"]
        assert [p["type"] for p in parts] == ["text", "python", "python_output", "text"]
        assert calculate(parts[1]["text"]) == parts[2]["text"]  # the engine's calculator gives the same output
        assert parts[-1]["text"].endswith(f"#### {parts[2]['text']}")
        assert a.evaluate(conversation, f"#### {parts[2]['text']}")
        assert not a.evaluate(conversation, f"#### {int(parts[2]['text']) + 1}")
        check_render(tok, conversation)

    words = tmp_path / "words.txt"
    words.write_text("strawberry\n\n", encoding="utf-8")
    bee = SpellingBee(size=40, word_list=words)
    counts = {}
    for conversation in bee:
        parts = conversation["messages"][1]["content"]
        assert "strawberry" in conversation["messages"][0]["content"]
        assert "strawberry:s,t,r,a,w,b,e,r,r,y" in parts[0]["text"]
        letter = parts[1]["text"][-3]
        counts[letter] = parts[2]["text"]
        assert parts[1]["text"] == f"'strawberry'.count('{letter}')"
    assert counts.get("r") == "3"
    spell = SimpleSpelling(size=3, word_list=words)
    assert spell[0]["messages"][1]["content"] == "strawberry:s,t,r,a,w,b,e,r,r,y"
    assert [x for x in SimpleSpelling(size=5)] == [x for x in SimpleSpelling(size=5)]
    with pytest.raises(FileNotFoundError):
        SpellingBee(word_list=tmp_path / "none.txt")


# ----- the user's own conversations


def test_customjson_loads_both_formats(tmp_path, tok):
    path = tmp_path / "identity.jsonl"
    tool = [{"type": "text", "text": "It is "}, {"type": "python", "text": "6*7"},
            {"type": "python_output", "text": "42"}, {"type": "text", "text": "42."}]
    lines = [
        json.dumps({"messages": [{"role": "user", "content": "Who are you?"},
                                 {"role": "assistant", "content": "I am tritonchat."}]}),
        "",
        json.dumps([{"role": "user", "content": "6*7?"}, {"role": "assistant", "content": tool}]),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    task = CustomJSON(path)
    assert len(task) == 2
    assert task[1] == {"messages": [{"role": "user", "content": "6*7?"}, {"role": "assistant", "content": tool}]}
    for conversation in task:
        check_render(tok, conversation)


@pytest.mark.parametrize("line, error", [
    ('{"messages": [{"role": "user", "content": "hi"}', "not valid JSON"),
    ('{"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]}',
     "message 0: expected role 'user', got 'assistant'"),
    ('[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "assistant", "content": "c"}]',
     "message 2: expected role 'user'"),
    ('{"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}]}',
     r"message 0 \(user\): content must be a str"),
    ('{"messages": [{"role": "user", "content": "a"}, '
     '{"role": "assistant", "content": [{"type": "code", "text": "b"}]}]}',
     r"part 0: expected"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}]}', "str or a list of parts"),
    ('{"messages": [{"role": "user", "content": "a"}]}', "at least 2"),
    ('{"conversation": []}', r'an object \{"messages"'),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}', "message 1"),
])
def test_customjson_bad_line_names_file_and_line(tmp_path, line, error):
    path = tmp_path / "mine.jsonl"
    good = json.dumps([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    path.write_text(f"{good}\n\n{line}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:3: .*{error}") as e:
        CustomJSON(path)
    assert "\n" not in str(e.value)


def test_customjson_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no conversations file"):
        CustomJSON(tmp_path / "none.jsonl")


def test_validator_accepts_what_the_renderer_renders(tok):
    for conversation in SMOL:
        validate_conversation(conversation)
        check_render(tok, conversation)
