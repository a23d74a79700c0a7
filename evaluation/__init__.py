"""Metrics: sonnet quality (chrF and form) and language-model perplexity."""
