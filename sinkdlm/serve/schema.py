"""A request body -> one validated generation: OpenAI's fields, and the sampler's diffusion fields.

A request may set the diffusion settings a `sinkdlm generate` option sets, under the same names
(`steps`, `block_length`, `remasking`, `threshold`, `cache`, `guidance`, ...), checked by the same
declarations (SampleConfig: its types, allowed values, ranges and cross-checks); a field it leaves
out takes the server's value (`sinkdlm serve`'s options, whose defaults are the CLI's). OpenAI's
`max_tokens` is the sampler's gen_length; with max_tokens but no `steps`, steps keep the server's
tokens per step. Fields of neither are refused by name, as are OpenAI's that a diffusion model
cannot honour (logprobs, penalties, logit_bias), unless given their neutral value.

Noise: a request's choice k draws the sampler's per-row noise of index seed * CHOICE_SPACE + k
(the sampler's own seed fixed at 0), so its output depends on its seed, never on its batch mates.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sinkdlm.errors import UserError
from sinkdlm.fields import choices_of, field_types, without_none
from sinkdlm.sample import SAMPLING_FIELDS, SampleConfig, validate_prompts

# settings the server fixes: each would make a row depend on its batch or change what max_tokens means
SERVER_FIXED = ("batch_ranking", "padding", "length_includes_prompt")
SERVER_OPTIONS = tuple(f for f in SAMPLING_FIELDS if f not in (*SERVER_FIXED, "seed"))  # `sinkdlm serve`'s
REQUEST_SAMPLING = tuple(f for f in SERVER_OPTIONS if f != "gen_length")  # diffusion body fields
CHOICE_SPACE = 2**16  # noise indices per seed: more than any request's prompts x n
SEED_SPACE = 2**64  # a seed is taken modulo this (OpenAI's seeds are signed 64-bit integers)
MAX_STOP = 16  # stop strings per request (OpenAI allows 4; lm-eval's tasks may send more)

# OpenAI fields a diffusion sampler cannot honour: accepted only with these neutral values
NEUTRAL = {"echo": (False,), "logprobs": (None, False), "top_logprobs": (None, 0), "frequency_penalty": (0,),
           "presence_penalty": (0,), "logit_bias": (None, {}), "suffix": (None, ""), "best_of": (None, 1),
           "parallel_tool_calls": (None,), "tools": (None, []), "tool_choice": (None, "none")}
COMMON = ("model", "max_tokens", "n", "stop", "seed", "stream", "stream_options", "user", "stream_steps")
COMPLETION_FIELDS = {"prompt", *COMMON, *REQUEST_SAMPLING, *NEUTRAL}
CHAT_FIELDS = {"messages", "max_completion_tokens", *COMMON, *REQUEST_SAMPLING, *NEUTRAL}


class RequestError(Exception):
    """A request the server refuses: OpenAI's error object, with the field at fault in `param`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.kind = message, param, status, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """What the served model and the server allow."""

    model_name: str
    block_size: int  # the model's context: prompt + max_tokens
    vocab_size: int  # prompt token ids must be below it
    max_rows: int  # prompts x n of one request: the server's --max-batch


@dataclass
class Generation:
    """One request, validated: its prompts as token ids, each sampled n times."""

    prompts: list[list[int]]
    n: int
    sampling: SampleConfig  # seed 0: the noise is keyed by `indices`
    seed: int
    stop: list[str]
    stream: bool = False
    stream_steps: bool = False  # also stream every denoising step's canvas
    include_usage: bool = False

    @property
    def rows(self) -> list[list[int]]:
        """The sampler's prompts: choice k = prompt k // n."""
        return [p for p in self.prompts for _ in range(self.n)]

    @property
    def indices(self) -> list[int]:
        return [(self.seed % SEED_SPACE) * CHOICE_SPACE + k for k in range(len(self.prompts) * self.n)]


def _type_error(name: str, value: Any, wanted: str) -> RequestError:
    return RequestError(f"{name} must be {wanted}, got {_shown(value)}", name)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def typed(name: str, value: Any, hint: Any) -> Any:
    """A JSON value checked against a settings field's type (ints not floats, no bools for numbers)."""
    base = without_none(hint)
    if value is None and base is not hint:
        return None
    if base is bool:
        if not isinstance(value, bool):
            raise _type_error(name, value, "true or false")
    elif base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(name, value, "an integer")
    elif base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(name, value, "a number")
        value = float(value)
    elif choices_of(base) is not None and value not in choices_of(base):
        raise RequestError(f"{name}={_shown(value)} is not one of {list(choices_of(base))}", name)
    return value


def _int(body: dict, name: str, default: int | None, low: int, high: int | None = None,
         fix: str = "") -> int | None:
    value = typed(name, body.get(name, default), int | None)
    if value is not None and (value < low or (high is not None and value > high)):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise RequestError(f"{name}={value} must be {bounds}{fix}", name)
    return value


