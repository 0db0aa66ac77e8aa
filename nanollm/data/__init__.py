"""Raw text and token data: document sources (sources.py), the corpus folder (corpus.py), token memmaps (tokens.py).

Submodules are imported explicitly; this package imports nothing so that loading it stays free.
"""
