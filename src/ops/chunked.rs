//! Chunked forward (SPEC section 5, the WY/UT form of flash-linear-attention's `chunk.py`): per
//! window of chunks, `kkt_solve -> wu -> state -> output`, all recorded into one graph and
//! submitted once.
//!
//! Scalar gate, both gate spaces and state layouts, GQA, h0/ht, scale, cu_seqlens and masks (a
//! masked token is a step with decay 1 and beta 0 whose output row is zero, as in
//! `reference::chunked`). The per-key gate is not supported here: `Algorithm::Auto` sends it to the
//! recurrent kernel and `Algorithm::Chunked` refuses it.
//!
//! Memory: the chunks are walked in windows that fit a scratch budget
//! ([`crate::Settings::chunk_window_bytes`]); the per-chunk states, `w`, `u`, `v_new` and `A` exist
//! for one window at a time and go back to the pool at submission, so an inference forward keeps
//! nothing per chunk after the call.

use super::{Inputs, Outputs};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::graph::{whole, PassGraph};
use crate::kernels::chunked::{
    max_local_chunks, saved_a_per_chunk, scratch_per_chunk, windows, ChunkSpec, ForwardPurpose, Params, Window,
    DEFAULT_TRAIN_WINDOW_BYTES, DEFAULT_WINDOW_BYTES, WG, WORKGROUP_BYTES,
};
use crate::kernels::Kernel;
use crate::problem::Problem;
use crate::tensor::padded;

pub(crate) const STORAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE;
/// Intermediates may be copied out (stage tests; a backward keeping what the forward saved).
const SAVED: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE.union(wgpu::BufferUsages::COPY_SRC);

/// Splits `n` workgroups over the grid's y and z axes: (y extent, z extent).
pub(crate) fn split(n: usize, max: u32) -> (u32, u32) {
    let y = (n as u32).clamp(1, max);
    (y, (n as u32).div_ceil(y).max(1))
}

/// The chunked passes' workgroup memory, checked before any GPU work.
pub(crate) fn check_workgroup_memory(caps: &crate::device::Caps) -> Result<()> {
    if caps.max_workgroup_storage < WORKGROUP_BYTES {
        return Err(Error::MissingFeature(format!(
            "{WORKGROUP_BYTES} bytes of workgroup memory for the chunked passes (max_compute_workgroup_storage_size = {})",
            caps.max_workgroup_storage
        )));
    }
    Ok(())
}

/// The chunk table of every window of one call (layout in `wgsl/chunk_common.wgsl`), then the mask
/// bytes. Each window's chunks carry their state slot (`state_slots`). For a backward, each
/// sequence's third word flags the window holding its *last* chunk (an empty sequence: the window
/// walked first, the last).
pub(crate) struct ChunkTable {
    words: Vec<u32>,
    /// Per window: chunk_off, seq_off, slot_off.
    offs: Vec<[u32; 3]>,
    mask_off: u32,
}

impl ChunkTable {
    pub(crate) fn new(p: &Problem, wins: &[Window], chunk: u32, backward: bool) -> ChunkTable {
        let mut last_win = vec![wins.len().saturating_sub(1); p.n_seqs()];
        for (wi, w) in wins.iter().enumerate() {
            for ch in &w.chunks {
                last_win[ch[2] as usize] = wi;
            }
        }
        let mut words: Vec<u32> = Vec::new();
        let mut offs = Vec::with_capacity(wins.len());
        for (wi, w) in wins.iter().enumerate() {
            let chunk_off = words.len() as u32;
            words.extend(w.chunks.iter().flatten());
            let seq_off = words.len() as u32;
            for (s, r) in w.seqs.iter().enumerate() {
                let flag = if backward { u32::from(last_win[s] == wi) } else { r[2] };
                words.extend([r[0], r[1], flag]);
            }
            let slot_off = words.len() as u32;
            words.extend(state_slots(p, &w.chunks, chunk));
            offs.push([chunk_off, seq_off, slot_off]);
        }
        let mask_off = words.len() as u32;
        ChunkTable { words, offs, mask_off }
    }

