"""Text front-end: CJK splitting, (later) normalization, SentencePiece tokenization, segmentation."""
