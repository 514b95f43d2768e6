"""Training loops (the RNN LM of issue 6)."""