    /// Uploads the table and copies the mask bytes after it on the device.
    pub(crate) fn record(&self, graph: &mut PassGraph, mask: Option<&crate::tensor::Tensor>) -> Result<wgpu::Buffer> {
        let mask_bytes = mask.map(|m| padded(m.byte_len())).unwrap_or(0);
        let mut words = self.words.clone();
        words.resize(words.len() + (mask_bytes / 4) as usize, 0);
        let info = graph.scratch_with("wgdelta.chunk.table", bytemuck::cast_slice(&words), STORAGE)?;
        if let Some(m) = mask {
            graph.copy(&m.buffer, 0, &info, self.mask_off as u64 * 4, mask_bytes);
        }
        Ok(info)
    }

    /// The uniform parameters of window `wi`.
    pub(crate) fn params(&self, wi: usize, p: &Problem, wg_per_row: u32) -> Params {
        let [chunk_off, seq_off, slot_off] = self.offs[wi];
        Params {
            n_local: (seq_off - chunk_off) / 3, // three words per chunk
            chunk_off,
            seq_off,
            mask_off: self.mask_off,
            n_seqs: p.n_seqs() as u32,
            wg_per_row,
            scale: p.scale,
            slot_off,
            _pad: [0; 4],
        }
    }
}

/// The slot of each chunk of a window in the window's states (`h_base` in `wgsl/chunk_common.wgsl`):
/// its rank in position-major order (all first chunks of the window's sequences, then all second
/// chunks, ...). Windows are consecutive runs of that order ([`crate::kernels::chunked::windows`]),
/// so the states of all windows together are the call's states in one canonical layout
/// `[G, HV, K, V]` whatever the window size, and a window's states are one contiguous slice of it.
fn state_slots(p: &Problem, chunks: &[[u32; 3]], chunk: u32) -> Vec<u32> {
    let pos = |ch: &[u32; 3]| (ch[0] - p.seqs.offsets[ch[2] as usize]) / chunk;
    let mut order: Vec<usize> = (0..chunks.len()).collect();
    order.sort_unstable_by_key(|&i| (pos(&chunks[i]), chunks[i][2]));
    let mut slots = vec![0; chunks.len()];
    for (rank, i) in order.into_iter().enumerate() {
        slots[i] = rank as u32;
    }
    slots
}

/// What a training forward saves for the chunked backward, in the canonical slot order
/// (`state_slots`): the state at the start of every chunk `[G, HV, K, V]` and A `[G, HV, C, C]`.
#[derive(Clone, Copy)]
pub(crate) struct TrainSaves<'a> {
    pub states: &'a wgpu::Buffer,
    pub a: &'a wgpu::Buffer,
}

/// Forward by the chunked passes with chunks of `chunk` tokens: `o`, and `ht` when asked.
/// With `saves` (a training forward), the state at the start of every chunk and A are written there
/// for the chunked backward.
pub(crate) fn forward(eng: &Engine, p: &Problem, x: &Inputs, chunk: u32, saves: Option<TrainSaves>) -> Result<Outputs> {
    let default = if saves.is_some() { DEFAULT_TRAIN_WINDOW_BYTES } else { DEFAULT_WINDOW_BYTES };
    let budget = eng.settings.chunk_window_bytes.unwrap_or(default);
    let mut graph = eng.graph();
    let (out, _) = record(eng, &mut graph, p, x, chunk, budget, false, saves)?;
    eng.submit(graph)?;
    Ok(out)
}

/// The scratch buffers of the last window recorded, in the layouts of `wgsl/chunk_common.wgsl`.
pub(crate) struct Saved {
    pub bufs: [wgpu::Buffer; 7],
    pub sizes: [u64; 7],
    /// The last window's local chunks: (start row, len, sequence).
    pub chunks: Vec<[u32; 3]>,
    /// The packed f16 operands (`wk16`) and their size, when `chunk_wu.wgsl` made them (W16).
    pub wk16: Option<(wgpu::Buffer, u64)>,
    /// q and k as f16 (`qk16`) and its size, when made (k only with OUT16).
    pub qk16: Option<(wgpu::Buffer, u64)>,
    /// The cooperative-matrix output pass's other f16 operands h16, vn16 and their sizes (`OUT16`).
    pub out16: Option<[(wgpu::Buffer, u64); 2]>,
}

