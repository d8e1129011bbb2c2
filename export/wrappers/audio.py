"""Export wrappers of the audio-side graphs (in progress)."""
WRAPPERS: dict = {}
