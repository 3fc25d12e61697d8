"""The user's own conversations from a JSONL file (identity conversations, custom SFT data).

One conversation per line: {"messages": [...]} in the format of `tasks.common` (an optional system message,
then user and assistant alternating, assistant content a str or a list of parts), or the bare list of messages
(the reference's format). Blank lines are skipped. Every line is checked when the file is loaded; the first bad
one is a ValueError naming `file:line` and what is wrong with it.
"""

from __future__ import annotations

import os

from tritonchat.tasks.common import Task, validate_conversation
from tritonchat.tasks.datafiles import iter_jsonl


class CustomJSON(Task):
    def __init__(self, path: str | os.PathLike, **kwargs):
        super().__init__(**kwargs)
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"no conversations file at {self.path} (JSONL, one {{\"messages\": [...]}} "
                                    "per line)")
        self.conversations = []
        for line_no, item in iter_jsonl(self.path):
            conversation = {"messages": item} if isinstance(item, list) else item
            try:
                validate_conversation(conversation)
            except ValueError as e:
                raise ValueError(f"{self.path}:{line_no}: {e}") from None
            self.conversations.append({"messages": conversation["messages"]})

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> dict:
        return self.conversations[index]
