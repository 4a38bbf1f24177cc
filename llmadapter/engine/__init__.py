"""The engines that answer requests: generation (chat, completions) and embeddings, on torch."""
