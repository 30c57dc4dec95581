"""Activation memory planning (Chameleon, arXiv 2509.11076): per named residual, keep it on device,
recompute it in the backward pass, or offload it to host memory, the fastest choice within a
memory budget, re-planned cheaply when the compiled program changes.

    from jaxsys.train import memory

    def step(remat, params, batch):            # the step differentiates remat(loss_fn)
        loss, grads = jax.value_and_grad(remat(loss_fn))(params, batch)
        ...

    prof = memory.profile(step, params, batch)  # residuals, lifetimes, recompute/swap costs
    plan = memory.plan(prof, budget_bytes=2**30)
    print(plan.table())
    train_step = jax.jit(functools.partial(step, plan.remat))

`MemoryPlanner` does the same online, one plan per program (sequence-length buckets, device-count
changes). The model's layers tag their residuals with `checkpoint_name`
(`jaxsys.models.residuals`); `Remat` applies a policy to each layer of a scanned stack.

What is measured and what is modelled: step times are measured (the layer body is compiled and
timed, and the benchmark times whole steps); memory is the liveness model of the traced program
(`liveness`), checked against XLA's `memory_analysis()` for plans without offload. On CPU, XLA
drops host offloading (the `pinned_host` transfers are not lowered), so an offloaded residual
stays in device memory and costs no transfer there: offload is only modelled on CPU.
"""

from jaxsys.train.memory.costs import Hardware as Hardware
from jaxsys.train.memory.liveness import Liveness as Liveness
from jaxsys.train.memory.liveness import analyze as analyze_liveness
from jaxsys.train.memory.online import POLICIES as POLICIES
from jaxsys.train.memory.online import MemoryPlanner as MemoryPlanner
from jaxsys.train.memory.planner import InfeasibleBudgetError as InfeasibleBudgetError
from jaxsys.train.memory.planner import MemoryPlan as MemoryPlan
from jaxsys.train.memory.planner import evaluate as evaluate
from jaxsys.train.memory.planner import fixed_plan as fixed_plan
from jaxsys.train.memory.planner import plan as plan
from jaxsys.train.memory.planner import resolve_budget as resolve_budget
from jaxsys.train.memory.profiler import Profile as Profile
from jaxsys.train.memory.profiler import ProfileCost as ProfileCost
from jaxsys.train.memory.profiler import Profiler as Profiler
from jaxsys.train.memory.profiler import Residual as Residual
from jaxsys.train.memory.profiler import profile as profile
from jaxsys.train.memory.profiler import traced_peak_bytes as traced_peak_bytes
from jaxsys.train.memory.remat import KEEP_ALL as KEEP_ALL
from jaxsys.train.memory.remat import Remat as Remat

__all__ = ["Hardware", "InfeasibleBudgetError", "KEEP_ALL", "Liveness", "MemoryPlan", "MemoryPlanner",
           "POLICIES", "Profile", "ProfileCost", "Profiler", "Remat", "Residual", "analyze_liveness",
           "evaluate", "fixed_plan", "plan", "profile", "resolve_budget", "traced_peak_bytes"]
