"""Models in and out of sinkdlm, read from their tensors: none of their code is run.

- `convert`: `sinkdlm convert`'s dispatch; a Llama/Qwen2 causal LM through transformers (HF folder,
  Hub name, GGUF)
- `llada`, `dream`: the diffusion LMs LLaDA and Dream, from their folders (`hf_folder` reads configs,
  safetensors and tokenizers of a HF model folder or Hub snapshot)
- `smdm`: SMDM's / the paper's lit_gpt `.pth` checkpoints (`weights_only=True`)
- `added_rows`: the mask token's and the sinks' embedding rows every import adds
- `export`: a folder transformers loads (`sinkdlm export`), with `hf_tokenizer` (its tokenizer and mask
  token), `llama_layout` (`--llama`), `model_card` (its README.md); `from_export`: such a folder back
- `hf_code/`: the modelling code shipped inside every export (runs without sinkdlm)
"""
