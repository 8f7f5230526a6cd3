//! Decode against a persistent state pool: `Engine::decode` updates the named slots in place, leaves
//! every other slot bit-identical, matches the float64 reference, and streaming T single-token calls
//! equal one forward over T tokens. Errors leave the pool untouched.
mod common;
use common::*;
use wgdelta::*;

/// A decode scenario: a case (its `h0` is replaced by the pool slots) plus a pool and slots.
struct Scenario {
    case: Case,
    pool_slots: usize,
    slots: Vec<i64>,
}

impl Scenario {
    fn per_slot(&self) -> [usize; 3] {
        let c = &self.case;
        match c.opts.state_layout {
            StateLayout::Kv => [c.hv, c.k, c.v],
            StateLayout::Vk => [c.hv, c.v, c.k],
        }
    }
    fn slot_len(&self) -> usize {
        self.per_slot().iter().product()
    }
    /// A random pool `[P, ...]`, F32.
    fn pool(&self) -> HostTensor {
        let [a, b, c] = self.per_slot();
        let mut rng = Rng::new(self.case.seed ^ 0xdec0de);
        let vals: Vec<f64> = rng.normals(self.pool_slots * self.slot_len()).iter().map(|x| 0.5 * x).collect();
        HostTensor::from_f64(&[self.pool_slots, a, b, c], &vals, DType::F32)
    }
    /// The case's data with `h0[n]` = `pool[slots[n]]`.
    fn data(&self, pool: &HostTensor) -> CaseData {
        assert!(self.case.h0, "scenario cases carry h0 = true for the reference");
        let mut d = self.case.data();
        let sl = self.slot_len() * 4;
        let mut bytes = Vec::with_capacity(self.slots.len() * sl);
        for &s in &self.slots {
            bytes.extend_from_slice(&pool.bytes[s as usize * sl..(s as usize + 1) * sl]);
        }
        let h0 = d.h0.as_mut().unwrap();
        assert_eq!(h0.bytes.len(), bytes.len(), "h0 is N slots");
        h0.bytes = bytes;
        d
    }
}

/// Runs a decode scenario against the reference; returns (o error, slot error) after asserting
/// that untouched slots are bit-identical.
fn run(e: &Engine, s: &Scenario) -> (f64, f64) {
    let c = &s.case;
    let pool_h = s.pool();
    let d = s.data(&pool_h);
    let dev = d.upload(e);
    let pool = e.upload("pool", &pool_h).unwrap();
    let mut x = dev.inputs(c.cu_seqlens.as_deref());
    x.h0 = None;
    let o = e.decode(&x, &pool, &s.slots, &c.opts).unwrap_or_else(|err| panic!("{}: {err}", c.label()));
    assert_eq!(o.shape(), &[c.b, c.t, c.hv, c.v]);
    let o = e.download(&o).unwrap().to_f32();
    let after = e.download(&pool).unwrap();
    let r = reference_forward(c, &d);
    let eo = rel_err(&o, &r.o);
    let sl = s.slot_len();
    let after_f = after.to_f32();
    let mut got = Vec::new();
    for &slot in &s.slots {
        got.extend_from_slice(&after_f[slot as usize * sl..(slot as usize + 1) * sl]);
    }
    let eh = rel_err(&got, &r.ht);
    let mut named = vec![false; s.pool_slots];
    for &slot in &s.slots {
        named[slot as usize] = true;
    }
    let mut untouched = 0;
    for (p, _) in named.iter().enumerate().filter(|(_, &n)| !n) {
        let range = p * sl * 4..(p + 1) * sl * 4;
        assert!(after.bytes[range.clone()] == pool_h.bytes[range], "{}: untouched slot {p} changed", c.label());
        untouched += 1;
    }
    let tol = fwd_tol(c.dtype);
    println!(
        "[decode] P={} slots={:?} {}: o {eo:.2e} slots {eh:.2e} (tol {tol:.0e}); {untouched} untouched slots bit-identical",
        s.pool_slots,
        if s.slots.len() > 8 { s.slots[..8].to_vec() } else { s.slots.clone() },
        c.label()
    );
    assert!(eo <= tol && eh <= tol, "{}: o err {eo:.3e}, slot err {eh:.3e} above {tol:.0e}", c.label());
    (eo, eh)
}

