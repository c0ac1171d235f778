"""Hand-written Triton kernels of the denoise step; the prefix attention's (`softmax_triton`, `prefix_attention_triton`)
are imported on their own. Imports Triton: import only where Triton is installed."""

from pi05eval.kernels.attention_triton import AttentionScratch, launch_attention
from pi05eval.kernels.config import ExpertKernelConfig, interleave_gate_up, interleave_halves, resolve
from pi05eval.kernels.expert_triton import NORM_BLOCK_M, block_m, launch_gemm_residual, launch_norm_gemm
from pi05eval.kernels.step_triton import launch_action_in, launch_step_out

__all__ = [
    "NORM_BLOCK_M",
    "AttentionScratch",
    "ExpertKernelConfig",
    "block_m",
    "interleave_gate_up",
    "interleave_halves",
    "launch_action_in",
    "launch_attention",
    "launch_gemm_residual",
    "launch_norm_gemm",
    "launch_step_out",
    "resolve",
]
