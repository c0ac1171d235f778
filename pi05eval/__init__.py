"""pi05eval: LIBERO closed-loop evaluation of optimized Pi0.5 policies (success and latency from the same rollouts)."""

__version__ = "0.1.0"
