"""OpenAI's completions protocol as data: the request body, its checks, and the error every refusal takes.

Owns what a request may say and how a refusal reads ({"error": {message, type, param, code}},
a status to send it with), so the official clients raise their usual errors. Reading the body
off the connection, running the request and shaping the responses are server.py's; this module
imports no web framework and can be checked on plain bytes.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nanollm.inference.engine import SamplingParams

__all__ = ["ApiError", "CompletionRequest", "MAX_STOP_STRINGS", "parse_completion_request"]

MAX_STOP_STRINGS = 4  # OpenAI's limit


class ApiError(Exception):
    """A request the server refuses, answered as OpenAI does: {"error": {message, type, param, code}}.

    headers go out with the status (Retry-After on a 503 for a full queue, WWW-Authenticate on a 401).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool | None = False


class CompletionRequest(BaseModel):
    """The body of POST /v1/completions: OpenAI's fields, strictly typed (a string is no number).

    Fields OpenAI defines that this server cannot honour are accepted only at their neutral value
    (n=1, echo=false, ...) and refused otherwise, never silently ignored. Unknown fields are
    refused too, as OpenAI does: its clients send them only when asked to (extra_body), so one is
    a mistake to report. top_k is the one extension (vLLM's spelling; 0 or null turns it off).
    """

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    model: str
    prompt: Any  # a string, or a list of one string; checked by prompt_text() for a clearer message
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    stop: Any = None  # a string or a list of up to 4; checked by stop_strings()
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what torch.Generator.manual_seed takes
    stream: bool | None = False
    stream_options: _StreamOptions | None = None
    user: str | None = None
    # OpenAI parameters accepted only at their neutral value
    n: int | None = None
    best_of: int | None = None
    echo: bool | None = None
    logprobs: int | None = None
    suffix: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def check_supported(self) -> None:
        """Refuse, naming the field, every option set to something this server does not do."""
        unsupported = {
            "n": self.n not in (None, 1),
            "best_of": self.best_of not in (None, 1),
            "echo": bool(self.echo),
            "logprobs": self.logprobs is not None,
            "suffix": bool(self.suffix),
            "frequency_penalty": bool(self.frequency_penalty),
            "presence_penalty": bool(self.presence_penalty),
            "logit_bias": bool(self.logit_bias),
        }
        for name, refused in unsupported.items():
            if refused:
                value = json.dumps(getattr(self, name))
                raise ApiError(400, f"{name}={value} is unsupported by this server; leave it unset", param=name)

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if isinstance(self.prompt, list) and len(self.prompt) == 1 and isinstance(self.prompt[0], str):
            return self.prompt[0]
        if isinstance(self.prompt, list) and self.prompt and all(isinstance(p, str) for p in self.prompt):
            raise ApiError(400, "prompt: one prompt per request is supported; send one request each", param="prompt")
        raise ApiError(400, "prompt must be a string (token-id prompts are unsupported)", param="prompt")

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ApiError(400, "stop must be a string or a list of strings", param="stop")
        if len(stops) > MAX_STOP_STRINGS:
            raise ApiError(400, f"stop: at most {MAX_STOP_STRINGS} strings, got {len(stops)}", param="stop")
        if "" in stops:
            raise ApiError(400, "stop: stop strings must not be empty", param="stop")
        return stops

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            max_tokens=16 if self.max_tokens is None else self.max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_k=self.top_k or None,
            top_p=None if self.top_p is None or self.top_p >= 1.0 else self.top_p,
            seed=self.seed,
        )


def _validation_error(err: ValidationError) -> ApiError:
    """The first problem pydantic found, as one line naming the field."""
    first = err.errors(include_url=False)[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    if first["type"] == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument supplied: {param}", param=param)
    if first["type"] == "missing":
        return ApiError(400, f"{param} is required", param=param)
    got = json.dumps(first.get("input"))
    return ApiError(400, f"{param}: {first['msg'][0].lower()}{first['msg'][1:]}, got {got[:80]}", param=param)


def parse_completion_request(body: bytes) -> CompletionRequest:
    """The request in a POST /v1/completions body; ApiError (400) naming the problem when it is not UTF-8 JSON
    of the right shape. Options that need the model (its name, the context length) are the caller's to check."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ApiError(400, f"the request body is not UTF-8 (byte {err.start} is invalid)") from None

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        data = json.loads(text, parse_constant=no_constants)
    except ValueError as err:  # json.JSONDecodeError is one
        raise ApiError(400, f"the request body is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        request = CompletionRequest.model_validate(data)
    except ValidationError as err:
        raise _validation_error(err) from None
    request.check_supported()
    return request
