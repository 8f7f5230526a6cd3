//! Specialisation of the chunked passes (`wgsl/chunk_*.wgsl`): chunk size and tiles, flags from the
//! problem; the windows of chunks the forward walks and their chunk tables; scratch sizes.

use super::{Kernel, PipelineKey, Reduce};
use crate::device::Caps;
use crate::problem::{DType, GateSpace, Problem, StateLayout};

/// Workgroup size of every chunked pass (`WG` in `wgsl/chunk_common.wgsl`).
pub const WG: u32 = 256;
/// Largest workgroup tile in floats (`TILE` in `wgsl/chunk_common.wgsl`): 16 KiB.
pub const TILE: u32 = 4096;
/// Workgroup memory of the largest chunked pass (the state walk: S, v_new, a staging slice, the
/// decay factors and the sequence range), in bytes; the device must grant at least this much
/// (Apple GPUs grant 32 KiB).
pub const WORKGROUP_BYTES: u32 = 4 * (TILE + 1024 + 2048 + 64 + 4);
/// Default bound on the scratch memory of one window of chunks of an inference forward (see
/// [`max_local_chunks`]); a call's scratch stays under it whatever T. Fewer, longer windows run
/// faster: on the H100 (docs/PERF.md, R49) the bf16 forward at B=8 T=8192 took 18.05 ms with 512 MiB,
/// 15.85 with 1 GiB and 15.15 with 2 GiB. 1 GiB holds B=1 T=16384 in one window (966 MiB) and B=8
/// T=8192 in four where the output pass stages q from the input (R79: 2.78 / 11.29 ms with one and
/// four windows against 2.88 / 11.78 with two and eight, before the q plane of `qk16` was dropped).
/// Devices with little memory set [`crate::Settings::chunk_window_bytes`] lower.
pub const DEFAULT_WINDOW_BYTES: u64 = 1 << 30;
/// The same bound for a training forward and the chunked backward, which hold the whole sequence's
/// inputs, saved states and gradients anyway: a training step at B=8 T=8192 took 87.4, 81.5, 77.9
/// and 75.8 ms with windows of 0.5, 1, 2 and 4 GiB (R49).
pub const DEFAULT_TRAIN_WINDOW_BYTES: u64 = 2 << 30;

/// The fewest subgroups a chunked pass's workgroup of [`WG`] threads can have on `caps` (0 where the
/// subgroup size is unknown). The variants that give each subgroup one task of its own (`U16`,
/// `PKEEP`) are chosen only where the tasks are no more than this.
fn min_subgroups(caps: &Caps) -> u32 {
    WG.checked_div(caps.subgroup_max).unwrap_or(0)
}

/// Everything that selects one compiled variant of the chunked passes, besides the problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChunkSpec {
    /// Chunk size C: 16, 32 or 64.
    pub chunk: u32,
    /// State pass: value columns per workgroup.
    pub bv: u32,
    /// Output pass: value columns per workgroup.
    pub bvo: u32,
    /// Cooperative-matrix output pass: columns of K per staged slice of exp(gc) ∘ q (`QKS`; divides
    /// K, the whole K where it fits).
    pub qks: u32,
    /// w/u pass: output columns per workgroup (divides K and V).
    pub bd: u32,
    /// Cooperative-matrix tile size of the `*_mma` passes, when they are used.
    pub mma: Option<u32>,
    /// The output pass runs on cooperative matrices (`chunk_output_mma.wgsl`), from the f16 operands
    /// that the pack and state passes then write (`OUT16`). In a backward: the local pass runs on
    /// them (`chunk_bwd_local_mma.wgsl`), with k of `qk16` from the w/u pass.
    pub out16: bool,
    /// The cooperative-matrix state walk writes S in f32 (`KEEP_F32`): for the SIMT output pass, a
    /// training forward's saved states and the stage tests.
    pub keep_f32: bool,
    /// The cooperative-matrix state walk writes v_new, and under `w16` the w/u pass w, in f32 as well
    /// (`WV32`): for the SIMT output and local passes and the stage tests.
    pub wv32: bool,
    /// The w/u pass writes the state walk's f16 operands (`W16`, with `wk16`), and with `out16` k of
    /// `qk16`; the pack pass then only makes q.
    pub w16: bool,
    /// A is the training forward's saved A, indexed by state slot (`A_SLOT`): the training forward
    /// writes it, the backward reads it instead of solving again.
    pub a_slot: bool,
    /// u in f16, and the cooperative-matrix walk accumulates v_new in f16 from it (`U16`).
    pub u16: bool,
    /// The cooperative-matrix output pass makes P once per key head and keeps it in registers for
    /// the head's value heads (`PKEEP`: each subgroup has one task of P).
    pub p_keep: bool,
    /// The cooperative-matrix output pass stages q from the input itself, so an inference forward
    /// runs no pack pass (`QIN`: with PKEEP and the whole K staged at once).
    pub q_in: bool,
}

impl ChunkSpec {
    /// Default tiles for chunk size `chunk` and head dims `k`, `v` (multiples of 16, at most 256).
    pub fn choose(chunk: u32, k: usize, v: usize) -> ChunkSpec {
        let (k, v) = (k as u32, v as u32);
        let fit = |cands: &[u32], ok: &dyn Fn(u32) -> bool| cands.iter().copied().find(|&b| ok(b)).unwrap_or(16);
        // The state pass holds K x BV and C x BV (<= 1024) tiles; BV = 16 always fits.
        let bv = fit(&[16], &|b| v % b == 0 && k * b <= TILE && chunk * b <= 1024);
        let bvo = fit(&[64, 32, 16], &|b| v % b == 0 && chunk * b <= TILE);
        let bd = fit(&[64, 32, 16], &|b| v % b == 0 && k % b == 0 && chunk * b <= TILE);
        ChunkSpec {
            chunk,
            bv,
            bvo,
            qks: k,
            bd,
            mma: None,
            out16: false,
            keep_f32: true,
            wv32: true,
            w16: false,
            a_slot: false,
            u16: false,
            p_keep: false,
            q_in: false,
        }
    }

