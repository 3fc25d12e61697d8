"""The Task base: a dataset of conversations with an evaluation rule, mixtures of tasks, and the shared helpers.

A conversation is the dict `engine.tokenizer.Tokenizer.render_conversation` takes: {"messages": [...]}, where a
message is {"role": "system" | "user" | "assistant", "content": ...}; a system message may only come first,
then the roles alternate user, assistant, ...; user and system content is a str; assistant content is a str or a
list of parts {"type": "text" | "python" | "python_output", "text": str} (a calculator call and the output the
engine forces after it, SPEC §11). Tasks may add keys of their own beside "messages" (the answer letters, the tests).

`eval_type` says how a task is scored: "categorical" tasks from the model's logits over the answer letters at the
position after <|assistant_start|> (`answer_letter_ids`, `predict_choice`, `categorical_batch`), and `evaluate`
gets the predicted letter; "generative" tasks from a sampled completion (decoded text), given to `evaluate`.
"""

from __future__ import annotations

import math
import operator
import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch

PART_TYPES = ("text", "python", "python_output")


class Task:
    """A lightweight view [start:stop:step] over `num_examples()` conversations; subclasses give `get_example`."""

    eval_type: str | None = None  # "categorical" | "generative"; None: not evaluated (training data only)

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if start < 0 or (stop is not None and stop < start) or step < 1:
            raise ValueError(f"need 0 <= start <= stop and step >= 1, got start={start}, stop={stop}, step={step}")
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self) -> int:
        raise NotImplementedError

    def get_example(self, index: int) -> dict:
        raise NotImplementedError

    def __len__(self) -> int:
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, -(-(stop - self.start) // self.step))

    def __getitem__(self, index: int) -> dict:
        index = operator.index(index)
        if not 0 <= index < len(self):
            raise IndexError(f"{type(self).__name__}: index {index} out of range [0, {len(self)})")
        return self.get_example(self.start + index * self.step)

    def evaluate(self, conversation: Mapping[str, Any], completion: str) -> bool | float:
        """Score `completion` (categorical: the predicted letter; generative: the decoded answer)."""
        raise NotImplementedError(f"{type(self).__name__} has no evaluation rule")

    def reward(self, conversation: Mapping[str, Any], completion: str) -> float:
        """The RL reward: the evaluation as a float."""
        return float(self.evaluate(conversation, completion))


class TaskMixture(Task):
    """Several tasks' conversations in one seeded, deterministic shuffle (the reference's SFT mixture).

    `epochs[i]` is how many times task i is seen: an int repeats it, a fraction takes its first share of items
    (1.5: every item once and the first half again). Passing a task twice in `tasks` also oversamples it.
    The order is `random.Random(seed).shuffle` of the (task, item) pairs, so with every epoch 1 and seed 42 it
    is the reference's order.
    """

    def __init__(self, tasks: Sequence[Task], epochs: Sequence[float] | None = None, seed: int = 42, **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        epochs = [1] * len(self.tasks) if epochs is None else list(epochs)
        if len(epochs) != len(self.tasks):
            raise ValueError(f"got {len(epochs)} epochs for {len(self.tasks)} tasks")
        self.index_map: list[tuple[int, int]] = []
        for t, (task, n) in enumerate(zip(self.tasks, epochs)):
            if not (isinstance(n, (int, float)) and math.isfinite(n) and n >= 0):
                raise ValueError(f"epochs must be finite numbers >= 0, got {n!r} for task {t}")
            size = len(task)
            count = int(n) * size + round((n - int(n)) * size)
            self.index_map.extend((t, i % size) for i in range(count))
        random.Random(seed).shuffle(self.index_map)

    def num_examples(self) -> int:
        return len(self.index_map)

    def get_example(self, index: int) -> dict:
        t, i = self.index_map[index]
        return self.tasks[t][i]


class TaskSequence(Task):
    """Tasks one after the other, in order (a curriculum)."""

    def __init__(self, tasks: Sequence[Task], **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)

    def num_examples(self) -> int:
        return sum(len(task) for task in self.tasks)

    def get_example(self, index: int) -> dict:
        for task in self.tasks:
            if index < len(task):
                return task[index]
            index -= len(task)
        raise IndexError(index)


# ----- conversations


def validate_conversation(conversation: Any, min_messages: int = 2) -> None:
    """Raise ValueError (one line, naming the message) unless `conversation` has the shape of the module
    docstring, with at least `min_messages` user/assistant messages."""
    if not isinstance(conversation, Mapping) or not isinstance(conversation.get("messages"), list):
        raise ValueError('a conversation is an object {"messages": [...]}')
    messages = conversation["messages"]
    start = 1 if messages and isinstance(messages[0], Mapping) and messages[0].get("role") == "system" else 0
    if len(messages) - start < min_messages:
        raise ValueError(f"expected at least {min_messages} user/assistant messages, got {len(messages) - start}")
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping) or "role" not in msg or "content" not in msg:
            raise ValueError(f"message {i}: expected an object with 'role' and 'content', got {msg!r:.80}")
        role, content = msg["role"], msg["content"]
        expected = "system" if i < start else ("user", "assistant")[(i - start) % 2]
        if role != expected:
            raise ValueError(f"message {i}: expected role {expected!r}, got {role!r} "
                             "(an optional system message first, then user and assistant alternate)")
        if isinstance(content, str):
            continue
        if role != "assistant" or not isinstance(content, list):
            kinds = "a str or a list of parts" if role == "assistant" else "a str"
            raise ValueError(f"message {i} ({role}): content must be {kinds}, got {type(content).__name__}")
        for j, part in enumerate(content):
            if not (isinstance(part, Mapping) and part.get("type") in PART_TYPES and isinstance(part.get("text"), str)):
                raise ValueError(f"message {i} (assistant), part {j}: expected {{'type': one of {PART_TYPES}, "
                                 f"'text': str}}, got {part!r:.80}")


def render_mc(question: str, letters: Sequence[str], choices: Sequence[str]) -> str:
    """The multiple-choice user prompt of the reference: each choice followed by '=' and its letter (a small model
    binds a letter better after its choice), the letter right after '=' with no space so that it is the very token
    the assistant answers with ("A", not " A")."""
    lines = [f"Multiple Choice question: {question}\n"]
    lines += [f"- {choice}={letter}\n" for letter, choice in zip(letters, choices)]
    lines.append("\nRespond only with the letter of the correct answer.")
    return "".join(lines)


# ----- categorical scoring


def answer_letter_ids(tokenizer, letters: Sequence[str]) -> list[int]:
    """The token id of each answer letter; ValueError if a letter is not exactly one token."""
    ids = []
    for letter in letters:
        encoded = tokenizer.encode(letter)
        if len(encoded) != 1:
            raise ValueError(f"answer letter {letter!r} is {len(encoded)} tokens, expected 1")
        ids.append(encoded[0])
    return ids


def predict_choice(logits: torch.Tensor, letter_ids: Sequence[int]) -> int:
    """The index of the answer letter with the highest logit: logits (V,) at the answer position (the position of
    the prompt's last token, <|assistant_start|>); ties go to the first letter."""
    if logits.dim() != 1:
        raise ValueError(f"expected logits of shape (vocab,), got {tuple(logits.shape)}")
    return int(logits[torch.as_tensor(list(letter_ids), device=logits.device)].argmax().item())


def categorical_batch(tokenizer, conversations: Sequence[Mapping[str, Any]]) -> tuple[torch.Tensor, list[int]]:
    """Prompts for categorical scoring: (ids int64 (B, T), right-padded with <|bos|>, and each row's answer
    position, its last prompt token). The model's logits[b, positions[b]] are the ones `predict_choice` takes."""
    prompts = [tokenizer.render_for_completion(c) for c in conversations]
    width = max(len(p) for p in prompts)
    bos = tokenizer.get_bos_token_id()
    ids = torch.tensor([p + [bos] * (width - len(p)) for p in prompts], dtype=torch.long)
    return ids, [len(p) - 1 for p in prompts]
