"""The server's settings, and what it holds while it runs: the model, its tokenizer, the request
defaults and limits, the chat template and the batcher. No web framework here."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from sinkdlm.checkpoint import resolve
from sinkdlm.errors import UserError
from sinkdlm.fields import check_choices, setting
from sinkdlm.sample import SampleConfig, load_for_sampling
from sinkdlm.serve.batcher import Batcher
from sinkdlm.serve.schema import Limits
from sinkdlm.serve.text import ChatTemplate, Decoder, chat_template

API_KEY_ENV = "SINKDLM_API_KEY"  # the key, when not given on the command line (where `ps` shows it)


@dataclass
class ServeConfig:
    """`sinkdlm serve`'s own options (the sampling defaults are SampleConfig's)."""

    host: str = setting("127.0.0.1", "address to bind; 0.0.0.0 serves other machines too")
    port: int = setting(8000, "TCP port; 0 = any free one (printed at start-up)", at_least=0, at_most=65535)
    api_key: str | None = setting(None, "every request must send `Authorization: Bearer KEY` (401 otherwise)",
                                  unset=f"${API_KEY_ENV}, else no key")
    model_name: str | None = setting(None, "the model id clients name", unset="the checkpoint folder's name")
    max_batch: int = setting(16, "most sequences (prompts x n) generated together; also a request's limit",
                             at_least=1)
    batch_window_ms: float = setting(10.0, "how long the first waiting request waits for others to batch with",
                                     at_least=0)
    chat_template: str | None = setting(None, "a Jinja chat template file for /v1/chat/completions",
                                        unset="the checkpoint's tokenizer_config.json's, else chat answers 400")
    device: str = setting("cpu", "torch device, e.g. cuda")

    def __post_init__(self) -> None:
        check_choices(self, "")
        if self.api_key is None:
            self.api_key = os.environ.get(API_KEY_ENV) or None
        if self.api_key is not None and not self.api_key.strip():
            raise UserError("--api-key is empty; pass a key or leave the option out")


class Engine:
    """A loaded checkpoint ready to serve."""

    def __init__(self, checkpoint: str | Path, cfg: ServeConfig, defaults: SampleConfig) -> None:
        ckpt = resolve(checkpoint)
        source, bos = chat_template(ckpt, cfg.chat_template)  # checked before the model loads
        self.model, tokenizer, eos = load_for_sampling(ckpt, cfg.device)
        self.decoder = Decoder(tokenizer, eos, self.model.mask_id)
        self.defaults = dataclasses.replace(defaults, seed=0)
        name = cfg.model_name or (ckpt.parent.name if ckpt.name.startswith("step-") else ckpt.name)
        m = self.model.cfg
        self.limits = Limits(name, m.block_size, m.require_vocab(), cfg.max_batch)
        self.template = ChatTemplate(source, bos, tokenizer.id_to_token(eos) or "") if source else None
        self.batcher = Batcher(self.model, self.decoder, cfg.batch_window_ms / 1000, cfg.max_batch)

    def close(self) -> None:
        self.batcher.close()