    /// Workgroup memory of the cooperative-matrix output pass (`wgsl/chunk_output_mma.wgsl`) with
    /// `tile` x `tile` matrices: pf (P, and a strip of 16 parked tiles), p16, qs, zt, gcs and `ctl`,
    /// in bytes.
    pub fn output_mma_bytes(&self, tile: u32) -> u32 {
        let c = self.chunk;
        4 * (c * c).max(16 * tile * tile) + 2 * c * (c + 8) + 2 * c * (self.qks + 8) + 4 * 256 + 4 * 64 + 16
    }

    /// Whether the cooperative-matrix output pass runs these tiles with `tile` x `tile` matrices,
    /// head dim `k`, `max_bytes` of workgroup memory and workgroups of at most `max_subgroups`
    /// subgroups (its strip of parked tiles holds 16; 0: unknown, not run).
    pub fn output_mma_fits(&self, k: usize, tile: u32, max_bytes: u32, max_subgroups: u32) -> bool {
        let (k, c, qks) = (k as u32, self.chunk, self.qks);
        c.is_multiple_of(2 * tile)
            && self.bvo.is_multiple_of(2 * tile)
            && qks.is_multiple_of(tile)
            && k.is_multiple_of(qks)
            && c * qks <= 8 * 4 * WG
            && (1..=16).contains(&max_subgroups)
            && self.output_mma_bytes(tile) <= max_bytes
    }

    /// The cooperative-matrix output pass for head dims `k`, `v` on `caps` with `tile` x `tile`
    /// matrices, if it fits: the whole V a workgroup (P once per chunk and key head), q staged in the
    /// widest slices of K that fit.
    fn with_output_mma(&self, k: usize, v: usize, tile: u32, caps: &Caps) -> Option<ChunkSpec> {
        let max_subgroups = WG.checked_div(caps.subgroup_min).unwrap_or(0);
        let mut on = ChunkSpec { bvo: v as u32, qks: k as u32, out16: true, ..*self };
        while on.qks >= tile {
            if on.output_mma_fits(k, tile, caps.max_workgroup_storage, max_subgroups) {
                return Some(on);
            }
            on.qks /= 2;
        }
        None
    }

    /// The tiles and variants of a forward of `p` on `caps` made for `purpose`, decided here only: the
    /// cooperative-matrix state walk where it fits ([`ChunkSpec::mma_for`]), the cooperative-matrix
    /// output pass with it where that fits too, the f16 operands from the w/u pass wherever they are
    /// made, and the f32 intermediates wherever something reads them.
    pub fn for_forward(chunk: u32, p: &Problem, caps: &Caps, purpose: ForwardPurpose) -> ChunkSpec {
        let mut spec = ChunkSpec::choose(chunk, p.dims.k, p.dims.v);
        spec.mma = spec.mma_for(p, caps);
        if let Some(t) = spec.mma {
            if let Some(on) = spec.with_output_mma(p.dims.k, p.dims.v, t, caps) {
                spec = on;
            }
            let tiles = spec.chunk / t;
            spec.p_keep = spec.out16 && tiles * (tiles / 2) <= min_subgroups(caps);
            // Only an inference forward: the training forward's backward and the stage tests read
            // the q plane of qk16 that the pack pass makes.
            spec.q_in = purpose == ForwardPurpose::Inference && spec.p_keep && spec.qks == p.dims.k as u32;
        }
        let stages = purpose == ForwardPurpose::Stages;
        spec.keep_f32 = purpose != ForwardPurpose::Inference || !spec.out16;
        spec.wv32 = stages || !spec.out16;
        spec.a_slot = purpose == ForwardPurpose::Training;
        // The stage tests check the f16 operands on every device, so they are made there too.
        spec.w16 = stages || spec.mma.is_some();
        if let Some(t) = spec.mma {
            spec.set_u16(p, caps, t);
        }
        spec
    }

    /// u in f16 and v_new accumulated in f16, with BV = 32 (`U16`), where nothing reads u or v_new in
    /// f32, the adapter accumulates in f16, and the walk fits with each v_new tile on a subgroup of
    /// its own (its one round, whatever the subgroup size within the adapter's range). On the H100
    /// (docs/PERF.md, R73) that walk took 0.89 / 3.99 ms at B=1 T=16384 / B=8 T=8192 against 1.12 /
    /// 4.92 before; with BV = 16 it was slower than before (1.44 / 5.91), so BV = 16 keeps f32 u.
    fn set_u16(&mut self, p: &Problem, caps: &Caps, t: u32) {
        let on = ChunkSpec { u16: true, bv: 32, ..*self };
        let fits = (on.chunk / t) * (on.bv / t) <= min_subgroups(caps)
            && p.dims.v.is_multiple_of(32)
            && on.mma_fits(p.dims.k, t, caps.max_workgroup_storage);
        if self.out16 && !self.wv32 && caps.mma_f16_acc(t) && fits {
            *self = on;
        }
    }

    /// The optional scratch buffers a forward with these tiles holds (`stages`: q in f16 as well, for
    /// the stage tests).
    pub fn scratch_set(&self, stages: bool) -> ScratchSet {
        ScratchSet {
            packed: self.w16,
            out16: self.out16,
            q16: (self.out16 && !self.q_in) || stages,
            f32_states: self.keep_f32,
            f32_wv: self.wv32,
            u16: self.u16,
        }
    }

