"""Downstream fine-tuning (centralised or federated) and backbone comparison."""
