"""The KV-cache benchmark: greedy decoding timed with and without the cache, checked, and written up.

Nothing is imported here: the stage imports the modules it uses.
"""