    /// Workgroup memory of the cooperative-matrix state walk (`wgsl/chunk_state_mma.wgsl`) with
    /// these tiles and head dim `k`: xs, s16, s32, vs, `ctl` and ih (zero and identity tiles with
    /// `U16`), in bytes.
    pub fn mma_workgroup_bytes(&self, k: usize) -> u32 {
        let (k, c, bv) = (k as u32, self.chunk, self.bv);
        let t = self.mma.unwrap_or(16);
        // (vs; ih: zero and identity tiles)
        let (vs, ih) = if self.u16 { (16, 2 * 2 * t * t) } else { (4 * c * bv, 16) };
        // (s32's rows padded by 4 words, SP in the WGSL)
        2 * c * (k + 8) + 2 * k.max(c) * (bv + 8) + 4 * k * (bv + 4) + vs + 16 + ih
    }

    /// Whether the cooperative-matrix state walk runs these tiles with `tile` x `tile` matrices,
    /// head dim `k` and `max_bytes` of workgroup memory (its 256 threads hold at most 8 vectors of
    /// 4 halves per operand and 4 values of u each: `NQ`, `NVR` in the WGSL).
    pub fn mma_fits(&self, k: usize, tile: u32, max_bytes: u32) -> bool {
        let (k32, c, bv) = (k as u32, self.chunk, self.bv);
        // (u in registers only without U16.)
        bv % tile == 0
            && k32 % tile == 0
            && c % tile == 0
            && c * k32 <= 8 * 4 * 256
            && (self.u16 || (c * bv % 256 == 0 && c * bv / 256 <= 4))
            && self.mma_workgroup_bytes(k) <= max_bytes
    }

    /// The cooperative-matrix tile the state walk runs with for `p` on a device with `caps`, if any:
    /// f16/bf16 inputs only (their f16 operands are within those inputs' tolerance, not within
    /// f32's), an adapter offering the tiles, and these tiles fitting. The one place that decides it,
    /// for the forward and for `Algorithm::Auto`.
    pub fn mma_for(&self, p: &Problem, caps: &Caps) -> Option<u32> {
        caps.mma_tile().filter(|&t| p.dtype != DType::F32 && self.mma_fits(p.dims.k, t, caps.max_workgroup_storage))
    }

    /// Workgroup memory of the cooperative-matrix reverse walk (`wgsl/chunk_bwd_state_mma.wgsl`) with
    /// these tiles and head dim `k`: xs, s16, b16, s32, vs and `ctl`, in bytes.
    pub fn bwd_mma_bytes(&self, k: usize) -> u32 {
        let (k, c, bv) = (k as u32, self.chunk, self.bv);
        2 * c * (k + 8) + 2 * k * (bv + 8) + 2 * 2 * c * (bv + 8) + 4 * k * bv + 4 * c * bv + 16
    }

    /// Workgroup memory of the cooperative-matrix local pass (`wgsl/chunk_bwd_local_mma.wgsl`) with
    /// chunk size C and value dim `v`: pf, p16, x16, zt, gcs, `ctl` and the output pass's qs (16
    /// bytes there), in bytes.
    pub fn bwd_local_mma_bytes(&self, v: usize) -> u32 {
        let (v, c) = (v as u32, self.chunk);
        4 * c * c + 2 * c * (c + 8) + 2 * c * (v + 8) + 4 * 256 + 4 * 64 + 16 + 16
    }

    /// Whether the cooperative-matrix local pass runs with `tile` x `tile` matrices, head dims `k`,
    /// `v` and `max_bytes` of workgroup memory (2 x 2 tiles a task over C x V).
    pub fn bwd_local_mma_fits(&self, k: usize, v: usize, tile: u32, max_bytes: u32) -> bool {
        let (k32, v32, c) = (k as u32, v as u32, self.chunk);
        c.is_multiple_of(2 * tile)
            && v32.is_multiple_of(2 * tile)
            && k32.is_multiple_of(tile)
            && self.bwd_local_mma_bytes(v) <= max_bytes
    }

    /// The tiles and variants of the chunked backward of `p` on `caps`: the cooperative-matrix
    /// reverse walk where the forward's walk would run on them and its arrays fit, with the f16
    /// operands it reads made by the recompute passes (`W16`, and q by the pack pass); with it the
    /// cooperative-matrix local pass where that fits (`out16`: k of `qk16` from the w/u pass too);
    /// the f32 intermediates always (the other backward passes read them).
    pub fn for_backward(chunk: u32, p: &Problem, caps: &Caps) -> ChunkSpec {
        let mut spec = ChunkSpec::choose(chunk, p.dims.k, p.dims.v);
        spec.mma = spec.mma_for(p, caps).filter(|_| spec.bwd_mma_bytes(p.dims.k) <= caps.max_workgroup_storage);
        spec.w16 = spec.mma.is_some();
        spec.out16 =
            spec.mma.is_some_and(|t| spec.bwd_local_mma_fits(p.dims.k, p.dims.v, t, caps.max_workgroup_storage));
        // f32 w only for the SIMT local pass (the SIMT walk reads w in f32 without W16 anyway).
        spec.wv32 = !spec.out16;
        spec.a_slot = true;
        spec
    }

    /// The pipeline key of pass `kernel` for problem `p`. Every chunked pass takes the same
    /// constants (declared once in `chunk_common.wgsl`).
    pub fn key(&self, kernel: Kernel, p: &Problem) -> PipelineKey {
        debug_assert!(kernel.chunked());
        let d = &p.dims;
        let b = |x: bool| if x { 1.0 } else { 0.0 };
        let key = PipelineKey::new(
            kernel,
            Reduce::Workgroup,
            vec![
                ("H", d.h as f64),
                ("HV", d.hv as f64),
                ("K", d.k as f64),
                ("V", d.v as f64),
                ("CH", self.chunk as f64),
                ("QKV_DT", p.dtype.wgsl_code() as f64),
                ("G_DT", p.g_dtype.wgsl_code() as f64),
                ("BETA_DT", p.beta_dtype.wgsl_code() as f64),
                ("GATE_LINEAR", b(p.gate_space == GateSpace::Linear)),
                ("LAYOUT_VK", b(p.state_layout == StateLayout::Vk)),
                ("HAS_MASK", b(p.has_mask)),
                ("HAS_H0", b(p.has_h0)),
                ("BV", self.bv as f64),
                ("BVO", self.bvo as f64),
                ("QKS", self.qks as f64),
                ("QIN", b(self.q_in)),
                ("BD", self.bd as f64),
                ("OUT16", b(self.out16)),
                ("KEEP_F32", b(self.keep_f32)),
                ("WV32", b(self.wv32)),
                ("W16", b(self.w16)),
                ("A_SLOT", b(self.a_slot)),
                ("U16", b(self.u16)),
                ("PKEEP", b(self.p_keep)),
            ],
        );
        match (kernel.mma(), self.mma) {
            (true, Some(t)) => key.with_mma(t),
            _ => key,
        }
    }

