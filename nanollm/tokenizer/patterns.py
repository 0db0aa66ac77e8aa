"""The pre-tokenizer split regexes, by name; shared by the BPE trainer and the tiktoken loader.

Both are copied verbatim from tiktoken_ext/openai_public.py so that training (Python `regex`)
and encoding (tiktoken's Rust engine) cut text into the same chunks.
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