/// Records the chunked forward of `p` into `graph` with windows of at most `budget` scratch bytes;
/// `pack16` makes the f16 operands of the cooperative-matrix walk (`chunk_wu.wgsl`, W16) even where
/// the walk that runs does not use them (stage tests check them on every device); `saves`, the saved
/// states and A of a training forward, take the place of the per-window scratch `h` and `a`.
#[allow(clippy::too_many_arguments)]
fn record(
    eng: &Engine,
    graph: &mut PassGraph,
    p: &Problem,
    x: &Inputs,
    chunk: u32,
    budget: u64,
    pack16: bool,
    saves: Option<TrainSaves>,
) -> Result<(Outputs, Saved)> {
    let states = saves.map(|s| s.states);
    let d = &p.dims;
    let c = chunk as usize;
    let n = p.n_seqs();
    let caps = &eng.gpu.caps;
    let purpose = match (pack16, states) {
        (true, _) => ForwardPurpose::Stages,
        (false, Some(_)) => ForwardPurpose::Training,
        (false, None) => ForwardPurpose::Inference,
    };
    let spec = ChunkSpec::for_forward(chunk, p, caps, purpose);
    let state_kernel = if spec.mma.is_some() { Kernel::ChunkStateMma } else { Kernel::ChunkState };
    check_workgroup_memory(caps)?;
    let o = eng.output("o", &[d.b, d.t, d.hv, d.v])?;
    let ht = if p.output_final_state { Some(eng.output("ht", &p.state_shape())?) } else { None };
    // Also bound the tokens one dispatch walks per sequence (software drivers' loop limiter, GPU
    // watchdogs): see `Gpu::max_tokens_per_dispatch`.
    let set = spec.scratch_set(pack16);
    let max_local =
        max_local_chunks(p, c, set, budget, caps.max_binding).min((eng.gpu.max_tokens_per_dispatch() / c).max(1));
    let wins = windows(p, c, max_local);
    let l = wins.iter().map(|w| w.chunks.len()).max().unwrap_or(0).max(1) as u64;

    let table = ChunkTable::new(p, &wins, chunk, false);
    let info = table.record(graph, x.mask)?;

    let [b_gc, b_bm, b_a, b_w, b_u, b_vn, b_h, b_wk16, b_qk16, b_h16, b_vn16] =
        scratch_per_chunk(p, c, set).map(|b| b * l);
    let sizes = [b_gc, b_bm, b_a, b_w, b_u, b_vn, b_h];
    let gc = graph.scratch("wgdelta.chunk.gc", b_gc, SAVED)?;
    let bm = graph.scratch("wgdelta.chunk.beta", b_bm, SAVED)?;
    let a = match saves {
        Some(s) => s.a.clone(),
        None => graph.scratch("wgdelta.chunk.a", b_a, SAVED)?,
    };
    let per_a = saved_a_per_chunk(p, c);
    let u = graph.scratch("wgdelta.chunk.u", b_u, SAVED)?;
    // Buffers a variant leaves out are bound to a small scratch buffer it never touches.
    let opt = |graph: &mut PassGraph, label, bytes: u64| graph.scratch(label, bytes.max(16), SAVED);
    let w = opt(graph, "wgdelta.chunk.w", b_w)?;
    let vn = opt(graph, "wgdelta.chunk.v_new", b_vn)?;
    let h = match states {
        Some(b) => b.clone(),
        None => opt(graph, "wgdelta.chunk.h", b_h)?,
    };
    let per_state = (d.hv * d.k * d.v * 4) as u64;
    let mut first = 0u64; // the window's first slot in the canonical states

    // The cooperative-matrix walk reads -w and K ∘ decay as f16 (chunk_wu.wgsl, W16) instead of w, k;
    // the cooperative-matrix output pass q, k, S and v_new as f16 (OUT16).
    let wk16 = opt(graph, "wgdelta.chunk.wk16", b_wk16)?;
    let qk16 = opt(graph, "wgdelta.chunk.qk16", b_qk16)?;
    let h16 = opt(graph, "wgdelta.chunk.h16", b_h16)?;
    let vn16 = opt(graph, "wgdelta.chunk.vn16", b_vn16)?;
    let state_w = if spec.mma.is_some() { &wk16 } else { &w };
    // The state carried between windows: ht itself when asked for, else scratch.
    let carry_scratch = match &ht {
        Some(_) => None,
        None => Some(graph.scratch("wgdelta.chunk.carry", (n * d.hv * d.k * d.v * 4) as u64, STORAGE)?),
    };
    let carry = ht.as_ref().map(|t| &t.buffer).or(carry_scratch.as_ref()).expect("carry");
    let h0 = x.h0.map(|t| &t.buffer).unwrap_or(&eng.dummy_read);

    let max = caps.max_workgroups_per_dim;
    let (hv, kv) = (d.hv as u32, (d.k + d.v) as u32);
    for (w_i, win) in wins.iter().enumerate() {
        let nl = win.chunks.len();
        let (cy, cz) = split(nl, max);
        let (sy, sz) = split(n, max);
        let params = |wg_per_row| table.params(w_i, p, wg_per_row);
        let pc =
            graph.scratch_with("wgdelta.chunk.params", bytemuck::bytes_of(&params(cy)), wgpu::BufferUsages::UNIFORM)?;
        let ps =
            graph.scratch_with("wgdelta.chunk.params", bytemuck::bytes_of(&params(sy)), wgpu::BufferUsages::UNIFORM)?;
        if nl > 0 {
            let f16_bufs = [&wk16, &qk16];
            let bufs = [&pc, &info, &gc, &bm, &w, &u];
            let ab = match saves {
                Some(_) => window_slice(&a, first, nl as u64, per_a),
                None => a.as_entire_buffer_binding(),
            };
            record_chunk_passes(graph, p, &spec, x, bufs, (ab, true), f16_bufs, set.q16, hv, kv, [cy, cz])?;
        }
        let hb = match states {
            Some(_) => window_slice(&h, first, nl as u64, per_state),
            None => h.as_entire_buffer_binding(),
        };
        first += nl as u64;
        let mut state_bufs =
            vec![whole(&ps), whole(&info), whole(&x.k.buffer), whole(&gc), whole(state_w), whole(&u), whole(h0)];
        state_bufs.extend([hb.clone(), whole(&vn), whole(carry)]);
        if spec.mma.is_some() {
            state_bufs.extend([whole(&h16), whole(&vn16), whole(&u)]);
        }
        graph.dispatch_ranges(&spec.key(state_kernel, p), &state_bufs, [hv * (d.v as u32 / spec.bv), sy, sz])?;
        if nl > 0 {
            let o = &o.buffer;
            let grid = [hv * (d.v as u32 / spec.bvo), cy, cz];
            if spec.out16 {
                // A workgroup per key head, for its GROUP value heads.
                let grid = [d.h as u32 * (d.v as u32 / spec.bvo), cy, cz];
                graph.dispatch(
                    &spec.key(Kernel::ChunkOutputMma, p),
                    &[&pc, &info, &qk16, &gc, &h16, &vn16, o, &qk16, &x.q.buffer],
                    grid,
                )?;
            } else {
                let (q, k) = (&x.q.buffer, &x.k.buffer);
                graph.dispatch_ranges(
                    &spec.key(Kernel::ChunkOutput, p),
                    &[whole(&pc), whole(&info), whole(q), whole(k), whole(&gc), hb, whole(&vn), whole(o)],
                    grid,
                )?;
            }
        }
    }
    let chunks = wins.last().map(|w| w.chunks.clone()).unwrap_or_default();
    let wk16 = set.packed.then_some((wk16, b_wk16));
    let qk16 = set.q16.then_some((qk16, b_qk16));
    let out16 = spec.out16.then_some([(h16, b_h16), (vn16, b_vn16)]);
    Ok((Outputs { o, ht }, Saved { bufs: [gc, bm, a, w, u, vn, h], sizes, chunks, wk16, qk16, out16 }))
}

