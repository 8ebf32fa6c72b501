"""Survey: find the GGUF models under folders, hash each file once (a manifest cache), group them into
families that share tensor bytes, and say what a split of each would store and save.

Modules: `manifest` (what scanning one file yields; imported by assemble.scan, so it imports nothing from
the rest of this package), `cache` (manifests on disk, SQLite), `discover` (walking folders), `families`
(models from files, families from models), `cluster` (the per-file scans on a Dask cluster), `run` (the
`survey` call and its report). `from gguf_split.survey.run import survey`.
"""
