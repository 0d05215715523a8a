"""Tasks: one module each, with the same few functions (encode rows, the loss, predict, score)."""
