"""The front-ends, in numpy, matching upstream's numbers: audio loading (`audio`), resampling
(`resample`), the SeamlessM4T and Kaldi fbank features (`features`), the 22.05 kHz log-mel (`mel`),
and text normalization, tokenization and segmentation (`text/`)."""
