// One persistent launch per expert layer: O projection + gated residual, adaRMS + gate|up + GeGLU, down projection +
// gated residual, then the next layer's adaRMS + Q/K/V + RoPE, separated by grid barriers (chain_cuda.py builds,
// launches and documents it). Compiled by NVRTC; every size below is a -D constant, so all loops are static.
//
// Each of the NB blocks (one per SM) owns a contiguous range of 8-row weight tiles of every phase. Its tiles are
// copied into shared memory by bulk asynchronous copies (one per phase) as soon as a buffer is free, so the
// next phases' weights stream from HBM while this phase computes and waits at the grid barrier. Weights are stored
// in mma fragment order (chain_cuda.fragment_order): one 16-byte shared-memory load per lane gives the B
// operands of two m16n8k16 MMAs. Rows are the M action tokens (M <= 16, one MMA row tile).
//
// Numerics as the Triton kernels (expert_triton.py): fp32 accumulation; GEMM outputs, gelu, gated branches and
// residual sums rounded to bf16 where PyTorch rounds them; the norm's statistics in fp32.

typedef unsigned short bf16_t;
typedef unsigned int u32;
typedef unsigned long long u64;

#define NT (NW * 32)

// tiles of 8 weight rows per phase, and the block's share
#define T_QKV (NQKV / 8)
#define T_O (D / 8)
#define T_GU (2 * F / 8)
#define T_DOWN (D / 8)
#define CEIL_DIV(a, b) (((a) + (b) - 1) / (b))

// Measurement switches (scripts/bench_expert_chain.py; the engine sets none): CHAIN_PROBE stamps the SM clock at
// the phase boundaries of block CHAIN_PROBE - 1 into gbar[2 + 10 (layer + 1) + k]; CHAIN_NO_COPY, CHAIN_NO_SYNC,
// CHAIN_NO_MMA, CHAIN_NO_NORM drop the weight copies, grid barriers, MMA loops, adaRMS passes (results invalid);
// CHAIN_GU_AT_START issues the gate|up copy at the start with O's instead of once O's tile landed (results valid).
#ifdef CHAIN_PROBE
#define STAMP(k)                                                                                                  \
    if (blockIdx.x == CHAIN_PROBE - 1 && threadIdx.x == 0) {                                                      \
        u64 t;                                                                                                    \
        asm volatile("mov.u64 %0, %%clock64;" : "=l"(t));                                                     \
        gbar[2 + 10 * (layer + 1) + (k)] = (u32)t;                                                                \
    }
#else
#define STAMP(k)
#endif

__device__ __forceinline__ float bf2f(u32 x) { return __uint_as_float(x << 16); }
__device__ __forceinline__ u32 f2bf(float x) {
    unsigned short r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
    return r;
}
__device__ __forceinline__ float rnd(float x) { return bf2f(f2bf(x)); }
__device__ __forceinline__ u32 pack2(float lo, float hi) { return f2bf(lo) | (f2bf(hi) << 16); }

// loads of data other blocks write during the launch: L2 only (L1 is not coherent across SMs)
__device__ __forceinline__ u32 ld_cg(const void* p) { return __ldcg((const unsigned int*)p); }
__device__ __forceinline__ uint2 ld_cg2(const void* p) { return __ldcg((const uint2*)p); }
__device__ __forceinline__ void st_u32(void* p, u32 v) { asm volatile("st.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory"); }

__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }

// Activation rows in shared memory ([M, K] bf16, K a multiple of 64): the 16-byte chunks of row r are XOR-swizzled
// with r mod 8, so the 8 rows x 4 words of an MMA operand load fall in 32 distinct banks.
__device__ __forceinline__ int swz(int r, int k, int K) { return r * K + (((k >> 3) ^ (r & 7)) << 3) + (k & 7); }