    /// The pipeline key of chunked backward pass `kernel`: [`ChunkSpec::key`] plus the dtypes of the
    /// upstream gradients (`do`, and `dht` when given; `chunk_bwd_common.wgsl`).
    pub fn bwd_key(&self, kernel: Kernel, p: &Problem, do_dt: DType, dht_dt: Option<DType>) -> PipelineKey {
        debug_assert!(kernel.chunk_bwd());
        let base = self.key(kernel, p);
        let mut c = base.constants_f64();
        c.push(("DO_DT", do_dt.wgsl_code() as f64));
        c.push(("DHT_DT", dht_dt.map_or(0, DType::wgsl_code) as f64));
        c.push(("HAS_DHT", if dht_dt.is_some() { 1.0 } else { 0.0 }));
        PipelineKey { mma: base.mma, ..PipelineKey::new(kernel, Reduce::Workgroup, c) }
    }
}

/// Uniform parameters of one chunked pass, laid out as `struct Params` in `chunk_common.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    pub n_local: u32,
    pub chunk_off: u32,
    pub seq_off: u32,
    pub mask_off: u32,
    pub n_seqs: u32,
    pub wg_per_row: u32,
    pub scale: f32,
    /// Offset of the per-chunk state slots in the chunk table.
    pub slot_off: u32,
    pub _pad: [u32; 4],
}

/// One window of chunks: the forward runs all its passes over one window before the next; the
/// state of each sequence is carried from window to window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    /// Local chunks: (start row, len, sequence), each sequence's chunks contiguous and in time order.
    pub chunks: Vec<[u32; 3]>,
    /// Per sequence: (lo, hi, first): local chunks `lo..hi`; `first` = 1 when they begin at the
    /// sequence's first chunk (or the sequence is empty and this is the first window).
    pub seqs: Vec<[u32; 3]>,
}

/// Cuts the chunks of `p` (each sequence cut into chunks of `chunk` rows from its own start, the
/// last possibly short) into windows of at most `max_local` chunks. Chunks are taken position by
/// position across sequences (all first chunks, then all second chunks, ...), so every window keeps
/// as many sequences in flight as it can and each sequence's chunks stay in order across windows.
/// There is always at least one window (it writes `ht` for empty sequences).
pub fn windows(p: &Problem, chunk: usize, max_local: usize) -> Vec<Window> {
    let n = p.n_seqs();
    let max_local = max_local.max(1);
    let n_ch: Vec<usize> = (0..n).map(|s| p.seqs.range(s).len().div_ceil(chunk)).collect();
    let max_pos = n_ch.iter().copied().max().unwrap_or(0);
    let mut groups: Vec<Vec<(usize, usize)>> = vec![Vec::new()];
    for pos in 0..max_pos {
        for (s, &nc) in n_ch.iter().enumerate() {
            if pos < nc {
                if groups.last().is_some_and(|g| g.len() == max_local) {
                    groups.push(Vec::new());
                }
                groups.last_mut().expect("non-empty").push((s, pos));
            }
        }
    }
    groups
        .into_iter()
        .enumerate()
        .map(|(wi, mut g)| {
            g.sort_unstable();
            let mut seqs = vec![[0u32; 3]; n];
            for (s, e) in seqs.iter_mut().enumerate() {
                e[2] = u32::from(wi == 0 && n_ch[s] == 0);
            }
            let mut chunks = Vec::with_capacity(g.len());
            for (lc, &(s, pos)) in g.iter().enumerate() {
                let rows = p.seqs.range(s);
                let start = rows.start + pos * chunk;
                let len = chunk.min(rows.end - start);
                if chunks.is_empty() || chunks.last().is_some_and(|c: &[u32; 3]| c[2] as usize != s) {
                    seqs[s] = [lc as u32, lc as u32, u32::from(pos == 0)];
                }
                seqs[s][1] = lc as u32 + 1;
                chunks.push([start as u32, len as u32, s as u32]);
            }
            Window { chunks, seqs }
        })
        .collect()
}

/// What a chunked forward is recorded for: which intermediates it must leave behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardPurpose {
    /// Only o and ht.
    Inference,
    /// Also the state at every chunk start in f32, for the chunked backward.
    Training,
    /// Every intermediate, f32 and f16, for the stage tests.
    Stages,
}

/// Which of its optional scratch buffers a chunked forward holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScratchSet {
    /// The cooperative-matrix state walk's f16 operands -w and K ∘ decay (`wk16`), made by the w/u
    /// pass (`W16`), which then writes f32 w only with `f32_wv`.
    pub packed: bool,
    /// The cooperative-matrix output pass's f16 operands (`qk16`, `h16`, `vn16`).
    pub out16: bool,
    /// q as f16 (`qk16`, made by `chunk_pack16.wgsl`): with `out16` unless the output pass stages q
    /// from the input (`q_in`), and in the stage tests.
    pub q16: bool,
    /// S in f32 (`h`).
    pub f32_states: bool,
    /// v_new in f32 (`vn`), and w alongside wk16.
    pub f32_wv: bool,
    /// u in f16 (`U16`).
    pub u16: bool,
}

