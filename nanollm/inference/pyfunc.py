"""A logged nanollm model as MLflow's pyfunc flavor runs it: a `prompt` column in, one completion per row out.

nanollm.tracking logs the checkpoint and tokenizer as an MLflow model whose loader is this
module (`loader_module="nanollm.inference.pyfunc"`): `mlflow.pyfunc.load_model` and `mlflow models
serve` call `_load_pyfunc(folder)` and then `predict`. The folder holds checkpoint/ (config.json,
architecture.json, model.pt), tokenizer/ (tokenizer.json) and sampling.json (the default params).
Nothing here imports mlflow, and nothing is pickled: a loaded model needs the nanollm package and
these files alone, and MLflow itself checks the params against the signature before `predict`.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from nanollm.hardware import pick_device
from nanollm.inference.engine import SamplingParams, generate_batch
from nanollm.inference.loading import document_prompt, load_for_decoding

CHECKPOINT, TOKENIZER, SAMPLING_FILE = "checkpoint", "tokenizer", "sampling.json"
# The params `predict` takes, in the order the signature lists them.
PARAMS = ("max_tokens", "temperature", "top_k", "top_p", "seed")


class PromptCompleter:
    """Completes prompts with one checkpoint and its tokenizer.

    Each prompt is completed after <|endoftext|> (a fresh document, as `nanollm generate` does)
    with its own sampler seeded by `seed`, and the rows of one call decode together as one batch
    (nanollm.inference.engine), so a row's text never depends on the rows beside it (greedy:
    up to a near-tie of the top two logits). Calls run one at a time under a lock: the model
    holds one KV cache, and a server may call `predict` from several threads.
    """

    def __init__(
        self, checkpoint: str | Path, tokenizer: str | Path, defaults: Mapping[str, Any], device: str = "auto"
    ):
        self.tokenizer, self.model = load_for_decoding(checkpoint, tokenizer, device=pick_device(device))
        self.defaults = {name: defaults[name] for name in PARAMS}
        self._lock = threading.Lock()

    def predict(self, model_input: Any, params: Mapping[str, Any] | None = None) -> list[str]:
        """The completion of each prompt: a DataFrame with a `prompt` column, or a list of strings.

        params (any subset of PARAMS; the rest default to sampling.json's): max_tokens >= 1,
        temperature >= 0 (0 is greedy), top_k >= 0 (0 is off), top_p in (0, 1] (1 is off), seed.
        """
        sampling = sampling_arguments({**self.defaults, **(params or {})})
        prompts: Iterable[Any] = model_input["prompt"] if hasattr(model_input, "columns") else model_input
        tok = self.tokenizer
        ids = [document_prompt(tok, "" if prompt is None else str(prompt)) for prompt in prompts]
        with self._lock:
            new = generate_batch(self.model, ids, SamplingParams(**sampling), stop_id=tok.eot_id)
        # a prompt ends on a whole character, so its new bytes start on one
        return [tok.decode(tokens) for tokens in new]


def sampling_arguments(params: Mapping[str, Any]) -> dict[str, Any]:
    """PARAMS as SamplingParams takes them (top_k 0 and top_p 1 are off); ValueError if out of range."""
    max_tokens, temperature = int(params["max_tokens"]), float(params["temperature"])
    top_k, top_p, seed = int(params["top_k"]), float(params["top_p"]), int(params["seed"])
    if max_tokens < 1:
        raise ValueError(f"max_tokens is {max_tokens}; use 1 or more")
    if temperature < 0:
        raise ValueError(f"temperature is {temperature}; use 0 (greedy) or more")
    if top_k < 0:
        raise ValueError(f"top_k is {top_k}; use 0 (off) or more")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p is {top_p}; use a value in (0, 1] (1 is off)")
    top_p_or_off = top_p if top_p < 1 else None
    return dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k or None, top_p=top_p_or_off, seed=seed)


def _load_pyfunc(path: str) -> PromptCompleter:
    """MLflow's entry point: the model folder (the `data` of the pyfunc flavor) as a PromptCompleter."""
    folder = Path(path)
    defaults = json.loads((folder / SAMPLING_FILE).read_text(encoding="utf-8"))
    return PromptCompleter(folder / CHECKPOINT, folder / TOKENIZER, defaults)
