"""Routing: what decides each row's path (routers, budget routers, pooled features, the lambda rule, the skip-run
limit).

It imports the ops only; the runtime executes what it decides.
"""

from .budget import BudgetRouters
from .decide import LAM_RULES, LAM_SCALE, check_lam, choose, limit_skip_runs
from .pooling import Pooling
from .routers import RouterFileError, RouterMLP, Routers

__all__ = ["BudgetRouters", "LAM_RULES", "LAM_SCALE", "Pooling", "RouterFileError", "RouterMLP", "Routers", "check_lam",
           "choose", "limit_skip_runs"]
