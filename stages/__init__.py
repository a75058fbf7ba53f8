"""The shipped stages: PDF extraction, chunking, embedding and the Qdrant store."""