/// Intermediate results of the chunked forward (tests compare them with `reference::chunked`
/// stage by stage). Per local chunk, padded to C rows, as laid out in `wgsl/chunk_common.wgsl`.
#[doc(hidden)]
#[derive(Debug)]
pub struct ChunkStages {
    pub out: Outputs,
    /// (start row, len, sequence) per chunk.
    pub chunks: Vec<[u32; 3]>,
    /// `[L, HV, C]`
    pub gc: Vec<f32>,
    /// `[L, HV, C]`
    pub beta: Vec<f32>,
    /// `[L, HV, C, C]`
    pub a: Vec<f32>,
    /// `[L, HV, C, K]`
    pub w: Vec<f32>,
    /// `[L, HV, C, V]`
    pub u: Vec<f32>,
    /// `[L, HV, C, V]`
    pub v_new: Vec<f32>,
    /// `[L, HV, K, V]`
    pub h: Vec<f32>,
    /// `[L, HV, 2, C, K]` IEEE half bits: -w, then K ∘ exp(gc_last - gc) (rows past the chunk zero).
    pub wk16: Vec<u16>,
    /// q, k as f16 `[L, H, 2, C, K]` (IEEE half bits; k only with the cooperative-matrix output pass).
    pub qk16: Option<Vec<u16>>,
    /// With the cooperative-matrix output pass, its other f16 operands: h `[L, HV, K, V]` (by local
    /// chunk, like `h`), v_new `[L, HV, C, V]`.
    pub out16: Option<[Vec<u16>; 2]>,
}

