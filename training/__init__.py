"""Accelerate trainer for tokenizers: recipes (config), data, losses, discriminator, train loop."""
