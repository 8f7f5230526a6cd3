//! Chunked backward (SPEC section 4 by the WY/UT form, as flash-linear-attention's
//! `chunk_gated_delta_rule_bwd`): per window of chunks, last window first, the forward's gates
//! (`kkt_solve` without its solve) and `wu` are recomputed (from the A the training forward saved),
//! then `bwd_local -> bwd_state -> bwd_dqkwg -> bwd_wy -> bwd_reduce` (`wgsl/chunk_bwd_common.wgsl`
//! has the plan, `reference::chunked_backward` the math), all recorded into one graph and submitted
//! once.
//!
//! The state at the start of every chunk comes from the states the training forward saved every C
//! tokens ([`super::backward::Saved`], C = the chunk size), so nothing per token is kept between
//! forward and backward. No pass accumulates with atomics: the gradients are bitwise repeatable
//! whatever [`crate::Accum`] is configured.

use super::backward::{Grads, Saved};
use super::chunked::{check_workgroup_memory, record_chunk_passes, split, window_slice, ChunkTable, STORAGE};
use crate::engine::Engine;
use crate::error::Result;
use crate::graph::whole;
use crate::kernels::chunked::{
    bwd_scratch_per_chunk, max_local_for, saved_a_per_chunk, windows, ChunkSpec, DEFAULT_TRAIN_WINDOW_BYTES,
};
use crate::kernels::Kernel;
use crate::problem::Problem;
use crate::tensor::Tensor;