impl Engine {
    /// Runs the chunked forward in one window and returns its intermediates (for stage tests).
    #[doc(hidden)]
    pub fn chunked_stages(&self, x: &Inputs, opts: &crate::problem::Options, chunk: u32) -> Result<ChunkStages> {
        let p = Problem::new(&x.meta(), x.cu_seqlens, opts, false)?;
        if let Some(why) = super::chunked_unsupported(&p) {
            return Err(Error::Unsupported(why));
        }
        let mut graph = self.graph();
        let (out, saved) = record(self, &mut graph, &p, x, chunk, u64::MAX, true, None)?;
        let mut copies = Vec::new();
        for (b, &size) in saved.bufs.iter().zip(&saved.sizes) {
            let t = self.gpu.empty("wgdelta.chunk.stage", &[(size / 4) as usize], crate::problem::DType::F32)?;
            graph.copy(b, 0, &t.buffer, 0, size);
            copies.push(t);
        }
        let (wk_buf, wk_size) = saved.wk16.ok_or_else(|| Error::Device {
            context: "chunked_stages".into(),
            message: "the f16 operands were not recorded".into(),
        })?;
        let mut halves = |(b, size): &(wgpu::Buffer, u64)| -> Result<crate::tensor::Tensor> {
            let t = self.gpu.empty("wgdelta.chunk.stage", &[(size / 2) as usize], crate::problem::DType::F16)?;
            graph.copy(b, 0, &t.buffer, 0, *size);
            Ok(t)
        };
        let wk = halves(&(wk_buf, wk_size))?;
        let q16 = saved.qk16.as_ref().map(&mut halves).transpose()?;
        let o16 = match &saved.out16 {
            Some(bufs) => Some(bufs.iter().map(&mut halves).collect::<Result<Vec<_>>>()?),
            None => None,
        };
        self.submit(graph)?;
        let bits = |t: &crate::tensor::Tensor| -> Result<Vec<u16>> {
            Ok(bytemuck::pod_collect_to_vec(&self.download(t)?.bytes))
        };
        let wk16 = bits(&wk)?;
        let mut v = copies.iter().map(|t| self.download(t).map(|h| h.to_f32())).collect::<Result<Vec<_>>>()?;
        // h is kept by slot (`state_slots`); the stages list it by local chunk like the rest.
        let per = p.dims.hv * p.dims.k * p.dims.v;
        let h = v.pop().expect("h is the last stage");
        let slots = state_slots(&p, &saved.chunks, chunk);
        v.push(slots.iter().flat_map(|&s| h[s as usize * per..(s as usize + 1) * per].iter().copied()).collect());
        let qk16 = q16.as_ref().map(bits).transpose()?;
        let out16 = match o16 {
            Some(ts) => {
                let [h16, vn] = [bits(&ts[0])?, bits(&ts[1])?];
                let h16 =
                    slots.iter().flat_map(|&s| h16[s as usize * per..(s as usize + 1) * per].iter().copied()).collect();
                Some([h16, vn])
            }
            None => None,
        };
        let mut next = || v.remove(0);
        Ok(ChunkStages {
            out,
            chunks: saved.chunks,
            gc: next(),
            beta: next(),
            a: next(),
            w: next(),
            u: next(),
            v_new: next(),
            h: next(),
            wk16,
            qk16,
            out16,
        })
    }
}

