"""Eager, export-friendly PyTorch modules of IndexTTS2, one family per module, each with its loader.

Rules every module here follows (they make ONNX export and TensorRT possible later): no data-dependent
Python control flow in `forward`, no buffer mutation, masks built from lengths with finite large
negatives, constants precomputed at construction or load, weight norm folded at load.
"""
