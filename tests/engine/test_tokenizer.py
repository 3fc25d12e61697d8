"""Tokenizer behaviour: training, round trips, special tokens, persistence, token bytes, chat masks, tok_train."""

import os
import pickle
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import regex
import torch
from tritonchat.engine.tokenizer import (
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    Tokenizer,
    get_tokenizer,
    load_token_bytes,
)
from tritonchat.scripts import tok_train

VOCAB = 400

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "She said it's fine, we'll see what they've done and you're right.",
    "Numbers like 12345, 2026 and 3.14159 appear in text.",
    "def add(a, b):\n    return a + b\n",
    "Unicode: café naïve 東京 你好世界 😀🚀 — dashes and “quotes”.",
    "Line one\r\nLine two\n\n\tTabbed line",
]
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ze", "qu", "the", "and", "ing", "ion", "er"]


def make_corpus(n_docs: int, seed: int = 0) -> list[str]:
    """Deterministic documents: known sentences plus pseudo-words and numbers, a few KB each batch."""
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(20, 60))]
        words += [str(rng.randint(0, 10**6)) for _ in range(3)]
        rng.shuffle(words)
        docs.append(SENTENCES[i % len(SENTENCES)] + " " + " ".join(words) + "\n")
    return docs


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_from_iterator(iter(make_corpus(200)), VOCAB)


# ----- vocabulary and special tokens -----


def test_vocab_and_special_ids_are_last(tok):
    assert tok.get_vocab_size() == VOCAB
    assert tok.get_special_tokens() == SPECIAL_TOKENS
    ids = [tok.encode_special(s) for s in SPECIAL_TOKENS]
    assert ids == list(range(VOCAB - len(SPECIAL_TOKENS), VOCAB))
    assert tok.get_bos_token_id() == VOCAB - len(SPECIAL_TOKENS)
    assert tok.id_to_token(tok.get_bos_token_id()) == "<|bos|>"
    assert tok.enc.name == "tritonchat"


def test_unknown_special_and_bad_input_types(tok):
    with pytest.raises(ValueError, match="unknown special token"):
        tok.encode_special("<|eos|>")
    with pytest.raises(ValueError, match="unknown special token"):
        tok.encode("hi", prepend="<|nope|>")
    with pytest.raises(TypeError):
        tok.encode(b"bytes")
    with pytest.raises(TypeError):
        tok.encode(["ok", 3])


def test_too_small_vocab_raises():
    with pytest.raises(ValueError, match="at least 265"):
        Tokenizer.train_from_iterator(iter(["abc"]), 264)


def test_max_chars_caps_training_text():
    # 300 characters cannot supply the requested merges: the vocab comes out smaller, with a warning
    with pytest.warns(UserWarning, match="corpus too small"):
        small = Tokenizer.train_from_iterator(iter(make_corpus(200)), VOCAB, max_chars=300)
    assert small.get_vocab_size() < VOCAB
    assert small.get_special_tokens() == SPECIAL_TOKENS


# ----- encode / decode -----


@pytest.mark.parametrize("text", [
    "",
    "hello world",
    "Emoji 😀🚀👩‍👩‍👧 and CJK 東京 你好世界 한국어",
    "newlines\n\n\r\n trailing spaces   \n\tand tabs",
    "never seen before: ẞ ǅ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \x00\x01",
    SENTENCES[3] * 5,
])
def test_roundtrip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < VOCAB - len(SPECIAL_TOKENS) for i in ids)
    assert tok.decode(ids) == text
    assert tok(text) == ids


def test_special_text_inside_document_is_ordinary(tok):
    text = "before <|bos|> middle <|assistant_end|> after"
    ids = tok.encode(text)
    specials = set(range(VOCAB - len(SPECIAL_TOKENS), VOCAB))
    assert not specials & set(ids)
    assert tok.decode(ids) == text
    assert tok.encode([text])[0] == ids


def test_prepend_append_and_batch(tok):
    bos = tok.get_bos_token_id()
    end = tok.encode_special("<|assistant_end|>")
    texts = ["one doc", "another, longer document 123", ""]
    single = [tok.encode(t) for t in texts]
    assert tok.encode(texts, num_threads=2) == single
    assert tok.encode(texts, prepend="<|bos|>", append=end) == [[bos] + s + [end] for s in single]
    assert tok.encode("x", prepend=bos) == [bos] + tok.encode("x")
    with pytest.raises(ValueError, match=str(VOCAB)):
        tok.encode("x", prepend=VOCAB)


