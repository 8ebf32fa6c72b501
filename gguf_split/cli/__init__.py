"""The `gguf-split` command, a thin layer over the library.
"""
