"""Lean, torch-free runtime: audio and text front-ends, executors, orchestration, CLI.

Nothing in this package imports torch, tensorrt or the `export` package at module level.
"""
