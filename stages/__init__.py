"""Thin Click commands, one module per pipeline stage, over the nanollm library."""