// rows [M, K] of a global activation (written by the previous kernel or phase) into shared memory, swizzled
template <int K>
__device__ __forceinline__ void stage_rows(const bf16_t* src, bf16_t* dst) {
    for (int i = threadIdx.x; i < M * K / 8; i += NT) {
        const int r = i / (K / 8), c = i % (K / 8);
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_addr(dst + swz(r, 8 * c, K))),
                     "l"(src + r * K + 8 * c) : "memory");
    }
    asm volatile("cp.async.commit_group;\ncp.async.wait_all;" ::: "memory");
    __syncthreads();
}

// ---- bulk copies into shared memory, completed on an mbarrier ----
__device__ __forceinline__ void mbar_init(u32 bar) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void bulk_load(u32 dst, const void* src, u32 bytes, u32 bar) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
        ::"r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
#ifdef CHAIN_NO_COPY
    return;
#endif
    u32 done = 0;
    while (!done) {
        asm volatile(
            "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
            : "=r"(done) : "r"(bar), "r"(parity) : "memory");
    }
}

// ---- grid barrier: arrival count + generation, reset by the last block to arrive ----
__device__ __forceinline__ void grid_sync(u32* bar) {
    __syncthreads();
#ifdef CHAIN_NO_SYNC
    return;
#endif
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
    __syncthreads();
}

__device__ __forceinline__ void mma16816(float* c, const u32* a, u32 b0, u32 b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The block's tiles [t0, t0 + nt) of a phase: out[M, 8 nt] = a[M, K] @ w_tiles.T, K split S ways over the warps
// (warp w: split w % S, tiles w / S, w / S + NW / S, ...); a: swizzled rows in shared memory (`swz`). Partial sums
// go to red [S][maxt][32 lanes][4] fp32, summed in split order by `tile_sums`.
template <int K, int S, int MAXT>
__device__ __forceinline__ void gemm_tiles(const bf16_t* w, int nt, const bf16_t* a, float* red, int maxt) {
    constexpr int G = NW / S;
    constexpr int CH = K / S / 32;  // 32-wide K chunks per split
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tig = lane & 3;
    const int s = warp % S, grp = warp / S;
    const bool lo = g < M, hi = g + 8 < M;
    float acc[MAXT][4];
#pragma unroll
    for (int i = 0; i < MAXT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
#ifdef CHAIN_NO_MMA
    constexpr int CH_RUN = 0;
#else
    constexpr int CH_RUN = CH;
#endif
    constexpr int BATCH = CH < 8 ? CH : 8;  // chunks whose A operands are loaded before their MMAs
    for (int c0 = 0; c0 < CH_RUN; c0 += BATCH) {
        u32 af[BATCH][2][4];
#pragma unroll
        for (int c = 0; c < BATCH; ++c) {
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const int k = (s * CH + c0 + c) * 32 + 16 * hh;
                const bool ok = c0 + c < CH;
                const int kt = k + 2 * tig;
                af[c][hh][0] = ok && lo ? *(const u32*)(a + swz(g, kt, K)) : 0u;
                af[c][hh][1] = ok && hi ? *(const u32*)(a + swz(g + 8, kt, K)) : 0u;
                af[c][hh][2] = ok && lo ? *(const u32*)(a + swz(g, kt + 8, K)) : 0u;
                af[c][hh][3] = ok && hi ? *(const u32*)(a + swz(g + 8, kt + 8, K)) : 0u;
            }
        }
#pragma unroll
        for (int c = 0; c < BATCH; ++c) {
            const int chunk = s * CH + c0 + c;
#pragma unroll
            for (int i = 0; i < MAXT; ++i) {
                const int j = grp + i * G;
                if (j < nt && c0 + c < CH) {
                    const uint4 b = *(const uint4*)(w + ((size_t)(j * (K / 32) + chunk) * 32 + lane) * 8);
                    mma16816(acc[i], af[c][0], b.x, b.y);
                    mma16816(acc[i], af[c][1], b.z, b.w);
                }
            }
        }
    }
    __syncthreads();  // red aliases the staged rows
#pragma unroll
    for (int i = 0; i < MAXT; ++i) {
        const int j = grp + i * G;
        if (j < nt) *(float4*)(red + ((s * maxt + j) * 32 + lane) * 4) = make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
    }
    __syncthreads();
}

// the whole sums of tile j, lane `lane`: c[0], c[1] at row g, columns 2 tig, 2 tig + 1; c[2], c[3] at row g + 8
template <int S>
__device__ __forceinline__ float4 tile_sums(const float* red, int j, int lane, int maxt) {
    float4 t = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int s = 0; s < S; ++s) {
        const float4 p = *(const float4*)(red + ((s * maxt + j) * 32 + lane) * 4);
        t.x += p.x; t.y += p.y; t.z += p.z; t.w += p.w;
    }
    return t;
}

