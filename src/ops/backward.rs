//! Training: a forward that saves what the backward needs (device buffers, O(T/C) states per
//! sequence and head), and the backward that turns it and the upstream gradients into gradients for
//! every input (`wgsl/recurrent_bwd.wgsl`, then `wgsl/reduce_partials.wgsl` in deterministic mode).

use super::recurrent::{common_bindings, record_info};
use super::{Inputs, Outputs, Plan};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::graph::whole;
use crate::kernels::backward::{reduce_partials_key, BackwardSpec, Params, ReduceParams, REDUCE_WG};
use crate::kernels::Accum;
use crate::problem::{Algorithm, DType, GateKind, InputsMeta, Options, Problem};
use crate::tensor::Tensor;

/// Default tokens between saved states (C).
pub const CHECKPOINT_EVERY: usize = 64;

/// Upper bound on the backward's per-dispatch replay scratch; longer batches are split by sequence.
const WORK_BUDGET: u64 = 256 << 20;

/// What [`Engine::forward_train`] keeps for [`Engine::backward`]: the inputs (device buffers are
/// reference-counted: these are handles, not copies), the validated call, and the state at the start
/// of every C-token block of each sequence.
#[derive(Debug, Clone)]
pub struct Saved {
    problem: Problem,
    opts: Options,
    cu_seqlens: Option<Vec<i64>>,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    h0: Option<Tensor>,
    mask: Option<Tensor>,
    checkpoints: Tensor,
    every: usize,
    /// After the chunked forward (for the chunked backward): the chunk size, and each chunk's A,
    /// `[G, HV, C, C]` in the order of the states.
    chunked: Option<(u32, Tensor)>,
}

impl Saved {
    /// The saved inputs as [`Inputs`] (the backward passes read them).
    pub(crate) fn inputs(&self) -> Inputs<'_> {
        let mut x = Inputs::new(&self.q, &self.k, &self.v, &self.g, &self.beta);
        x.mask = self.mask.as_ref();
        x
    }

    /// The validated forward call.
    pub fn problem(&self) -> &Problem {
        &self.problem
    }
    /// States before rows `seq[n] + b*C` of each sequence, F32, kv order whatever the call's layout.
    /// After the recurrent forward: `[N, HV, NB, K, V]`, `NB = ceil(max_len / C)`, blocks past a
    /// sequence's end zero. After the chunked forward ([`Saved::chunk`]): `[G, HV, K, V]`, one state
    /// per chunk of every sequence (G in all), in position-major order: the first chunks of all
    /// sequences, then all second chunks, and so on. That tensor may exceed one storage binding
    /// (B=8, T=8192, HV=32, K=V=128: 2 GiB); the passes bind it a window at a time.
    pub fn checkpoints(&self) -> &Tensor {
        &self.checkpoints
    }
    /// The checkpoint interval C.
    pub fn every(&self) -> usize {
        self.every
    }
    /// The chunk size, when the chunked forward saved the states: the backward then runs the
    /// chunked passes; otherwise the recurrent kernel. [`Engine::forward_train`] decides:
    /// `Algorithm::Chunked` asks for the chunked passes, `Recurrent` for the kernel, and `Auto`
    /// picks chunked where [`auto_chunked_backward`] says so (and no other `checkpoint_every` than
    /// 64 was set).
    pub fn chunk(&self) -> Option<u32> {
        self.chunked.as_ref().map(|c| c.0)
    }
    /// Bytes of device memory the saved states take (the inputs are shared with the caller).
    pub fn state_bytes(&self) -> u64 {
        self.checkpoints.byte_len()
    }
    /// Bytes of device memory everything saved for the backward takes besides the inputs: the
    /// states and, after the chunked forward, each chunk's A = (I + StrictLower(diag(beta) K K^T ∘
    /// Γ))^-1 (`[G, HV, C, C]` f32: the backward reads it instead of solving again, as FLA's does).
    pub fn saved_bytes(&self) -> u64 {
        self.state_bytes() + self.chunked.as_ref().map_or(0, |c| c.1.byte_len())
    }
    pub(crate) fn g(&self) -> &Tensor {
        &self.g
    }
    pub(crate) fn mask(&self) -> Option<&Tensor> {
        self.mask.as_ref()
    }
}

/// Gradients of `L = sum(o * do) + sum(ht * dht)` with respect to every input, F32, each in the
/// shape of its input (SPEC section 4).
#[derive(Debug)]
pub struct Grads {
    /// `[B, T, H, K]`, summed over the value heads sharing a key head.
    pub dq: Tensor,
    /// `[B, T, H, K]`, summed over the value heads sharing a key head.
    pub dk: Tensor,
    /// `[B, T, HV, V]`.
    pub dv: Tensor,
    /// Shape of `g`, with respect to `g` in its own gate space (log: dL/dg; linear: dL/d(decay)).
    pub dg: Tensor,
    /// `[B, T, HV]`.
    pub dbeta: Tensor,
    /// Shape of `h0`, when the forward had one.
    pub dh0: Option<Tensor>,
}

