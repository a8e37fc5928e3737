"""Files: the scan file (storage.py), reading recordings of any kind (recording.py), stempy and
LiberTEM exchange (interop.py), replay of recordings as a source (replay.py), PNG previews
(previews.py)."""
