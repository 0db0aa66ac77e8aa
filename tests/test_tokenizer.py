"""The tokenizer file and the tiktoken-backed Tokenizer: round trips, merge semantics, corrupt files, GPT-2."""

import hashlib
import json
import logging
import time

import numpy as np
import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from nanollm.config import ConfigError, TokenizerConfig
from nanollm.errors import NanollmError
from nanollm.tokenizer import (
    FILENAME,
    Tokenizer,
    bytes_per_token,
    create_tokenizer,
    gpt2,
    load_tokenizer,
    save_gpt2,
)
from nanollm.tokenizer.patterns import SPLIT_PATTERNS, without_surrogates

TEXTS = [
    "def add(a, b):\n    return a + b\n\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n",
    "Les élèves étudient à l'école. Ça va? Naïve café, 你好世界, こんにちは, 🙂🙂👍🏽 👩‍👩‍👧",
    "for i in range(10):\n    print(i, i ** 2)  # squares\n" * 3,
    "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX! 1234567 3.14159",
]
HARD = [
    "",
    " ",
    "\n\n\n",
    "e\u0301 a\u0308 n\u0303",  # combining marks
    "👩‍👩‍👧 🏳️‍🌈 👍🏽",  # ZWJ sequences, skin tones
    "你好，世界！漢字かなカナ한국어",
    "שָׁלוֹם مرحبا",  # RTL with vowel points
    "<|endoftext|> inside text <|endoftext|>",
    "\x00\x01\x7f \ufffd \U0010ffff",
    "tabs\tand\r\nwindows\rlines",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    cfg = TokenizerConfig(vocab_size=400, special_tokens=("<|endoftext|>", "<|pad|>"))
    return create_tokenizer(cfg, TEXTS * 2, tmp_path_factory.mktemp("tok"), progress=False)


def _doc(tok: Tokenizer) -> dict:
    return json.loads(tok.path.read_text())


# ---------------------------------------------------------------------------- encoding


def test_layout_ids_and_specials(tok):
    doc = _doc(tok)
    n_merges = len(doc["merges"])
    assert tok.vocab_size == doc["vocab_size"] == 256 + n_merges + 2 == 400
    assert tok.special_tokens == {"<|endoftext|>": 398, "<|pad|>": 399}
    assert tok.eot_id == 398
    assert [tok.encoding.decode_single_token_bytes(b) for b in (0, 65, 255)] == [b"\x00", b"A", b"\xff"]


@pytest.mark.parametrize("text", TEXTS + HARD)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")


# Every code point, surrogates included: hypothesis leaves category Cs out by default, and draws it
# rarely even when allowed, so it gets a strategy of its own.
ANY_TEXT = st.text(st.characters(exclude_categories=()) | st.characters(categories=["Cs"]))


@settings(max_examples=100, deadline=None)
@given(ANY_TEXT)
def test_round_trip_any_text(tok, text):
    """Valid Unicode round-trips exactly; surrogates are cleaned first, as documented (and as tiktoken does)."""
    clean = without_surrogates(text)
    assert tok.decode(tok.encode(text)) == clean
    assert tok.encode_to_numpy(text).tolist() == tok.encode(text) == tok.encode(clean)
    if not any("\ud800" <= c <= "\udfff" for c in text):
        assert clean == text


@pytest.mark.parametrize(
    ("text", "seen_as"),
    [("a\ud800b", "a\ufffdb"), ("\udfff", "\ufffd"), ("x\ud83d\ude42y", "x🙂y"), ("\ude42\ud83d", "\ufffd\ufffd")],
)
def test_surrogates(tok, text, seen_as):
    assert tok.encode(text) == tok.encode(seen_as) and tok.decode(tok.encode(text)) == seen_as


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200) | ANY_TEXT.map(lambda t: without_surrogates(t).encode("utf-8")))
def test_bytes_round_trip(tok, data):
    ids = tok.encode_bytes(data)
    assert tok.decode_bytes(ids) == data
    assert max(ids, default=0) < tok.eot_id  # never a special token
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return
    assert ids == tok.encode(text)


def test_bytes_api_on_invalid_utf8(tok):
    # stray bytes, an encoded surrogate (CESU-8, not UTF-8), a character cut short
    data = "café ".encode() + b"\xff\xfe" + "naïve".encode() + b"\xed\xa0\x80" + b"\xc3"
    ids = tok.encode_bytes(data)
    assert tok.decode_bytes(ids) == data
    assert ids[: len(tok.encode("café "))] == tok.encode("café ")
    assert [255, 254] == ids[len(tok.encode("café ")) : len(tok.encode("café ")) + 2]  # byte b is token b
    assert tok.decode(ids) == "café \ufffd\ufffdnaïve\ufffd\ufffd\ufffd\ufffd"


