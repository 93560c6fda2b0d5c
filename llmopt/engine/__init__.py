"""Generation: sampling parameters, the sampler, detokenization and the engine."""
