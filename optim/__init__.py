"""Second-order optimizers: SOAP (Vyas et al. 2024) and Shampoo (Gupta et al. 2018).

Both are torch.optim.Optimizer subclasses with the hyper-parameters of optimizer.AdamW plus
precondition_frequency and max_precond_dim; which tensors they precondition, and the AdamW step
every other tensor takes, is the rule in optim/common.py (the trainer's parameter groups,
training/optimizers.param_groups, mark nn.Embedding weights `precondition=False` by default). docs/optimizers.md has the maths, the
tests against pytorch-optimizer, and the measured comparison with AdamW.
"""

from optim.common import count_preconditioned, is_preconditioned
from optim.shampoo import Shampoo
from optim.soap import SOAP

__all__ = ["SOAP", "Shampoo", "is_preconditioned", "count_preconditioned"]