// (1 + scale), shift of the 4 columns 4 t .. 4 t + 3 that thread t normalizes (static: loaded before any wait)
struct NormCols {
    float sc[4], sh[4];
};
__device__ __forceinline__ NormCols norm_cols(const float* mod) {
    NormCols m;
    const int k = 4 * threadIdx.x;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        m.sc[e] = k < D ? 1.f + mod[k + e] : 0.f;
        m.sh[e] = k < D ? mod[D + k + e] : 0.f;
    }
    return m;
}

// adaRMS of the M rows of h [M, D] into X (shared, swizzled): round(h * rstd * (1 + scale) + shift), fp32 math;
// thread t holds columns 4 t .. 4 t + 3 of every row, the row sums of squares meet in ss [NW][16]
__device__ __forceinline__ void norm_rows(const bf16_t* h, const NormCols& m, bf16_t* X, float* ss, float eps) {
#ifdef CHAIN_NO_NORM
    __syncthreads();
    return;
#endif
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, k = 4 * threadIdx.x;
    const bool on = k < D;
    float x[M][4], part[M];
#pragma unroll
    for (int r = 0; r < M; ++r) {
        const uint2 v = on ? ld_cg2(h + r * D + k) : make_uint2(0u, 0u);
        x[r][0] = bf2f(v.x & 0xffff), x[r][1] = bf2f(v.x >> 16), x[r][2] = bf2f(v.y & 0xffff), x[r][3] = bf2f(v.y >> 16);
    }
#pragma unroll
    for (int r = 0; r < M; ++r) {
        part[r] = x[r][0] * x[r][0] + x[r][1] * x[r][1] + x[r][2] * x[r][2] + x[r][3] * x[r][3];
#pragma unroll
        for (int o = 16; o; o >>= 1) part[r] += __shfl_xor_sync(0xffffffffu, part[r], o);
    }
    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < M; ++r) ss[warp * 16 + r] = part[r];
    }
    __syncthreads();
    if (on) {
#pragma unroll
        for (int r = 0; r < M; ++r) {
            float tot = 0.f;
#pragma unroll
            for (int w = 0; w < NW; ++w) tot += ss[w * 16 + r];
            const float rstd = 1.f / sqrtf(tot / D + eps);
            float y[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) y[e] = x[r][e] * rstd * m.sc[e] + m.sh[e];
            *(uint2*)(X + swz(r, k, D)) = make_uint2(pack2(y[0], y[1]), pack2(y[2], y[3]));
        }
    }
    __syncthreads();
}