/// Scratch bytes per local chunk, buffer by buffer: gc, bm, a, w, u, vn, h, wk16, qk16, h16, vn16
/// (0 for the buffers `set` leaves out: f32 w is read by the SIMT state walk only, or kept).
pub fn scratch_per_chunk(p: &Problem, chunk: usize, set: ScratchSet) -> [u64; 11] {
    let d = &p.dims;
    let (c, h, hv, k, v) = (chunk as u64, d.h as u64, d.hv as u64, d.k as u64, d.v as u64);
    let f = 4;
    let on = |x: bool, b: u64| if x { b } else { 0 };
    [
        f * hv * c,
        f * hv * c,
        f * hv * c * c,
        on(!set.packed || set.f32_wv, f * hv * c * k),
        if set.u16 { 2 * hv * c * v } else { f * hv * c * v },
        on(set.f32_wv, f * hv * c * v),
        on(set.f32_states, f * hv * k * v),
        on(set.packed, 2 * 2 * hv * c * k),
        // qk16: k^T for the output pass, q as well where the pack pass makes it (`QPL` planes).
        if set.q16 { 2 * 2 * h * c * k } else { on(set.out16, 2 * h * c * k) },
        on(set.out16, 2 * hv * k * v),
        on(set.out16, 2 * hv * c * v),
    ]
}

/// Scratch bytes per local chunk of the chunked backward, buffer by buffer: the forward's gc, bm, w,
/// u (recomputed; A is the one the training forward saved, [`saved_a_per_chunk`]), then vn, dvn, dh, dqp,
/// dkp, dw, dgc (`wgsl/chunk_bwd_common.wgsl`), then the f16 operands wk16 and qk16 of the
/// cooperative-matrix reverse walk (0 without `mma`).
pub fn bwd_scratch_per_chunk(p: &Problem, chunk: usize, spec: &ChunkSpec) -> [u64; 13] {
    let d = &p.dims;
    let (c, hv, k, v) = (chunk as u64, d.hv as u64, d.k as u64, d.v as u64);
    let f = 4 * hv;
    let mma = spec.w16;
    let set = ScratchSet { packed: mma, q16: mma, f32_states: true, f32_wv: spec.wv32, out16: false, u16: false };
    let [gc, bm, _, w, u, _, _, wk16, qk16, ..] = scratch_per_chunk(p, chunk, set);
    [gc, bm, w, u, f * c * v, f * c * v, f * k * v, f * c * k, f * c * k, f * c * k, f * c, wk16, qk16]
}

/// Bytes of the saved A per chunk (`[G, HV, C, C]` f32): the training forward writes it, the
/// backward binds a window slice of it.
pub fn saved_a_per_chunk(p: &Problem, chunk: usize) -> u64 {
    (4 * p.dims.hv * chunk * chunk) as u64
}

/// Local chunks per window: all of them when they fit `budget` bytes of scratch, else the largest
/// power of two that does (so pooled buffers are not rounded up), never so many that one buffer
/// exceeds `max_binding`. At least 1.
pub fn max_local_chunks(p: &Problem, chunk: usize, set: ScratchSet, budget: u64, max_binding: u64) -> usize {
    max_local_for(p, chunk, &scratch_per_chunk(p, chunk, set), budget, max_binding)
}

/// [`max_local_chunks`] for scratch of `per` bytes per chunk, buffer by buffer.
pub fn max_local_for(p: &Problem, chunk: usize, per: &[u64], budget: u64, max_binding: u64) -> usize {
    let total: usize = (0..p.n_seqs()).map(|s| p.seqs.range(s).len().div_ceil(chunk)).sum();
    let per = per.to_vec();
    let per_total: u64 = per.iter().sum();
    let per_max = per.iter().copied().max().unwrap_or(1).max(1);
    // The pool rounds each buffer up to a power of two: bound the rounded size by the binding limit.
    let fits = |l: u64| per.iter().all(|&b| (b * l).next_power_of_two() <= max_binding) && l * per_total <= budget;
    if total > 0 && fits(total as u64) {
        return total;
    }
    let mut l = (budget / per_total.max(1)).min(max_binding / per_max).max(1);
    l = 1 << (63 - l.leading_zeros());
    while l > 1 && !fits(l) {
        l /= 2;
    }
    l as usize
}

/// Peak scratch bytes of a forward of `p` with windows of `max_local` chunks and the buffers of
/// `set`, as the pool holds them (each buffer rounded up to a power of two), plus the carried state.
pub fn scratch_bytes(p: &Problem, chunk: usize, set: ScratchSet, max_local: usize) -> u64 {
    let ws = windows(p, chunk, max_local);
    let l = ws.iter().map(|w| w.chunks.len()).max().unwrap_or(0).max(1) as u64;
    let per = scratch_per_chunk(p, chunk, set);
    let bufs: u64 = per.iter().filter(|&&b| b > 0).map(|&b| (b * l).max(16).next_power_of_two()).sum();
    let d = &p.dims;
    let carry = if p.output_final_state { 0 } else { (p.n_seqs() * d.hv * d.k * d.v * 4) as u64 };
    bufs + carry.max(16).next_power_of_two()
}