/// The binding of `n` states from slot `first` of `states` (`per` bytes each): one window's slice
/// of the canonical saved states. A window without chunks binds one state's bytes it never touches.
pub(crate) fn window_slice(states: &wgpu::Buffer, first: u64, n: u64, per: u64) -> wgpu::BufferBinding<'_> {
    let size = (n * per).max(per.min(states.size() - first * per)).max(4);
    wgpu::BufferBinding { buffer: states, offset: first * per, size: std::num::NonZeroU64::new(size) }
}

/// Records the passes before the state walk: kkt_solve (the gates, and unless `solve` is false A: a
/// backward reads the A its training forward saved, bound as `a`), wu, and with `q16` the pack pass
/// (q as f16 in plane 0 of `qk16`). `wk16`, `qk16`: where the w/u pass writes the f16 operands under
/// `spec.w16` (bound, untouched, without).
#[allow(clippy::too_many_arguments)]
pub(crate) fn record_chunk_passes(
    graph: &mut PassGraph,
    p: &Problem,
    spec: &ChunkSpec,
    x: &Inputs,
    [pc, info, gc, bm, w, u]: [&wgpu::Buffer; 6],
    (a, solve): (wgpu::BufferBinding<'_>, bool),
    [wk16, qk16]: [&wgpu::Buffer; 2],
    q16: bool,
    hv: u32,
    kv: u32,
    [cy, cz]: [u32; 2],
) -> Result<()> {
    let (g, beta) = (&x.g.buffer, &x.beta.buffer);
    graph.dispatch_ranges(
        &spec.key(Kernel::ChunkKktSolve, p).with_constant("SOLVE", if solve { 1.0 } else { 0.0 }),
        &[whole(pc), whole(info), whole(&x.k.buffer), whole(gc), whole(bm), a.clone(), whole(g), whole(beta)],
        [p.dims.h as u32, cy, cz],
    )?;
    let k = &x.k.buffer;
    graph.dispatch_ranges(
        &spec.key(Kernel::ChunkWu, p),
        &[
            whole(pc),
            whole(info),
            whole(k),
            whole(&x.v.buffer),
            whole(gc),
            whole(bm),
            a,
            whole(w),
            whole(u),
            whole(wk16),
            whole(qk16),
        ],
        [hv * (kv / spec.bd), cy, cz],
    )?;
    if q16 {
        let d = &p.dims;
        let vecs = (d.h * spec.chunk as usize * d.k / 8) as u32;
        graph.dispatch(
            &spec.key(Kernel::ChunkPack16, p),
            &[pc, info, &x.q.buffer, qk16],
            [vecs.div_ceil(WG), cy, cz],
        )?;
    }
    Ok(())
}