def test_special_tokens_are_never_produced_from_text(tok):
    ids = tok.encode("a<|endoftext|>b<|pad|>" * 3)
    assert not set(ids) & set(tok.special_tokens.values())
    assert tok.decode([tok.eot_id]) == "<|endoftext|>"


def _reference_encode(text: str, merges: list[list[int]], pattern: str) -> list[int]:
    """Pure Python: split with the regex, then in each chunk apply the lowest-rank merge present, repeatedly."""
    rank = {tuple(pair): 256 + i for i, pair in enumerate(merges)}
    out = []
    for chunk in regex.findall(pattern, without_surrogates(text)):
        ids = list(chunk.encode("utf-8"))
        while len(ids) > 1:
            pair = min(zip(ids, ids[1:], strict=False), key=lambda p: rank.get(p, float("inf")))
            if pair not in rank:
                break
            merged, i = [], 0
            while i < len(ids):
                if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
                    merged.append(rank[pair])
                    i += 2
                else:
                    merged.append(ids[i])
                    i += 1
            ids = merged
        out += ids
    return out


@pytest.mark.parametrize("text", [*TEXTS, *HARD, "def gradient(self):\n        return self.x + self.y  # café"])
def test_tiktoken_applies_merges_in_rank_order(tok, text):
    doc = _doc(tok)
    assert tok.encode(text) == _reference_encode(text, doc["merges"], doc["pattern"])


# Pieces of the training text glued at random, so that many merges apply; plus arbitrary code points.
# Unassigned code points (category Cn) are left out here: tiktoken's Rust regex and Python's
# `regex` module carry different Unicode versions, so they may disagree on whether such a code
# point is \p{L}; that splits the text differently before any merge, which is not what this compares.
ASSIGNED_TEXT = st.text(st.characters(exclude_categories=("Cn",)) | st.characters(categories=["Cs"]))
PIECES = st.sampled_from(
    ["def ", "self", ".x", " = ", "\n    ", "return", "(a, b)", "é", "你好", "🙂", "12345", " the"]
)


@settings(max_examples=100, deadline=None)
@given(st.lists(PIECES | ASSIGNED_TEXT, max_size=12).map("".join))
def test_tiktoken_equals_rank_order_reference_on_any_text(tok, text):
    doc = _doc(tok)
    assert tok.encode(text) == _reference_encode(text, doc["merges"], doc["pattern"])


def test_batch_numpy_and_partial_utf8(tok):
    assert tok.encode_batch(TEXTS, num_threads=2) == [tok.encode(t) for t in TEXTS]
    ids = tok.encode(TEXTS[1])
    assert tok.decode(np.array(ids, dtype=np.uint16)) == TEXTS[1]
    cut = tok.encode("é")  # two bytes; alone, the first is not valid UTF-8
    assert tok.decode(list(tok.decode_bytes(cut)[:1])) == "\ufffd"


def test_token_byte_lengths(tok):
    lengths = tok.token_byte_lengths()
    assert lengths.shape == (tok.vocab_size,)
    assert lengths[tok.eot_id] == 0 and lengths[399] == 0 and (lengths[:256] == 1).all()
    for text in TEXTS:
        assert lengths[tok.encode(text)].sum() == len(text.encode("utf-8"))


def test_sha256_is_of_the_file_bytes(tok, tmp_path):
    assert tok.sha256 == hashlib.sha256(tok.path.read_bytes()).hexdigest()
    assert load_tokenizer(tok.path).sha256 == load_tokenizer(tok.path.parent).sha256 == tok.sha256
    edited = tmp_path / FILENAME
    edited.write_text(json.dumps({**_doc(tok), "pattern_name": "renamed"}))
    assert load_tokenizer(edited).sha256 != tok.sha256


