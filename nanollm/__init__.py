"""nanollm: a from-scratch small-LLM lab (data, BPE tokenizer, Transformer, training, evaluation).

The package is a library: it takes config objects and paths and never reads params.yaml
or knows about DVC. The `stages` package wraps it in Click commands.
"""

__version__ = "0.1.0"
