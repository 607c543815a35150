"""The data stage: sources read into tensors, the split, normalization, batches, and the checks of
the data against the model."""
