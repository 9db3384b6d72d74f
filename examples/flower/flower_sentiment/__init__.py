"""flower-sentiment: peft-federated on Flower, MiniLM on Twitter sentiment."""