/// Peak scratch bytes of a chunked backward of `p` (`bwd_scratch_per_chunk`, windows of at most
/// `max_local` chunks) as the pool holds them, plus the carried dS; the saved states, inputs and
/// gradients are not scratch.
pub fn bwd_scratch_bytes(p: &Problem, chunk: usize, max_local: usize, spec: &ChunkSpec) -> u64 {
    let l = windows(p, chunk, max_local).iter().map(|w| w.chunks.len()).max().unwrap_or(0).max(1) as u64;
    let bufs: u64 = bwd_scratch_per_chunk(p, chunk, spec).iter().map(|&b| (b * l).max(16).next_power_of_two()).sum();
    let d = &p.dims;
    let carry = if p.has_h0 { 0 } else { (p.n_seqs() * d.hv * d.k * d.v * 4) as u64 };
    bufs + carry.max(16).next_power_of_two()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::problem::{DType, InputsMeta, Options, TensorMeta};

    fn problem(b: usize, t: usize, hv: usize, k: usize, cu: Option<&[i64]>) -> Problem {
        let m = InputsMeta {
            q: Some(TensorMeta::new(&[b, t, 16, k], DType::BF16)),
            k: Some(TensorMeta::new(&[b, t, 16, k], DType::BF16)),
            v: Some(TensorMeta::new(&[b, t, hv, k], DType::BF16)),
            g: Some(TensorMeta::new(&[b, t, hv], DType::BF16)),
            beta: Some(TensorMeta::new(&[b, t, hv], DType::BF16)),
            ..Default::default()
        };
        Problem::new(&m, cu, &Options::default(), false).unwrap()
    }

    #[test]
    fn windows_keep_sequences_in_order() {
        let p = problem(1, 40, 16, 16, Some(&[0, 0, 17, 18, 40]));
        for max in [1, 2, 3, 100] {
            let ws = windows(&p, 8, max);
            let mut next = [0usize; 4]; // next row expected per sequence
            for (wi, w) in ws.iter().enumerate() {
                assert!(w.chunks.len() <= max);
                for (s, r) in w.seqs.iter().enumerate() {
                    if r[0] < r[1] {
                        assert_eq!(r[2] == 1, next[s] == 0);
                    }
                    for lc in r[0]..r[1] {
                        let [start, len, seq] = w.chunks[lc as usize];
                        assert_eq!(seq as usize, s);
                        let off = p.seqs.offsets[s] as usize;
                        assert_eq!(start as usize, off + next[s]);
                        next[s] += len as usize;
                    }
                    if r[0] == r[1] {
                        assert_eq!(r[2] == 1, wi == 0 && p.seqs.range(s).is_empty());
                    }
                }
            }
            for (s, got) in next.iter().enumerate() {
                assert_eq!(*got, p.seqs.range(s).len());
            }
        }
    }

    /// The scratch of an inference forward on SIMT passes, and on cooperative matrices with the pack
    /// pass's q plane (as without QIN; an inference forward with QIN holds `q16: false`).
    const SIMT: ScratchSet =
        ScratchSet { packed: false, out16: false, q16: false, f32_states: true, f32_wv: true, u16: false };
    const MMA: ScratchSet =
        ScratchSet { packed: true, out16: true, q16: true, f32_states: false, f32_wv: false, u16: true };
    /// The backward's variants: SIMT passes, or both cooperative-matrix passes (16 x 16 tiles).
    fn bwd_spec(mma: bool) -> ChunkSpec {
        let s = ChunkSpec::choose(64, 128, 128);
        ChunkSpec { mma: mma.then_some(16), w16: mma, out16: mma, wv32: !mma, ..s }
    }

    /// Peak scratch of the memory case: B=1, T=16384, HV=32, K=V=128, chunk 64, with the
    /// SIMT passes and with the cooperative-matrix passes' f16 operands.
    #[test]
    fn scratch_for_long_sequence() {
        let p = problem(1, 16384, 32, 128, None);
        for set in [SIMT, MMA] {
            let whole = max_local_chunks(&p, 64, set, u64::MAX, u64::MAX);
            assert_eq!(whole, 256);
            let per: u64 = scratch_per_chunk(&p, 64, set).iter().sum();
            println!(
                "B=1 T=16384 HV=32 K=V=128 C=64 ({set:?}): {per} bytes per chunk; all {whole} chunks at once: {} MiB",
                scratch_bytes(&p, 64, set, whole) >> 20
            );
            // (budget, chunks per window expected): the default two windows of 128, a 512 MiB budget
            // (the default before R49) four windows of 64, 2 GiB the whole sequence at once.
            for (budget, expect) in [(DEFAULT_WINDOW_BYTES, 128), (512 << 20, 64), (2 << 30, 256)] {
                let l = max_local_chunks(&p, 64, set, budget, 2 << 30);
                let peak = scratch_bytes(&p, 64, set, l);
                println!("  budget {} MiB: windows of {l} chunks, peak scratch {} MiB", budget >> 20, peak >> 20);
                assert_eq!(l, expect);
                assert_eq!(windows(&p, 64, l).len(), 256 / expect);
                assert!(peak <= budget);
            }
        }
        // An inference forward on cooperative matrices with q staged from the input (no q plane in
        // qk16): the whole sequence in one window of the default budget (docs/PERF.md R79).
        let inf = ScratchSet { q16: false, ..MMA };
        let l = max_local_chunks(&p, 64, inf, DEFAULT_WINDOW_BYTES, 2 << 30);
        let peak = scratch_bytes(&p, 64, inf, l);
        println!("  inference ({inf:?}): windows of {l} chunks, peak scratch {} MiB", peak >> 20);
        assert_eq!((l, windows(&p, 64, l).len()), (256, 1));
        assert!(peak <= DEFAULT_WINDOW_BYTES);
        assert_eq!(scratch_per_chunk(&p, 64, inf)[8] * 2, scratch_per_chunk(&p, 64, MMA)[8]);
        let b8 = problem(8, 8192, 32, 128, None);
        assert_eq!(max_local_chunks(&b8, 64, inf, DEFAULT_WINDOW_BYTES, 2 << 30), 256);
        assert_eq!(max_local_chunks(&b8, 64, MMA, DEFAULT_WINDOW_BYTES, 2 << 30), 128);
        // Past the budget the windows bound the scratch whatever T: B=1 T=131072 (2048 chunks).
        let long = problem(1, 131072, 32, 128, None);
        let l = max_local_chunks(&long, 64, MMA, DEFAULT_WINDOW_BYTES, 2 << 30);
        assert!(windows(&long, 64, l).len() > 1);
        assert!(scratch_bytes(&long, 64, MMA, l) <= DEFAULT_WINDOW_BYTES);
    }

    /// Memory of forward + backward for the case B=1, T=16384, HV=32, K=V=128, chunk 64.
    #[test]
    fn backward_memory_for_long_sequence() {
        let p = problem(1, 16384, 32, 128, None);
        for mma in [false, true] {
            let per = bwd_scratch_per_chunk(&p, 64, &bwd_spec(mma));
            let l = max_local_for(&p, 64, &per, DEFAULT_TRAIN_WINDOW_BYTES, 2 << 30);
            let scratch = bwd_scratch_bytes(&p, 64, l, &bwd_spec(mma));
            let states = 32 * 256 * 128 * 128 * 4u64; // N * HV * T/64 * K * V floats
            let saved_a = 256 * saved_a_per_chunk(&p, 64); // T/64 chunks of HV * C * C floats
            assert_eq!(saved_a, 128 << 20);
            let grads = 2 * 16384 * 16 * 128 * 4 + 16384 * 32 * 128 * 4 + 2 * 16384 * 32 * 4u64;
            println!(
                "B=1 T=16384 HV=32 K=V=128 C=64 (cooperative-matrix passes: {mma}): saved states {} MiB (T/64 = 256 \
                 per head) and A {} MiB, backward scratch {} MiB (windows of {l} chunks, {} KiB per chunk), \
                 gradients {} MiB",
                states >> 20,
                saved_a >> 20,
                scratch >> 20,
                per.iter().sum::<u64>() >> 10,
                grads >> 20
            );
            assert!(scratch <= DEFAULT_TRAIN_WINDOW_BYTES);
            assert_eq!(l, 128);
        }
    }

    /// Where the cooperative-matrix state walk runs: NVIDIA's 48 KiB take chunk 64 at K=128; Apple's
    /// 32 KiB need chunk 32 there; K=256 stays on the SIMT walk (its register arrays).
    #[test]
    fn mma_state_walk_fits() {
        let s = |c| ChunkSpec::choose(c, 128, 128);
        assert!(s(64).mma_fits(128, 16, 48 << 10));
        assert!(!s(64).mma_fits(128, 8, 32 << 10));
        assert!(s(32).mma_fits(128, 8, 32 << 10));
        assert!(s(16).mma_fits(16, 16, 32 << 10));
        assert!(!ChunkSpec::choose(64, 256, 128).mma_fits(256, 16, 48 << 10));
        assert!(!ChunkSpec::choose(64, 48, 48).mma_fits(48, 32, 48 << 10));
    }

    /// An adapter with subgroups of 32 and `tile` x `tile` f16 cooperative matrices accumulating in
    /// each of `acc`, granting `kib` KiB of workgroup memory.
    fn coop_caps(tile: u32, kib: u32, acc: &[&'static str]) -> Caps {
        use crate::device::CoopShape;
        Caps {
            f16: true,
            f64: false,
            subgroup: true,
            subgroup_min: 32,
            subgroup_max: 32,
            f32_atomic: false,
            timestamp: false,
            passthrough: false,
            coop_matrix: acc.iter().map(|&cr| CoopShape { m: tile, n: tile, k: tile, ab: "f16", cr }).collect(),
            max_binding: 1 << 30,
            max_buffer: 1 << 30,
            max_workgroup_storage: kib << 10,
            max_invocations: 1024,
            max_storage_buffers: 31,
            max_workgroups_per_dim: 65535,
        }
    }

    /// Where the forward's walk takes u in f16 with BV = 32 (`U16`): an inference or training forward
    /// on NVIDIA's 16x16 tiles with f16 accumulators (47,136 bytes of 48 KiB at C=64, K=128; BV = 32
    /// with f32 u would need 54,304); not without f16 accumulators, not in the stage tests (they read
    /// u in f32), not on Apple's 8x8 tiles (16 v_new tiles for 8 subgroups).
    #[test]
    fn forward_walk_u16() {
        let p = problem(1, 256, 32, 128, None);
        let nv = coop_caps(16, 48, &["f32", "f16"]);
        for purpose in [ForwardPurpose::Inference, ForwardPurpose::Training] {
            let s = ChunkSpec::for_forward(64, &p, &nv, purpose);
            assert_eq!((s.u16, s.bv, s.mma), (true, 32, Some(16)), "{purpose:?}");
            assert_eq!(s.mma_workgroup_bytes(128), 47136);
            assert_eq!(ChunkSpec { u16: false, ..s }.mma_workgroup_bytes(128), 54304);
            assert!(!ChunkSpec { u16: false, ..s }.mma_fits(128, 16, 48 << 10));
            assert!(s.scratch_set(false).u16);
            assert!(s.p_keep); // 8 tasks of P for 8 subgroups
        }
        let s = ChunkSpec::for_forward(64, &p, &nv, ForwardPurpose::Stages);
        assert_eq!((s.u16, s.bv), (false, 16));
        let s = ChunkSpec::for_forward(64, &p, &coop_caps(16, 48, &["f32"]), ForwardPurpose::Inference);
        assert_eq!((s.u16, s.bv, s.mma), (false, 16, Some(16)));
        let s = ChunkSpec::for_forward(32, &p, &coop_caps(8, 32, &["f32", "f16"]), ForwardPurpose::Inference);
        assert_eq!((s.u16, s.mma), (false, Some(8)));
        // u takes half the bytes.
        let on = ChunkSpec::for_forward(64, &p, &nv, ForwardPurpose::Inference).scratch_set(false);
        assert_eq!(scratch_per_chunk(&p, 64, on)[4] * 2, scratch_per_chunk(&p, 64, ScratchSet { u16: false, ..on })[4]);
    }

    /// Where the backward's reverse walk runs on cooperative matrices: f16/bf16 inputs only, NVIDIA's
    /// 48 KiB at chunk 64 and K = 128 (42,000 bytes), Apple's 32 KiB from chunk 32 down; with it the
    /// recompute passes make its f16 operands (`w16`) and its scratch holds them.
    #[test]
    fn mma_backward_walk_fits() {
        let caps = |tile, kib| coop_caps(tile, kib, &["f32"]);
        let p = problem(1, 256, 32, 128, None);
        assert_eq!(ChunkSpec::choose(64, 128, 128).bwd_mma_bytes(128), 42000);
        let nv = ChunkSpec::for_backward(64, &p, &caps(16, 48));
        // The local pass on cooperative matrices with it (out16): 44,320 bytes at C=64, V=128.
        assert_eq!(ChunkSpec::choose(64, 128, 128).bwd_local_mma_bytes(128), 44320);
        assert_eq!((nv.mma, nv.w16, nv.wv32, nv.out16), (Some(16), true, false, true));
        assert_eq!(ChunkSpec::for_backward(64, &p, &caps(8, 32)).mma, None);
        let apple = ChunkSpec::for_backward(32, &p, &caps(8, 32));
        assert_eq!((apple.mma, apple.out16), (Some(8), true));
        // 16x16 tiles need chunks of 32 or more for the local pass's 2 x 2 tile tasks.
        let c16 = ChunkSpec::for_backward(16, &p, &caps(16, 48));
        assert_eq!((c16.mma, c16.out16), (Some(16), false));
        // K = V = 256: neither cooperative-matrix pass fits 48 KiB.
        let wide = problem(1, 256, 32, 256, None);
        assert!(!ChunkSpec::for_backward(64, &wide, &caps(16, 48)).out16);
        let mut f32_problem = p.clone();
        f32_problem.dtype = DType::F32;
        assert_eq!(ChunkSpec::for_backward(64, &f32_problem, &caps(16, 48)).mma, None);
        let [_, _, w, .., wk16, qk16] = bwd_scratch_per_chunk(&p, 64, &nv);
        assert_eq!(w, 0); // no f32 w where the local pass runs on cooperative matrices
        assert_eq!((wk16, qk16), (2 * 2 * 32 * 64 * 128, 2 * 2 * 16 * 64 * 128));
        let [.., wk16, qk16] = bwd_scratch_per_chunk(&p, 64, &bwd_spec(false));
        assert_eq!((wk16, qk16), (0, 0));
    }

    /// Where the cooperative-matrix output pass runs at K = V = 128: with NVIDIA's 48 KiB and 16x16
    /// tiles from chunk 32 (two column tiles a task), q staged whole; with Apple's 32 KiB and 8x8 tiles
    /// at every chunk size, q staged in slices of 32 columns at chunk 64. Always the whole V a
    /// workgroup; never with more than 16 subgroups (the strip of parked tiles).
    #[test]
    fn mma_output_fits() {
        let caps = |tile, kib| coop_caps(tile, kib, &["f32"]);
        let p = problem(1, 128, 32, 128, None);
        for c in [16, 32, 64] {
            let s = ChunkSpec::choose(c, 128, 128);
            let nv = s.with_output_mma(128, 128, 16, &caps(16, 48));
            assert_eq!(nv.map(|o| (o.bvo, o.qks, o.out16)), (c >= 32).then_some((128, 128, true)), "{c}");
            let apple = s.with_output_mma(128, 128, 8, &caps(8, 32)).unwrap();
            assert_eq!((apple.bvo, apple.qks), (128, if c == 64 { 32 } else { 128 }), "{c}");
            assert!(apple.output_mma_bytes(8) <= 32 << 10);
            let narrow = Caps { subgroup_min: 8, ..caps(16, 48) }; // up to 32 subgroups
            assert_eq!(s.with_output_mma(128, 128, 16, &narrow), None);
        }
        let s = ChunkSpec { qks: 128, ..ChunkSpec::choose(64, 128, 128) };
        assert_eq!(s.output_mma_bytes(16), 44304);
        assert_eq!(ChunkSpec { qks: 32, ..s }.output_mma_bytes(8), 32016);
        let inf = ChunkSpec::for_forward(64, &p, &caps(16, 48), ForwardPurpose::Inference);
        assert_eq!((inf.qks, inf.p_keep, inf.q_in), (128, true, true));
        // q from the input only for an inference forward (the others read the pack pass's q plane),
        // and only where q is staged whole (not with Apple's slices).
        assert!(!ChunkSpec::for_forward(64, &p, &caps(16, 48), ForwardPurpose::Training).q_in);
        assert!(!ChunkSpec::for_forward(64, &p, &caps(16, 48), ForwardPurpose::Stages).q_in);
        assert!(!ChunkSpec::for_forward(64, &p, &caps(8, 32), ForwardPurpose::Inference).q_in);
    }

    /// The perf cases of issue #3 fit a 2 GiB binding and the grid limits.
    #[test]
    fn production_shapes_fit() {
        for (b, t) in [(1, 16384), (8, 8192)] {
            let p = problem(b, t, 32, 128, None);
            let spec = ChunkSpec::choose(64, 128, 128);
            let l = max_local_chunks(&p, 64, MMA, DEFAULT_WINDOW_BYTES, 2 << 30);
            let ws = windows(&p, 64, l);
            let biggest = scratch_per_chunk(&p, 64, MMA).iter().max().unwrap() * l as u64;
            let o_bytes = (b * t * 32 * 128 * 4) as u64;
            println!(
                "B={b} T={t}: {} windows of {l} chunks, largest scratch buffer {} MiB, o {} MiB, peak scratch {} MiB, \
                 grids: state {}x{b}, output {}x{l}, wu {}x{l}",
                ws.len(),
                biggest >> 20,
                o_bytes >> 20,
                scratch_bytes(&p, 64, MMA, l) >> 20,
                32 * 128 / spec.bv,
                32 * 128 / spec.bvo,
                32 * 256 / spec.bd
            );
            assert!(biggest <= 2 << 30 && o_bytes < 2 << 30);
            assert!(l <= 65535 && ws.iter().all(|w| w.chunks.len() <= l));
        }
    }
}