fn case(b: usize, t: usize, h: usize, hv: usize, k: usize, v: usize, opts: Options) -> Case {
    let mut c = Case::new(b, t, h, hv, k, v);
    c.h0 = true;
    c.opts = Options { output_final_state: true, ..opts };
    c
}

#[test]
fn pool_basic() {
    let e = engine();
    for (i, opts) in [Options::default(), Options::mlx()].into_iter().enumerate() {
        for t in [1, 3] {
            for (h, hv) in [(1, 1), (2, 4), (1, 4)] {
                let mut c = case(3, t, h, hv, 32, 16, opts);
                c.dtype = [DType::F32, DType::BF16, DType::F16][(i + t + hv) % 3];
                c.seed = (i * 100 + t * 10 + hv) as u64;
                run(e, &Scenario { case: c, pool_slots: 7, slots: vec![5, 0, 3] });
            }
        }
    }
}

#[test]
fn pool_wide_batch() {
    let e = engine();
    for (i, opts) in [Options::default(), Options::mlx()].into_iter().enumerate() {
        let t = 1 + 2 * i;
        let c = case(64, t, 1, 2, 64, 32, opts);
        let slots: Vec<i64> = (0..64).map(|r| (r * 37 + 11) % 80).collect();
        run(e, &Scenario { case: c, pool_slots: 80, slots });
    }
}

#[test]
fn pool_head_dims_and_gates() {
    let e = engine();
    // K > 64 (workgroup reduction), per-key gate, non-square state in vk layout, mask.
    let mut c = case(2, 3, 1, 2, 128, 32, Options::mlx());
    c.gate = GateKind::PerKey;
    run(e, &Scenario { case: c, pool_slots: 4, slots: vec![3, 1] });
    let mut c = case(4, 3, 2, 2, 16, 64, Options::default());
    c.mask = true;
    run(e, &Scenario { case: c, pool_slots: 5, slots: vec![4, 2, 0, 1] });
    let c = case(1, 1, 1, 1, 256, 16, Options::default());
    run(e, &Scenario { case: c, pool_slots: 2, slots: vec![1] });
    // The workgroup-memory fallback as well.
    let c = case(3, 2, 1, 4, 32, 32, Options::mlx());
    run(engine_no_subgroups(), &Scenario { case: c, pool_slots: 7, slots: vec![6, 2, 4] });
}

/// Consecutive slots (one sequence always) are bound as a range of the pool instead of read per
/// row: the range's neighbours stay bit-identical and the result matches.
#[test]
fn pool_slot_ranges() {
    let e = engine();
    run(e, &Scenario { case: case(1, 1, 2, 4, 32, 32, Options::default()), pool_slots: 6, slots: vec![3] });
    run(e, &Scenario { case: case(3, 2, 1, 2, 64, 16, Options::mlx()), pool_slots: 7, slots: vec![2, 3, 4] });
    let mut c = case(1, 4, 1, 2, 32, 32, Options::default());
    c.cu_seqlens = Some(vec![0, 1, 3, 4]);
    run(e, &Scenario { case: c, pool_slots: 5, slots: vec![1, 2, 3] });
}

/// q, k, v, g, beta of each of the first `t` tokens of `d`, uploaded as one-token tensors.
fn token_inputs(e: &Engine, d: &CaseData, t: usize) -> Vec<[Tensor; 5]> {
    (0..t)
        .map(|step| {
            let up = |name: &str, x: &HostTensor| e.upload(name, &slice_tokens(x, step, step + 1)).unwrap();
            [up("q", &d.q), up("k", &d.k), up("v", &d.v), up("g", &d.g), up("beta", &d.beta)]
        })
        .collect()
}

