"""fedspeech: federated self-supervised speech representation learning on Flower."""

__version__ = "0.1.0"
