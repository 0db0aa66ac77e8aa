"""Running a trained model: decoding over token ids, and measuring it.

generate.py samples token ids (prefill, decode steps, temperature/top-k/top-p) and knows
nothing of text; bench/ is the KV-cache benchmark, one module an idea; peers.py builds the
transformers twin the benchmark races. The network and its KV cache are nanollm.model's.
Nothing is imported here, so loading one of these modules does not load the others.
"""
