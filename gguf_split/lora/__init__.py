"""LoRA adapters: the math, llama.cpp's adapter files, the overlay on a loaded task, extraction, and
serving through llama.cpp. Imports format and disk.
"""
