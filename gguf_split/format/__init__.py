"""GGUF files: the strict header reader and writer, gguf-split's own records, file names, and a
zero-copy view of any GGUF model. Imports nothing above it (errors only).
"""
