"""Tilt series to atoms: the projector and back-projector (projector.py), alignment and RESIRE
reconstruction (reconstruct.py), atom tracing in the reconstructed volume (tracing.py)."""