def test_small_corpus_gives_a_smaller_consistent_vocab(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        small = create_tokenizer(TokenizerConfig(vocab_size=5000), ["tiny tiny corpus"], tmp_path, progress=False)
    doc = json.loads((tmp_path / FILENAME).read_text())
    assert small.vocab_size == doc["vocab_size"] == 256 + len(doc["merges"]) + 1 < 5000
    assert small.eot_id == small.vocab_size - 1
    assert "stopped after" in caplog.text and "fewer than tokenizer.vocab_size=5000" in caplog.text
    assert small.decode(small.encode("tiny corpus, new words")) == "tiny corpus, new words"


@pytest.mark.parametrize("specials", [("<|endoftext|>",), ("<|endoftext|>", "<|pad|>", "<|im_start|>")])
def test_vocab_below_bytes_plus_specials_is_a_config_error(specials):
    floor = 256 + len(specials)
    TokenizerConfig(vocab_size=floor, special_tokens=specials)  # the bytes and specials alone: valid, no merges
    with pytest.raises(ConfigError, match=f"tokenizer.vocab_size: got {floor - 1}; must be >= {floor}"):
        TokenizerConfig(vocab_size=floor - 1, special_tokens=specials)


def test_no_merges_is_a_byte_tokenizer(tmp_path):
    tok = create_tokenizer(TokenizerConfig(vocab_size=257), ["abab abab"], tmp_path, progress=False)
    assert tok.vocab_size == 257 and tok.eot_id == 256 and tok.encode("abab") == [97, 98, 97, 98]


def test_configurable_special_tokens_follow_the_merges(tmp_path):
    specials = ("<|endoftext|>", "<|fim_prefix|>", "<|fim_suffix|>")
    tok = create_tokenizer(TokenizerConfig(vocab_size=300, special_tokens=specials), TEXTS, tmp_path, progress=False)
    assert tok.special_tokens == {name: 297 + k for k, name in enumerate(specials)}
    assert not set(tok.encode("".join(specials) * 2)) & set(tok.special_tokens.values())
    assert tok.decode([297, 298, 299]) == "".join(specials)


def test_bytes_per_token_streams_several_encoders(tok, monkeypatch):
    from nanollm.tokenizer import train

    monkeypatch.setattr(train, "_MEASURE_CHARS", 50)  # several batches
    texts = TEXTS * 3
    calls = []

    def bytes_only(batch):
        calls.append(len(batch))
        return [t.encode("utf-8") for t in batch]  # one token per byte

    ours, bytewise = bytes_per_token(iter(texts), tok.encode_batch, bytes_only)
    total = sum(len(t.encode("utf-8")) for t in texts)
    assert bytewise == 1.0 and ours == total / sum(len(tok.encode(t)) for t in texts) > 1.5
    assert len(calls) > 3 and max(calls) < len(texts)
    assert bytes_per_token([], tok.encode_batch) == [0.0]


# ---------------------------------------------------------------------------- corrupt files


def _corrupt(doc: dict, **changes) -> dict:
    return {**doc, **changes}


CORRUPTIONS = {
    # a merge repeating earlier bytes would give two ids one rank: tiktoken panics on that
    "duplicate rank": (lambda d: _corrupt(d, merges=d["merges"] + [d["merges"][0]], vocab_size=d["vocab_size"] + 1,
                                          special_tokens={k: v + 1 for k, v in d["special_tokens"].items()}),
                       "repeats the bytes of token 256"),
    "missing token": (lambda d: _corrupt(d, merges=[[0, 300], *d["merges"][1:]]), "does not exist before id 256"),
    "negative id": (lambda d: _corrupt(d, merges=[[-1, 5], *d["merges"][1:]]), "does not exist"),
    "not a pair": (lambda d: _corrupt(d, merges=[[1, 2, 3], *d["merges"][1:]]), "not a pair of token ids"),
    "special inside ranks": (lambda d: _corrupt(d, special_tokens={"<|endoftext|>": 65, "<|pad|>": 399}),
                             "must be distinct and follow the merges"),
    "duplicate special": (lambda d: _corrupt(d, special_tokens={"<|endoftext|>": 398, "<|pad|>": 398}),
                          "must be distinct"),
    "no specials": (lambda d: _corrupt(d, special_tokens={}), "needs at least"),
    "vocab size": (lambda d: _corrupt(d, vocab_size=4096), "vocab_size is 4096"),
    "bad pattern": (lambda d: _corrupt(d, pattern="(unclosed"), "pattern does not compile"),
    "missing key": (lambda d: {k: v for k, v in d.items() if k != "merges"}, "missing key 'merges'"),
    "unknown format": (lambda d: _corrupt(d, format="sentencepiece"), "unknown format"),
    "not an object": (lambda d: [1, 2], "JSON object"),
}  # fmt: skip


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corrupt_file_is_a_one_line_error(tok, tmp_path, name):
    corrupt, reason = CORRUPTIONS[name]
    path = tmp_path / FILENAME
    path.write_text(json.dumps(corrupt(_doc(tok))))
    with pytest.raises(NanollmError) as err:  # a tiktoken PanicException (a BaseException) would escape this
        load_tokenizer(tmp_path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and reason in message
    assert "dvc repro train_tokenizer" in message


@pytest.mark.parametrize(
    ("content", "reason"),
    [(None, "cannot read tokenizer"), (b'{"format": ', "not valid JSON"), (b"\xff\xfe", "not valid JSON")],
)
def test_missing_or_unparsable_file(tmp_path, content, reason):
    if content is not None:
        (tmp_path / FILENAME).write_bytes(content)
    with pytest.raises(NanollmError, match=reason):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------------------- GPT-2


def test_gpt2_file_records_tiktoken_and_extra_specials(tmp_path):
    save_gpt2(tmp_path / FILENAME, ["<|endoftext|>", "<|pad|>"])
    doc = json.loads((tmp_path / FILENAME).read_text())
    assert doc == {
        "format": "tiktoken",
        "name": "gpt2",
        "vocab_size": 50258,
        "special_tokens": {"<|endoftext|>": 50256, "<|pad|>": 50257},
    }


def test_gpt2_extra_specials_load(tmp_path, monkeypatch):
    # Stand-in for the cached GPT-2 ranks (256 bytes only, ranked in reverse as GPT-2 ranks its bytes
    # in its own order): exercises how extra specials are added and how encode_bytes finds byte ids.
    fake = {"name": "gpt2", "pat_str": SPLIT_PATTERNS["gpt2"], "special_tokens": dict(gpt2.SPECIAL_TOKENS),
            "mergeable_ranks": {bytes([b]): 255 - b for b in range(256)}}  # fmt: skip
    monkeypatch.setattr(gpt2, "encoding_kwargs", lambda: dict(fake))
    save_gpt2(tmp_path / FILENAME, ["<|endoftext|>", "<|pad|>"])
    tok = load_tokenizer(tmp_path)
    assert tok.vocab_size == 50258 and tok.eot_id == 50256
    assert tok.special_tokens == {"<|endoftext|>": 50256, "<|pad|>": 50257}
    assert tok.decode([50257]) == "<|pad|>" and 50257 not in tok.encode("<|pad|>")
    assert tok.encode_bytes(b"a\xff") == [255 - 97, 0] and tok.decode_bytes([255 - 97, 0]) == b"a\xff"


@pytest.mark.parametrize("cache", ["empty-dir", "disabled"])
def test_gpt2_not_cached_fails_fast_without_downloading(tmp_path, monkeypatch, cache):
    import tiktoken.load

    def no_download(*args, **kwargs):
        raise AssertionError("tiktoken tried to download")

    monkeypatch.setattr(tiktoken.load, "read_file", no_download)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache") if cache == "empty-dir" else "")
    save_gpt2(tmp_path / FILENAME, ["<|endoftext|>"])
    assert not gpt2.is_cached()
    start = time.perf_counter()
    with pytest.raises(NanollmError, match="vocab.bpe, encoder.json not in tiktoken's cache") as err:
        create_tokenizer(TokenizerConfig(kind="gpt2"), [], tmp_path)
    assert time.perf_counter() - start < 1.0
    assert "\n" not in str(err.value) and "tokenizer.kind: bpe" in str(err.value)


def test_gpt2_cache_file_with_wrong_hash_counts_as_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    for url in gpt2.FILES:
        (tmp_path / hashlib.sha1(url.encode()).hexdigest()).write_text("truncated")
    assert gpt2.missing_files() == list(gpt2.FILES)


@pytest.mark.skipif(not gpt2.is_cached(), reason="tiktoken's GPT-2 files are not cached on this machine")
def test_gpt2_from_cache(tmp_path):
    tok = create_tokenizer(TokenizerConfig(kind="gpt2"), [], tmp_path)
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    assert tok.encode("hello world") == [31373, 995]


def test_patterns_match_tiktoken():
    import inspect

    from tiktoken_ext import openai_public

    assert SPLIT_PATTERNS["gpt2"] == openai_public.r50k_pat_str
    assert f'r"""{SPLIT_PATTERNS["gpt4"]}"""' in inspect.getsource(openai_public.cl100k_base)
