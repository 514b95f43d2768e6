"""Pallas kernels: bit-packed tree masks and tree attention (issue 7)."""
