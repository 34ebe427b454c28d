"""The OpenAI-compatible HTTP server behind `tunelab serve` (the verb, verbs/serve.py, binds and loads the model).

    requests.py    what the server holds (`Served`), request bodies, their validation, prompt rendering
    generation.py  one request's generation (through `evaluation.evaluate.generate_tokens`), stop strings
    batching.py    concurrent requests share one left-padded generate call
    logprobs.py    per-token log-probabilities recorded while generating, shaped as OpenAI answers them
    app.py         the FastAPI app: limits, errors, endpoints, server-sent events
    limits.py      the request body limit, whatever the framing (pure ASGI)
"""
