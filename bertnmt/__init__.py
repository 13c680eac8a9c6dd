"""bertnmt: BERT-fused neural machine translation (Zhu et al., ICLR 2020)."""

__version__ = "0.1.0"
