"""GSM8K (openai/gsm8k): grade-school math word problems, solved with the calculator tool.

Files: `<base>/tasks_data/gsm8k/` (config main) or `<base>/tasks_data/gsm8k-socratic/`, `{train,test}*.parquet|jsonl`
with columns question and answer. An answer is a worked solution whose calculations are annotated
`<<expr=result>>`, ending with `#### <number>`:

    Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.
    #### 10

Each annotation becomes a calculator call inside the assistant's message (SPEC §11): the text before it, a
{"type": "python", "text": expr} part, then the {"type": "python_output", "text": result} part the engine forces
(the result is split off at the last '='; an annotation without '=' gets an empty output), then the text after.
Scoring compares the number after '#### ' in the completion with the reference's (commas removed), as the
official grader does.
"""

from __future__ import annotations

import re

from tritonchat.tasks.common import Task
from tritonchat.tasks.datafiles import open_split

SUBSETS = {"main": "gsm8k", "socratic": "gsm8k-socratic"}
SPLITS = ("train", "test")
_ANNOTATION = re.compile(r"(<<[^>]+>>)")
_FINAL = re.compile(r"#### (-?[0-9.,]+)")


def answer_parts(answer: str) -> list[dict]:
    """A GSM8K answer as assistant parts: text, then python + python_output for every <<expr=result>>."""
    parts = []
    for piece in _ANNOTATION.split(answer):
        if piece.startswith("<<") and piece.endswith(">>"):
            inner = piece[2:-2]
            expr, result = inner.rsplit("=", 1) if "=" in inner else (inner, "")
            parts += [{"type": "python", "text": expr}, {"type": "python_output", "text": result}]
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def extract_answer(text: str) -> str | None:
    """The number after the first '#### ' with its commas removed, or None."""
    match = _FINAL.search(text)
    return match.group(1).strip().replace(",", "") if match else None


class GSM8K(Task):
    eval_type = "generative"

    def __init__(self, subset: str = "main", split: str = "test", data_dir=None, base_dir=None,
                 shuffle_seed: int | None = 42, **kwargs):
        super().__init__(**kwargs)
        if subset not in SUBSETS or split not in SPLITS:
            raise ValueError(f"GSM8K needs a subset in {tuple(SUBSETS)} and a split in {SPLITS}, "
                             f"got {subset!r}, {split!r}")
        self.rows = open_split(SUBSETS[subset], split, ["question", "answer"], f"openai/gsm8k (config {subset})",
                               data_dir, base_dir, shuffle_seed)

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        if extract_answer(row["answer"]) is None:
            raise ValueError(f"{self.rows.where(index)}: answer has no final '#### <number>'")
        return {"messages": [
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": answer_parts(row["answer"])},
        ]}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        """Whether the completion's final number equals the reference's (a completion without one is wrong)."""
        if not isinstance(completion, str):
            raise TypeError(f"completion must be the decoded text, got {type(completion).__name__}")
        reference = extract_answer(conversation["messages"][-1]["content"][-1]["text"])
        predicted = extract_answer(completion)
        return predicted is not None and predicted == reference
