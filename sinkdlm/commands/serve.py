"""`sinkdlm serve --checkpoint DIR [--port 8000] [--api-key KEY] [sampling defaults]`: an OpenAI-compatible server.

POST /v1/completions and /v1/chat/completions (streamed with `stream: true`), GET /v1/models and
/health, on 127.0.0.1 unless --host says otherwise. The sampling options are the defaults of a
request that leaves a diffusion field out (a request may set each under the same name, e.g.
`"steps": 32`). Needs the `serve` extra.
"""

from __future__ import annotations

import argparse

from sinkdlm import fields
from sinkdlm.optional import require
from sinkdlm.sample import SampleConfig
from sinkdlm.serve.engine import ServeConfig
from sinkdlm.serve.schema import SERVER_OPTIONS


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder (its latest)")
    fields.add_arguments(parser, ServeConfig)
    fields.add_arguments(parser, SampleConfig, SERVER_OPTIONS)


def run(args: argparse.Namespace) -> int:
    cfg = ServeConfig(**fields.values_from(args, ServeConfig))
    defaults = SampleConfig(**fields.values_from(args, SERVER_OPTIONS))
    for module in ("fastapi", "uvicorn"):
        require(module, "sinkdlm serve")
    from sinkdlm.serve.app import bind, serve
    from sinkdlm.serve.engine import Engine

    sock = bind(cfg.host, cfg.port)  # a port in use is refused before the model loads
    serve(Engine(args.checkpoint, cfg, defaults), cfg, sock)
    return 0