def test_encode_head_equals_one_encode(tok):
    """Cut into parts where the pre-split always cuts, the text encodes to the ids of one encode: random texts
    of letters, digits, spaces, newlines, punctuation, contractions and non-ASCII, parts of 1 to 17 characters."""
    rng = random.Random(3)
    alphabet = list("ab cd\n\n  \t\r.,'s12345\u00e9\u00fc\u4e2d ") + ["'ll", "'ve", " \n", "\n\n", "  "]
    for _ in range(1500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200)))
        full = tok.encode(text, prepend="<|bos|>")
        for chunk in (1, 3, 17):
            limit = rng.randint(0, 40)
            assert tok.encode_head(text, limit, prepend="<|bos|>", chunk_chars=chunk) == (full[:limit], len(full))


def test_decode_accepts_tensors_and_rejects_out_of_range(tok):
    ids = tok.encode("tensor input", prepend="<|bos|>")
    assert tok.decode(torch.tensor(ids)) == "<|bos|>tensor input"
    with pytest.raises(ValueError, match=f"token id {VOCAB} out of range"):
        tok.decode(ids + [VOCAB])
    with pytest.raises(ValueError, match="token id -1 out of range"):
        tok.decode([-1])
    with pytest.raises(ValueError, match="out of range"):
        tok.id_to_token(VOCAB + 5)


def test_split_pattern():
    assert SPLIT_PATTERN == (
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}|"""
        r""" ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
    )
    assert regex.findall(SPLIT_PATTERN, "Hello world's 12345") == ["Hello", " world", "'s", " ", "12", "34", "5"]
    assert regex.findall(SPLIT_PATTERN, "a\n\n  b") == ["a", "\n\n", " ", " b"]


def test_encoding_uses_split_pattern(tok):
    assert tok.enc._pat_str == SPLIT_PATTERN
    for tid in tok.encode("Hello world's 12345 and 9876543210"):
        piece = tok.id_to_token(tid)
        assert sum(c.isdigit() for c in piece) <= 2
        assert not (any(c.isdigit() for c in piece) and any(c.isalpha() for c in piece))


# ----- persistence and token bytes -----


def test_save_load_identical(tok, tmp_path):
    out = tmp_path / "tokenizer"
    tok.save(out)
    assert sorted(os.listdir(out)) == ["token_bytes.pt", "tokenizer.pkl"]  # no temp files left behind
    loaded = Tokenizer.from_directory(out)
    assert loaded.get_vocab_size() == tok.get_vocab_size()
    assert loaded.get_special_tokens() == tok.get_special_tokens()
    texts = make_corpus(5, seed=1) + ["Emoji 😀 東京 <|bos|>"]
    assert loaded.encode(texts) == tok.encode(texts)
    tok.save(out)  # overwriting is fine
    assert Tokenizer.from_directory(str(out)).encode(texts) == tok.encode(texts)


def test_from_directory_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.pkl"):
        Tokenizer.from_directory(tmp_path)
    (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps({"not": "an encoding"}))
    with pytest.raises(ValueError, match="tiktoken.Encoding"):
        Tokenizer.from_directory(tmp_path)
    (tmp_path / "tokenizer.pkl").write_bytes(b"garbage")
    with pytest.raises(ValueError):
        Tokenizer.from_directory(tmp_path)


def test_token_bytes(tok, tmp_path):
    tb = tok.token_bytes()
    assert tb.dtype == torch.int32 and tb.shape == (VOCAB,)
    assert tb[:256].tolist() == [1] * 256
    assert tb[-len(SPECIAL_TOKENS):].tolist() == [0] * len(SPECIAL_TOKENS)
    for text in ["Emoji 😀🚀 and CJK 東京", SENTENCES[2], make_corpus(1, seed=3)[0]]:
        ids = tok.encode(text, prepend="<|bos|>")
        assert int(tb[ids].sum()) == len(text.encode("utf-8"))
    tok.save(tmp_path)
    assert torch.equal(load_token_bytes(tmp_path), tb)
    assert torch.equal(load_token_bytes(tmp_path / "token_bytes.pt", device="cpu"), tb)
    with pytest.raises(FileNotFoundError):
        load_token_bytes(tmp_path / "missing")


