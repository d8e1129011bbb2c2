"""Export wrappers of the GPT-side graphs (in progress)."""
WRAPPERS: dict = {}