/// Whether `Algorithm::Auto` runs the backward of `p` by the chunked passes (on any device), given
/// the engine's forced accumulation `accum` (`Settings::accum`): wherever the chunked algorithm
/// supports `p` (a scalar gate), unless atomics were asked for by name (the chunked passes use none:
/// they are bitwise repeatable with scratch bounded by the window budget).
///
/// Measured on an H100 (docs/PERF.md, 2026-11-22, run R26), bf16 forward + backward: the chunked
/// passes beat the recurrent kernel with f32 atomics at every shape of the sweep, B = 1..16 and
/// T = 256..4096, by 2.0x (B=1 T=256: 0.66 against 1.35 ms) to 2.9x (B=1 T=4096: 7.23 against
/// 21.2 ms). The per-key gate has no chunked form and stays on the recurrent kernel.
pub fn auto_chunked_backward(p: &Problem, accum: Option<Accum>) -> bool {
    super::chunked_unsupported(p).is_none() && accum.is_none_or(|a| a == Accum::Deterministic)
}

impl Engine {
    /// The forward of a training step: `o` (and `ht` when asked) as [`Engine::forward`] computes
    /// them, plus a [`Saved`] context for [`Engine::backward`].
    ///
    /// ```no_run
    /// use wgdelta::{Engine, HostTensor, Inputs, Options};
    /// let eng = Engine::new()?;
    /// let (b, t, h, hv, k, v) = (1, 100, 1, 2, 32, 32);
    /// let up = |n: &str, s: &[usize]| eng.upload(n, &HostTensor::from_f32(s, &vec![0.1; s.iter().product()]));
    /// let (q, kk, vv) = (up("q", &[b, t, h, k])?, up("k", &[b, t, h, k])?, up("v", &[b, t, hv, v])?);
    /// let (g, beta) = (up("g", &[b, t, hv])?, up("beta", &[b, t, hv])?);
    /// let (out, saved) = eng.forward_train(&Inputs::new(&q, &kk, &vv, &g, &beta), &Options::default())?;
    /// let d_o = up("do", &[b, t, hv, v])?; // dL/do from the rest of the model
    /// let grads = eng.backward(&saved, &d_o, None)?;
    /// assert_eq!(grads.dq.shape(), &[b, t, h, k]);
    /// assert_eq!(saved.checkpoints().shape(), &[1, hv, 2, k, v]); // ceil(100 / 64) states per head
    /// # let _ = out;
    /// # Ok::<(), wgdelta::Error>(())
    /// ```
    pub fn forward_train(&self, x: &Inputs, opts: &Options) -> Result<(Outputs, Saved)> {
        let p = Problem::new(&x.meta(), x.cu_seqlens, opts, false)?;
        // The backward is decided here: the chunked one starts from the state at every chunk,
        // which the chunked forward writes as it goes; the recurrent one from the states the
        // recurrent kernel saves every C tokens.
        let auto_every = self.settings.checkpoint_every.is_none_or(|e| e == super::AUTO_CHUNK as usize);
        let chunked = match super::plan(&p, &self.gpu.caps)? {
            Plan::Chunked { chunk } if p.algorithm != Algorithm::Auto => Some(chunk as usize),
            _ if p.algorithm == Algorithm::Auto && auto_chunked_backward(&p, self.settings.accum) && auto_every => {
                Some(super::AUTO_CHUNK as usize)
            }
            _ => None,
        };
        let d = &p.dims;
        let every = match (chunked, self.settings.checkpoint_every) {
            (Some(c), Some(e)) if e != c => {
                return Err(Error::Option {
                    name: "checkpoint_every",
                    why: format!("the chunked backward with chunk {c} needs states every {c} tokens, got {e}"),
                })
            }
            (Some(c), _) => c,
            (None, e) => e.unwrap_or(CHECKPOINT_EVERY),
        };
        if every == 0 || every > 4096 {
            return Err(Error::Option { name: "checkpoint_every", why: format!("must be 1..=4096, got {every}") });
        }
        let (ck, chunked, out) = if let Some(c) = chunked {
            let g = (0..p.n_seqs()).map(|s| p.seqs.range(s).len().div_ceil(c)).sum();
            // Every slot is written by the forward, so the buffers may be recycled ones.
            let ck = self.output_with("wgdelta.checkpoints", &[g, d.hv, d.k, d.v], true)?;
            let a = self.output_with("wgdelta.saved_a", &[g, d.hv, c, c], true)?;
            let saves = super::chunked::TrainSaves { states: &ck.buffer, a: &a.buffer };
            let out = super::chunked::forward(self, &p, x, c as u32, Some(saves))?;
            (ck, Some((c as u32, a)), out)
        } else {
            let nb = p.seqs.max_len().div_ceil(every);
            // Fresh buffers are zero-filled by wgpu: blocks past a shorter sequence's end stay zero.
            let ck = self.gpu.empty("wgdelta.checkpoints", &[p.n_seqs(), d.hv, nb, d.k, d.v], DType::F32)?;
            let out = super::recurrent::forward(self, &p, x, Some((&ck.buffer, every as u32, nb as u32)))?;
            (ck, None, out)
        };
        let saved = Saved {
            problem: p,
            opts: *opts,
            cu_seqlens: x.cu_seqlens.map(<[i64]>::to_vec),
            q: x.q.clone(),
            k: x.k.clone(),
            v: x.v.clone(),
            g: x.g.clone(),
            beta: x.beta.clone(),
            h0: x.h0.cloned(),
            mask: x.mask.cloned(),
            checkpoints: ck,
            every,
            chunked,
        };
        Ok((out, saved))
    }

