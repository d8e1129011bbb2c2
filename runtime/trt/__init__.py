"""TensorRT on cuda-python: the one checked way into tensorrt (`api`: import, logger, enum names), the
executor (`executor`), the checked CUDA wrapper (`cuda`), CUDA-graph capture/replay (`cuda_graphs`), the
device KV cache (`kv_device`) and its copy plans (`kv_plan`), the GPT steps on TensorRT (`gpt_steps`),
what a plan is keyed by and its profiles (`engine_plan`), and the GPU/TensorRT probe with its driver
diagnosis (`gpu`).

Nothing here imports tensorrt or cuda-python at module level: `runtime.trt.api.import_tensorrt` and
`runtime.trt.cuda` load them on first use, so the package imports (and is tested through fakes) on a
machine without a GPU.
"""
