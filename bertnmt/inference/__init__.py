"""Layer 6: translating and scoring with a trained model."""
