"""The GPT decode path, backend-free: the steps protocol every backend implements (`steps`), the decode
loop (`generate`) with its logits processing and draws (`sampling`) and beam bookkeeping (`beam`), the
host KV cache (`kv_cache`), the steps over any two graph executors (`graph_steps`), and a segment's
codes cut at the stop token (`codes`).

The decode loop is `runtime/gpt/generate.py:generate`. The TensorRT steps with a device-resident cache
are in `runtime/trt/gpt_steps.py`.
"""