/// Many calls in one batch share the upload buffer of small parameters and tables (several of its
/// 64 KiB buffers fill up): each call keeps its own scale and slots, so the batched outputs and
/// pool equal the unbatched ones bit for bit.
#[test]
fn batch_of_many_calls_keeps_each_calls_uploads() {
    let e = engine();
    let steps = 300;
    let c = case(2, steps, 1, 2, 16, 16, Options::default());
    let s = Scenario { case: c.clone(), pool_slots: 4, slots: vec![3, 1] };
    let pool_h = s.pool();
    let d = s.data(&pool_h);
    let per_step = token_inputs(e, &d, steps);
    let slots = [vec![3, 1], vec![0, 2], vec![2, 3]];
    let run_all = |pool: &Tensor| -> Result<Vec<Tensor>> {
        (0..steps)
            .map(|i| {
                let st = &per_step[i];
                let opts = Options { scale: Some(0.25 + 0.001 * i as f32), ..c.opts };
                e.decode(&Inputs::new(&st[0], &st[1], &st[2], &st[3], &st[4]), pool, &slots[i % 3], &opts)
            })
            .collect()
    };
    let pool_a = e.upload("pool", &pool_h).unwrap();
    let outs_a = run_all(&pool_a).unwrap();
    let pool_b = e.upload("pool", &pool_h).unwrap();
    let outs_b = e.batch(|| run_all(&pool_b)).unwrap();
    for (i, (a, b)) in outs_a.iter().zip(&outs_b).enumerate() {
        assert!(e.download(a).unwrap().bytes == e.download(b).unwrap().bytes, "call {i}: batched o differs");
    }
    assert!(e.download(&pool_a).unwrap().bytes == e.download(&pool_b).unwrap().bytes, "batched pool differs");
    println!("[decode] {steps} calls in one batch equal the unbatched calls");
}

/// Decode of more tokens than one dispatch runs (several segments, in place on the pool).
#[test]
fn pool_segments() {
    let e = engine();
    let seg = e.gpu().max_tokens_per_dispatch();
    for (t, opts) in [(seg + 3, Options::default()), (2 * seg + 1, Options::mlx())] {
        let c = case(2, t, 1, 2, 16, 16, opts);
        run(e, &Scenario { case: c, pool_slots: 5, slots: vec![3, 0] });
    }
}

/// More sequences than the grid's y extent: they spill into z (sequence n = wid.y + wid.z * MAX_Y,
/// MAX_Y the device's grid limit) and the overhanging workgroups of the last z layer exit.
#[test]
fn pool_grid_spills_to_z() {
    let e = engine();
    let max = e.gpu().caps().max_workgroups_per_dim as usize;
    if max > 1 << 17 {
        println!("[decode] grid limit {max}: too many sequences to spill into z here, skipped");
        return;
    }
    let b = max + 3;
    let c = case(b, 1, 1, 1, 16, 16, Options::default());
    // Distinct slots in reverse order; slots 0 and 1 stay untouched.
    let slots: Vec<i64> = (0..b).map(|r| (b + 1 - r) as i64).collect();
    run(e, &Scenario { case: c, pool_slots: b + 2, slots });
}

/// Decode of packed sequences (cu_seqlens, B = 1) including an empty one: each sequence reads and
/// writes its own slot; the empty sequence's slot is rewritten with its own value.
#[test]
fn pool_cu_seqlens() {
    let e = engine();
    for opts in [Options::default(), Options::mlx()] {
        let mut c = case(1, 4, 1, 2, 32, 32, opts);
        c.cu_seqlens = Some(vec![0, 1, 3, 3, 4]);
        run(e, &Scenario { case: c, pool_slots: 8, slots: vec![2, 6, 0, 4] });
    }
}

