"""Where a run executes: local process pool, emulated AWS (moto), real AWS."""
