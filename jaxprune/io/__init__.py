"""Checkpoint I/O: HF safetensors directories, GGUF files, name resolution."""
