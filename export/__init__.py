"""Export side: the eager, export-friendly PyTorch IndexTTS2, its checkpoint loaders, fixtures,
demo checkpoints and (later) ONNX export. Needs torch."""