def check_fields(body: Any, allowed: set[str]) -> dict:
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    for name in sorted(body):
        if name not in allowed:
            raise RequestError(f"unknown field {name!r}; this server takes OpenAI's fields and the diffusion "
                               f"settings {', '.join(REQUEST_SAMPLING)}", name, code="unknown_field")
    for name, neutral in NEUTRAL.items():
        if name in body and body[name] not in neutral:
            raise RequestError(f"{name}={_shown(body[name])} is not supported by a diffusion sampler; leave it out",
                               name, code="unsupported_field")
    return body


def sampling(body: dict, defaults: SampleConfig, max_tokens: int | None) -> SampleConfig:
    """The request's SampleConfig: its diffusion fields over the server's defaults."""
    hints = field_types(SampleConfig)
    given = {name: typed(name, body[name], hints[name]) for name in REQUEST_SAMPLING if name in body}
    if max_tokens is not None:
        given["gen_length"] = max_tokens
        if "steps" not in given:  # keep the server's tokens per step, a multiple of the blocks
            blocks = max_tokens // (given.get("block_length", defaults.block_length) or max_tokens) or 1
            steps = math.ceil(defaults.steps * max_tokens / defaults.gen_length / blocks) * blocks
            given["steps"] = max(blocks, min(steps, max_tokens))
    try:
        return dataclasses.replace(defaults, seed=0, **given)
    except UserError as e:
        wrong = next((name for name in given if f"{name}=" in str(e)), None)
        text = str(e).replace("sampling ", "").replace("gen_length", "max_tokens")
        raise RequestError(text, "max_tokens" if wrong == "gen_length" else wrong) from None


def generation(body: dict, prompts: list[list[int]], where: str, defaults: SampleConfig, limits: Limits) -> Generation:
    """The fields every request shares; `prompts` are already token ids, `where` names their field."""
    model = body.get("model")
    if not isinstance(model, str):
        raise RequestError("model is required: a string naming the served model (GET /v1/models)", "model")
    if model != limits.model_name:
        raise RequestError(f"model {model!r} is not served here; this server serves {limits.model_name!r}",
                           "model", status=404, code="model_not_found")
    max_tokens_field = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _int(body, max_tokens_field, None, 1, limits.block_size - 1,
                      f" (the model's context is {limits.block_size} tokens, prompt included)")
    n = _int(body, "n", 1, 1, None)
    if n * len(prompts) > limits.max_rows:
        raise RequestError(f"n={n} x {len(prompts)} prompt(s) = {n * len(prompts)} sequences, more than this "
                           f"server's --max-batch {limits.max_rows}; ask for fewer", "n")
    cfg = sampling(body, defaults, max_tokens)
    try:
        validate_prompts(prompts, cfg, limits.block_size, [f"{where} {i}" for i in range(len(prompts))])
    except UserError as e:
        raise RequestError(str(e).replace("gen_length", "max_tokens"), where, code="context_length_exceeded") \
            from None
    seed = _int(body, "seed", None, -(2**63), 2**63 - 1)
    stream = typed("stream", body.get("stream", False), bool | None) or False
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not set(options) <= {"include_usage"}:
        raise RequestError("stream_options must be an object with at most include_usage", "stream_options")
    return Generation(prompts, n, cfg, secrets.randbits(63) if seed is None else seed, stop_strings(body.get("stop")),
                      stream, typed("stream_steps", body.get("stream_steps", False), bool),
                      typed("stream_options", options.get("include_usage", False), bool))


def stop_strings(stop: Any) -> list[str]:
    """OpenAI's stop: null, a string or a list of strings."""
    items = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise RequestError(f"stop must be a non-empty string or a list of them, got {_shown(stop)}", "stop")
    if len(items) > MAX_STOP:
        raise RequestError(f"stop has {len(items)} strings; at most {MAX_STOP}", "stop")
    return items


def completion_prompts(prompt: Any, encode: Callable[[str], list[int]], vocab_size: int) -> list[list[int]]:
    """OpenAI's prompt: a string, a list of strings, a list of token ids, or a list of such lists."""
    if isinstance(prompt, str):
        return [encode(prompt)]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return [encode(p) for p in prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [_token_ids(prompt, vocab_size)]
    if isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        return [_token_ids(p, vocab_size) for p in prompt]
    raise RequestError("prompt must be a string, a list of strings, a list of token ids or a list of such lists, "
                       f"got {_shown(prompt)}", "prompt")


def _token_ids(ids: Sequence[Any], vocab_size: int) -> list[int]:
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in ids):
        raise RequestError(f"prompt token ids must be integers in [0, {vocab_size}), got {_shown(ids)}", "prompt")
    return list(ids)


def chat_messages(messages: Any) -> list[dict[str, str]]:
    """OpenAI's messages: [{role, content}], content a string or a list of text parts."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise RequestError(f"messages[{i}] must be an object with a role and a content", "messages")
        content = m["content"]
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string or a list of text parts", "messages")
        out.append({"role": m["role"], "content": content})
    return out
