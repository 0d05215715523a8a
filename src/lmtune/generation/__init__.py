"""Generation: the sampler and stop rules (`sampling`) and the slot cache for continuous batching (`slots`),
both on the one decoder, `lmtune.decode` (prefill, static KV cache, GGUF-block weights via `lmtune.blocks`,
int8). `generate`, `chat`, task prediction and `serve` all decode through these."""
