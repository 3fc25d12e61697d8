"""SmolTalk (HuggingFaceTB/smol-smoltalk): general conversations for SFT, splits train and test.

Files: `<base>/tasks_data/smoltalk/{train,test}*.parquet|jsonl`, one conversation per row in a `messages` column
(a list of {role, content}; an optional system message first).
"""

from __future__ import annotations

from tritonchat.tasks.common import Task, validate_conversation
from tritonchat.tasks.datafiles import open_split

SPLITS = ("train", "test")


class SmolTalk(Task):
    def __init__(self, split: str, data_dir=None, base_dir=None, shuffle_seed: int | None = 42, **kwargs):
        super().__init__(**kwargs)
        if split not in SPLITS:
            raise ValueError(f"SmolTalk split must be one of {SPLITS}, got {split!r}")
        self.rows = open_split("smoltalk", split, ["messages"], "HuggingFaceTB/smol-smoltalk", data_dir, base_dir,
                               shuffle_seed)

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        conversation = {"messages": self.rows[index]["messages"]}
        try:
            validate_conversation(conversation)
        except ValueError as e:
            raise ValueError(f"{self.rows.where(index)}: {e}") from None
        return conversation
