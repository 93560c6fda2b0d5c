"""Reading model files: Hugging Face folders and GGUF files."""
