"""Speculative decoding: drafters propose tokens, the target model verifies them.

Drafters (`drafter.Drafter`) only propose; `adaptive.SpecController` decides how many
tokens each sequence may propose from measured acceptance and step cost; verification
runs in the engine's ordinary step: the runner scores the k + 1 positions as decode
rows, `Engine._verify` judges them with `sampler.verify_token`.
"""
