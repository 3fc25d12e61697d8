"""The BPE tokenizer (SPEC §8) and the chat rendering with training masks (SPEC §11).

A `Tokenizer` wraps a `tiktoken.Encoding` built from our own trained merges: GPT-4 style pre-split
(`SPLIT_PATTERN`), byte-level BPE ranks 0..N-1 learned by rustbpe, then the 9 special tokens at ids
N..N+8. On disk a tokenizer directory holds `tokenizer.pkl` (the pickled Encoding) and `token_bytes.pt`
(int32 [vocab_size], UTF-8 byte length of every token, 0 for special tokens; the bits-per-byte denominator).

Ordinary text is always encoded with `encode_ordinary`: the text "<|bos|>" inside a document becomes
ordinary tokens, never the special id. Special ids only enter through `prepend`/`append` and the chat
renderer.
"""

from __future__ import annotations

import operator
import os
import pickle
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import tiktoken
import torch
from tritonchat.engine.paths import atomic_write

SPECIAL_TOKENS = [
    "<|bos|>",  # starts every document and every conversation
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant asks the calculator tool
    "<|python_end|>",
    "<|output_start|>",  # the tool's result, forced into the stream by the engine
    "<|output_end|>",
]

# GPT-4's pre-split, except numbers split into groups of at most 2 digits (\p{N}{1,2}) to spare a small vocab.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

ENCODING_NAME = "tritonchat"
TOKENIZER_FILE = "tokenizer.pkl"
TOKEN_BYTES_FILE = "token_bytes.pt"

TokenLike = str | int  # a special-token string or a token id

# Where SPLIT_PATTERN always ends a piece, whatever follows: after an ASCII letter before a space (a letter run ends
# at its last letter; the space starts the next piece), and after a newline before a visible ASCII character (no
# alternative holds a newline followed by one). Cutting a text there and encoding the parts gives the same ids as
# encoding it whole (the pattern has no look-behind, so a part is split as the whole text is from that point).
# ASCII only, so that the rule does not hang on the Unicode tables of one regex engine or another.
_SAFE_CUT = re.compile(r"[A-Za-z](?= )|\n(?=[!-~])")


def _capped(texts: Iterable[str], max_chars: int | None) -> Iterator[str]:
    """Yield texts until `max_chars` characters in total; the last text is cut to fit exactly."""
    remaining = max_chars
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"training texts must be str, got {type(text).__name__}")
        if remaining is None:
            yield text
            continue
        if remaining <= 0:
            return
        text = text[:remaining]
        remaining -= len(text)
        yield text