/// T decode calls of one token each equal one forward over the T tokens (o per token and the final
/// slots), and both match the reference.
#[test]
fn streaming_equals_forward() {
    let e = engine();
    for (opts, dtype) in [(Options::default(), DType::F32), (Options::mlx(), DType::BF16)] {
        let t = 12;
        let mut c = case(3, t, 1, 2, 32, 32, opts);
        c.dtype = dtype;
        let s = Scenario { case: c.clone(), pool_slots: 5, slots: vec![4, 1, 2] };
        let pool_h = s.pool();
        let d = s.data(&pool_h);
        // One forward over all tokens from h0 = the slots.
        let dev = d.upload(e);
        let full = e.forward(&dev.inputs(None), &c.opts).unwrap();
        let o_full = e.download(&full.o).unwrap().to_f32();
        let ht_full = e.download(full.ht.as_ref().unwrap()).unwrap().to_f32();
        // T single-token decode calls against the pool.
        let pool = e.upload("pool", &pool_h).unwrap();
        let row = c.hv * c.v;
        let mut o_stream = vec![f32::NAN; c.b * t * row];
        for step in 0..t {
            let up = |name: &str, x: &HostTensor| e.upload(name, &slice_tokens(x, step, step + 1)).unwrap();
            let (q, k, v, g, beta) = (up("q", &d.q), up("k", &d.k), up("v", &d.v), up("g", &d.g), up("beta", &d.beta));
            let o = e.decode(&Inputs::new(&q, &k, &v, &g, &beta), &pool, &s.slots, &c.opts).unwrap();
            let o = e.download(&o).unwrap().to_f32();
            for b in 0..c.b {
                o_stream[(b * t + step) * row..(b * t + step + 1) * row].copy_from_slice(&o[b * row..(b + 1) * row]);
            }
        }
        let after = e.download(&pool).unwrap().to_f32();
        let sl = s.slot_len();
        let mut ht_stream = Vec::new();
        for &slot in &s.slots {
            ht_stream.extend_from_slice(&after[slot as usize * sl..(slot as usize + 1) * sl]);
        }
        let f64s = |x: &[f32]| x.iter().map(|&y| y as f64).collect::<Vec<f64>>();
        let eo = rel_err(&o_stream, &f64s(&o_full));
        let eh = rel_err(&ht_stream, &f64s(&ht_full));
        let bitwise = o_stream == o_full && ht_stream == ht_full;
        let r = reference_forward(&c, &d);
        let (ro, rh) = (rel_err(&o_stream, &r.o), rel_err(&ht_stream, &r.ht));
        println!(
            "[stream] {}: stream vs forward o {eo:.2e} ht {eh:.2e} (bitwise equal: {bitwise}); vs reference o {ro:.2e} ht {rh:.2e}",
            c.label()
        );
        assert!(eo <= 1e-6 && eh <= 1e-6, "streaming decode differs from forward: o {eo:.3e} ht {eh:.3e}");
        let tol = fwd_tol(dtype);
        assert!(ro <= tol && rh <= tol, "streaming decode vs reference: o {ro:.3e} ht {rh:.3e}");
        // Untouched slots (0 and 3) are exactly the originals.
        for p in [0usize, 3] {
            assert_eq!(&after[p * sl..(p + 1) * sl], &pool_h.to_f32()[p * sl..(p + 1) * sl], "slot {p} changed");
        }
    }
}

