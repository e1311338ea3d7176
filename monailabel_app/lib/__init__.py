"""The app's modules: settings, bundles and checkpoints, infer / train tasks, strategies, transforms."""