// the gated residual of one lane's fragment (two rows g, g + 8; columns n, n + 1): gate rounded to bf16, and h's
// two current pairs (loaded ahead of the GEMM)
struct Residual {
    float gt0, gt1;
    u32 h[2];
};
__device__ __forceinline__ Residual residual_gate(const float* gate, int n) {
    Residual r;
    r.gt0 = rnd(gate[n]), r.gt1 = rnd(gate[n + 1]);
    r.h[0] = r.h[1] = 0u;
    return r;
}
__device__ __forceinline__ void residual_load(Residual& res, const bf16_t* h, int n, int g) {
#pragma unroll
    for (int half = 0; half < 2; ++half)
        if (g + 8 * half < M) res.h[half] = ld_cg(h + (g + 8 * half) * D + n);
}
// h[r, n..n+1] += round(round(c) * gate); res.h becomes the new values
__device__ __forceinline__ void residual_store(Residual& res, bf16_t* h, int n, int g, float4 c) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int r = g + 8 * half;
        if (r < M) {
            const u32 hv = res.h[half];
            const float a = half ? c.z : c.x, b = half ? c.w : c.y;
            res.h[half] = pack2(bf2f(hv & 0xffff) + rnd(rnd(a) * res.gt0), bf2f(hv >> 16) + rnd(rnd(b) * res.gt1));
            st_u32(h + r * D + n, res.h[half]);
        }
    }
}

__device__ __forceinline__ void issue(u32 dst, const bf16_t* src, int tiles, int k, u32 bar) {
#ifdef CHAIN_NO_COPY
    return;
#endif
    if (tiles > 0) bulk_load(dst, src, (u32)tiles * 8u * (u32)k * 2u, bar);
}

__device__ __forceinline__ int tile_lo(int t_total) { return (int)(((long long)blockIdx.x * t_total) / NB); }
__device__ __forceinline__ int tile_hi(int t_total) { return (int)(((long long)(blockIdx.x + 1) * t_total) / NB); }

