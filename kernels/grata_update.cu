// GraTa parameter update: gradient alignment + dynamic-learning-rate Adam, fused.
//
// Compiled at run time with NVRTC (see cuda_update.py); also compiles as-is with nvcc.
// No header is included: everything used here is built into NVRTC.
//
// What one GraTa step needs, for the flat BN-affine vector theta (fp32, length n):
//     cos  = <g_p, g_a> / (||g_p|| * ||g_a|| + 1e-12)
//     eta  = beta * (cos + 1)^2 / 4
//     m    = b1 * m + (1 - b1) * g_p
//     v    = b2 * v + (1 - b2) * g_p^2
//     theta -= eta / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
// (torch.optim.Adam's formulation, no weight decay.) The host passes the bias corrections
// bc1 = 1 - b1^t and sqrt(bc2) = sqrt(1 - b2^t), computed in double, so no thread ever
// evaluates pow(); eta only exists on the device.
//
// Design
// ------
// The update of every element needs eta, and eta needs a reduction over the whole vector:
// a grid-wide dependency. Three launch shapes, all sharing the same code (the host picks
// one by length; the GPU check script sweeps them):
//
//  * grata_fused_single, one block of 1024 threads (a few thousand elements): the block
//    reads g_p and g_a to form the three sums, reduces them, computes eta, and updates.
//    One ordinary launch, no atomics, no grid barrier. One SM's bandwidth bounds it, which
//    is why it is not the default at the 19,136 parameters of ResNet-34.
//
//  * grata_fused, several blocks, COOPERATIVE launch (19,136 and up; one launch): the
//    grid is a few blocks at 19,136 (latency: about one batch of loads per thread and
//    phase, plus the barrier) and every resident block at 10^7 (bandwidth). Phase 1
//    accumulates per-block partial sums, each block writes its partial to a workspace slot
//    and takes a ticket on an atomic counter (release/acquire at gpu scope). The block that
//    takes the last ticket reduces the partials in block-index order, computes cos and eta,
//    publishes them, resets the counter and bumps a generation word with a release store.
//    The other blocks wait for the generation to change (acquire loads, __nanosleep
//    back-off) and then run phase 2. A last-block pattern alone cannot make the other
//    blocks wait; the wait is only safe because a cooperative launch guarantees that every
//    block of the grid is resident at once (the host sizes the grid from the occupancy
//    calculator and the driver refuses a cooperative grid that does not fit). The barrier
//    state is self-resetting, so the kernel can be replayed (CUDA graphs) without host
//    work. A hand-written barrier is used instead of cooperative_groups::grid_group::sync()
//    so that NVRTC needs no CUDA include directory (Jetson images often ship without one).
//
//  * grata_reduce + grata_apply, TWO ordinary launches (devices or contexts without
//    cooperative launch, e.g. under MPS): the same last-block reduction publishes eta to
//    device memory; the second kernel reads it. No host round trip in either case.
//
// Bandwidth: the update needs 5 reads and 3 writes per element (32 B). This kernel reads
// g_p twice (36 B). Phase 2 walks the grid-stride iterations in REVERSE order, so the part
// of g_p that phase 1 read last (still in L2: 50 MB on H100, 4 MB on Orin) is re-read
// first; g_a, theta, m, v use streaming (evict-first) cache hints so they do not push g_p
// out. Loads and stores are float4 where the pointers allow it: the body is vectorised when
// all arrays of a phase are congruent modulo 16 bytes (a scalar head aligns them), else the
// phase falls back to coalesced scalar accesses. Any length, any 4-byte alignment.
//
// Latency: a thread issues the loads of several grid-stride iterations (GRATA_UNROLL_*)
// before using any, so even the small grids keep enough bytes in flight.
//
// Reductions: products are formed in fp32 and summed in fp32 over one float4 (4 terms),
// then folded into per-thread fp64 accumulators; block and grid reductions are fp64 in a
// fixed tree / index order. The result depends only on (n, pointer alignment, grid size),
// never on timing: it is deterministic run to run. fp64 costs 3 adds per 4 elements, which
// keeps it off the critical path even on Jetson Orin, where fp64 throughput is a small
// fraction of fp32 but the kernel is bound by LPDDR5 bandwidth. Limitation, by design:
// gradient entries below ~1e-19 in magnitude have products that underflow fp32.

