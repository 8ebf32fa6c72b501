"""Transport packs: per-tensor codecs, the pack container, and which files a pack holds. Imports
everything below the CLI but runtime and lora.
"""
