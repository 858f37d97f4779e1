"""Tokens -> what a client reads: a choice's text (EOS, stop strings), the text a stream may send
once blocks are committed, the canvas of a denoising step, and the chat template.

A streamed choice sends text only from committed blocks (every position of the block decoded), and
only as far as the text is final: cut at the first EOS and the first stop string, and never a
trailing partial character (a byte-level BPE splits one character over several tokens). So the
concatenated stream equals the non-streamed text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from sinkdlm.checkpoint import chat_settings
from sinkdlm.errors import UserError
from sinkdlm.interop.hf_tokenizer import MASK_TOKEN, TOKENIZER_CONFIG
from sinkdlm.serve.schema import RequestError

PARTIAL = "\ufffd"  # what decoding shows for an incomplete UTF-8 character


@dataclass
class Choice:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    tokens: int  # completion tokens (up to the EOS)


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """The text before the earliest stop string, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[:min(cuts)], True) if cuts else (text, False)


class Decoder:
    """The tokenizer as the server uses it: ids <-> text, the mask's text, EOS."""

    def __init__(self, tokenizer: Any, eos_id: int, mask_id: int) -> None:
        self.tokenizer, self.eos_id, self.mask_id = tokenizer, eos_id, mask_id
        self.mask_text = tokenizer.id_to_token(mask_id) or MASK_TOKEN

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def until_eos(self, ids: list[int]) -> tuple[list[int], bool]:
        return (ids[:ids.index(self.eos_id)], True) if self.eos_id in ids else (ids, False)

    def choice(self, ids: list[int], gen_length: int, stop: list[str]) -> Choice:
        """A finished choice from the sampler's tokens (cut at EOS already, or EOS-filled)."""
        ids, ended = self.until_eos(ids)
        text, stopped = cut_at_stop(self.decode(ids), stop)
        finished = ended or stopped or len(ids) < gen_length
        return Choice(text, "stop" if finished else "length", len(ids))

    def canvas(self, region: list[int]) -> str:
        """A denoising step's generated region as text, each masked position as the mask token."""
        parts, run = [], []
        for token in region:
            if token == self.mask_id:
                parts += [self.decode(run), self.mask_text]
                run = []
            else:
                run.append(token)
        return "".join(parts + [self.decode(run)])


class BlockStream:
    """The text of one streamed choice, sent as its blocks are committed."""

    def __init__(self, decoder: Decoder, block: int, stop: list[str]) -> None:
        self.decoder, self.block, self.stop = decoder, block, stop
        self.sent, self.committed, self.done = "", 0, False

    def update(self, region: Tensor) -> str:
        """The new text after a step whose generated region is `region`; "" when no block was committed."""
        if self.done:
            return ""
        decoded = (region != self.decoder.mask_id).view(-1, self.block).all(1).tolist()
        committed = next((b for b, d in enumerate(decoded) if not d), len(decoded))
        if committed == self.committed:
            return ""
        self.committed = committed
        ids, ended = self.decoder.until_eos(region[: committed * self.block].tolist())
        text, stopped = cut_at_stop(self.decoder.decode(ids), self.stop)
        self.done = ended or stopped
        if not self.done:
            hold = max(map(len, self.stop), default=1) - 1  # a stop string may begin here and end in the next block
            text = text.rstrip(PARTIAL)
            text = text[:max(0, len(text) - hold)]
        return self._advance(text)

    def finish(self, final: str) -> str:
        """What remains to send of the final text."""
        return self._advance(final)

    def _advance(self, text: str) -> str:
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta


def chat_template(checkpoint: Path, override: str | None) -> tuple[str | None, str]:
    """(the chat template, the BOS text it may use): the file `override`, else the checkpoint's
    tokenizer_config.json's template (Hugging Face's layout: an exported folder), else the one its
    meta.json carries (`convert` records the source tokenizer's), else None."""
    config = checkpoint / TOKENIZER_CONFIG
    try:
        settings = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
        settings = settings if settings.get("chat_template") else {**settings, **chat_settings(checkpoint)}
        template, bos = settings.get("chat_template"), settings.get("bos_token") or ""
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise UserError(f"{config} is not a JSON object; fix it or remove it") from None
    bos = bos.get("content", "") if isinstance(bos, dict) else str(bos)
    if override is not None:
        path = Path(override)
        if not path.is_file():
            raise UserError(f"--chat-template {path} does not exist; pass a Jinja template file")
        return path.read_text(encoding="utf-8"), bos
    if isinstance(template, list):  # [{name, template}]: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if isinstance(template, dict):  # {name: template}, as transformers holds several
        template = template.get("default")
    return (template if isinstance(template, str) else None), bos


class ChatTemplate:
    """A Hugging Face chat template (Jinja, sandboxed as transformers renders it)."""

    def __init__(self, source: str, bos: str, eos: str) -> None:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            self.template = env.from_string(source)
        except TemplateError as e:
            raise UserError(f"the chat template does not parse: {e}; fix it or pass another with --chat-template") \
                from None
        self.bos, self.eos, self.error = bos, eos, TemplateError

    def render(self, messages: list[dict[str, str]]) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=True, bos_token=self.bos,
                                        eos_token=self.eos)
        except self.error as e:
            raise RequestError(f"the chat template refused these messages: {e}", "messages") from None
