"""Diffraction of regions of a finished scan: grains and their patterns (grains.py), Bragg
peaks and lattice indexing (bragg.py), the peak and grain tables written to files (peak_table.py)."""
