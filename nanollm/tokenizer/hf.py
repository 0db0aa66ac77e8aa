"""Our tokenizer as a Hugging Face one: a tokenizer.json for `tokenizers` that encodes every text to the
ids tiktoken gives, plus the tokenizer_config.json that tells transformers how to load it.

Owns the conversion and the <|endoftext|>-first convention on the Hugging Face side; the model
folder these files join is nanollm.hf_folder's. `tokenizers` is imported lazily (transformers needs it,
so it is there wherever the folder is useful).

How the pieces map (the standard tiktoken -> HF conversion, as transformers' TikTokenConverter):
- pre-tokenizer: our split regex (Split, "isolated": the matches are the chunks), then ByteLevel,
  which renders each byte of a chunk as GPT-2's printable stand-in character (no regex of its own).
- model: BPE whose vocab maps each token's rendered bytes to its id (= its tiktoken rank), with
  `ignore_merges` (a chunk that is itself a token is that token, tiktoken's first lookup). tiktoken
  joins whichever adjacent pair forms the lowest-ranked token; tokenizers applies the lowest-ranked
  merge. So the merges are every split of each token into two tokens, ordered by the token's rank
  (splits of one token by their parts' ranks). The two could only differ where two different splits
  of one token are candidates at once (tiktoken takes the leftmost); fuzzing found no such text
  (tests/test_hf.py runs the tricky cases: repeated-character runs, random Unicode).
- special tokens: added tokens at their ids, never matched in text (`split_special_tokens`), just
  as our `Tokenizer.encode` never produces them.
- post-processor: <|endoftext|> before every text, because `nanollm generate` starts every
  prompt with it (the model only ever saw text after a document separator).
- regex dialect: see `oniguruma_pattern`.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nanollm.errors import NanollmError

if TYPE_CHECKING:
    import tokenizers

    from nanollm.tokenizer.tokenizer import Tokenizer

__all__ = ["HF_TOKENIZER_FILES", "hf_tokenizer", "oniguruma_pattern", "write_hf_tokenizer"]

HF_TOKENIZER, HF_TOKENIZER_CONFIG = "tokenizer.json", "tokenizer_config.json"
# No special_tokens_map.json: transformers 4 and 5 both read bos/eos from tokenizer_config.json,
# and 5 no longer writes that file.
HF_TOKENIZER_FILES = (HF_TOKENIZER, HF_TOKENIZER_CONFIG)

_BOUNDED_REPEAT = re.compile(r"\{\d+(?:,\d*)?\}")  # {n}, {n,}, {n,m}
_INLINE_FLAGS = re.compile(r"\(\?([a-zA-Z-]*)[:)]")  # (?i:...), (?-i), (?m) ...


# ---------------------------------------------------------------------------- regex dialect


def oniguruma_pattern(pattern: str) -> str:
    """`pattern` in tiktoken's dialect (Rust regex + fancy-regex) rewritten for Oniguruma, tokenizers' engine.

    Oniguruma (Ruby syntax) reads two constructs differently. A possessive bounded repeat
    `X{1,3}+` is `(X{1,3})+` to Ruby, i.e. unbounded: the gpt4 pattern would keep "12345" as one
    chunk instead of "123" "45"; it becomes the atomic group `(?>X{1,3})`, which is what
    possessive means. `$` and `^` match at every line end and start in Ruby, only at the end and
    start of the text in tiktoken; they become `\\z` and `\\A`. The other constructs our patterns use
    (`\\p{L}`, `\\s`, `++`, `?+`, lookahead, `(?i:...)`) mean the same in both. Inline flags other
    than i (m, s, x, ...) differ between the dialects and raise ValueError.
    """
    out: list[str] = []  # one piece per atom, so a quantifier can wrap the atom it follows
    groups: list[int] = []  # where in `out` each open group starts
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            end = i + 2
            if pattern[i + 1 : end] in ("p", "P", "x", "u") and pattern.startswith("{", end):  # \p{L}, \x{263a}
                end = pattern.index("}", end) + 1
            out.append(pattern[i:end])
            i = end
        elif c == "[":
            end = _class_end(pattern, i)
            out.append(pattern[i:end])
            i = end
        elif c == "(":
            flags = _INLINE_FLAGS.match(pattern, i)
            if flags and set(flags.group(1)) - {"i", "-"}:
                raise ValueError(
                    f"inline flags {flags.group()!r} mean other things in Oniguruma; only (?i) is converted"
                )
            groups.append(len(out))
            out.append(c)
            i += 1
        elif c == ")":
            start = groups.pop()
            out[start:] = ["".join(out[start:]) + c]  # the whole group is now one atom
            i += 1
        elif c in "$^":
            out.append(r"\z" if c == "$" else r"\A")
            i += 1
        elif out and (repeat := _BOUNDED_REPEAT.match(pattern, i)):
            i = repeat.end()
            if pattern.startswith("+", i):  # possessive
                out[-1] = f"(?>{out[-1]}{repeat.group()})"
                i += 1
            else:
                out[-1] += repeat.group()
        elif out and c in "*+?":
            out[-1] += c  # a quantifier, or the possessive/lazy mark after one
            i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _class_end(pattern: str, start: int) -> int:
    """The index just past the character class opening at pattern[start] ("["), nested classes included."""
    depth, i = 0, start
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        i += 1
        if c == "[":
            depth += 1
            i += pattern.startswith("^", i)
            i += pattern.startswith("]", i)  # a "]" right after "[" or "[^" is a literal
        elif c == "]":
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unterminated character class at {start} in {pattern!r}")


# ---------------------------------------------------------------------------- vocabulary


@cache
def _byte_chars() -> tuple[str, ...]:
    """GPT-2's printable stand-in for each byte: printable Latin-1 stays itself, the rest go to U+0100 on.

    The table HF's ByteLevel pre-tokenizer and decoder use (bytes_to_unicode in GPT-2's encoder.py).
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, shifted = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + shifted)
            shifted += 1
    return tuple(chars[b] for b in range(256))


