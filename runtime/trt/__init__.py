"""TensorRT on cuda-python: the executor (`executor`), the checked CUDA wrapper (`cuda`), CUDA-graph
capture/replay (`cuda_graphs`), the device KV cache (`kv_device`) and its copy plans (`kv_plan`), the
GPT steps on TensorRT (`gpt_steps`), what a plan is keyed by and its profiles (`engine_plan`), and the
GPU/TensorRT probe (`gpu`).

Nothing here imports tensorrt or cuda-python at module level: `runtime.trt.gpu.import_tensorrt` and
`runtime.trt.cuda` load them on first use, so the package imports (and is tested through fakes) on a
machine without a GPU.
"""
