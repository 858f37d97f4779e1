"""sinkdlm: masked diffusion language models with a sink token.

The pipeline, in the order a run goes through it:
- data/: corpora -> tokenizers -> packed token shards (and the synthetic copy tasks)
- config.py, fields.py: one typed config tree, its allowed values declared once
- model.py, attention.py, diffusion.py: the Transformer with sink tokens, its attention kernels and
  masks, the masked-diffusion maths
- training/: the Fabric trainer (pretraining, SFT, adaptation), its run folder, recipes, parallelism
- checkpoint.py (hf_format.py: the transformers layout it also reads): folders of weights + config
- sample.py, window.py: reverse-diffusion sampling, sink-pinned windowed decoding
- eval/: likelihoods, lm-eval tasks, GSM8K, generation quality, copy-task probes
- analysis/: where attention sinks, over denoising steps and layers; figures, report, explorer page
- interop/: LLaDA, Dream, SMDM and Llama/Qwen2 in; a transformers-loadable folder out
- experiments/: the demo, the paper's ablation study, length generalisation
- serve/: an OpenAI-compatible HTTP server
- cli.py, commands/: `sinkdlm <command>`, each command only parsing and calling the above
- errors.py, optional.py, files.py, jsonl.py, intervals.py: small shared helpers, each named for its one job
"""

__version__ = "0.1.0"
