"""Detector sources: each turns a detector's native stream (DECTRIS SIMPLON, Quantum
Detectors Merlin) into the protocol's messages inside the workers' receivers, so everything
after the chunk is the same for every detector (docs/DECTRIS.md, docs/MERLIN.md).

``mib`` and ``simplon`` hold the formats only (the emulator speaks them too); ``dectris``
and ``merlin`` the clients and sources; ``build`` picks a worker's source from the plan.
"""
