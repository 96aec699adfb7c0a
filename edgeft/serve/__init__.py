"""``edgeft serve``: the embedded model server (KServe V2 + TEI-style routes, dynamic batching,
API keys, Prometheus metrics). Modules: config (ServeConfig), runner (tokenizer + ORT session),
engine (the interface routes call), batcher (the built-in engine), codec (V2 JSON/binary),
auth (keys, rate limit), metrics, app (routes), server (uvicorn and the process lifecycle).
"""
