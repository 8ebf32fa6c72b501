"""Assembling a split: options and specs, scanning inputs, the planner, and the verbs that write
(split, add, remove). Imports format, disk and splitdir.
"""
