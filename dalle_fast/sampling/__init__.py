"""Sampling images from a trained transformer, and reranking them."""
