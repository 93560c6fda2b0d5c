"""Building blocks of the decoder: norm, rotary embeddings, attention, MLP."""
