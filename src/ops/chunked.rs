//! Chunked forward (SPEC section 5, the WY/UT form of flash-linear-attention's `chunk.py`): per
//! window of chunks, `cumsum -> kkt_solve -> wu -> state -> output`, all recorded into one graph and
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
use crate::error::Result;
use crate::graph::PassGraph;
use crate::kernels::chunked::{
    max_local_chunks, scratch_per_chunk, windows, ChunkSpec, Params, DEFAULT_WINDOW_BYTES, WG,
};
use crate::kernels::Kernel;
use crate::problem::Problem;
use crate::tensor::padded;

const STORAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE;

/// Splits `n` workgroups over the grid's y and z axes: (y extent, z extent).
fn split(n: usize, max: u32) -> (u32, u32) {
    let y = (n as u32).clamp(1, max);
    (y, (n as u32).div_ceil(y).max(1))
}

/// Forward by the chunked passes with chunks of `chunk` tokens: `o`, and `ht` when asked.
pub(crate) fn forward(eng: &Engine, p: &Problem, x: &Inputs, chunk: u32) -> Result<Outputs> {
    let d = &p.dims;
    let c = chunk as usize;
    let n = p.n_seqs();
    let caps = &eng.gpu.caps;
    let spec = ChunkSpec::choose(chunk, d.k, d.v);
    let o = eng.output("o", &[d.b, d.t, d.hv, d.v])?;
    let ht = if p.output_final_state { Some(eng.output("ht", &p.state_shape())?) } else { None };
    let mut graph = eng.graph();

    let budget = eng.settings.chunk_window_bytes.unwrap_or(DEFAULT_WINDOW_BYTES);
    let max_local = max_local_chunks(p, c, budget, caps.max_binding);
    let wins = windows(p, c, max_local);
    let l = wins.iter().map(|w| w.chunks.len()).max().unwrap_or(0).max(1) as u64;

    // One chunk table for all windows, then the mask bytes (copied on the device).
    let mut words: Vec<u32> = Vec::new();
    let mut offs = Vec::with_capacity(wins.len());
    for w in &wins {
        let chunk_off = words.len() as u32;
        words.extend(w.chunks.iter().flatten());
        let seq_off = words.len() as u32;
        words.extend(w.seqs.iter().flatten());
        offs.push((chunk_off, seq_off));
    }
    let mask_off = words.len() as u32;
    let mask_bytes = x.mask.map(|m| padded(m.byte_len())).unwrap_or(0);
    words.resize(words.len() + (mask_bytes / 4) as usize, 0);
    let info = graph.scratch_with("wgdelta.chunk.table", bytemuck::cast_slice(&words), STORAGE)?;
    if let Some(m) = x.mask {
        graph.copy(&m.buffer, 0, &info, mask_off as u64 * 4, mask_bytes);
    }

    let [b_gc, b_bm, b_a, b_w, b_u, b_vn, b_h] = scratch_per_chunk(p, c).map(|b| b * l);
    let gc = graph.scratch("wgdelta.chunk.gc", b_gc, STORAGE)?;
    let bm = graph.scratch("wgdelta.chunk.beta", b_bm, STORAGE)?;
    let a = graph.scratch("wgdelta.chunk.a", b_a, STORAGE)?;
    let w = graph.scratch("wgdelta.chunk.w", b_w, STORAGE)?;
    let u = graph.scratch("wgdelta.chunk.u", b_u, STORAGE)?;
    let vn = graph.scratch("wgdelta.chunk.v_new", b_vn, STORAGE)?;
    let h = graph.scratch("wgdelta.chunk.h", b_h, STORAGE)?;
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
        let (chunk_off, seq_off) = offs[w_i];
        let nl = win.chunks.len();
        let (cy, cz) = split(nl, max);
        let (sy, sz) = split(n, max);
        let params = |wg_per_row| Params {
            n_local: nl as u32,
            chunk_off,
            seq_off,
            mask_off,
            n_seqs: n as u32,
            wg_per_row,
            scale: p.scale,
            _pad: 0,
        };
        let pc =
            graph.scratch_with("wgdelta.chunk.params", bytemuck::bytes_of(&params(cy)), wgpu::BufferUsages::UNIFORM)?;
        let ps =
            graph.scratch_with("wgdelta.chunk.params", bytemuck::bytes_of(&params(sy)), wgpu::BufferUsages::UNIFORM)?;
        if nl > 0 {
            record_chunk_passes(&mut graph, p, &spec, x, [&pc, &info, &gc, &bm, &a, &w, &u], hv, kv, [cy, cz])?;
        }
        graph.dispatch(
            &spec.key(Kernel::ChunkState, p),
            &[&ps, &info, &x.k.buffer, &gc, &w, &u, h0, &h, &vn, carry],
            [hv * (d.v as u32 / spec.bv), sy, sz],
        )?;
        if nl > 0 {
            graph.dispatch(
                &spec.key(Kernel::ChunkOutput, p),
                &[&pc, &info, &x.q.buffer, &x.k.buffer, &gc, &h, &vn, &o.buffer],
                [hv * (d.v as u32 / spec.bvo), cy, cz],
            )?;
        }
    }
    eng.submit(graph)?;
    Ok(Outputs { o, ht })
}

/// Records the passes before the state walk: cumsum, kkt_solve, wu.
#[allow(clippy::too_many_arguments)]
fn record_chunk_passes(
    graph: &mut PassGraph,
    p: &Problem,
    spec: &ChunkSpec,
    x: &Inputs,
    [pc, info, gc, bm, a, w, u]: [&wgpu::Buffer; 7],
    hv: u32,
    kv: u32,
    [cy, cz]: [u32; 2],
) -> Result<()> {
    graph.dispatch(
        &spec.key(Kernel::ChunkCumsum, p),
        &[pc, info, &x.g.buffer, &x.beta.buffer, gc, bm],
        [hv.div_ceil(WG), cy, cz],
    )?;
    graph.dispatch(
        &spec.key(Kernel::ChunkKktSolve, p),
        &[pc, info, &x.k.buffer, gc, bm, a],
        [p.dims.h as u32, cy, cz],
    )?;
    graph.dispatch(
        &spec.key(Kernel::ChunkWu, p),
        &[pc, info, &x.k.buffer, &x.v.buffer, gc, bm, a, w, u],
        [hv * (kv / spec.bd), cy, cz],
    )
}
