"""Generation: the one decoder (`decoder`: prefill, static KV cache, int8), the lossless GGUF-block weights
it reads (`gguf_weights`), the sampler and stop rules (`sampling`) and the slot cache for continuous batching
(`slots`). `generate`, `chat`, task prediction and `serve` all decode through these."""
