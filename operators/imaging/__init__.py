"""2D analysis of finished scans' images: phase from the centre of mass (phase.py), atomic
columns found and refined (columns.py), atoms counted per column (atom_counting.py)."""
