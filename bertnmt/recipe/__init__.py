"""Layer 5: the paper's recipe (baseline, warm start, fused stages) and model export."""
