"""The runtime loader: a split's tasks as zero-copy tensors over shared mappings. Imports format,
disk, splitdir (and lora when an adapter is applied).
"""