extern "C" __global__ void __launch_bounds__(NT, 1) expert_chain(
    const bf16_t* __restrict__ wqkv,  // [depth, T_QKV, D/32, 32, 8] fragment order, RoPE pairs interleaved
    const bf16_t* __restrict__ wo,    // [depth, T_O, NQ/32, 32, 8]
    const bf16_t* __restrict__ wgu,   // [depth, T_GU, D/32, 32, 8], rows gate j / up j interleaved
    const bf16_t* __restrict__ wd,    // [depth, T_DOWN, F/32, 32, 8]
    const float* __restrict__ mods,   // [2 depth + 1, 3 D] fp32: this step's adaRMS (scale | shift | gate)
    bf16_t* h,                        // [M, D] residual stream, updated in place
    const bf16_t* att,                // [M, NQ] attention output (the previous launch's)
    bf16_t* act,                      // [M, F] gelu(gate) * up
    bf16_t* qkv,                      // [M, NQKV] q | k | v, RoPE applied
    const bf16_t* __restrict__ cosp,  // [B, 1, L, HD]
    const bf16_t* __restrict__ sinp,
    int cs_b, int cs_l,               // strides (elements) of cos / sin over batch and position
    u32* gbar,                        // [2 + ...] grid barrier (count, generation), zero-initialized once
    int layer,                        // O, gate|up, down of this layer; < 0: none
    int qkv_layer,                    // Q/K/V of this layer after them; < 0: none
    float eps) {
    static_assert(MAXT_O * 32 <= NT && MAXT_DOWN * 32 <= NT && MAXT_GU * 32 <= NT && MAXT_QKV * 32 <= NT,
                  "one epilogue fragment per thread");
    static_assert(D <= 4 * NT && T_O == T_DOWN, "norm columns per thread; O and down share their column tiles");
    extern __shared__ __align__(128) unsigned char smem[];
    bf16_t* slot_a = (bf16_t*)smem;                       // gate|up, then the next Q/K/V
    bf16_t* slot_b = (bf16_t*)(smem + SLOT_A);            // O, then down
    bf16_t* X = (bf16_t*)(smem + SLOT_A + SLOT_B);        // normalized rows; reused for the partial sums
    float* red = (float*)X;
    float* ss = (float*)(smem + SLOT_A + SLOT_B + X_BYTES);  // [NW][16] row sums of squares
    u64* bars = (u64*)(ss + NW * 16);
    const u32 bar_a = smem_addr(bars), bar_b = smem_addr(bars + 1);
    const int tid = threadIdx.x, ln = tid & 31, g = ln >> 2, tig = ln & 3;
    u32 par_a = 0, par_b = 0;

    const int o0 = tile_lo(T_O), no = tile_hi(T_O) - o0;  // also the down tiles (T_O == T_DOWN)
    const int gu0 = tile_lo(T_GU), ngu = tile_hi(T_GU) - gu0;
    const int q0 = tile_lo(T_QKV), nq = tile_hi(T_QKV) - q0;

    if (tid == 0) {
        mbar_init(bar_a);
        mbar_init(bar_b);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        if (layer >= 0) {  // weights never change: copy them before waiting for the previous kernel
            issue(smem_addr(slot_b), wo + ((size_t)layer * T_O + o0) * 8 * NQ, no, NQ, bar_b);
#ifdef CHAIN_GU_AT_START
            issue(smem_addr(slot_a), wgu + ((size_t)layer * T_GU + gu0) * 8 * D, ngu, D, bar_a);
#endif
        } else {
            issue(smem_addr(slot_a), wqkv + ((size_t)qkv_layer * T_QKV + q0) * 8 * D, nq, D, bar_a);
        }
    }
    // static operands of the epilogues and norms, loaded before the wait
    const int n_res = 8 * (o0 + (tid >> 5)) + 2 * tig;  // O / down: this thread's output column pair
    const float* mod_attn = mods + (size_t)(2 * (layer < 0 ? 0 : layer)) * 3 * D;
    const float* mod_mlp = mod_attn + 3 * D;
    const float* mod_q = mods + (size_t)(2 * (qkv_layer < 0 ? 0 : qkv_layer)) * 3 * D;
    Residual res_o = residual_gate(mod_attn + 2 * D, tid < no * 32 ? n_res : 0);
    Residual res_d = residual_gate(mod_mlp + 2 * D, tid < no * 32 ? n_res : 0);
    const NormCols cols_mlp = norm_cols(mod_mlp), cols_q = norm_cols(mod_q);
    const int n_q = 8 * (q0 + (tid >> 5)) + 2 * tig;  // Q/K/V: interleaved row pair (d, d + HD/2) of one head
    const int col_q = (n_q / HD) * HD + (n_q % HD) / 2;  // output column of its first half
    float rope[2][4] = {{1.f, 0.f, 1.f, 0.f}, {1.f, 0.f, 1.f, 0.f}};  // cos1, sin1, cos2, sin2 per row
    if (qkv_layer >= 0 && tid < nq * 32 && n_q < ROPE_N) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int r = g + 8 * half;
            if (r < M) {
                const int cs = (r / L) * cs_b + (r % L) * cs_l + col_q % HD;
                rope[half][0] = bf2f(cosp[cs]), rope[half][1] = bf2f(sinp[cs]);
                rope[half][2] = bf2f(cosp[cs + HD / 2]), rope[half][3] = bf2f(sinp[cs + HD / 2]);
            }
        }
    }
    // dependents may start once every block got here (all blocks are resident: grid_sync cannot deadlock)
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    STAMP(0);
    asm volatile("griddepcontrol.wait;" ::: "memory");  // the previous kernel (h, att written) is complete
    __syncthreads();
    STAMP(1);

    if (layer >= 0) {
        // ---- O projection + gated residual ----
        if (tid < no * 32) residual_load(res_o, h, n_res, g);
        if (no > 0) {  // no copy was issued for a block without tiles
            mbar_wait(bar_b, par_b);
            par_b ^= 1;
        }
#ifndef CHAIN_GU_AT_START  // gate|up's copy would delay O's tile if issued with it
        if (tid == 0) issue(smem_addr(slot_a), wgu + ((size_t)layer * T_GU + gu0) * 8 * D, ngu, D, bar_a);
#endif
        bf16_t* att_s = (bf16_t*)(smem + STAGE_O);  // past the O weights in slot B, into X
        stage_rows<NQ>(att, att_s);
        gemm_tiles<NQ, S_O, CEIL_DIV(MAXT_O, NW / S_O)>(slot_b, no, att_s, red, MAXT_O);
        if (tid < no * 32) residual_store(res_o, h, n_res, g, tile_sums<S_O>(red, tid >> 5, ln, MAXT_O));
        __syncthreads();  // slot_b and red are free
        if (tid == 0) {
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            issue(smem_addr(slot_b), wd + ((size_t)layer * T_DOWN + o0) * 8 * F, no, F, bar_b);
        }
        STAMP(2);
        grid_sync(gbar);
        STAMP(3);
        // ---- adaRMS + gate|up + GeGLU ----
        norm_rows(h, cols_mlp, X, ss, eps);
        if (ngu > 0) {
            mbar_wait(bar_a, par_a);
            par_a ^= 1;
        }
        STAMP(9);
        gemm_tiles<D, S_GU, CEIL_DIV(MAXT_GU, NW / S_GU)>(slot_a, ngu, X, red, MAXT_GU);
        if (tid < ngu * 32) {
            const float4 c = tile_sums<S_GU>(red, tid >> 5, ln, MAXT_GU);
            const int col = 4 * (gu0 + (tid >> 5)) + tig;  // pair (gate col, up col) of weight rows 2 col, 2 col + 1
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int r = g + 8 * half;
                if (r < M) {
                    const float a = rnd(half ? c.z : c.x), b = rnd(half ? c.w : c.y);
                    const float inner = 0.7978845608028654f * (a + 0.044715f * a * a * a);
                    const float gelu = rnd(a / (1.f + __expf(-2.f * inner)));
                    act[r * F + col] = (bf16_t)f2bf(gelu * b);
                }
            }
        }
        __syncthreads();
        if (tid == 0 && qkv_layer >= 0) {
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            issue(smem_addr(slot_a), wqkv + ((size_t)qkv_layer * T_QKV + q0) * 8 * D, nq, D, bar_a);
        }
        STAMP(4);
        grid_sync(gbar);
        STAMP(5);
        // ---- down projection + gated residual (h of these columns: this block's O phase wrote it) ----
        res_d.h[0] = res_o.h[0], res_d.h[1] = res_o.h[1];
        if (no > 0) {
            mbar_wait(bar_b, par_b);
            par_b ^= 1;
        }
        bf16_t* act_s = (bf16_t*)(smem + STAGE_D);  // slot A past the next Q/K/V weights (being copied)
        stage_rows<F>(act, act_s);
        gemm_tiles<F, S_DOWN, CEIL_DIV(MAXT_DOWN, NW / S_DOWN)>(slot_b, no, act_s, red, MAXT_DOWN);
        if (tid < no * 32) residual_store(res_d, h, n_res, g, tile_sums<S_DOWN>(red, tid >> 5, ln, MAXT_DOWN));
        STAMP(6);
        if (qkv_layer < 0) return;
        grid_sync(gbar);
        STAMP(7);
    }
    // ---- adaRMS + Q/K/V + RoPE of qkv_layer ----
    norm_rows(h, cols_q, X, ss, eps);
    if (nq > 0) mbar_wait(bar_a, par_a);
    gemm_tiles<D, S_QKV, CEIL_DIV(MAXT_QKV, NW / S_QKV)>(slot_a, nq, X, red, MAXT_QKV);
    if (tid < nq * 32) {
        const float4 c = tile_sums<S_QKV>(red, tid >> 5, ln, MAXT_QKV);
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int r = g + 8 * half;
            if (r < M) {
                float a = rnd(half ? c.z : c.x), b = rnd(half ? c.w : c.y);
                if (n_q < ROPE_N) {
                    const float a2 = a * rope[half][0] - b * rope[half][1];
                    b = b * rope[half][2] + a * rope[half][3];
                    a = a2;
                }
                qkv[r * NQKV + col_q] = (bf16_t)f2bf(a);
                qkv[r * NQKV + col_q + HD / 2] = (bf16_t)f2bf(b);
            }
        }
    }
    STAMP(8);
}
