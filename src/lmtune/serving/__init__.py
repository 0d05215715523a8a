"""Serving: the OpenAI-compatible API (`api`, with its request bodies and errors) and the continuous batcher
(`batcher`) it puts the requests on; `lmtune serve` (lmtune/serve.py) loads the model and runs them."""
