"""benchmarks package (filled by later issues; see ../shared/DESIGN.md)."""
