"""The pipeline's default corpus, built in a temporary folder, for benchmarks run without one."""

from pathlib import Path


def stdlib_corpus(out: Path) -> Path:
    """The pipeline's default corpus (params.yaml defaults: stdlib source, seed 1337, 5% val)."""
    from nanollm.config import Config
    from nanollm.data.corpus import write_corpus
    from nanollm.data.sources import open_source

    cfg = Config()
    source = open_source(cfg.data)
    write_corpus(
        source,
        out,
        seed=cfg.seed,
        val_fraction=cfg.data.val_fraction,
        shard_bytes=cfg.data.shard_mb * 10**6,
        source_description=source.description,
    )
    return out
