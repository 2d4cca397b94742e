"""STUB: being written. Replace this whole file."""