// Block sizes: the multi-block shapes use GRATA_BLOCK threads per block (many blocks per
// SM); the single-block shape uses GRATA_SINGLE_BLOCK threads (one block has to cover the
// whole vector, so it should be as wide as possible).
#ifndef GRATA_BLOCK
#define GRATA_BLOCK 256
#endif
#ifndef GRATA_SINGLE_BLOCK
#define GRATA_SINGLE_BLOCK 1024
#endif

#if (GRATA_BLOCK % 32) != 0 || GRATA_BLOCK > 1024 || (GRATA_SINGLE_BLOCK % 32) != 0 || \
    GRATA_SINGLE_BLOCK > 1024
#error "block sizes must be multiples of 32, at most 1024"
#endif

// Grid-stride iterations whose loads a thread issues together (memory-level parallelism).
#ifndef GRATA_UNROLL_SUMS
#define GRATA_UNROLL_SUMS 4
#endif
#ifndef GRATA_UNROLL_ADAM
#define GRATA_UNROLL_ADAM 2
#endif

typedef unsigned long long u64;

// ---------------------------------------------------------------- memory-model helpers

__device__ __forceinline__ unsigned grata_ld_acquire(const unsigned* p)
{
    unsigned v;
    asm volatile("ld.acquire.gpu.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ void grata_red_release_add(unsigned* p, unsigned x)
{
    asm volatile("red.release.gpu.add.u32 [%0], %1;" : : "l"(p), "r"(x) : "memory");
}

__device__ __forceinline__ unsigned grata_atom_add_acq_rel(unsigned* p, unsigned x)
{
    unsigned old;
    asm volatile("atom.acq_rel.gpu.add.u32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(x) : "memory");
    return old;
}

// ---------------------------------------------------------------- reductions

__device__ __forceinline__ double grata_warp_sum(double x)
{
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        x += __shfl_down_sync(0xffffffffu, x, off);
    }
    return x;
}

// Sums three per-thread values over the block in a fixed order. The totals are valid in
// thread 0. Ends with a barrier so the shared scratch can be reused at once.
template <int BLOCK>
__device__ __forceinline__ void grata_block_sum3(double& a, double& b, double& c)
{
    constexpr int WARPS = BLOCK / 32;
    __shared__ double scratch[3][WARPS];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    a = grata_warp_sum(a);
    b = grata_warp_sum(b);
    c = grata_warp_sum(c);
    if (lane == 0) {
        scratch[0][warp] = a;
        scratch[1][warp] = b;
        scratch[2][warp] = c;
    }
    __syncthreads();
    if (warp == 0) {
        a = lane < WARPS ? scratch[0][lane] : 0.0;
        b = lane < WARPS ? scratch[1][lane] : 0.0;
        c = lane < WARPS ? scratch[2][lane] : 0.0;
        a = grata_warp_sum(a);
        b = grata_warp_sum(b);
        c = grata_warp_sum(c);
    }
    __syncthreads();
}

// ---------------------------------------------------------------- partition of [0, n)
//
// [0, head) and [head + 4*nvec, n) are processed element by element ("scalar" indices,
// numbered 0..nscalar-1), [head, head + 4*nvec) as float4. When the arrays of a phase are
// not congruent modulo 16 bytes, everything is scalar.

struct GrataSplit {
    u64 head;
    u64 nvec;
    u64 nscalar;
};

__device__ __forceinline__ unsigned grata_quad_offset(const void* p)
{
    return (unsigned)(((u64)p >> 2) & 3u);
}

__device__ __forceinline__ GrataSplit grata_split(u64 n, bool vectorise, unsigned offset)
{
    GrataSplit s;
    if (!vectorise) {
        s.head = 0;
        s.nvec = 0;
        s.nscalar = n;
        return s;
    }
    u64 head = (u64)((4u - offset) & 3u);
    if (head > n) {
        head = n;
    }
    s.head = head;
    s.nvec = (n - head) >> 2;
    s.nscalar = n - 4 * s.nvec;
    return s;
}

__device__ __forceinline__ u64 grata_scalar_index(const GrataSplit& s, u64 j)
{
    return j < s.head ? j : j + 4 * s.nvec;
}

// ---------------------------------------------------------------- phase 1: the three sums

template <int BLOCK>
__device__ __forceinline__ void grata_dot_partials(const float* __restrict__ gp,
                                                   const float* __restrict__ ga, u64 n,
                                                   double& pa, double& pp, double& aa)
{
    const u64 tid = (u64)blockIdx.x * BLOCK + threadIdx.x;
    const u64 stride = (u64)gridDim.x * BLOCK;
    const unsigned off = grata_quad_offset(gp);
    const GrataSplit s = grata_split(n, off == grata_quad_offset(ga), off);

    const float4* __restrict__ gp4 = reinterpret_cast<const float4*>(gp + s.head);
    const float4* __restrict__ ga4 = reinterpret_cast<const float4*>(ga + s.head);
    // Batches of GRATA_UNROLL_SUMS grid-stride iterations: all loads of a batch are issued
    // (predicated) before the first is used, so a thread has that many in flight.
    for (u64 base = tid; base < s.nvec; base += GRATA_UNROLL_SUMS * stride) {
        float4 p[GRATA_UNROLL_SUMS], a[GRATA_UNROLL_SUMS];
#pragma unroll
        for (int u = 0; u < GRATA_UNROLL_SUMS; ++u) {
            const u64 i = base + (u64)u * stride;
            if (i < s.nvec) {
                p[u] = __ldcg(gp4 + i);  // L2 only: phase 2 re-reads it
                a[u] = __ldcs(ga4 + i);  // read once: evict first
            } else {
                p[u] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                a[u] = p[u];
            }
        }
#pragma unroll
        for (int u = 0; u < GRATA_UNROLL_SUMS; ++u) {
            float d = p[u].x * a[u].x;
            d = fmaf(p[u].y, a[u].y, d);
            d = fmaf(p[u].z, a[u].z, d);
            d = fmaf(p[u].w, a[u].w, d);
            float q = p[u].x * p[u].x;
            q = fmaf(p[u].y, p[u].y, q);
            q = fmaf(p[u].z, p[u].z, q);
            q = fmaf(p[u].w, p[u].w, q);
            float r = a[u].x * a[u].x;
            r = fmaf(a[u].y, a[u].y, r);
            r = fmaf(a[u].z, a[u].z, r);
            r = fmaf(a[u].w, a[u].w, r);
            pa += (double)d;  // exact no-ops (+0.0) for the padding of the last batch
            pp += (double)q;
            aa += (double)r;
        }
    }
    for (u64 j = tid; j < s.nscalar; j += stride) {
        const u64 k = grata_scalar_index(s, j);
        const float p = __ldcg(gp + k);
        const float a = __ldcs(ga + k);
        pa += (double)(p * a);
        pp += (double)(p * p);
        aa += (double)(a * a);
    }
}

// ---------------------------------------------------------------- phase 2: Adam

struct GrataAdam {
    float step;      // learning rate / bc1
    float bc2_sqrt;  // sqrt(1 - b2^t)
    float b1, omb1;  // b1, 1 - b1 (each rounded from double by the host)
    float b2, omb2;  // b2, 1 - b2
    float eps;
};

__device__ __forceinline__ GrataAdam grata_adam_coefs(float step, float bc2_sqrt, float b1,
                                                      float omb1, float b2, float omb2,
                                                      float eps)
{
    GrataAdam c;
    c.step = step;
    c.bc2_sqrt = bc2_sqrt;
    c.b1 = b1;
    c.omb1 = omb1;
    c.b2 = b2;
    c.omb2 = omb2;
    c.eps = eps;
    return c;
}

__device__ __forceinline__ void grata_adam1(float& th, float& m, float& v, float g,
                                            const GrataAdam& c)
{
    m = fmaf(c.b1, m, c.omb1 * g);
    v = fmaf(c.b2, v, c.omb2 * g * g);
    const float denom = sqrtf(v) / c.bc2_sqrt + c.eps;
    th = fmaf(-c.step, m / denom, th);
}

// Updates theta, m, v in place. Walks the grid-stride iterations from the last to the
// first (see the header: the most recently read g_p is still in L2).
template <int BLOCK>
__device__ __forceinline__ void grata_adam_apply(float* __restrict__ theta, float* __restrict__ m,
                                                 float* __restrict__ v,
                                                 const float* __restrict__ g, u64 n,
                                                 const GrataAdam& c)
{
    const u64 tid = (u64)blockIdx.x * BLOCK + threadIdx.x;
    const u64 stride = (u64)gridDim.x * BLOCK;
    const unsigned off = grata_quad_offset(theta);
    const bool congruent = off == grata_quad_offset(m) && off == grata_quad_offset(v) &&
                           off == grata_quad_offset(g);
    const GrataSplit s = grata_split(n, congruent, off);

    float4* __restrict__ th4 = reinterpret_cast<float4*>(theta + s.head);
    float4* __restrict__ m4 = reinterpret_cast<float4*>(m + s.head);
    float4* __restrict__ v4 = reinterpret_cast<float4*>(v + s.head);
    const float4* __restrict__ g4 = reinterpret_cast<const float4*>(g + s.head);

    // Iterations are numbered 0..iters-1 (element index tid + k * stride) and taken in
    // batches of GRATA_UNROLL_ADAM from the LAST one down; loads of a batch go out first.
    const u64 iters = s.nvec > tid ? (s.nvec - tid + stride - 1) / stride : 0;
    for (u64 left = iters; left > 0;) {
        float4 t[GRATA_UNROLL_ADAM], mm[GRATA_UNROLL_ADAM], vv[GRATA_UNROLL_ADAM];
        float4 gg[GRATA_UNROLL_ADAM];
#pragma unroll
        for (int u = 0; u < GRATA_UNROLL_ADAM; ++u) {
            if ((u64)u < left) {
                const u64 i = tid + (left - 1 - (u64)u) * stride;
                gg[u] = __ldcg(g4 + i);
                t[u] = __ldcs(th4 + i);
                mm[u] = __ldcs(m4 + i);
                vv[u] = __ldcs(v4 + i);
            }
        }
#pragma unroll
        for (int u = 0; u < GRATA_UNROLL_ADAM; ++u) {
            if ((u64)u < left) {
                const u64 i = tid + (left - 1 - (u64)u) * stride;
                grata_adam1(t[u].x, mm[u].x, vv[u].x, gg[u].x, c);
                grata_adam1(t[u].y, mm[u].y, vv[u].y, gg[u].y, c);
                grata_adam1(t[u].z, mm[u].z, vv[u].z, gg[u].z, c);
                grata_adam1(t[u].w, mm[u].w, vv[u].w, gg[u].w, c);
                __stcs(th4 + i, t[u]);
                __stcs(m4 + i, mm[u]);
                __stcs(v4 + i, vv[u]);
            }
        }
        left = left > GRATA_UNROLL_ADAM ? left - GRATA_UNROLL_ADAM : 0;
    }
    for (u64 j = tid; j < s.nscalar; j += stride) {
        const u64 k = grata_scalar_index(s, j);
        float t = theta[k];
        float mm = m[k];
        float vv = v[k];
        grata_adam1(t, mm, vv, __ldcg(g + k), c);
        theta[k] = t;
        m[k] = mm;
        v[k] = vv;
    }
}

// ---------------------------------------------------------------- finalisation

// Thread 0 of the block that holds the totals: cos, eta and the step size eta / bc1,
// published to scal[0] (cos), scal[1] (step), both double, and *cos_out (float, optional).
__device__ __forceinline__ double grata_finish(double pa, double pp, double aa, double beta,
                                               double bc1, double* scal, float* cos_out)
{
    const double cosv = pa / (sqrt(pp) * sqrt(aa) + 1e-12);
    const double eta = beta * (cosv + 1.0) * (cosv + 1.0) / 4.0;
    const double step = eta / bc1;
    scal[0] = cosv;
    scal[1] = step;
    if (cos_out != nullptr) {
        *cos_out = (float)cosv;
    }
    return step;
}

// Multi-block shapes, once the block's own partial is in thread 0: publish it and take a
// ticket; the block with the last ticket reduces all partials in block-index order and
// publishes the scalars, then resets the counter and bumps the generation (release).
// Returns (in every thread) whether this block was the last; if it was, *step_out holds
// the step size.
template <int BLOCK>
__device__ __forceinline__ bool grata_last_block(double pa, double pp, double aa, double beta,
                                                 double bc1, double* partials, unsigned* sync,
                                                 double* scal, float* cos_out, float* step_out)
{
    __shared__ int s_last;
    const unsigned nblocks = gridDim.x;
    if (threadIdx.x == 0) {
        partials[blockIdx.x] = pa;
        partials[nblocks + blockIdx.x] = pp;
        partials[2 * nblocks + blockIdx.x] = aa;
        // acq_rel: releases this block's partial, acquires every earlier block's.
        const unsigned ticket = grata_atom_add_acq_rel(&sync[0], 1u);
        s_last = ticket == nblocks - 1;
        if (s_last) {
            __threadfence();  // the other threads of this block read the partials next
        }
    }
    __syncthreads();
    if (!s_last) {
        return false;
    }
    double a = 0.0, b = 0.0, c = 0.0;
    for (unsigned k = threadIdx.x; k < nblocks; k += BLOCK) {
        a += __ldcg(partials + k);
        b += __ldcg(partials + nblocks + k);
        c += __ldcg(partials + 2 * nblocks + k);
    }
    grata_block_sum3<BLOCK>(a, b, c);
    if (threadIdx.x == 0) {
        *step_out = (float)grata_finish(a, b, c, beta, bc1, scal, cos_out);
        sync[0] = 0u;  // ready for the next launch; ordered before the release below
        grata_red_release_add(&sync[1], 1u);
    }
    __syncthreads();
    return true;
}

template <int BLOCK>
__device__ __forceinline__ void grata_fused_body(float* __restrict__ theta,
                                                 float* __restrict__ m, float* __restrict__ v,
                                                 const float* __restrict__ gp,
                                                 const float* __restrict__ ga, u64 n,
                                                 double beta, double bc1, const GrataAdam& c0,
                                                 double* partials, unsigned* sync,
                                                 double* scal, float* cos_out)
{
    __shared__ float s_step;
    unsigned gen = 0u;
    if (gridDim.x > 1 && threadIdx.x == 0) {
        // Read before arriving: the generation cannot move until every block has arrived.
        gen = grata_ld_acquire(&sync[1]);
    }
    double pa = 0.0, pp = 0.0, aa = 0.0;
    grata_dot_partials<BLOCK>(gp, ga, n, pa, pp, aa);
    grata_block_sum3<BLOCK>(pa, pp, aa);

    if (gridDim.x == 1) {
        if (threadIdx.x == 0) {
            s_step = (float)grata_finish(pa, pp, aa, beta, bc1, scal, cos_out);
        }
        __syncthreads();
    } else if (!grata_last_block<BLOCK>(pa, pp, aa, beta, bc1, partials, sync, scal, cos_out,
                                        &s_step)) {
        // Only reachable in a cooperative launch: every block is resident, so the last
        // block is running and will release us.
        if (threadIdx.x == 0) {
            while (grata_ld_acquire(&sync[1]) == gen) {
                __nanosleep(32);
            }
            s_step = (float)__ldcg(scal + 1);
        }
        __syncthreads();
    }

    GrataAdam c = c0;
    c.step = s_step;
    grata_adam_apply<BLOCK>(theta, m, v, gp, n, c);
}

// ---------------------------------------------------------------- kernels
//
// Common arguments: n elements; beta (GraTa's base learning rate); bc1 = 1 - b1^t;
// bc2_sqrt = sqrt(1 - b2^t); b1, omb1 = 1 - b1, b2, omb2 = 1 - b2, eps as fp32.
// Workspace: partials, 3 * gridDim.x doubles; sync, 2 unsigned, zero before the first
// launch and left consistent by every launch; scal, 2 doubles (cos, eta / bc1) written by
// every grata launch; cos_out, an optional fp32 scalar (nullptr for none).

// One launch, one block of GRATA_SINGLE_BLOCK threads: small vectors.
extern "C" __global__ void __launch_bounds__(GRATA_SINGLE_BLOCK)
grata_fused_single(float* __restrict__ theta, float* __restrict__ m, float* __restrict__ v,
                   const float* __restrict__ gp, const float* __restrict__ ga, long long n,
                   double beta, double bc1, float bc2_sqrt, float b1, float omb1, float b2,
                   float omb2, float eps, double* scal, float* cos_out)
{
    const GrataAdam c = grata_adam_coefs(0.0f, bc2_sqrt, b1, omb1, b2, omb2, eps);
    grata_fused_body<GRATA_SINGLE_BLOCK>(theta, m, v, gp, ga, (u64)n, beta, bc1, c, nullptr,
                                         nullptr, scal, cos_out);
}

// One launch, GRATA_BLOCK threads per block. More than one block: MUST be launched
// cooperatively (the blocks wait for each other).
extern "C" __global__ void __launch_bounds__(GRATA_BLOCK)
grata_fused(float* __restrict__ theta, float* __restrict__ m, float* __restrict__ v,
            const float* __restrict__ gp, const float* __restrict__ ga, long long n,
            double beta, double bc1, float bc2_sqrt, float b1, float omb1, float b2,
            float omb2, float eps, double* partials, unsigned* sync, double* scal,
            float* cos_out)
{
    const GrataAdam c = grata_adam_coefs(0.0f, bc2_sqrt, b1, omb1, b2, omb2, eps);
    grata_fused_body<GRATA_BLOCK>(theta, m, v, gp, ga, (u64)n, beta, bc1, c, partials, sync,
                                  scal, cos_out);
}

// Two-launch shape, first launch (any grid): the sums; the last block publishes scal.
extern "C" __global__ void __launch_bounds__(GRATA_BLOCK)
grata_reduce(const float* __restrict__ gp, const float* __restrict__ ga, long long n,
             double beta, double bc1, double* partials, unsigned* sync, double* scal,
             float* cos_out)
{
    __shared__ float s_step;
    double pa = 0.0, pp = 0.0, aa = 0.0;
    grata_dot_partials<GRATA_BLOCK>(gp, ga, (u64)n, pa, pp, aa);
    grata_block_sum3<GRATA_BLOCK>(pa, pp, aa);
    if (gridDim.x == 1) {
        if (threadIdx.x == 0) {
            grata_finish(pa, pp, aa, beta, bc1, scal, cos_out);
        }
    } else {
        grata_last_block<GRATA_BLOCK>(pa, pp, aa, beta, bc1, partials, sync, scal, cos_out,
                                      &s_step);
    }
}

// Two-launch shape, second launch (any grid): Adam with the step size published in scal.
extern "C" __global__ void __launch_bounds__(GRATA_BLOCK)
grata_apply(float* __restrict__ theta, float* __restrict__ m, float* __restrict__ v,
            const float* __restrict__ gp, long long n, const double* scal, float bc2_sqrt,
            float b1, float omb1, float b2, float omb2, float eps)
{
    const GrataAdam c =
        grata_adam_coefs((float)scal[1], bc2_sqrt, b1, omb1, b2, omb2, eps);
    grata_adam_apply<GRATA_BLOCK>(theta, m, v, gp, (u64)n, c);
}

// Plain Adam (TENT), any grid: step = lr / bc1, computed by the host in double.
extern "C" __global__ void __launch_bounds__(GRATA_BLOCK)
adam_step(float* __restrict__ theta, float* __restrict__ m, float* __restrict__ v,
          const float* __restrict__ g, long long n, float step, float bc2_sqrt, float b1,
          float omb1, float b2, float omb2, float eps)
{
    const GrataAdam c = grata_adam_coefs(step, bc2_sqrt, b1, omb1, b2, omb2, eps);
    grata_adam_apply<GRATA_BLOCK>(theta, m, v, g, (u64)n, c);
}
