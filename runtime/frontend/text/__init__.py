"""Text front-end (UPSTREAM.md §2.6): normalization (`normalize`, engines in `wetext` / `fallback`),
CJK splitting (`cjk`), SentencePiece tokenization (`tokenizer`) and segmentation (`segments`)."""
