"""Memory by term before launch (memory.py), from the model's dimensions alone."""
