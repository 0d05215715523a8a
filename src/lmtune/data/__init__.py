"""Data: reading files into rows (`readers`) and rows of token ids into batches (`batching`)."""
