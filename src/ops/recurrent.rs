//! Recurrent forward: one pass over the tokens with the state on chip (`wgsl/recurrent_fwd.wgsl`).

use super::{Inputs, Outputs};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::graph::{whole, PassGraph, Upload, BIND_ALIGN};
use crate::kernels::recurrent::{Params, RecurrentSpec, StateSrc, Tiles, DECODE_MAX_LEN, DECODE_WIDE_MIN_HEADS};
use crate::problem::Problem;
use crate::tensor::{padded, Tensor};

/// Where the recurrence reads its initial state and writes its final state.
pub(crate) struct StateIo<'a> {
    pub src: StateSrc,
    pub h0: Option<&'a wgpu::Buffer>,
    /// Written when `store` (and read when `src == InPlace`).
    pub state: Option<&'a wgpu::Buffer>,
    pub store: bool,
    /// Slot of each sequence in the state buffer (decode against a pool).
    pub slots: Option<&'a [u32]>,
    /// Checkpoints for the backward: (buffer `[N, HV, NB, K, V]`, interval C, NB).
    pub ckpt: Option<(&'a wgpu::Buffer, u32, u32)>,
}

impl Engine {
    /// The recurrent kernels' tiling for `p`: the forced one from [`crate::Settings`], if valid, or
    /// the device default.
    pub(crate) fn recurrent_tiles(&self, p: &Problem) -> Result<Tiles> {
        let caps = &self.gpu.caps;
        match self.settings.recurrent_tiles {
            Some(t) if t.valid(p.dims.k, p.dims.v, caps) => Ok(t),
            Some(t) => Err(Error::Option {
                name: "recurrent_tiles",
                why: format!("{t:?} is not valid for K = {}, V = {} on this device", p.dims.k, p.dims.v),
            }),
            None if p.seqs.max_len() <= DECODE_MAX_LEN && p.n_seqs() * p.dims.hv >= DECODE_WIDE_MIN_HEADS => {
                Ok(Tiles::decode_wide(p.dims.k, p.dims.v, caps))
            }
            None => Ok(Tiles::choose(p.dims.k, p.dims.v, p.seqs.max_len(), caps)),
        }
    }
}

/// Records the `info` table the recurrent kernels read: `slots` [N] | seq offsets [N+1] | mask bytes
/// (copied on the device from the mask tensor). Slots come first so the decode kernel reads slot n
/// at `info[n]`, an address that needs no uniform read first. Returns the uploaded table, the seq
/// offsets' offset (0 without slots) and the mask offset, in words.
pub(crate) fn record_info(
    graph: &mut PassGraph,
    p: &Problem,
    mask: Option<&Tensor>,
    slots: Option<&[u32]>,
) -> Result<(Upload, u32, u32)> {
    let mut words: Vec<u32> = slots.map(<[u32]>::to_vec).unwrap_or_default();
    let seq_off = words.len() as u32;
    words.extend_from_slice(&p.seqs.offsets);
    let mask_off = words.len() as u32;
    let mask_bytes = mask.map(|m| padded(m.byte_len())).unwrap_or(0);
    words.resize(words.len() + (mask_bytes / 4) as usize, 0);
    let info = graph.upload("wgdelta.meta", bytemuck::cast_slice(&words))?;
    if let Some(m) = mask {
        graph.copy(&m.buffer, 0, &info.buffer, info.offset + mask_off as u64 * 4, mask_bytes);
    }
    Ok((info, seq_off, mask_off))
}

