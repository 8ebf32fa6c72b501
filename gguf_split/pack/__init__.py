"""Transport packs (docs/pack-format.md): a split or a set of models as one `.ggufpack`, and back, byte
for byte. Imports format/, disk/, splitdir/ and assemble/ (transport opens sharded models through
assemble.scan); nothing below imports it.

One module per job, each importing only the ones above it in this list:
- format.py: the container's facts (magic, version, head, record and tail layouts, limits, names);
- codec.py: the per-tensor codecs (plain, delta), the deterministic prediction and its search;
- index.py: the index, both ways (the writer's entries as JSON; a pack's JSON checked into entries);
- inventory.py: packing stages 1-2, hash the inputs and list each distinct tensor and header piece once;
- planning.py: stage 3, per tensor plain or a delta against which base;
- records.py: stage 4, the data records in order, coded on a pool;
- report.py: what a pack run reports;
- writer.py: `pack_files`, the stages in order, then the index and the tail;
- reader.py: `PackReader`, `read_index`, `unpack`;
- transport.py: which files a pack holds (a split's, models'), `pack`, `unpack_to`, `--restore`.
"""
