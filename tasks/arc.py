"""ARC (allenai/ai2_arc): grade-school science questions, configs ARC-Easy and ARC-Challenge.

Files: `<base>/tasks_data/arc-easy/` and `<base>/tasks_data/arc-challenge/`, `{train,validation,test}*.parquet|jsonl`
with columns question (str), choices {text: [str], label: [str]} and answerKey (one of the labels). The labels are
the letters of the prompt (`render_mc`), as the dataset gives them (mostly A-D, a few items 1-4 or A-E).
"""

from __future__ import annotations

from tritonchat.tasks.common import Task, render_mc
from tritonchat.tasks.datafiles import open_split

SUBSETS = {"ARC-Easy": "arc-easy", "ARC-Challenge": "arc-challenge"}
SPLITS = ("train", "validation", "test")


class ARC(Task):
    eval_type = "categorical"

    def __init__(self, subset: str, split: str, data_dir=None, base_dir=None, shuffle_seed: int | None = 42,
                 **kwargs):
        super().__init__(**kwargs)
        if subset not in SUBSETS or split not in SPLITS:
            raise ValueError(f"ARC needs a subset in {tuple(SUBSETS)} and a split in {SPLITS}, "
                             f"got {subset!r}, {split!r}")
        self.rows = open_split(SUBSETS[subset], split, ["question", "choices", "answerKey"],
                               f"allenai/ai2_arc (config {subset})", data_dir, base_dir, shuffle_seed)

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        choices, answer = row["choices"], row["answerKey"]
        ok = isinstance(choices, dict) and all(isinstance(choices.get(k), list) for k in ("text", "label"))
        if not ok or len(choices["text"]) != len(choices["label"]) or answer not in choices["label"]:
            raise ValueError(f"{self.rows.where(index)}: expected choices {{text, label}} of equal length and an "
                             f"answerKey among the labels, got {choices!r:.80} and {answer!r}")
        letters = tuple(choices["label"])
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], letters, choices["text"])},
                {"role": "assistant", "content": answer},
            ],
            "letters": letters,
        }

    def evaluate(self, conversation: dict, completion: str) -> bool:
        """Whether the predicted letter is the answer's."""
        if completion not in conversation["letters"]:
            raise ValueError(f"ARC prediction must be one of {conversation['letters']}, got {completion!r}")
        return completion == conversation["messages"][-1]["content"]
