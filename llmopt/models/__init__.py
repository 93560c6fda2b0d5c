"""Decoder definitions, built from llmopt.layers."""
