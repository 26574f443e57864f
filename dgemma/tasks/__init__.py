"""Task recipes built on the engine: data, text format, training setup and evaluation for one task each."""
