"""Layer 7: ablation tables, convergence reports and benchmarks."""
