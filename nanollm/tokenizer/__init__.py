"""Byte-level BPE tokenizers: training (bpe.py), the tokenizer.json format and tiktoken-backed
`Tokenizer` (tokenizer.py), tiktoken's cached GPT-2 encoding (gpt2.py), the split regexes
(patterns.py), config wiring and the bytes/token metric (train.py), and the same tokenizer as a
Hugging Face tokenizer.json (hf.py, imported on demand). See docs/bpe.md.
"""

from nanollm.tokenizer.bpe import train_bpe
from nanollm.tokenizer.patterns import SPLIT_PATTERNS
from nanollm.tokenizer.tokenizer import FILENAME, Tokenizer, load_tokenizer, save_bpe, save_gpt2
from nanollm.tokenizer.train import bytes_per_token, create_tokenizer

__all__ = [
    "FILENAME",
    "SPLIT_PATTERNS",
    "Tokenizer",
    "bytes_per_token",
    "create_tokenizer",
    "load_tokenizer",
    "save_bpe",
    "save_gpt2",
    "train_bpe",
]