/// Bad slots, a given h0, bad pools: typed errors, and the pool is left bit-identical.
#[test]
fn errors_leave_pool_untouched() {
    let e = engine();
    let c = case(3, 1, 1, 2, 32, 16, Options::default());
    let s = Scenario { case: c.clone(), pool_slots: 7, slots: vec![5, 0, 3] };
    let pool_h = s.pool();
    let d = s.data(&pool_h);
    let dev = d.upload(e);
    let pool = e.upload("pool", &pool_h).unwrap();
    let mut x = dev.inputs(None);
    x.h0 = None;
    let unchanged = |what: &str| {
        let now = e.download(&pool).unwrap();
        assert!(now.bytes == pool_h.bytes, "{what}: pool changed after an error");
    };

    for (slots, row, index) in [(vec![5i64, -1, 3], 1usize, -1i64), (vec![7, 0, 3], 0, 7), (vec![5, 0, 100], 2, 100)] {
        let r = e.decode(&x, &pool, &slots, &c.opts);
        println!("[decode errors] slots {slots:?}: {:?}", r.as_ref().err());
        assert!(
            matches!(r, Err(Error::SlotOutOfRange { row: rr, index: ii, slots: 7 }) if rr == row && ii == index),
            "slots {slots:?}: {r:?}"
        );
        unchanged("slot out of range");
    }
    let r = e.decode(&x, &pool, &[i64::MIN, 0, 1], &c.opts);
    assert!(matches!(r, Err(Error::SlotOutOfRange { .. })), "i64::MIN slot: {r:?}");

    let r = e.decode(&x, &pool, &[5, 0, 5], &c.opts);
    println!("[decode errors] duplicate slot: {:?}", r.as_ref().err());
    assert!(matches!(r, Err(Error::Option { name: "slots", .. })), "duplicate slots: {r:?}");
    unchanged("duplicate slots");

    let r = e.decode(&x, &pool, &[5, 0], &c.opts);
    assert!(matches!(r, Err(Error::Shape { name: "slots", .. })), "too few slots: {r:?}");
    let r = e.decode(&x, &pool, &[5, 0, 3, 1], &c.opts);
    assert!(matches!(r, Err(Error::Shape { name: "slots", .. })), "too many slots: {r:?}");
    unchanged("slot count");

    let h0 = dev.h0.as_ref().unwrap();
    let r = e.decode(&x.with_h0(h0), &pool, &s.slots, &c.opts);
    println!("[decode errors] h0 given: {:?}", r.as_ref().err());
    assert!(matches!(r, Err(Error::Option { name: "h0", .. })), "h0 given: {r:?}");
    unchanged("h0 given");

    // The pool in the other layout ([P, HV, V, K] for a kv call with K != V).
    let r = e.decode(&x, &pool, &s.slots, &Options { state_layout: StateLayout::Vk, ..c.opts });
    println!("[decode errors] pool in the wrong layout: {:?}", r.as_ref().err());
    assert!(matches!(r, Err(Error::Shape { name: "pool", .. })), "wrong layout: {r:?}");
    unchanged("wrong layout");

    // Wrong rank, wrong head count, wrong dtype.
    let flat = e.upload("pool3", &HostTensor::from_f32(&[7, 2, 512], &vec![0.0; 7 * 2 * 512])).unwrap();
    let r = e.decode(&x, &flat, &s.slots, &c.opts);
    assert!(matches!(r, Err(Error::Shape { name: "pool", .. })), "rank-3 pool: {r:?}");
    let heads = e.upload("pool_hv", &HostTensor::from_f32(&[7, 1, 32, 16], &vec![0.0; 7 * 512])).unwrap();
    let r = e.decode(&x, &heads, &s.slots, &c.opts);
    assert!(matches!(r, Err(Error::Shape { name: "pool", .. })), "pool with HV=1: {r:?}");
    let half = e.upload("pool_f16", &HostTensor::from_f64(&[7, 2, 32, 16], &vec![0.0; 7 * 1024], DType::F16)).unwrap();
    let r = e.decode(&x, &half, &s.slots, &c.opts);
    println!("[decode errors] F16 pool: {:?}", r.as_ref().err());
    assert!(matches!(r, Err(Error::DType { name: "pool", .. })), "F16 pool: {r:?}");

    // Input validation runs first too (k with the wrong K).
    let kbad = e.upload("kbad", &HostTensor::from_f32(&[3, 1, 1, 16], &[0.0; 48])).unwrap();
    let r = e.decode(&Inputs { k: &kbad, ..x }, &pool, &s.slots, &c.opts);
    assert!(matches!(r, Err(Error::Shape { name: "k", .. })), "bad k: {r:?}");
    unchanged("bad k");

    // After all that, a good call still works and matches.
    let o = e.decode(&x, &pool, &s.slots, &c.opts).unwrap();
    let o = e.download(&o).unwrap().to_f32();
    let r = reference_forward(&c, &d);
    let eo = rel_err(&o, &r.o);
    println!("[decode errors] good call afterwards: o {eo:.2e}");
    assert!(eo <= 1e-4);
}

