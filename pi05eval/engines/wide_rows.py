"""One-pass row reductions up to 2048 columns in inductor's Triton code (`CompileOptions.wide_rows`).

Inductor generates a row (INNER) reduction as one pass, the whole row in registers, only up to 1024 columns; wider
rows become a loop that reads its inputs twice (once for the statistics, once for the output). SigLIP's LayerNorms
(1152 wide, residual adds folded in) and Gemma's RMSNorms (2048) are such rows. `one_pass_rows()` installs a subclass
of inductor's heuristics that allows one pass up to `MAX_ROW` while a stage compiles. Same sums in another fp32
order: exact up to rounding.

Inductor reads its `inductor_choices_class` setting once per process, so the handler is also set directly
(`V.set_choices_handler`) for the duration; the setting itself is patched too, so that inductor's FX graph cache keys
the kernels compiled this way apart. Importing this module imports inductor.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from torch._inductor import config as inductor_config
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.virtualized import V

MAX_ROW = 2048


class WideRowChoices(InductorChoices):
    """Inductor's heuristics, with one-pass INNER reductions up to MAX_ROW columns."""

    @staticmethod
    def should_use_persistent_reduction(features: Any, cooperative_reduction: bool) -> bool:
        if (
            inductor_config.triton.persistent_reductions
            and not cooperative_reduction
            and features.get_reduction_hint() == ReductionHint.INNER
            and V.graph.sizevars.statically_known_leq(features.reduction_numel, MAX_ROW)
        ):
            return True
        return InductorChoices.should_use_persistent_reduction(features, cooperative_reduction)

    def uuid(self) -> str:  # inductor's cache key, where its version asks for one
        return f"pi05eval.WideRowChoices/{MAX_ROW}"


def compile_options() -> dict[str, Any]:
    """`torch.compile` options of a stage compiled with one-pass rows. Dynamo keeps one compiled entry per function,
    guarded by the inputs and the backend's options, not by the inductor settings around the call: without these
    options a stage compiled one way would be served to an engine of the other within one process."""
    if not hasattr(inductor_config, "inductor_choices_class"):
        raise ValueError("engine option wide_rows needs a torch with the inductor setting `inductor_choices_class`")
    return {"inductor_choices_class": WideRowChoices}


@contextmanager
def one_pass_rows() -> Iterator[None]:
    """Inside: torch.compile'd code generates row reductions up to MAX_ROW wide as one pass."""
    keyed = hasattr(inductor_config, "inductor_choices_class")
    with (
        V.set_choices_handler(WideRowChoices()),
        inductor_config.patch(inductor_choices_class=WideRowChoices) if keyed else nullcontext(),
    ):
        yield
