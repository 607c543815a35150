"""The model stage: the layer registry and its facts, nncli's blocks, and the shape plan that turns
the `model:` section into a plain `torch.nn.Sequential`."""
