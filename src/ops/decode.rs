//! Decode: a few tokens for many sequences against a persistent state pool, updated in place.
//! Row n of the batch (or sequence n with `cu_seqlens`) reads and writes pool slot `slots[n]`;
//! every other slot is left bit-identical.

use super::recurrent::{record, StateIo};
use super::Inputs;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::kernels::recurrent::StateSrc;
use crate::problem::{DType, Options, Problem, StateLayout};
use crate::tensor::Tensor;

impl Engine {
    /// Runs the recurrence for each sequence of `x` starting from `pool[slots[n]]` and writes the
    /// final state back to the same slot. `pool` is `[P, HV, K, V]` (kv) or `[P, HV, V, K]` (vk), F32.
    /// Returns `o`. `x.h0` must be `None` (the pool is the state); slots must be distinct.
    pub fn decode(&self, x: &Inputs, pool: &Tensor, slots: &[i64], opts: &Options) -> Result<Tensor> {
        if x.h0.is_some() {
            return Err(Error::Option {
                name: "h0",
                why: "decode reads its state from the pool; pass h0 = None".into(),
            });
        }
        let p = Problem::new(&x.meta(), x.cu_seqlens, opts, false)?;
        let d = &p.dims;
        let n = p.n_seqs();
        if pool.dtype() != DType::F32 {
            return Err(Error::DType { name: "pool", got: pool.dtype(), expected: "F32".into() });
        }
        let per_slot = match p.state_layout {
            StateLayout::Kv => [d.hv, d.k, d.v],
            StateLayout::Vk => [d.hv, d.v, d.k],
        };
        if pool.shape().len() != 4 || pool.shape()[1..] != per_slot {
            return Err(Error::Shape {
                name: "pool",
                got: pool.shape().to_vec(),
                expected: format!("[P, {}, {}, {}]", per_slot[0], per_slot[1], per_slot[2]),
            });
        }
        if slots.len() != n {
            return Err(Error::Shape {
                name: "slots",
                got: vec![slots.len()],
                expected: format!("[{n}] (one per sequence)"),
            });
        }
        let n_slots = pool.shape()[0];
        let mut seen = vec![false; n_slots];
        let mut idx = Vec::with_capacity(n);
        for (row, &s) in slots.iter().enumerate() {
            if s < 0 || s as usize >= n_slots {
                return Err(Error::SlotOutOfRange { row, index: s, slots: n_slots });
            }
            if std::mem::replace(&mut seen[s as usize], true) {
                return Err(Error::Option { name: "slots", why: format!("slot {s} is named twice (row {row})") });
            }
            idx.push(s as u32);
        }
        let o = self.output("o", &[d.b, d.t, d.hv, d.v])?;
        let mut graph = self.graph();
        let io = StateIo {
            src: StateSrc::InPlace,
            h0: None,
            state: Some(&pool.buffer),
            store: true,
            slots: Some(&idx),
            ckpt: None,
        };
        record(self, &mut graph, &p, x, &o, io)?;
        self.submit(graph)?;
        Ok(o)
    }
}