/// `Engine::batch`: T decode calls recorded into one submission give bit-identical outputs and
/// pool to the same calls submitted one by one; a download inside the batch sees the calls recorded
/// before it; a failing call inside the batch returns its error and the calls before it still run;
/// `Profile::Submission` times the batch as one span.
#[test]
fn batch_equals_unbatched() {
    let gpu = engine().gpu().clone();
    let e = Engine::with_settings(
        gpu.clone(),
        Settings { profile: Profile::Submission, poison_outputs: Some(true), ..Default::default() },
    );
    let t = 6;
    let c = case(2, t, 1, 2, 32, 16, Options::default());
    let s = Scenario { case: c.clone(), pool_slots: 4, slots: vec![3, 1] };
    let pool_h = s.pool();
    let d = s.data(&pool_h);
    let steps = token_inputs(&e, &d, t);
    fn inputs(st: &[Tensor; 5]) -> Inputs<'_> {
        Inputs::new(&st[0], &st[1], &st[2], &st[3], &st[4])
    }
    let run_all = |pool: &Tensor| -> Result<Vec<Tensor>> {
        steps.iter().map(|st| e.decode(&inputs(st), pool, &s.slots, &c.opts)).collect()
    };

    let pool_a = e.upload("pool", &pool_h).unwrap();
    let outs_a: Vec<Tensor> = run_all(&pool_a).unwrap();
    e.take_profiles().unwrap();
    let pool_b = e.upload("pool", &pool_h).unwrap();
    let (outs_b, mid) = e
        .batch(|| {
            let outs: Vec<Tensor> = run_all(&pool_b)?;
            // Read inside the batch: the recorded calls are submitted first.
            let mid = e.download(&pool_b)?;
            Ok((outs, mid))
        })
        .unwrap();
    let profiles = e.take_profiles().unwrap();
    let pool_a_h = e.download(&pool_a).unwrap();
    assert!(mid.bytes == pool_a_h.bytes, "download inside a batch did not see the recorded calls");
    for (i, (a, b)) in outs_a.iter().zip(&outs_b).enumerate() {
        assert!(e.download(a).unwrap().bytes == e.download(b).unwrap().bytes, "step {i}: batched o differs");
    }
    assert!(e.download(&pool_b).unwrap().bytes == pool_a_h.bytes, "batched pool differs");
    if gpu.caps().timestamp {
        // The calls before the download form one submission, timed as one span.
        assert_eq!(profiles.len(), 1, "{profiles:?}");
        assert_eq!(profiles[0].len(), 1, "{profiles:?}");
        assert!(profiles[0][0].ns > 0.0, "{profiles:?}");
    }

    // A failing call inside a batch: its error comes back; the call before it still ran.
    let pool_c = e.upload("pool", &pool_h).unwrap();
    let r = e.batch(|| {
        e.decode(&inputs(&steps[0]), &pool_c, &s.slots, &c.opts)?;
        e.decode(&inputs(&steps[1]), &pool_c, &[9, 1], &c.opts)
    });
    assert!(matches!(r, Err(Error::SlotOutOfRange { index: 9, .. })), "{r:?}");
    let after = e.download(&pool_c).unwrap();
    assert!(after.bytes != pool_h.bytes, "the call recorded before the failing one did not run");
}
