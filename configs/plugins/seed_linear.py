"""The tutorial's hand-written fully connected layer, registered as an nncli plugin
under the name SeedLinear (torch.nn already has a Linear).

It holds `W` and `b` as nn.Parameter and computes x.mm(W) + b. `infer` tells nncli that
`in_feature` equals the last dimension of the input, so configs may leave it out.
"""
import torch as t
from torch import nn

import nncli


@nncli.register_layer(name="SeedLinear", infer={"in_feature": -1})
class Linear(nn.Module):
    def __init__(self, in_feature: int, out_feature: int):
        super().__init__()
        self.W = nn.Parameter(t.randn(in_feature, out_feature))
        self.b = nn.Parameter(t.randn(out_feature))

    def forward(self, x):
        x = x.mm(self.W)
        return x + self.b.expand_as(x)
