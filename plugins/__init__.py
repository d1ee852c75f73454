"""Built-in pruning strategies (registered through the `ppkit` entry-point group)."""
