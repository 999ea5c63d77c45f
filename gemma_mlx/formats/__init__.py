"""Other ecosystems' file formats: GGUF files in (convert), Hugging Face checkpoints out (fuse --export-hf)."""
