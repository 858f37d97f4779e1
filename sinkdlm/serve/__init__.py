"""`sinkdlm serve`: an OpenAI-compatible HTTP server for any sinkdlm checkpoint.

schema: a request body -> validated settings (OpenAI's fields, the sampler's diffusion fields);
batcher: one worker thread that groups concurrent requests into `sample.generate` calls;
text: completion text (EOS, stop strings), streamed block deltas, the denoising canvas, chat templates;
app: the FastAPI routes, OpenAI's response and error objects, and `serve` (uvicorn).
Only app imports the `serve` extra's packages.
"""
