"""Moving frames and reports: the wire protocol (protocol.py), the receiver that runs inside
each worker (receiver.py), its spill to local disk (spill.py), the small report messages
(control.py) and network helpers (net.py)."""
