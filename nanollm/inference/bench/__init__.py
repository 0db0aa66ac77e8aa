"""The KV-cache benchmark: greedy decoding timed with and without the cache, checked, and written up.

One idea a module. timing.py runs the protocol (seeded prompts, warm-up, alternating rounds,
medians) and makes the rows; equality.py decides whether the cached and the plain path agree,
up to a near-tie; bandwidth.py turns tokens/s into bytes/s of weights read, beside the copy
bandwidth the machine reaches; results.py writes the rows as CSV and flat metrics and reads
them back; chart.py draws them; report.py renders the markdown section of docs/kv_cache.md.
Generation is nanollm.inference.generate's, the cache the model's, the transformers peer
nanollm.inference.peers'. Nothing is imported here: the stage imports what it uses.
"""
