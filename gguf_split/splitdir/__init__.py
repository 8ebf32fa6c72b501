"""A split directory as it is on disk: its tasks and files, and what reads them (verify, restore,
info, llama.cpp links). Imports format and disk.
"""
