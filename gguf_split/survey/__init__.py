"""Survey: find the GGUF models under folders, hash each file once (a manifest cache), group them into
families that share tensor bytes, and say what a split of each would store and save.

Modules: `manifest` (scanning one file into its manifest, a disk.manifest.FileManifest: the types live in
disk/ because assemble.scan uses them too), `cache` (manifests on disk, SQLite), `discover` (walking folders), `families`
(models from files, families from models), `cluster` (the per-file scans on a Dask cluster), `run` (the
`survey` call and its report). `from gguf_split.survey.run import survey`.
"""
