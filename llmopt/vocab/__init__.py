"""Tokenizer backends: what llmopt.tokenizer.Tokenizer drives (the Hugging Face
`tokenizers` library, or the native SentencePiece BPE over a compact vocabulary file)."""