class Tokenizer:
    """Byte-level BPE over a `tiktoken.Encoding`, with the chat special tokens of SPEC §8."""

    def __init__(self, enc: tiktoken.Encoding):
        self.enc = enc
        self._special_ids: dict[str, int] = dict(enc._special_tokens)  # name -> id

    # ----- construction and persistence -----

    @classmethod
    def train_from_iterator(
        cls, text_iterator: Iterable[str], vocab_size: int, max_chars: int | None = None
    ) -> Tokenizer:
        """Train BPE merges on a stream of texts; vocab_size counts the 256 bytes, the merges and the 9 specials.

        If the corpus runs out of pairs to merge, the vocabulary comes out smaller (with a warning).
        """
        n_special = len(SPECIAL_TOKENS)
        if vocab_size < 256 + n_special:
            raise ValueError(f"vocab_size must be at least {256 + n_special} (256 bytes + {n_special} specials), "
                             f"got {vocab_size}")
        if max_chars is not None and max_chars <= 0:
            raise ValueError(f"max_chars must be positive, got {max_chars}")
        import rustbpe  # the trainer is only needed here

        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(_capped(text_iterator, max_chars), vocab_size - n_special, pattern=SPLIT_PATTERN)
        ranks = {bytes(token): int(rank) for token, rank in trainer.get_mergeable_ranks()}
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise RuntimeError("BPE trainer returned non-contiguous ranks")
        if len(ranks) < vocab_size - n_special:
            warnings.warn(f"corpus too small: got {len(ranks) + n_special} tokens instead of {vocab_size}",
                          stacklevel=2)
        specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
        enc = tiktoken.Encoding(ENCODING_NAME, pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
        return cls(enc)

    @classmethod
    def from_directory(cls, path: str | os.PathLike) -> Tokenizer:
        """Load `<path>/tokenizer.pkl` (a pickled tiktoken.Encoding)."""
        file = os.path.join(os.fspath(path), TOKENIZER_FILE)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no {TOKENIZER_FILE} in {os.fspath(path)!r}: train one with "
                                    f"`python -m scripts.tok_train`")
        with open(file, "rb") as f:
            try:
                enc = pickle.load(f)
            except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as e:
                raise ValueError(f"{file!r} is not a readable pickle: {e}") from e
        if not isinstance(enc, tiktoken.Encoding):
            raise ValueError(f"{file!r} holds a {type(enc).__name__}, expected a tiktoken.Encoding")
        return cls(enc)

    def save(self, path: str | os.PathLike) -> None:
        """Write `tokenizer.pkl` and `token_bytes.pt` into directory `path` (created if needed), atomically."""
        directory = os.fspath(path)
        os.makedirs(directory, exist_ok=True)
        atomic_write(os.path.join(directory, TOKENIZER_FILE), lambda f: pickle.dump(self.enc, f))
        token_bytes = self.token_bytes()
        atomic_write(os.path.join(directory, TOKEN_BYTES_FILE), lambda f: torch.save(token_bytes, f))

    def token_bytes(self) -> torch.Tensor:
        """int32 [vocab_size]: UTF-8 byte length of each token, 0 for special tokens."""
        special = set(self._special_ids.values())
        lengths = []
        for i in range(self.get_vocab_size()):
            if i in special:
                lengths.append(0)
                continue
            try:
                lengths.append(len(self.enc.decode_single_token_bytes(i)))
            except KeyError:  # an id hole in a foreign encoding
                lengths.append(0)
        return torch.tensor(lengths, dtype=torch.int32)

    # ----- vocabulary -----

    def get_vocab_size(self) -> int:
        return self.enc.n_vocab

    def get_special_tokens(self) -> list[str]:
        """Special-token strings in id order."""
        return sorted(self._special_ids, key=self._special_ids.__getitem__)

    def encode_special(self, name: str) -> int:
        try:
            return self._special_ids[name]
        except KeyError:
            raise ValueError(f"unknown special token {name!r}; known: {self.get_special_tokens()}") from None

    def get_bos_token_id(self) -> int:
        return self.encode_special("<|bos|>")

    def id_to_token(self, id: int) -> str:
        """The text of one token (invalid UTF-8 fragments shown as U+FFFD)."""
        self._check_ids([id])
        return self.enc.decode_single_token_bytes(id).decode("utf-8", errors="replace")

    def _check_ids(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        vocab = self.get_vocab_size()
        if min(ids) < 0 or max(ids) >= vocab:
            bad = next(i for i in ids if not 0 <= i < vocab)
            raise ValueError(f"token id {bad} out of range [0, {vocab})")

    def _as_id(self, token: TokenLike) -> int:
        if isinstance(token, str):
            return self.encode_special(token)
        if isinstance(token, bool):
            raise TypeError("a token must be a special-token string or an int id, got bool")
        tid = operator.index(token)
        self._check_ids([tid])
        return tid

    # ----- encode / decode -----

    def encode(self, text: str | list[str], prepend: TokenLike | None = None, append: TokenLike | None = None,
               num_threads: int = 8) -> list[int] | list[list[int]]:
        """Encode ordinary text (special-token text stays ordinary). A list of texts gives a list of id lists.

        `prepend`/`append`: a special-token string (e.g. "<|bos|>") or an id, added to each sequence.
        """
        head = None if prepend is None else self._as_id(prepend)
        tail = None if append is None else self._as_id(append)
        if isinstance(text, str):
            rows = [self.enc.encode_ordinary(text)]
        elif isinstance(text, list):
            if not all(isinstance(t, str) for t in text):
                raise TypeError("encode expects a str or a list of str")
            rows = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
        else:
            raise TypeError(f"encode expects a str or a list of str, got {type(text).__name__}")
        for row in rows:
            if head is not None:
                row.insert(0, head)
            if tail is not None:
                row.append(tail)
        return rows[0] if isinstance(text, str) else rows

    __call__ = encode

    def encode_head(self, text: str, limit: int, prepend: TokenLike | None = None,
                    chunk_chars: int = 1 << 16) -> tuple[list[int], int]:
        """(ids[:limit], len(ids)) of ids = encode(text, prepend), without holding all of ids: the text is encoded in
        parts of about `chunk_chars` characters cut where the pre-split always cuts (`_SAFE_CUT`), so the ids are
        those of one encode, and memory follows the part, not the text. A text with no such cut, or an encoding with
        another split pattern, is encoded in one piece."""
        if limit < 0 or chunk_chars < 1:
            raise ValueError(f"need limit >= 0 and chunk_chars >= 1, got {limit}, {chunk_chars}")
        head = [] if prepend is None else [self._as_id(prepend)]
        total, start = len(head), 0
        safe = self.enc._pat_str == SPLIT_PATTERN
        while start < len(text):
            cut = _SAFE_CUT.search(text, start + chunk_chars) if safe and len(text) - start > chunk_chars else None
            end = cut.end() if cut else len(text)
            ids = self.enc.encode_ordinary(text[start:end])
            total += len(ids)
            if len(head) < limit:
                head.extend(ids[:limit - len(head)])
            start = end
        return head[:limit], total

    def decode(self, ids: Iterable[int]) -> str:
        """Ids (list, tuple, tensor, array) -> text; raises ValueError naming the first out-of-range id."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        ids = [operator.index(i) for i in ids]
        self._check_ids(ids)
        return self.enc.decode(ids)

    # ----- chat (SPEC §11) -----

    def render_conversation(self, conversation: Mapping[str, Any],
                            max_tokens: int | None = 2048) -> tuple[list[int], list[int]]:
        """Render {"messages": [...]} to (ids, mask), both of length <= max_tokens (None: no limit).

        mask[t] = 1 where token t is supervised: assistant content, python calls and <|assistant_end|>.
        Everything else (bos, user turns, <|assistant_start|>, forced tool outputs) has mask 0.
        """
        ids: list[int] = []
        mask: list[int] = []

        def add(tokens: int | list[int], supervised: int) -> None:
            tokens = [tokens] if isinstance(tokens, int) else tokens
            ids.extend(tokens)
            mask.extend([supervised] * len(tokens))

        sp = self.encode_special
        add(self.get_bos_token_id(), 0)
        for role, content in _chat_turns(conversation):
            if role == "user":
                add(sp("<|user_start|>"), 0)
                add(self.encode(content), 0)
                add(sp("<|user_end|>"), 0)
                continue
            add(sp("<|assistant_start|>"), 0)
            for kind, text in content:
                if kind == "text":
                    add(self.encode(text), 1)
                elif kind == "python":
                    add(sp("<|python_start|>"), 1)
                    add(self.encode(text), 1)
                    add(sp("<|python_end|>"), 1)
                else:  # python_output: forced by the engine at inference, so never a training target
                    add(sp("<|output_start|>"), 0)
                    add(self.encode(text), 0)
                    add(sp("<|output_end|>"), 0)
            add(sp("<|assistant_end|>"), 1)
        if max_tokens is not None:
            ids, mask = ids[:max_tokens], mask[:max_tokens]
        return ids, mask

    def render_for_completion(self, conversation: Mapping[str, Any]) -> list[int]:
        """Ids to prime sampling: the conversation without its final assistant message, then <|assistant_start|>.

        The conversation must end with a user message once that final assistant message (if any) is dropped.
        """
        messages = list(_messages_of(conversation))
        if messages and isinstance(messages[-1], Mapping) and messages[-1].get("role") == "assistant":
            messages.pop()
        if not messages or not isinstance(messages[-1], Mapping) or messages[-1].get("role") != "user":
            raise ValueError("render_for_completion needs a conversation whose last turn to answer is a user message")
        ids, _ = self.render_conversation({"messages": messages}, max_tokens=None)
        ids.append(self.encode_special("<|assistant_start|>"))
        return ids

    def visualize_tokenization(self, ids: Sequence[int], mask: Sequence[int], color: bool = True) -> str:
        """Tokens joined by '|': supervised (mask 1) green, others red; without color, supervised ones in [ ]."""
        if len(ids) != len(mask):
            raise ValueError(f"ids and mask differ in length: {len(ids)} vs {len(mask)}")
        pieces = []
        for tid, m in zip(ids, mask):
            tok = self.id_to_token(tid)
            if color:
                pieces.append(f"\033[92m{tok}\033[0m" if m else f"\033[91m{tok}\033[0m")
            else:
                pieces.append(f"[{tok}]" if m else tok)
        return "|".join(pieces)


# ----- conversation validation -----

_PART_TYPES = ("text", "python", "python_output")


def _messages_of(conversation: Mapping[str, Any]) -> Sequence[Any]:
    if not isinstance(conversation, Mapping) or "messages" not in conversation:
        raise ValueError('a conversation is a mapping {"messages": [...]}')
    messages = conversation["messages"]
    if not isinstance(messages, Sequence) or isinstance(messages, str):
        raise ValueError('conversation["messages"] must be a list of messages')
    return messages


def _parts(content: Any, where: str) -> list[tuple[str, str]]:
    """Normalize message content to [(type, text)]: a str is one text part."""
    if isinstance(content, str):
        return [("text", content)]
    if not isinstance(content, Sequence):
        raise ValueError(f"{where}: content must be a str or a list of parts")
    parts = []
    for j, part in enumerate(content):
        valid = isinstance(part, Mapping) and part.get("type") in _PART_TYPES and isinstance(part.get("text"), str)
        if not valid:
            raise ValueError(f"{where}, part {j}: expected {{'type': one of {_PART_TYPES}, 'text': str}}, got {part!r}")
        parts.append((part["type"], part["text"]))
    return parts


def _plain_text(content: Any, where: str) -> str:
    """User and system content: a str, or a list of text parts joined."""
    parts = _parts(content, where)
    if any(kind != "text" for kind, _ in parts):
        raise ValueError(f"{where}: only text parts are allowed outside assistant messages")
    return "".join(text for _, text in parts)


def _chat_turns(conversation: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """Validate and normalize: [("user", str) | ("assistant", [(type, text)])], a leading system message merged."""
    messages = _messages_of(conversation)
    if not messages:
        raise ValueError("conversation has no messages")
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping) or "role" not in msg or "content" not in msg:
            raise ValueError(f"message {i}: expected a mapping with 'role' and 'content', got {msg!r}")
    system = None
    start = 0
    if messages[0]["role"] == "system":
        system = _plain_text(messages[0]["content"], "message 0")
        start = 1
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ValueError("a system message must be followed by a user message")
    turns: list[tuple[str, Any]] = []
    for i in range(start, len(messages)):
        role = messages[i]["role"]
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(f"message {i}: expected role {expected!r}, got {role!r} "
                             f"(roles alternate user/assistant starting with user; system only first)")
        where = f"message {i} ({role})"
        if role == "user":
            text = _plain_text(messages[i]["content"], where)
            if system is not None and i == start:
                text = system + "\n\n" + text
            turns.append(("user", text))
        else:
            turns.append(("assistant", _parts(messages[i]["content"], where)))
    return turns


# ----- loading helpers -----


def load_token_bytes(path: str | os.PathLike, device: str | torch.device = "cpu") -> torch.Tensor:
    """int32 [vocab_size] token byte lengths, from a tokenizer directory or a token_bytes.pt file."""
    file = os.fspath(path)
    if os.path.isdir(file):
        file = os.path.join(file, TOKEN_BYTES_FILE)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no token byte lengths at {file!r}: train a tokenizer with "
                                "`python -m scripts.tok_train`")
    return torch.load(file, map_location=device, weights_only=True)


def get_tokenizer(base_dir: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer saved in `<base_dir>/tokenizer/` (base_dir defaults to engine.paths.get_base_dir())."""
    if base_dir is None:
        from tritonchat.engine.paths import get_base_dir

        base_dir = get_base_dir()
    return Tokenizer.from_directory(os.path.join(os.fspath(base_dir), "tokenizer"))
