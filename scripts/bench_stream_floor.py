"""Micro-benchmark: the floor of a persistent denoise kernel, streaming the expert's weights through grid barriers.

    PYTHONPATH=$PWD python scripts/bench_stream_floor.py --out stream_floor.json

One launch of one block per SM runs the byte traffic of the whole 10-step denoise (per layer: the Q/K/V, prefix K/V,
O, gate|up and down bytes of Pi0.5's expert, 35 MB) with no arithmetic. A producer warp copies each block's share
of every phase into a ring of shared-memory slots by bulk asynchronous copies, never waiting for a barrier, only for
a free slot; the consumer warps take each slot (reading it whole from shared memory, or only waiting for it) and
free it; after the phases a variant marks, the consumers of all blocks meet at a grid barrier, as a persistent
kernel must between dependent phases. So the time of a variant is what streaming plus synchronization costs before
any math: the lower bound of the persistent-kernel route for today's 4.65 ms Triton denoise.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from pi05eval.bench import environment

SOURCE = r"""
typedef unsigned int u32;
typedef unsigned long long u64;

__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    u32 done = 0;
    while (!done) {
        asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                     " selp.u32 %0, 1, 0, p;\n}" : "=r"(done) : "r"(bar), "r"(parity) : "memory");
    }
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void bulk_load(u32 dst, const void* src, u32 bytes, u32 bar) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 ::"r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}
// all consumer threads of all blocks: arrival count + generation, reset by the last block
__device__ __forceinline__ void grid_sync(u32* bar) {
    asm volatile("bar.sync 1, %0;" ::"r"(NCW * 32) : "memory");
    if (threadIdx.x == 0) {
        u32 gen, arrived, now;
        asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(gen) : "l"(bar + 1) : "memory");
        asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;" : "=r"(arrived) : "l"(bar) : "memory");
        if (arrived == gridDim.x - 1) {
            asm volatile("st.relaxed.gpu.global.u32 [%0], 0;" ::"l"(bar) : "memory");
            asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(bar + 1), "r"(gen + 1) : "memory");
        } else {
            do {
                asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(now) : "l"(bar + 1) : "memory");
            } while (now == gen);
        }
    }
    asm volatile("bar.sync 1, %0;" ::"r"(NCW * 32) : "memory");
}

// the same, as one monotonic arrival counter: barrier number k (from 1) completes when it reaches k * gridDim.x
// (one L2 round trip less than the counter + generation above; the counter is zeroed before each launch)
__device__ __forceinline__ void grid_sync_count(u32* bar, u32 k) {
    asm volatile("bar.sync 1, %0;" ::"r"(NCW * 32) : "memory");
    if (threadIdx.x == 0) {
        u32 now;
        asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(bar) : "memory");
        do {
            asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(now) : "l"(bar) : "memory");
        } while (now < k * gridDim.x);
    }
    asm volatile("bar.sync 1, %0;" ::"r"(NCW * 32) : "memory");
}

