"""Offline training data (nothing is downloaded)."""
