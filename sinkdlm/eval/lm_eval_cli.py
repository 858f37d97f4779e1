"""lm-eval's own command line with the `sinkdlm` model registered: `sinkdlm-lm-eval` (installed
with sinkdlm) or `python -m sinkdlm.eval.lm_eval_cli`, taking exactly lm-eval's options.

lm-eval (0.4.13) finds a model only in its own package: no entry-point discovery, and
`--include_path` adds tasks, not models (docs/lm-eval.md). So `lm_eval --model sinkdlm` cannot see
this package; this is `lm_eval` after `import sinkdlm.eval.harness`.

    sinkdlm-lm-eval run --model sinkdlm --model_args pretrained=runs/sft,gen_length=64 \\
        --tasks gsm8k --num_fewshot 0 --include_path ~/.cache/sinkdlm/lm_eval_tasks
"""

from __future__ import annotations

import sys

from sinkdlm.errors import EXIT_BAD_INPUT, UserError

PROG = "sinkdlm-lm-eval"


def main() -> int:
    from sinkdlm.eval.run import import_harness

    try:
        import_harness()  # registers the model `sinkdlm`
        from lm_eval.__main__ import cli_evaluate

        cli_evaluate()
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
