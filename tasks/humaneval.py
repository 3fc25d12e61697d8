"""HumanEval (openai/openai_humaneval): 164 Python functions to complete, checked by running their tests.

Files: `<base>/tasks_data/humaneval/test*.parquet|jsonl` with columns prompt (the signature and docstring),
canonical_solution, test (defines `check(candidate)`) and entry_point. The conversation asks with the prompt and
answers with the whole function (prompt + solution), which is how a chat model answers; `evaluate` runs the
completion's code (its first fenced block, else all of it) with the prompt's imports and the tests in the sandbox
of `tasks.execution`.
"""

from __future__ import annotations

from tritonchat.tasks.common import Task
from tritonchat.tasks.datafiles import open_split
from tritonchat.tasks.execution import Limits, execute, humaneval_program


class HumanEval(Task):
    eval_type = "generative"

    def __init__(self, data_dir=None, base_dir=None, shuffle_seed: int | None = 42, limits: Limits | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        self.limits = Limits() if limits is None else limits  # the sandbox's limits for every evaluation
        self.rows = open_split("humaneval", "test", ["prompt", "canonical_solution", "test", "entry_point"],
                               "openai/openai_humaneval", data_dir, base_dir, shuffle_seed, optional=["task_id"])

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        return {
            "messages": [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": f"{row['prompt']}\n{row['canonical_solution']}"},
            ],
            "entry_point": row["entry_point"],
            "test": row["test"],
            "task_id": row.get("task_id", ""),
        }

    def evaluate(self, conversation: dict, completion: str) -> bool:
        """Whether the completion's code passes the item's tests in the sandbox."""
        prompt = conversation["messages"][0]["content"]
        program = humaneval_program(prompt, completion, conversation["test"], conversation["entry_point"])
        return execute(program, self.limits).passed
