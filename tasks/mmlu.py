"""MMLU (cais/mmlu, config "all"): four-choice questions; auxiliary_train for SFT, test for evaluation.

Files: `<base>/tasks_data/mmlu/{auxiliary_train,validation,dev,test}*.parquet|jsonl` with columns question (str),
choices (4 str), answer (index 0-3), and subject (optional). A row becomes a user prompt listing the choices with
their letters (`render_mc`) and the assistant's answer, the letter alone.
"""

from __future__ import annotations

from tritonchat.tasks.common import Task, render_mc
from tritonchat.tasks.datafiles import open_split

SPLITS = ("auxiliary_train", "validation", "dev", "test")


class MMLU(Task):
    eval_type = "categorical"
    letters = ("A", "B", "C", "D")

    def __init__(self, split: str, data_dir=None, base_dir=None, shuffle_seed: int | None = 42, **kwargs):
        super().__init__(**kwargs)
        if split not in SPLITS:
            raise ValueError(f"MMLU split must be one of {SPLITS}, got {split!r}")
        self.rows = open_split("mmlu", split, ["question", "choices", "answer"], "cais/mmlu (config all)", data_dir,
                               base_dir, shuffle_seed, optional=["subject"])

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        choices, answer = row["choices"], row["answer"]
        if not (isinstance(choices, list) and len(choices) == 4 and isinstance(answer, int) and 0 <= answer < 4):
            raise ValueError(f"{self.rows.where(index)}: expected 4 choices and an answer index 0-3, "
                             f"got {choices!r:.80} and {answer!r}")
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], self.letters, choices)},
                {"role": "assistant", "content": self.letters[answer]},
            ],
            "subject": row.get("subject", ""),
            "letters": self.letters,
        }

    def evaluate(self, conversation: dict, completion: str) -> bool:
        """Whether the predicted letter is the answer's."""
        if completion not in conversation["letters"]:
            raise ValueError(f"MMLU prediction must be one of {conversation['letters']}, got {completion!r}")
        return completion == conversation["messages"][-1]["content"]
