"""Training the models QSLM searches: task fine-tuning, the cached embedded defaults, n-gram yardsticks."""
