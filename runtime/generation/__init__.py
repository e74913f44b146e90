"""Generation: prompts, the KV-cached loop and its sampling, the task prefixes, and the parsers and
typed results of their answers."""
