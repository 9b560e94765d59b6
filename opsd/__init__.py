"""On-policy self-distillation (OPSD) for reasoning language models."""
