"""Downstream orchestration on finished scans: the per-scan stages (runner.py), tilt series
collected (series.py) and reconstructed (tomo.py, tomo_output.py), and 3D statistics of
atomic models (atoms.py)."""
