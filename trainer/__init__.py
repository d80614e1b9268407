"""The DiverseDistill trainer: data, students, the Distillation Module, losses and the CLI."""
