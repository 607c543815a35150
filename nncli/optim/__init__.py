"""The optimization stage: the loss, the optimizer with its parameter groups, the learning-rate
schedule, and the validation metrics, each a registry whose entries carry their facts."""