// phases p < NPH of one layer: the block's share share[p] bytes (multiple of 16) at w + layer * LAYER_BYTES +
// off[p] + blockIdx.x * share[p]; barrier after phase p if (sync_mask >> p) & 1
extern "C" __global__ void __launch_bounds__((NCW + 1) * 32, 1) stream_floor(
    const unsigned char* __restrict__ w, u32* gbar, u32* sink, int steps, int layers, int layer_bytes,
    int sync_mask, int consume, int counter_barrier, int off0, int off1, int off2, int off3, int off4,
    int share0, int share1, int share2, int share3, int share4) {
    extern __shared__ __align__(128) unsigned char smem[];
    __shared__ __align__(8) u64 full[NSLOT], empty[NSLOT];
    const int off[5] = {off0, off1, off2, off3, off4};
    const int share[5] = {share0, share1, share2, share3, share4};
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (threadIdx.x == 0) {
        for (int s = 0; s < NSLOT; ++s) {
            mbar_init(smem_addr(&full[s]), 1);
            mbar_init(smem_addr(&empty[s]), NCW);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    u32 acc = 0, barriers = 0;
    long long c = 0;  // chunk counter, the same sequence on both sides
    for (int step = 0; step < steps; ++step) {
        for (int layer = 0; layer < layers; ++layer) {
            const unsigned char* base = w + (long long)layer * layer_bytes;
            for (int p = 0; p < NPH; ++p) {
                const unsigned char* src = base + (long long)off[p] + (long long)blockIdx.x * share[p];
                for (int done = 0; done < share[p]; done += SLOT, ++c) {
                    const int slot = (int)(c % NSLOT);
                    const u32 round = (u32)(c / NSLOT);
                    const u32 bytes = (u32)min(SLOT, share[p] - done);
                    if (warp == NCW) {  // producer
                        if (lane == 0) {
                            if (round > 0) mbar_wait(smem_addr(&empty[slot]), (round - 1) & 1);
                            bulk_load(smem_addr(smem + slot * SLOT), src + done, bytes, smem_addr(&full[slot]));
                        }
                    } else {  // consumers
                        mbar_wait(smem_addr(&full[slot]), round & 1);
                        if (consume) {
                            const uint4* q = (const uint4*)(smem + slot * SLOT);
                            for (int i = threadIdx.x; i < (int)(bytes / 16); i += NCW * 32) {
                                const uint4 v = q[i];
                                acc ^= v.x ^ v.y ^ v.z ^ v.w;
                            }
                        }
                        __syncwarp();
                        if (lane == 0) mbar_arrive(smem_addr(&empty[slot]));
                    }
                }
                if (warp < NCW && ((sync_mask >> p) & 1)) {
                    if (counter_barrier) {
                        grid_sync_count(gbar, ++barriers);
                    } else {
                        grid_sync(gbar);
                    }
                }
            }
        }
    }
    if (warp < NCW) atomicXor(sink + blockIdx.x, acc);
}
"""

# bytes of one expert layer's phases (Pi0.5, bf16; a 544-token prefix): Q/K/V, prefix K/V, O, gate|up, down
PHASES = {
    "qkv": 1024 * 2560 * 2,
    "attn": 544 * 256 * 2 * 2,
    "o": 2048 * 1024 * 2,
    "gu": 1024 * 8192 * 2,
    "down": 4096 * 1024 * 2,
}
VARIANTS = {  # name: (sync mask over PHASES, consumers read the slots, weights streamed, counter barrier)
    "stream only": (0b00000, 0, True, 0),
    "stream, consumers read smem": (0b00000, 1, True, 0),
    "5 barriers per layer": (0b11111, 1, True, 0),
    "3 barriers per layer (after attn, o, down)": (0b10110, 1, True, 0),
    "1 barrier per layer": (0b10000, 1, True, 0),
    "5 barriers per layer, no weights": (0b11111, 0, False, 0),
    "5 counter barriers per layer": (0b11111, 1, True, 1),
    "5 counter barriers per layer, no weights": (0b11111, 0, False, 1),
}


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _median_ms(kernel, launch_args: list, gbar: torch.Tensor, blocks: int, threads: int, smem: int, reps: int) -> float:
    """Median CUDA-event ms of one launch (after 3 untimed ones); the barrier words are zeroed before each."""

    def launch() -> None:
        kernel(grid=(blocks, 1, 1), block=(threads, 1, 1), shared_mem=smem, args=launch_args)

    for _ in range(3):
        gbar.zero_()
        launch()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        gbar.zero_()
        a.record()
        launch()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def run(args: argparse.Namespace) -> dict[str, Any]:
    dev = torch.device("cuda")
    blocks = torch.cuda.get_device_properties(dev).multi_processor_count
    shares = [_ceil(_ceil(b, blocks), 16) * 16 for b in PHASES.values()]  # per block, a multiple of 16 bytes
    offsets, total = [], 0
    for share in shares:
        offsets.append(total)
        total += share * blocks
    layer_bytes = -(-total // 256) * 256
    w = torch.randint(0, 255, (layer_bytes * args.layers,), dtype=torch.uint8, device=dev)
    defines = [f"-DNCW={args.consumer_warps}", f"-DNSLOT={args.slots}", f"-DSLOT={args.slot_kb * 1024}", "-DNPH=5"]
    kernel = torch.cuda._compile_kernel(SOURCE, "stream_floor", nvcc_options=["-std=c++17", *defines])
    smem = args.slots * args.slot_kb * 1024
    kernel.set_shared_memory_config(smem)
    gbar = torch.zeros(2, dtype=torch.int32, device=dev)
    sink = torch.zeros(blocks, dtype=torch.int32, device=dev)
    res: dict[str, Any] = {"env": environment(), "blocks": blocks, "layer_mb": total / 1e6, "args": vars(args)}
    res["variants"] = {}
    for name, (mask, consume, stream, counter) in VARIANTS.items():
        sizes = shares if stream else [0] * len(shares)
        for steps, label in ((args.steps, "denoise"), (1, "one step")):
            launch_args = [w, gbar, sink, steps, args.layers, layer_bytes, mask, consume, counter, *offsets, *sizes]
            ms = _median_ms(kernel, launch_args, gbar, blocks, (args.consumer_warps + 1) * 32, smem, args.reps)
            gbytes = (total if stream else 0) * steps * args.layers / 1e9
            per_layer_step = round(1e3 * ms / (steps * args.layers), 3)
            row = {"ms": round(ms, 4), "tb_per_s": round(gbytes / ms, 3), "us_per_layer_step": per_layer_step}
            res["variants"].setdefault(name, {})[label] = row
            print(f"{name:48s} {label:9s} {ms:8.3f} ms  {gbytes / ms:6.2f} TB/s  "
                  f"{row['us_per_layer_step']:6.2f} us/layer-step", flush=True)  # fmt: skip
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="write the JSON result here")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--layers", type=int, default=18)
    p.add_argument("--consumer-warps", type=int, default=8)
    p.add_argument("--slots", type=int, default=6)
    p.add_argument("--slot-kb", type=int, default=32)
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args(argv)
    res = run(args)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)
    return res


if __name__ == "__main__":
    main()