def _render(token: bytes) -> str:
    table = _byte_chars()
    return "".join(table[b] for b in token)


def _vocab_and_merges(tokens: list[bytes]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """BPE vocab and merges for the tokens of ranks 0..n-1 (`tokens[rank]`): every split into two tokens."""
    ranks = {token: rank for rank, token in enumerate(tokens)}
    merges: list[tuple[str, str]] = []
    for token in tokens:  # in rank order, so merges are ordered by the token they make
        splits = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in ranks and token[k:] in ranks]
        splits.sort(key=lambda pair: (ranks[pair[0]], ranks[pair[1]]))
        merges += [(_render(left), _render(right)) for left, right in splits]
    return {_render(token): rank for token, rank in ranks.items()}, merges


# ---------------------------------------------------------------------------- the tokenizer


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise NanollmError("exporting the tokenizer needs Hugging Face tokenizers: pip install tokenizers") from None
    return tokenizers


def hf_tokenizer(tok: Tokenizer) -> tokenizers.Tokenizer:
    """A `tokenizers.Tokenizer` that encodes like `tok` (after a leading <|endoftext|>) and decodes like it.

    Raises NanollmError for what tokenizer.json cannot express: a split regex Oniguruma reads
    differently, or a special token whose text is also a regular token.
    """
    tk = _tokenizers()
    from tokenizers import decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    special_ids = set(tok.special_tokens.values())
    n_ranks = tok.vocab_size - len(special_ids)  # ranks 0..n-1, then the special tokens (tokenizer.py checks it)
    tokens = [tok.encoding.decode_single_token_bytes(rank) for rank in range(n_ranks)]
    vocab, merges = _vocab_and_merges(tokens)
    for name in tok.special_tokens:
        if name in vocab:
            raise NanollmError(
                f"special token {name!r} of {tok.path} is also regular token {vocab[name]}, which tokenizer.json "
                "cannot express; retrain the tokenizer with another tokenizer.special_tokens name"
            )
    pattern = tok.encoding._pat_str  # tiktoken keeps the split regex only in this attribute
    try:
        split = pre_tokenizers.Split(tk.Regex(oniguruma_pattern(pattern)), behavior="isolated", invert=False)
    except Exception as err:  # ValueError from the rewrite; tokenizers raises a bare Exception for a bad regex
        raise NanollmError(f"split pattern of {tok.path} cannot be converted for tokenizers ({err})") from None

    hf = tk.Tokenizer(BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    hf.decoder = decoders.ByteLevel()
    specials = sorted(tok.special_tokens.items(), key=lambda item: item[1])  # added in id order: ids n_ranks, ...
    hf.add_special_tokens([tk.AddedToken(name, special=True, normalized=False) for name, _ in specials])
    assert all(hf.token_to_id(name) == token_id for name, token_id in specials)  # tokenizer.py checked the ids
    eot = next(iter(tok.special_tokens))
    try:
        hf.post_processor = processors.TemplateProcessing(  # lists, not strings: a name may hold spaces
            single=[eot, "$A:0"],
            pair=[eot, "$A:0", f"{eot}:1", "$B:1"],  # two texts: two documents, each after its separator
            special_tokens=[(eot, tok.eot_id)],
        )
    except ValueError:  # tokenizers parses "name:type_id" and "$A"
        raise NanollmError(
            f"special token {eot!r} of {tok.path} holds ':' or starts with '$', which tokenizers' templates cannot "
            "hold; retrain the tokenizer with another first tokenizer.special_tokens name"
        ) from None
    return hf


def write_hf_tokenizer(tok: Tokenizer, folder: str | Path, *, model_max_length: int) -> list[str]:
    """Write tokenizer.json and tokenizer_config.json into `folder`; their names.

    Plain writes: the caller makes the folder atomic (nanollm.hf_folder writes it through atomic_path).
    `model_max_length` is the context the model was trained at (HF warns past it; ours still runs).
    """
    folder = Path(folder)
    eot = next(iter(tok.special_tokens))
    (folder / HF_TOKENIZER).write_text(hf_tokenizer(tok).to_str(pretty=True) + "\n", encoding="utf-8")
    config = {
        # the generic fast tokenizer: a model-specific class (LlamaTokenizer) would rebuild its own pipeline
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eot,
        "eos_token": eot,
        "split_special_tokens": True,  # "<|endoftext|>" typed in a text is text, as in Tokenizer.encode
        "clean_up_tokenization_spaces": False,  # decode gives the bytes back, spaces before punctuation included
        "add_prefix_space": False,
        "model_max_length": model_max_length,
    }
    (folder / HF_TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return list(HF_TOKENIZER_FILES)