/// Records the recurrent pass of `p` into `graph`, writing `o` and, per `io`, the state.
pub(crate) fn record(
    eng: &Engine,
    graph: &mut PassGraph,
    p: &Problem,
    x: &Inputs,
    o: &Tensor,
    io: StateIo,
) -> Result<()> {
    let tiles = eng.recurrent_tiles(p)?;
    let d = &p.dims;
    let n = p.n_seqs();
    // A run of consecutive slots (always so for one sequence) is bound as that range of the pool,
    // so the kernel finds its state without reading the slot first: one dependent memory round
    // trip less per decode call (the slot and the state it names were two).
    let slot_bytes = (d.hv * d.k * d.v * 4) as u64;
    let (slots, pool_range) = match io.slots {
        Some(s) if consecutive(s) && slot_bytes.is_multiple_of(BIND_ALIGN as u64) => {
            (None, Some((s[0] as u64 * slot_bytes, n as u64 * slot_bytes)))
        }
        other => (other, None),
    };
    let (info, seq_off, mask_off) = record_info(graph, p, x.mask, slots)?;

    // Sequence n = wid.y + wid.z * max: y takes all sequences up to the grid limit (so with z = 1
    // every workgroup is a sequence), z the rest. The kernel knows `max` as the override MAX_Y.
    // No sequences: gz = 0, and the graph skips the empty dispatch.
    let max = eng.gpu.caps.max_workgroups_per_dim;
    let tiles_x = (d.v as u32 / tiles.bv) * d.hv as u32;
    let gy = (n as u32).clamp(1, max);
    let gz = (n as u32).div_ceil(gy);

    // Segments: every dispatch runs at most `seg` tokens of each sequence; later segments continue
    // from the state the previous one stored, in place in `carry`.
    let seg = eng.gpu.max_tokens_per_dispatch();
    let n_seg = p.seqs.max_len().div_ceil(seg).max(1);
    let carry = match io.state {
        Some(b) => b.clone(),
        None if n_seg > 1 => {
            graph.scratch("wgdelta.state.carry", (n * d.hv * d.k * d.v * 4) as u64, wgpu::BufferUsages::STORAGE)?
        }
        None => eng.dummy_write.clone(),
    };
    let h0 = io.h0.unwrap_or(&eng.dummy_read);
    let (ckpt, every, ck_blocks) = io.ckpt.unwrap_or((&eng.dummy_write, 0, 0));
    for s in 0..n_seg {
        let last = s + 1 == n_seg;
        let params = Params {
            n_seqs: n as u32,
            seq_off,
            mask_off,
            scale: p.scale,
            t: d.t as u32,
            seg_start: (s * seg) as u32,
            seg_len: seg as u32,
            ck_blocks,
        };
        let ubuf = graph.upload("wgdelta.params", bytemuck::bytes_of(&params))?;
        let spec = RecurrentSpec {
            tiles,
            state_src: if s == 0 { io.src } else { StateSrc::InPlace },
            store_state: if last { io.store } else { true },
            use_slots: slots.is_some(),
            decode: p.seqs.max_len() <= DECODE_MAX_LEN,
            checkpoint: every,
            max_y: max,
        };
        let state = match pool_range {
            Some((offset, size)) => {
                wgpu::BufferBinding { buffer: &carry, offset, size: std::num::NonZeroU64::new(size) }
            }
            None => whole(&carry),
        };
        let mut bufs = common_bindings(&ubuf, x, &info);
        bufs.extend([whole(h0), whole(&o.buffer), state, whole(ckpt)]);
        graph.dispatch_ranges(&spec.key(p), &bufs, [tiles_x, gy, gz])?;
    }
    Ok(())
}

/// Bindings 0-6, which both recurrent kernels declare alike (`wgsl/recurrent_common.wgsl`, and each
/// kernel's parameters at 0): parameters, q, k, v, g, beta, the info table. Each kernel's own follow.
pub(crate) fn common_bindings<'a>(
    params: &'a Upload,
    x: &Inputs<'a>,
    info: &'a Upload,
) -> Vec<wgpu::BufferBinding<'a>> {
    let mut b = vec![params.binding()];
    b.extend([x.q, x.k, x.v, x.g, x.beta].map(|t| whole(&t.buffer)));
    b.push(info.binding());
    b
}

/// Whether `slots` are s, s + 1, s + 2, ... (a range of the pool).
fn consecutive(slots: &[u32]) -> bool {
    slots.windows(2).all(|w| w[0].checked_add(1) == Some(w[1])) && !slots.is_empty()
}

/// Forward by the recurrent kernel: `o`, and `ht` when asked; with `ckpt` = (buffer, C, NB) also the
/// state every C tokens of each sequence (the backward's checkpoints).
pub(crate) fn forward(
    eng: &Engine,
    p: &Problem,
    x: &Inputs,
    ckpt: Option<(&wgpu::Buffer, u32, u32)>,
) -> Result<Outputs> {
    let d = &p.dims;
    let o = eng.output("o", &[d.b, d.t, d.hv, d.v])?;
    let ht = if p.output_final_state { Some(eng.output("ht", &p.state_shape())?) } else { None };
    let mut graph = eng.graph();
    let io = StateIo {
        src: if x.h0.is_some() { StateSrc::H0 } else { StateSrc::Zeros },
        h0: x.h0.map(|t| &t.buffer),
        state: ht.as_ref().map(|t| &t.buffer),
        store: ht.is_some(),
        slots: None,
        ckpt,
    };
    record(eng, &mut graph, p, x, &o, io)?;
    eng.submit(graph)?;
    Ok(Outputs { o, ht })
}
