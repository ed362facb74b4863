"""The model runtime: loading, generation, chat models, structured output, embeddings."""