def test_get_tokenizer_and_base_dir(tok, tmp_path, monkeypatch):
    """get_tokenizer() reads <base>/tokenizer (the base directory rule itself: tests/engine/test_paths.py)."""
    tok.save(tmp_path / "tokenizer")
    assert get_tokenizer(tmp_path).encode("abc") == tok.encode("abc")
    monkeypatch.setenv("TRITONCHAT_BASE_DIR", str(tmp_path))
    assert get_tokenizer().get_vocab_size() == VOCAB


# ----- chat rendering -----


def sp(tok, name):
    return tok.encode_special(name)


def test_render_simple_conversation(tok):
    conv = {"messages": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "It is 4."},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "Welcome"},
    ]}
    ids, mask = tok.render_conversation(conv)
    u1, a1, u2, a2 = (tok.encode(m["content"]) for m in conv["messages"])
    names = ["<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>"]
    us, ue, as_, ae = (sp(tok, n) for n in names)
    expected = [tok.get_bos_token_id(), us, *u1, ue, as_, *a1, ae, us, *u2, ue, as_, *a2, ae]
    assert ids == expected
    expected_mask = [0] * (3 + len(u1)) + [0] + [1] * (len(a1) + 1) + [0] * (2 + len(u2)) + [0] + [1] * (len(a2) + 1)
    assert mask == expected_mask
    assert len(ids) == len(mask)


def test_render_merges_system_message(tok):
    with_system = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]}
    merged = {"messages": [
        {"role": "user", "content": "Be brief.\n\nHi"},
        {"role": "assistant", "content": "Hello"},
    ]}
    assert tok.render_conversation(with_system) == tok.render_conversation(merged)


def test_render_tool_parts(tok):
    conv = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Compute 12*34"}]},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute. "},
            {"type": "python", "text": "12*34"},
            {"type": "python_output", "text": "408"},
            {"type": "text", "text": " The answer is 408."},
        ]},
    ]}
    ids, mask = tok.render_conversation(conv)
    user = tok.encode("Compute 12*34")
    t1, code, out, t2 = (tok.encode(s) for s in ["Let me compute. ", "12*34", "408", " The answer is 408."])
    names = ["<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
             "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]
    us, ue, as_, ae, ps, pe, os_, oe = (sp(tok, n) for n in names)
    segments = [  # (tokens, mask)
        ([tok.get_bos_token_id(), us, *user, ue, as_], 0),
        (t1, 1),
        ([ps, *code, pe], 1),
        ([os_, *out, oe], 0),  # forced tool output is not supervised
        ([*t2, ae], 1),
    ]
    assert ids == [t for toks, _ in segments for t in toks]
    assert mask == [m for toks, m in segments for _ in toks]
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == (
        "Let me compute. <|python_start|>12*34<|python_end|> The answer is 408.<|assistant_end|>")


@pytest.mark.parametrize("messages, match", [
    ([], "no messages"),
    ([{"role": "assistant", "content": "hi"}], "expected role 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "expected role 'assistant'"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "expected role 'assistant'"),
    ([{"role": "system", "content": "s"}], "followed by a user"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], "followed by a user"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}], "part 0"),
    ([{"role": "user", "content": [{"type": "python", "text": "1+1"}]}], "only text parts"),
    ([{"content": "no role"}], "'role' and 'content'"),
])
def test_render_rejects_bad_conversations(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.render_conversation({"messages": messages})


def test_render_truncates(tok):
    conv = {"messages": [{"role": "user", "content": "a fairly long question " * 10},
                         {"role": "assistant", "content": "an answer " * 10}]}
    full_ids, full_mask = tok.render_conversation(conv, max_tokens=None)
    ids, mask = tok.render_conversation(conv, max_tokens=7)
    assert (ids, mask) == (full_ids[:7], full_mask[:7])
    assert tok.render_conversation(conv, max_tokens=10_000) == (full_ids, full_mask)


def test_render_for_completion(tok):
    as_ = sp(tok, "<|assistant_start|>")
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
               {"role": "user", "content": "2+2?"}]
    prompt = tok.render_for_completion({"messages": history + [{"role": "assistant", "content": "4"}]})
    assert prompt[-1] == as_
    assert prompt == tok.render_conversation({"messages": history})[0] + [as_]
    assert tok.render_for_completion({"messages": history}) == prompt  # ending with the user turn works too
    with pytest.raises(ValueError):
        tok.render_for_completion({"messages": [{"role": "assistant", "content": "x"}]})


