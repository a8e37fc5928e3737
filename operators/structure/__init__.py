"""3D statistics of atom positions: neighbours (neighbors.py), coordination and strain,
bond-orientational order (order3d.py), Voronoi indices, polytetrahedral motifs, pair
distribution, displacements, depth profiles, lattices, and the per-atom tables (atom_tables.py)."""
