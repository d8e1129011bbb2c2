"""Streaming synthesis: audio chunks as they are ready, the chunked vocoder, the per-request pipeline."""
