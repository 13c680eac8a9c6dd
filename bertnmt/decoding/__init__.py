"""Layer 3: beam/greedy search, the batched decode loop, BLEU/chrF and significance."""
