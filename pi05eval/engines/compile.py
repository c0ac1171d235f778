"""`engine=compile`: the fast path (`fast.py`) compiled with torch.compile and replayed as CUDA graphs.

Per prompt-length bucket (and image-slot pattern) the call is three graphs replayed back to back — vision,
prefill, denoise (all Euler steps) — with CUDA events between them for per-stage times; no host sync and no Python
control flow on GPU values inside. On CUDA the denoise step is, by default, hand-fused Triton kernels (5 per expert
layer, `triton_denoise.py`) instead of inductor's. Inputs are copied into static buffers; the output buffer is
reused by the next call. Compiled artifacts are cached on disk (`torch.compiler` cache artifacts, keyed by model
config, precision, steps, shortcuts, batch, GPU and torch version; one file per built bucket) so a second process
skips the cold build.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pi05eval.engines.bucketed import BucketedEngine
from pi05eval.engines.fast import FastPi05, Shortcuts
from pi05eval.model.pi05 import Pi05Model
from pi05eval.policy.bundle import cache_root

log = logging.getLogger(__name__)

DEFAULT_BUCKETS = (32, 64, 128, 200)
# the Triton denoise kernels' tiles hold every row of the step: at batch 4 (40 rows) they exceed the H200's shared
# memory (measured: OutOfResources), so larger batches use inductor's denoise step
TRITON_MAX_BATCH = 2


def default_cache_dir() -> Path:
    return cache_root() / "compile"


@dataclass(frozen=True)
class CompileOptions:
    """`policy.engine_options` for engine=compile."""

    buckets: tuple[int, ...] = DEFAULT_BUCKETS  # prompt-length buckets; the model's max_token_len is always added
    cuda_graph: bool = True  # replay the call as CUDA graphs (CUDA only)
    compile: bool = True  # torch.compile the stages (off: the fast path runs eagerly, still graph-captured)
    mode: str = "default"  # inductor mode (graphs are captured by this engine); max-autotune builds > 4 min
    cache_dir: str | None = None  # None: $PI05EVAL_CACHE/compile or ~/.cache/pi05eval/compile
    # the denoise step as hand-fused Triton kernels (engines/triton_denoise.py) on CUDA; where they cannot run
    # (CPU, quantized expert layers, shortcuts off) the compiled step is used instead
    triton_denoise: bool = True
    # inductor's multi-kernel reductions: each wide row reduction (norms) is generated both as one pass and as a loop,
    # the faster picked on the first call (the graphs are captured after it); not with mode="max-autotune*". On an
    # H200: vision 1.76 -> 1.72 ms, prefill 4.00 -> 3.95 ms, same build time; but a second process that loads the
    # compile cache fails in inductor (torch 2.11), so it is off by default
    multi_kernel: bool = False
    # row reductions (SigLIP's LayerNorms, 1152 wide; Gemma's RMSNorms, 2048) generated as one pass over the row held
    # in registers instead of inductor's two-pass loop above 1024 columns (`wide_rows.py`); exact up to fp32 order
    wide_rows: bool = False

    def __post_init__(self) -> None:
        for name in ("multi_kernel", "wide_rows"):
            if getattr(self, name) and self.mode != "default":
                raise ValueError(f"{name} needs mode='default', not {self.mode!r} (a mode or options, not both)")


@contextmanager
def _plain_no_grad() -> Iterator[None]:
    """Grad off and inference mode off, whatever the caller's modes: a bucket is always built, and its compiled stages
    always run without graphs, in one mode. Otherwise a call under `torch.inference_mode` (as the policy makes) after a
    build outside it fails dynamo's guards and recompiles inside the timed call, and a bucket built under it has
    inference-tensor buffers that a later call outside inference mode cannot write. Graph replays need neither."""
    with torch.inference_mode(False), torch.no_grad():
        yield


class _Graphs:
    """Static buffers and captured graphs of one (bucket, kept image slots) shape."""

    def __init__(self, eng: CompiledEngine, bucket: int, keep: tuple[int, ...]) -> None:
        cfg, dev, b = eng.model.cfg, eng.device, eng.batch_size
        self.bucket, self.keep = bucket, keep
        size = cfg.image_size
        self.images = torch.zeros(b, len(keep), 3, size, size, device=dev)
        self.img_mask = torch.ones(b, len(keep), dtype=torch.bool, device=dev)
        self.tokens = torch.zeros(b, bucket, dtype=torch.int64, device=dev)
        self.token_mask = torch.zeros(b, bucket, dtype=torch.bool, device=dev)
        self.token_mask[:, 0] = True
        self.noise = torch.zeros(b, cfg.action_horizon, cfg.action_dim, device=dev)
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.events = [torch.cuda.Event(enable_timing=True) for _ in range(4)] if eng.use_graphs else []
        self.eng = eng

    def run_stages(self) -> torch.Tensor:
        e = self.eng
        self.img_tokens = e.vision(self.images)
        self.ks, self.vs, self.key_mask = e.prefill(self.img_tokens, self.img_mask, self.tokens, self.token_mask)
        self.out = e.denoise(self.noise, self.ks, self.vs, self.key_mask)
        return self.out

    def capture(self) -> None:
        """Warm up (compiles) on a side stream, then capture vision / prefill / denoise as three graphs."""
        e = self.eng
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.run_stages()
        torch.cuda.current_stream().wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        g_vision, g_prefill, g_denoise = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(g_vision, pool=pool):
            self.img_tokens = e.vision(self.images)
        with torch.cuda.graph(g_prefill, pool=pool):
            self.ks, self.vs, self.key_mask = e.prefill(self.img_tokens, self.img_mask, self.tokens, self.token_mask)
        with torch.cuda.graph(g_denoise, pool=pool):
            self.out = e.denoise(self.noise, self.ks, self.vs, self.key_mask)
        self.graphs = [g_vision, g_prefill, g_denoise]

    def __call__(self) -> torch.Tensor:
        if not self.graphs:  # the compiled stages run (and are guarded) in the mode they were built in
            with _plain_no_grad():
                return self.run_stages()
        ev = self.events
        ev[0].record()
        for g, end in zip(self.graphs, ev[1:], strict=True):
            g.replay()
            end.record()
        return self.out

    def stage_ms(self) -> dict[str, float]:
        """CUDA-event times of the last replay; call after the output was synchronized."""
        if not self.graphs:
            return {}
        ev = self.events
        return {name: ev[i].elapsed_time(ev[i + 1]) for i, name in enumerate(("vision", "prefill", "denoise"))}


class CompiledEngine(BucketedEngine):
    """Drop-in for `Pi05Model.sample_actions` (fixed num_steps and batch size)."""

    name = "compile"

    def __init__(
        self,
        model: Pi05Model,
        num_steps: int,
        shortcuts: Shortcuts | None = None,
        options: CompileOptions | None = None,
        batch_size: int = 1,
        precision: str = "bf16",
    ) -> None:
        shortcuts = shortcuts or Shortcuts()
        options = options or CompileOptions()
        self.model = model
        self.device = model.action_in.weight.device
        self.batch_size = batch_size
        self.fast = FastPi05(model, num_steps, shortcuts)
        self.options = options
        self.use_graphs = options.cuda_graph and self.device.type == "cuda"
        self.buckets = self.bucket_set(options.buckets, model.cfg.max_token_len)
        self.key = self._cache_key(precision, num_steps, shortcuts, batch_size)
        # one file per built (bucket, images): torch keeps one entry per artifact kind when it loads a file, so a file
        # saved again after a second bucket would serve only that bucket
        self.cache_dir = Path(options.cache_dir or default_cache_dir()) / self.key
        self.graphs: dict[tuple[int, tuple[int, ...]], _Graphs] = {}
        self.build_s: dict[str, float] = {}
        self.cache_loaded = self._load_cache() if options.compile else False

        inductor: dict[str, Any] = {"triton.multi_kernel": 1} if options.multi_kernel else {}
        if options.compile and options.wide_rows:
            from pi05eval.engines.wide_rows import compile_options

            inductor.update(compile_options())

        def wrap(fn):
            if not options.compile:
                return fn
            if inductor:  # options instead of a mode (__post_init__ checks the mode is "default")
                return torch.compile(fn, options=inductor, dynamic=False, fullgraph=True)
            return torch.compile(fn, mode=options.mode, dynamic=False, fullgraph=True)

        self.vision, self.prefill, self._update = (
            wrap(self.fast.vision),
            wrap(self.fast.prefill),
            wrap(self.fast.update),
        )
        self.triton = False
        if options.triton_denoise and self.device.type == "cuda" and batch_size > TRITON_MAX_BATCH:
            log.info("Triton denoise not used: batch %d > %d", batch_size, TRITON_MAX_BATCH)
        elif options.triton_denoise and self.device.type == "cuda":
            from pi05eval.engines.triton_denoise import TritonDenoise

            try:  # launched as is inside the graph (the Triton kernels compile during the warm-up)
                self._update = TritonDenoise(self.fast).update
                self.triton = True
            except ValueError as e:
                log.info("Triton denoise not used: %s", e)
        self.last: _Graphs | None = None

    # ------------------------------------------------------------------------------------------------ building

    def _cache_key(self, precision: str, num_steps: int, shortcuts: Shortcuts, batch: int) -> str:
        gpu = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        parts = [
            repr(self.model.cfg),
            precision,
            num_steps,
            asdict(shortcuts),
            batch,
            self.options.mode,
            self.options.multi_kernel,
            self.options.wide_rows,
            self.options.triton_denoise and self.device.type == "cuda" and batch <= TRITON_MAX_BATCH,
            gpu,
            torch.__version__,
        ]
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:20]

    def _load_cache(self) -> bool:
        loaded = []
        for path in sorted(self.cache_dir.glob("*.bin")):
            try:
                torch.compiler.load_cache_artifacts(path.read_bytes())
            except Exception as e:  # a corrupt or incompatible file only costs a cold build of its bucket
                log.warning("ignoring compile cache %s: %s", path, e)
                continue
            loaded.append(path.stem)
        if loaded:
            log.info("loaded compile cache %s (%s)", self.cache_dir, ", ".join(loaded))
        return bool(loaded)

    def _save_cache(self, label: str) -> None:
        """After building `label`: what this process compiled so far, unless a file for it exists already."""
        path = self.cache_dir / f"{label}.bin"
        if path.exists():
            return
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # sweep jobs building the same bucket each write their own
        tmp.write_bytes(saved[0])
        os.replace(tmp, path)

    def _compiling(self) -> AbstractContextManager[None]:
        """The context the stages compile in (they compile on their first call, inside `_graphs`)."""
        if self.options.compile and self.options.wide_rows:
            from pi05eval.engines.wide_rows import one_pass_rows

            return one_pass_rows()
        return nullcontext()

    def denoise(self, noise, ks, vs, key_mask) -> torch.Tensor:
        return self.fast.denoise(noise, ks, vs, key_mask, update=self._update)

    def prepare(self, prompt_lengths: Iterable[int], image_masks: tuple[bool, ...] = (True, True, False)) -> float:
        """Build (compile + capture) every bucket these prompt lengths need; returns the seconds spent."""
        t0 = time.perf_counter()
        keep = self.kept_slots(image_masks)
        for bucket in sorted({self.bucket_for(n) for n in prompt_lengths}):
            self._graphs(bucket, keep)
        if self.options.compile:
            # inductor's compile-worker processes would otherwise keep starting up / idling beside the timed calls
            # (measured: ~4 ms of host time per call in a process that loaded its kernels from the cache) and
            # beside the env workers; a later new bucket starts them again
            from torch._inductor.async_compile import shutdown_compile_workers

            shutdown_compile_workers()
        return time.perf_counter() - t0

    def _graphs(self, bucket: int, keep: tuple[int, ...]) -> _Graphs:
        key = (bucket, keep)
        if key not in self.graphs:
            t0 = time.perf_counter()
            with _plain_no_grad(), self._compiling():
                g = _Graphs(self, bucket, keep)
                if self.use_graphs:
                    g.capture()
                else:
                    g.run_stages()
            self.graphs[key] = g
            label = f"bucket{bucket}_img{len(keep)}"
            self.build_s[label] = time.perf_counter() - t0
            log.info("built %s engine: %s in %.1fs", self.name, label, self.build_s[label])
            if self.options.compile:
                self._save_cache(label)
        return self.graphs[key]

    # ------------------------------------------------------------------------------------------------ calling

    @torch.no_grad()
    def sample_actions(self, images, image_masks, tokens, token_mask, noise, num_steps: int | None = None):
        """Same contract as `Pi05Model.sample_actions`; returns a buffer overwritten by the next call."""
        bucket, keep, (images, image_masks, tokens, token_mask) = self.route(
            images, image_masks, tokens, token_mask, num_steps
        )
        g = self._graphs(bucket, keep)  # built in plain mode: its buffers take writes in any mode
        g.images.copy_(images, non_blocking=True)
        g.img_mask.copy_(image_masks, non_blocking=True)
        g.tokens.copy_(tokens, non_blocking=True)
        g.token_mask.copy_(token_mask, non_blocking=True)
        g.noise.copy_(noise, non_blocking=True)
        self.last = g
        return g()

    def stage_ms(self) -> dict[str, float]:
        return self.last.stage_ms() if self.last is not None else {}
