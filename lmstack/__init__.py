"""lmstack: one readable PyTorch codebase for the whole life of a decoder-only LM."""
