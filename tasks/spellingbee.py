"""Spelling and letter counting, generated from a word list: "How many r are in strawberry?" -> 3.

A small model sees tokens, not letters, so it cannot count letters unless it learns to spell a word out. The
SpellingBee answer spells the word, counts the letter position by position, checks the count with the calculator
(`'strawberry'.count('r')`, a call the engine's calculator accepts) and ends with `#### <count>`, scored like
GSM8K. SimpleSpelling only spells words out ("Spell the word: cat" -> "cat:c,a,t").

Item i of split "train" is drawn from `random.Random(seed * 2**32 + i)`, of "test" from an offset of 10,000,000
(so train and test items differ), the same seeds as the reference when seed=0. The words come from `word_list`,
a text file with one word per line (blank lines skipped, e.g. dwyl/english-words' words_alpha.txt), else from the
small list below.
"""

from __future__ import annotations

import os
import random

from tritonchat.tasks.common import Task
from tritonchat.tasks.gsm8k import extract_answer

LETTERS = "abcdefghijklmnopqrstuvwxyz"
TEST_SEED_OFFSET = 10_000_000
WORDS = tuple("""
apple banana cherry strawberry raspberry blueberry orange lemon mango papaya pineapple grape melon peach
elephant giraffe kangaroo crocodile hippopotamus octopus butterfly penguin dolphin squirrel rabbit turtle
mississippi tennessee alabama committee bookkeeper balloon coffee address success possession assessment
necessary embarrass occurrence accommodate millennium parallel pepper bubble puzzle jazz pizza letter
computer keyboard language mountain river ocean island desert forest weather thunder lightning rainbow
library mathematics science history geography chemistry physics biology astronomy philosophy music
bottle kitten summer winter autumn spring yellow purple silver golden bridge castle garden window
triangle rectangle pentagon hexagon circle sphere cylinder pyramid parabola variable function integer
""".split())

# The question, in a few phrasings and languages; {letter} and {word} are filled in, perhaps quoted.
TEMPLATES = (
    "How many {letter} are in {word}",
    "How many {letter} are in the word {word}",
    "How many times does the letter {letter} appear in {word}",
    "Count the {letter} in {word}",
    "Count how often {letter} occurs in {word}",
    "How many {letter}'s does {word} have",
    "What is the number of {letter} in {word}",
    "In the word {word}, how many times is {letter} used",
    "Tell me how many {letter} there are in {word}",
    "{word}: how many {letter}",
    "¿Cuántas letras {letter} hay en {word}",
    "Combien de {letter} y a-t-il dans {word}",
    "Wie oft kommt {letter} in {word} vor",
    "{word}里有几个{letter}",
)


def load_words(word_list: str | os.PathLike | None = None) -> tuple[str, ...]:
    """The words of `word_list` (one per line, stripped, blank lines skipped), or the built-in list."""
    if word_list is None:
        return WORDS
    path = os.fspath(word_list)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no word list at {path} (a text file, one word per line)")
    with open(path, encoding="utf-8") as f:
        words = tuple(w for w in (line.strip() for line in f) if w)
    if not words:
        raise ValueError(f"{path}: the word list is empty")
    return words


class _Generated(Task):
    def __init__(self, size: int = 1000, split: str = "train", seed: int = 0, word_list=None, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test") or size < 0:
            raise ValueError(f"need split 'train' or 'test' and size >= 0, got {split!r}, {size}")
        self.size, self.split, self.seed = size, split, seed
        self.words = load_words(word_list)

    def num_examples(self) -> int:
        return self.size

    def _rng(self, index: int) -> random.Random:
        return random.Random(self.seed * 2**32 + (TEST_SEED_OFFSET if self.split == "test" else 0) + index)


class SpellingBee(_Generated):
    eval_type = "generative"

    def get_example(self, index: int) -> dict:
        rng = self._rng(index)
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(LETTERS)  # sometimes a letter not in it
        template = rng.choice(TEMPLATES)
        if rng.random() < 0.3:
            template = template.lower()
        lq, wq = rng.choice(["", "'", '"']), rng.choice(["", "'", '"'])
        question = template.format(letter=f"{lq}{letter}{lq}", word=f"{wq}{word}{wq}")
        if rng.random() < 0.5:
            question += "?"

        # No space between a position and its letter: "3:r", so the letter is the same token as in "r" alone.
        lines, count = [], 0
        for i, char in enumerate(word, 1):
            count += char == letter
            lines.append(f"{i}:{char}" + (f" yes, {count} so far" if char == letter else ""))
        spelled = (f"I need the number of '{letter}' in '{word}'. Spelling it out first:\n{word}:{','.join(word)}\n\n"
                   f"Going through it letter by letter:\n" + "\n".join(lines) + f"\n\nThat makes {count}.")
        truth = word.count(letter)
        parts = [
            {"type": "text", "text": spelled + "\n\nChecking with Python:\n\n"},
            {"type": "python", "text": f"{word!r}.count({letter!r})"},
            {"type": "python_output", "text": str(truth)},
            {"type": "text", "text": f"\n\nPython says {truth} as well.\n\n#### {truth}"},
        ]
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}]}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        """Whether the number after '#### ' in the completion is the count."""
        if not isinstance(completion, str):
            raise TypeError(f"completion must be the decoded text, got {type(completion).__name__}")
        predicted = extract_answer(completion)
        truth = extract_answer(conversation["messages"][-1]["content"][-1]["text"])
        return predicted is not None and predicted == truth


class SimpleSpelling(_Generated):
    """Spell a word out: the skill that makes counting hard, on its own (training data; not evaluated)."""

    def _rng(self, index: int) -> random.Random:
        return random.Random(f"spell:{super()._rng(index).random()}")  # another stream than SpellingBee's

    def get_example(self, index: int) -> dict:
        word = self._rng(index).choice(self.words)
        return {"messages": [
            {"role": "user", "content": f"Spell the word: {word}"},
            {"role": "assistant", "content": f"{word}:{','.join(word)}"},
        ]}
