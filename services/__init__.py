"""Network services of the distillation fleet."""