/// Gradients of `p` (validated with its upstream gradients) by the chunked passes with chunks of
/// `chunk` tokens; `saved` holds the chunked forward's states of that chunk size
/// ([`Saved::chunk`]) and `saved_a` its A per chunk.
pub(crate) fn backward(
    eng: &Engine,
    p: &Problem,
    saved: &Saved,
    saved_a: &Tensor,
    d_o: &Tensor,
    dht: Option<&Tensor>,
    chunk: u32,
) -> Result<Grads> {
    let d = &p.dims;
    let c = chunk as usize;
    let n = p.n_seqs();
    let caps = &eng.gpu.caps;
    check_workgroup_memory(caps)?;
    let spec = ChunkSpec::for_backward(chunk, p, caps);
    let mma = spec.mma.is_some();
    let budget = eng.settings.chunk_window_bytes.unwrap_or(DEFAULT_TRAIN_WINDOW_BYTES);
    let per = bwd_scratch_per_chunk(p, c, &spec);
    // Windows are sized with the saved A's slice counted too (it is bound per window like scratch).
    let per_a = saved_a_per_chunk(p, c);
    let mut sizing = per.to_vec();
    sizing.push(per_a);
    let max_local =
        max_local_for(p, c, &sizing, budget, caps.max_binding).min((eng.gpu.max_tokens_per_dispatch() / c).max(1));
    let wins = windows(p, c, max_local);
    let l = wins.iter().map(|w| w.chunks.len()).max().unwrap_or(0).max(1) as u64;

    // The window holding each sequence's last chunk starts its walk from dht; an empty sequence
    // takes dht (or 0) straight to dh0, in the window walked first (ChunkTable, backward).
    let table = ChunkTable::new(p, &wins, chunk, true);

    let dq = eng.output("dq", &[d.b, d.t, d.h, d.k])?;
    let dk = eng.output("dk", &[d.b, d.t, d.h, d.k])?;
    let dv = eng.output("dv", &[d.b, d.t, d.hv, d.v])?;
    let dg = eng.output("dg", saved.g().shape())?;
    let dbeta = eng.output("dbeta", &[d.b, d.t, d.hv])?;
    let dh0 = if p.has_h0 { Some(eng.output("dh0", &p.state_shape())?) } else { None };

    let mut graph = eng.graph();
    let info = table.record(&mut graph, saved.mask())?;
    const NAMES: [&str; 13] = [
        "wgdelta.chunk.gc",
        "wgdelta.chunk.beta",
        "wgdelta.chunk.w",
        "wgdelta.chunk.u",
        "wgdelta.chunk.v_new",
        "wgdelta.chunk.dv_new",
        "wgdelta.chunk.dh",
        "wgdelta.chunk.dq_part",
        "wgdelta.chunk.dk_part",
        "wgdelta.chunk.dw",
        "wgdelta.chunk.dgc",
        "wgdelta.chunk.wk16",
        "wgdelta.chunk.qk16",
    ];
    // Buffers the variant leaves out (the f16 operands of the SIMT walk) are 16 bytes, never touched.
    let bufs = NAMES
        .iter()
        .zip(per)
        .map(|(name, b)| graph.scratch(name, (b * l).max(16), STORAGE))
        .collect::<Result<Vec<_>>>()?;
    let [gc, bm, w, u, vn, dvn, dh, dqp, dkp, dw, dgc, wk16, qk16] = &bufs[..] else {
        unreachable!("13 scratch buffers")
    };
    // dS is carried between windows in dh0 itself when the call has h0, else in scratch.
    let carry_scratch = match &dh0 {
        Some(_) => None,
        None => Some(graph.scratch("wgdelta.chunk.carry", (n * d.hv * d.k * d.v * 4) as u64, STORAGE)?),
    };
    let carry = dh0.as_ref().map(|t| &t.buffer).or(carry_scratch.as_ref()).expect("carry");
    let dht_buf = dht.map(|t| &t.buffer).unwrap_or(&eng.dummy_read);
    let key = |k: Kernel| spec.bwd_key(k, p, d_o.dtype(), dht.map(Tensor::dtype));
    let x = saved.inputs();
    let ck = &saved.checkpoints().buffer;
    let saved_a = &saved_a.buffer;
    let per_state = (d.hv * d.k * d.v * 4) as u64;
    // Each window's first slot in the canonical saved states.
    let firsts: Vec<u64> = wins
        .iter()
        .scan(0u64, |acc, w| {
            let f = *acc;
            *acc += w.chunks.len() as u64;
            Some(f)
        })
        .collect();

    let max = caps.max_workgroups_per_dim;
    let (hv, kv) = (d.hv as u32, (d.k + d.v) as u32);
    for (wi, win) in wins.iter().enumerate().rev() {
        let nl = win.chunks.len();
        let (cy, cz) = split(nl, max);
        let (sy, sz) = split(n, max);
        let params = |wg_per_row| table.params(wi, p, wg_per_row);
        let ckb = window_slice(ck, firsts[wi], nl as u64, per_state);
        let ab = window_slice(saved_a, firsts[wi], nl as u64, per_a);
        let uniform = wgpu::BufferUsages::UNIFORM;
        let pc = graph.scratch_with("wgdelta.chunk.params", bytemuck::bytes_of(&params(cy)), uniform)?;
        let ps = graph.scratch_with("wgdelta.chunk.params", bytemuck::bytes_of(&params(sy)), uniform)?;
        let (q, k, v, g) = (&x.q.buffer, &x.k.buffer, &x.v.buffer, &x.g.buffer);
        let dout = &d_o.buffer;
        if nl > 0 {
            record_chunk_passes(
                &mut graph,
                p,
                &spec,
                &x,
                [&pc, &info, gc, bm, w, u],
                (ab.clone(), false), // A as the training forward saved it
                [wk16, qk16],
                mma, // q as f16 for the cooperative-matrix walk
                hv,
                kv,
                [cy, cz],
            )?;
            // The local pass: on cooperative matrices from the f16 operands (q, k; -w), else from q, k, w.
            let (local, operands) = if spec.out16 {
                (Kernel::ChunkBwdLocalMma, vec![qk16, gc, wk16])
            } else {
                (Kernel::ChunkBwdLocal, vec![q, k, gc, w])
            };
            let mut binds: Vec<_> = [&pc, &info].into_iter().chain(operands).chain([u]).map(whole).collect();
            binds.extend([ckb.clone(), whole(dout), whole(vn), whole(dvn)]);
            graph.dispatch_ranges(&key(local), &binds, [hv, cy, cz])?;
        }
        let walk = [hv * (d.v as u32 / spec.bv), sy, sz];
        if mma {
            graph.dispatch(
                &key(Kernel::ChunkBwdStateMma),
                &[&ps, &info, qk16, gc, wk16, dout, dht_buf, dvn, dh, carry],
                walk,
            )?;
        } else {
            graph.dispatch(
                &key(Kernel::ChunkBwdState),
                &[&ps, &info, q, k, gc, w, dout, dht_buf, dvn, dh, carry],
                walk,
            )?;
        }
        if nl > 0 {
            graph.dispatch_ranges(
                &key(Kernel::ChunkBwdDqkwg),
                &[
                    whole(&pc),
                    whole(&info),
                    whole(q),
                    whole(k),
                    whole(gc),
                    ckb,
                    whole(dh),
                    whole(vn),
                    whole(dvn),
                    whole(dout),
                    whole(dqp),
                    whole(dkp),
                    whole(dw),
                    whole(dgc),
                ],
                [hv, cy, cz],
            )?;
            let wy = [&pc, &info, k, v, g, gc, bm].map(whole).into_iter().chain([ab]);
            let wy_out = [dw, dvn, dgc, dkp, &dv.buffer, &dbeta.buffer, &dg.buffer].map(whole);
            graph.dispatch_ranges(&key(Kernel::ChunkBwdWy), &wy.chain(wy_out).collect::<Vec<_>>(), [hv, cy, cz])?;
            graph.dispatch(
                &key(Kernel::ChunkBwdReduce),
                &[&pc, &info, dqp, dkp, &dq.buffer, &dk.buffer],
                [d.h as u32, cy, cz],
            )?;
        }
    }
    eng.submit(graph)?;
    Ok(Grads { dq, dk, dv, dg, dbeta, dh0 })
}
