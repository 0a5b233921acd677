"""Built-in examples that need no downloads: ``mlp`` and ``transformer`` (a small character LM)."""
