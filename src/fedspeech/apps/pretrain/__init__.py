"""Federated self-supervised pretraining (wav2vec 2.0 or feature matching)."""
