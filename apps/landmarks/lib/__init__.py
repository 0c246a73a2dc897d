"""The landmarks app's adapters: model configs, infer and train tasks, active-learning strategies."""