def test_visualize_tokenization(tok):
    ids, mask = tok.render_conversation({"messages": [{"role": "user", "content": "q"},
                                                      {"role": "assistant", "content": "a"}]})
    plain = tok.visualize_tokenization(ids, mask, color=False)
    assert plain.startswith("<|bos|>|<|user_start|>") and plain.endswith("[<|assistant_end|>]")
    assert "\033[92m" in tok.visualize_tokenization(ids, mask)


# ----- scripts/tok_train.py -----


def write_shard(path, texts, row_group_size=16):
    pq.write_table(pa.table({"text": texts}), path, row_group_size=row_group_size)


def test_iter_texts(tmp_path):
    train_docs, val_docs = make_corpus(30, seed=4), ["VALIDATION " * 3] * 5
    write_shard(tmp_path / "shard_00000.parquet", train_docs)
    write_shard(tmp_path / "shard_00001.parquet", val_docs)
    docs = list(tok_train.iter_texts(str(tmp_path), max_chars=10**9))
    assert docs == train_docs  # the last shard is held out
    capped = list(tok_train.iter_texts(str(tmp_path), max_chars=10**9, doc_cap=20))
    assert capped == [d[:20] for d in docs]
    limited = list(tok_train.iter_texts(str(tmp_path), max_chars=500))
    assert sum(map(len, limited)) == 500 and "".join(limited) == "".join(docs)[:500]
    # a single shard is used for training
    single = tmp_path / "single"
    single.mkdir()
    write_shard(single / "shard_00000.parquet", val_docs)
    assert list(tok_train.iter_texts(str(single), max_chars=10**9)) == val_docs
    with pytest.raises(FileNotFoundError):
        list(tok_train.iter_texts(str(tmp_path / "empty"), max_chars=10))
    # a folder of .txt files: the last file is the validation split
    txt = tmp_path / "txt"
    txt.mkdir()
    (txt / "a.txt").write_text("a plain text document", encoding="utf-8")
    (txt / "b.txt").write_text("held out", encoding="utf-8")
    assert list(tok_train.iter_texts(str(txt), max_chars=10**9)) == ["a plain text document"]


def test_tok_train_main(tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    write_shard(data / "shard_00000.parquet", make_corpus(150, seed=5))
    write_shard(data / "shard_00001.parquet", make_corpus(10, seed=6))
    rc = tok_train.main(["--vocab-size", "300", "--max-chars", "2_000_000", "--data", str(data), "--out", str(out)])
    assert rc == 0
    assert sorted(os.listdir(out)) == ["token_bytes.pt", "tokenizer.pkl"]
    tok = Tokenizer.from_directory(out)
    assert tok.get_vocab_size() == 300
    assert load_token_bytes(out).shape == (300,)
    printed = capsys.readouterr().out
    assert "trained vocab 300" in printed and "held-out" in printed and "bytes/token" in printed


@pytest.mark.parametrize("argv, message", [
    (["--vocab-size", "100"], "--vocab-size must be at least 265 (256 bytes + 9 special tokens), got 100"),
    (["--max-chars", "0"], "--max-chars must be positive, got 0"),
    (["--doc-cap", "-5"], "--doc-cap must be positive, got -5"),
    (["--data", "{tmp}/nope"], "--data {tmp}/nope: no such file or folder"),
    (["--data", "{tmp}/bad"], "{tmp}/bad/shard_00000.parquet is not a readable parquet file"),
    (["--data", "{tmp}/empty"], "no *.parquet or *.txt files in data folder {tmp}/empty"),
    (["--out", "{tmp}/file.txt"], "--out {tmp}/file.txt: exists and is not a folder"),
])
def test_tok_train_user_mistakes_are_one_line(tmp_path, monkeypatch, capsys, argv, message):
    """Each mistake is reported before any work (no corpus is built), in one line, with exit code 2."""
    monkeypatch.setenv("TRITONCHAT_BASE_DIR", str(tmp_path / "base"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "shard_00000.parquet").write_bytes(b"not parquet at all")
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    rc = tok_train.main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith(f"{tok_train.PROG}: error: "), err
    assert message.format(tmp=tmp_path) in err
    assert not (tmp_path / "base").exists()


def test_tok_train_ctrl_c_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "a.txt").write_text("some text to train on")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Tokenizer, "train_from_iterator", interrupted)
    assert tok_train.main(["--data", str(tmp_path / "a.txt"), "--out", str(tmp_path / "out")]) == 130
    assert capsys.readouterr().err.strip() == f"{tok_train.PROG}: interrupted"
    assert not (tmp_path / "out").exists()
