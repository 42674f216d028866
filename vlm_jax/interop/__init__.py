"""PyTorch interop: one key map per family (data, shared by import and export), the engine that applies
them, streaming import/export of checkpoints, and a parity checker."""