    /// The accumulation variant the backward of `p` uses on this engine.
    pub fn backward_accum(&self, p: &Problem) -> Accum {
        match self.settings.accum {
            Some(a) => a,
            None if p.deterministic => Accum::Deterministic,
            None if self.gpu.caps.f32_atomic => Accum::F32Atomic,
            None => Accum::CasLoop,
        }
    }

    /// Gradients of `sum(o * do) + sum(ht * dht)` for the forward that produced `saved`.
    /// `do` is `[B, T, HV, V]`; `dht` (optional) has the shape of the state in the call's layout.
    pub fn backward(&self, saved: &Saved, d_o: &Tensor, dht: Option<&Tensor>) -> Result<Grads> {
        let meta = InputsMeta {
            q: Some(saved.q.meta()),
            k: Some(saved.k.meta()),
            v: Some(saved.v.meta()),
            g: Some(saved.g.meta()),
            beta: Some(saved.beta.meta()),
            h0: saved.h0.as_ref().map(Tensor::meta),
            mask: saved.mask.as_ref().map(Tensor::meta),
            d_o: Some(d_o.meta()),
            dht: dht.map(Tensor::meta),
        };
        let p = Problem::new(&meta, saved.cu_seqlens.as_deref(), &saved.opts, true)?;
        if let Some((chunk, a)) = &saved.chunked {
            return super::chunked_backward::backward(self, &p, saved, a, d_o, dht, *chunk);
        }
        let d = p.dims;
        let n = p.n_seqs();
        let accum = self.backward_accum(&p);
        if accum == Accum::F32Atomic && !self.gpu.caps.f32_atomic {
            return Err(Error::MissingFeature("SHADER_FLOAT32_ATOMIC (for Accum::F32Atomic)".into()));
        }
        let tiles = self.recurrent_tiles(&p)?.for_backward(d.k);
        // The backward walks a whole sequence in one dispatch; a software driver's loop limiter
        // (llvmpipe: 65535 loop iterations per invocation) would end it early, silently.
        let limit = self.gpu.max_backward_tokens(tiles.kt, tiles.reduce);
        if p.seqs.max_len() > limit {
            return Err(Error::Unsupported(format!(
                "backward of a {}-token sequence on this adapter: at most {limit} tokens per sequence \
                 (its shader loop limit); use a hardware GPU",
                p.seqs.max_len()
            )));
        }
        let v_tiles = d.v as u32 / tiles.bv;
        let wg = tiles.kt * tiles.bv;
        let every = saved.every as u32;

        // Results, in the caller's shapes.
        let g_shape = saved.g.shape().to_vec();
        let dq = self.output("dq", &[d.b, d.t, d.h, d.k])?;
        let dk = self.output("dk", &[d.b, d.t, d.h, d.k])?;
        let dv = self.output("dv", &[d.b, d.t, d.hv, d.v])?;
        let dg = self.output("dg", &g_shape)?;
        let dbeta = self.output("dbeta", &[d.b, d.t, d.hv])?;
        let dh0 = if p.has_h0 { Some(self.output("dh0", &p.state_shape())?) } else { None };

        // Accumulator regions dq | dk | dg | dbeta; in deterministic mode each is `slices` copies.
        let qk_len = (d.rows() * d.h * d.k) as u64;
        let g_len = match p.gate {
            GateKind::Scalar => d.rows() * d.hv,
            GateKind::PerKey => d.rows() * d.hv * d.k,
        } as u64;
        let b_len = (d.rows() * d.hv) as u64;
        let (qk_slices, hv_slices) = match accum {
            Accum::Deterministic => ((d.group() as u32 * v_tiles) as u64, v_tiles as u64),
            _ => (1, 1),
        };
        let dq_off = 0u64;
        let dk_off = qk_slices * qk_len;
        let dg_off = 2 * qk_slices * qk_len;
        let dbeta_off = dg_off + hv_slices * g_len;
        let acc_len = dbeta_off + hv_slices * b_len;
        for (name, x) in [("dq_off", dk_off), ("acc", acc_len)] {
            if x > u32::MAX as u64 / 2 {
                return Err(Error::TooLarge {
                    name: format!("backward accumulator ({name})"),
                    bytes: 4 * x,
                    limit_name: "32-bit indexing",
                    limit: 2 << 31,
                });
            }
        }

        // Replay scratch per sequence: HV * V tiles workgroups, each C states of KR * WG floats.
        let per_seq = d.hv as u64 * v_tiles as u64 * every as u64 * (tiles.kr * wg) as u64 * 4;
        let dh0_len = if p.has_h0 { (n * d.hv * d.k * d.v) as u64 } else { 0 };
        let budget = WORK_BUDGET.min(self.gpu.caps.max_binding).saturating_sub(4 * dh0_len);
        let batch = ((budget / per_seq.max(1)) as usize).clamp(1, n.max(1));
        let hist_len = batch as u64 * per_seq / 4;

        let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC;
        let mut graph = self.graph();
        // No slots: the seq offsets start at info[0], where recurrent_bwd.wgsl reads them.
        let (info, seq_off, mask_off) = record_info(&mut graph, &p, saved.mask.as_ref(), None)?;
        debug_assert_eq!(seq_off, 0);
        let acc = graph.scratch("wgdelta.bwd.acc", 4 * acc_len, usage)?;
        graph.clear(&acc, 4 * acc_len);
        let work = graph.scratch("wgdelta.bwd.work", 4 * (hist_len + dh0_len), usage)?;

        let spec =
            BackwardSpec { tiles, accum, every, do_dtype: d_o.dtype(), dht: dht.map(Tensor::dtype), dh0: p.has_h0 };
        let key = spec.key(&p);
        let max = self.gpu.caps.max_workgroups_per_dim;
        let dht_buf = dht.map(|t| &t.buffer).unwrap_or(&self.dummy_read);
        let mut base = 0;
        while base < n {
            let count = batch.min(n - base);
            let gy = (count as u32).clamp(1, max);
            let gz = (count as u32).div_ceil(gy);
            let params = Params {
                n_seqs: count as u32,
                seq_base: base as u32,
                mask_off,
                wg_per_row: gy,
                scale: p.scale,
                ck_blocks: saved.checkpoints.shape()[2] as u32,
                dh0_off: hist_len as u32,
                qk_len: qk_len as u32,
                g_len: g_len as u32,
                b_len: b_len as u32,
                dq_off: dq_off as u32,
                dk_off: dk_off as u32,
                dg_off: dg_off as u32,
                dbeta_off: dbeta_off as u32,
                _pad: [0; 2],
            };
            let ubuf = graph.upload("wgdelta.bwd.params", bytemuck::bytes_of(&params))?;
            let mut bufs = common_bindings(&ubuf, &saved.inputs(), &info);
            bufs.extend([&d_o.buffer, dht_buf, &saved.checkpoints.buffer, &dv.buffer, &work, &acc].map(whole));
            graph.dispatch_ranges(&key, &bufs, [v_tiles * d.hv as u32, gy, gz])?;
            base += count;
        }

        // Sum the slices (deterministic) or copy the sums out (atomics).
        let regions =
            [(&dq, dq_off, qk_slices, qk_len), (&dk, dk_off, qk_slices, qk_len), (&dg, dg_off, hv_slices, g_len)];
        for (t, off, slices, len) in regions.into_iter().chain([(&dbeta, dbeta_off, hv_slices, b_len)]) {
            if accum == Accum::Deterministic {
                let rp = ReduceParams { len: len as u32, slices: slices as u32, off: off as u32, _pad: 0 };
                let ubuf = graph.upload("wgdelta.reduce.params", bytemuck::bytes_of(&rp))?;
                let groups = (len as u32).div_ceil(REDUCE_WG);
                let gx = groups.clamp(1, max);
                graph.dispatch_ranges(
                    &reduce_partials_key(),
                    &[ubuf.binding(), whole(&acc), whole(&t.buffer)],
                    [gx, groups.div_ceil(gx), 1],
                )?;
            } else {
                graph.copy(&acc, 4 * off, &t.buffer, 0, 4 * len);
            }
        }
        if let Some(t) = &dh0 {
            graph.copy(&work, 4 * hist_len, &t.buffer, 0, 4 * dh0_len);
        }
        self.submit(graph)?;
        Ok(Grads { dq, dk, dv, dg, dbeta, dh0 })
    }
}
