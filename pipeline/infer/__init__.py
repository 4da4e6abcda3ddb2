"""Inference: inputs, the loaded run, one volume -> mask, quality checks, writers, shards, montages."""
