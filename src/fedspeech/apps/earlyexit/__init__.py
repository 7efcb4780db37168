"""Adaptive federated fine-tuning with early exits, one depth per device."""
