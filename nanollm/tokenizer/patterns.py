"""What text the tokenizer sees: the pre-tokenizer split regexes by name, and the rule for strings
that are not valid Unicode. Shared by the BPE trainer (Python `regex`) and the tiktoken loader.

The regexes are copied verbatim from tiktoken_ext/openai_public.py so that training and
encoding (tiktoken's Rust engine) cut text into the same chunks.
"""

SPLIT_PATTERNS: dict[str, str] = {
    # GPT-2 (r50k_base): letters, numbers and punctuation runs, each with one optional leading space.
    "gpt2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""",
    # GPT-4 (cl100k_base): case-insensitive contractions, numbers in groups of at most 3 digits,
    # newlines kept apart from other whitespace (good for code indentation).
    "gpt4": (
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
        r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
    ),
}


def without_surrogates(text: str) -> str:
    """`text` as tiktoken encodes it: lone surrogates become U+FFFD, a high+low pair the character it stands for.

    A Python str may hold surrogate code points (U+D800..U+DFFF, e.g. from a JSON `\\ud83d`
    escape), which have no UTF-8 form. tiktoken's `encode_ordinary` then re-reads the text
    as UTF-16 with errors="replace" (tiktoken/core.py); the trainer applies the same rule, so
    both see the same chunks. Valid text comes back unchanged at the cost of one UTF-8 encode.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text
