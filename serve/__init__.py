"""The serving layer: IndexTTS2 as a service above the runtime (`python -m serve`).

One process holds ONE model instance (a runtime `Synthesizer`, whose scheduler batches every request's
graph work) and opens two front doors onto it: an OpenAI-compatible HTTP API (FastAPI + uvicorn,
serve/http_api.py) and Triton Inference Server through PyTriton (serve/triton_models.py). Both doors take
the same request fields, checked by serve/params.py before anything is queued, and share the voice registry
(serve/voices.py) and the concurrency bound (serve/service.py).
"""
