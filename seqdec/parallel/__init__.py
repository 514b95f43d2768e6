"""Parallel-in-time solvers: affine scans (`scan`) and Newton (`newton`)."""
