//! Every bad input returns its typed error before any GPU work: validation through `Problem::new`
//! on shapes alone (no device), a selection through `Engine::forward` with real tensors (no device
//! error surfaces, no scratch memory is touched), and size limits through the device layer.
mod common;
use common::*;
use wgdelta::problem::{InputsMeta, TensorMeta};
use wgdelta::*;

const F32: DType = DType::F32;

fn tm(shape: &[usize], dtype: DType) -> Option<TensorMeta> {
    Some(TensorMeta::new(shape, dtype))
}

/// Valid metadata for `[B, T, H, K]` / `[B, T, HV, V]` in `dt`.
fn meta(b: usize, t: usize, h: usize, hv: usize, k: usize, v: usize, dt: DType) -> InputsMeta {
    InputsMeta {
        q: tm(&[b, t, h, k], dt),
        k: tm(&[b, t, h, k], dt),
        v: tm(&[b, t, hv, v], dt),
        g: tm(&[b, t, hv], dt),
        beta: tm(&[b, t, hv], dt),
        ..Default::default()
    }
}

fn base() -> InputsMeta {
    meta(2, 5, 2, 4, 32, 16, F32)
}

fn check(m: &InputsMeta, cu: Option<&[i64]>, opts: &Options) -> Result<Problem> {
    Problem::new(m, cu, opts, false)
}

/// Asserts `r` is an error matching `pat`, printing it.
macro_rules! expect_err {
    ($what:expr, $r:expr, $pat:pat $(if $guard:expr)?) => {{
        let r = $r;
        match &r {
            Err(e) => println!("{:<48} -> {e}", $what),
            Ok(_) => println!("{:<48} -> accepted (!)", $what),
        }
        assert!(matches!(r, Err($pat) $(if $guard)?), "{}: expected {}, got {:?}", $what, stringify!($pat), r.map(|_| ()));
    }};
}

/// The controls: valid inputs at the edges of every rule are accepted (so the error tests below
/// are not vacuous).
#[test]
fn valid_edges_accepted() {
    let d = Options::default();
    for (k, v) in [(16, 16), (256, 256), (16, 256), (192, 48)] {
        check(&meta(1, 3, 1, 1, k, v, F32), None, &d).unwrap();
    }
    for dt in [DType::F32, DType::F16, DType::BF16] {
        check(&meta(1, 3, 2, 8, 32, 32, dt), None, &d).unwrap();
    }
    // Empty sequence axis, per-key gate, gate/beta dtypes independent of q.
    check(&meta(2, 0, 1, 1, 16, 16, F32), None, &d).unwrap();
    let mut m = base();
    m.g = tm(&[2, 5, 4, 32], DType::BF16);
    m.beta = tm(&[2, 5, 4], DType::F16);
    let p = check(&m, None, &d).unwrap();
    assert_eq!(p.gate, GateKind::PerKey);
    // h0 in both layouts, masks in U8 and BOOL, cu_seqlens with empty sequences.
    let mut m = base();
    m.h0 = tm(&[2, 4, 32, 16], F32);
    check(&m, None, &d).unwrap();
    m.h0 = tm(&[2, 4, 16, 32], F32);
    check(&m, None, &Options::mlx()).unwrap();
    for md in [DType::U8, DType::Bool] {
        let mut m = base();
        m.mask = tm(&[2, 5], md);
        check(&m, None, &d).unwrap();
    }
    let mut m = meta(1, 9, 1, 1, 16, 16, F32);
    m.h0 = tm(&[4, 1, 16, 16], F32);
    let p = check(&m, Some(&[0, 0, 9, 9, 9]), &d).unwrap();
    assert_eq!(p.n_seqs(), 4);
    for chunk in [16, 32, 64] {
        check(&base(), None, &Options { algorithm: Algorithm::Chunked { chunk }, ..d }).unwrap();
    }
    check(&base(), None, &Options { scale: Some(0.0), ..d }).unwrap();
    check(&base(), None, &Options { scale: Some(-3.0), ..d }).unwrap();
}

#[test]
fn missing_tensors() {
    let d = Options::default();
    type Drop = fn(&mut InputsMeta);
    let cases: [(&str, Drop); 5] = [
        ("q", |m| m.q = None),
        ("k", |m| m.k = None),
        ("v", |m| m.v = None),
        ("g", |m| m.g = None),
        ("beta", |m| m.beta = None),
    ];
    for (name, drop) in cases {
        let mut m = base();
        drop(&mut m);
        let r = check(&m, None, &d);
        expect_err!(format!("missing {name}"), r, Error::Missing(n) if n == name);
    }
    // Backward needs `do`.
    let r = Problem::new(&base(), None, &d, true);
    expect_err!("backward without do", r, Error::Missing("do"));
    expect_err!("default InputsMeta", check(&InputsMeta::default(), None, &d), Error::Missing("q"));
}

#[test]
fn shapes_and_ranks() {
    let d = Options::default();
    let with = |f: &dyn Fn(&mut InputsMeta)| {
        let mut m = base();
        f(&mut m);
        check(&m, None, &d)
    };
    expect_err!("q rank 3", with(&|m| m.q = tm(&[2, 5, 64], F32)), Error::Shape { name: "q", .. });
    expect_err!("q rank 5", with(&|m| m.q = tm(&[2, 5, 2, 32, 1], F32)), Error::Shape { name: "q", .. });
    expect_err!("q with B = 0", with(&|m| m.q = tm(&[0, 5, 2, 32], F32)), Error::Shape { name: "q", .. });
    expect_err!("k with another K", with(&|m| m.k = tm(&[2, 5, 2, 48], F32)), Error::Shape { name: "k", .. });
    expect_err!("k with another T", with(&|m| m.k = tm(&[2, 6, 2, 32], F32)), Error::Shape { name: "k", .. });
    expect_err!("k with another H", with(&|m| m.k = tm(&[2, 5, 1, 32], F32)), Error::Shape { name: "k", .. });
    expect_err!("k rank 3", with(&|m| m.k = tm(&[2, 5, 64], F32)), Error::Shape { name: "k", .. });
    expect_err!("v with another B", with(&|m| m.v = tm(&[3, 5, 4, 16], F32)), Error::Shape { name: "v", .. });
    expect_err!("v with another T", with(&|m| m.v = tm(&[2, 4, 4, 16], F32)), Error::Shape { name: "v", .. });
    expect_err!("v rank 3", with(&|m| m.v = tm(&[2, 5, 64], F32)), Error::Shape { name: "v", .. });
    expect_err!("g [B, T]", with(&|m| m.g = tm(&[2, 5], F32)), Error::Shape { name: "g", .. });
    expect_err!("g [B, T, H] (H != HV)", with(&|m| m.g = tm(&[2, 5, 2], F32)), Error::Shape { name: "g", .. });
    expect_err!("g [B, T, HV, V] (V != K)", with(&|m| m.g = tm(&[2, 5, 4, 16], F32)), Error::Shape { name: "g", .. });
    expect_err!("g [B, T, HV, K, 1]", with(&|m| m.g = tm(&[2, 5, 4, 32, 1], F32)), Error::Shape { name: "g", .. });
    expect_err!("g with another T", with(&|m| m.g = tm(&[2, 4, 4], F32)), Error::Shape { name: "g", .. });
    expect_err!("beta [B, T, HV, 1]", with(&|m| m.beta = tm(&[2, 5, 4, 1], F32)), Error::Shape { name: "beta", .. });
    expect_err!("beta [B, T, H]", with(&|m| m.beta = tm(&[2, 5, 2], F32)), Error::Shape { name: "beta", .. });
    expect_err!(
        "beta [B, T, HV, K] (per-key beta)",
        with(&|m| m.beta = tm(&[2, 5, 4, 32], F32)),
        Error::Shape { name: "beta", .. }
    );
}

#[test]
fn dtypes() {
    let d = Options::default();
    let with = |f: &dyn Fn(&mut InputsMeta)| {
        let mut m = base();
        f(&mut m);
        check(&m, None, &d)
    };
    expect_err!("k F16 with q F32", with(&|m| m.k = tm(&[2, 5, 2, 32], DType::F16)), Error::DType { name: "k", .. });
    expect_err!("v BF16 with q F32", with(&|m| m.v = tm(&[2, 5, 4, 16], DType::BF16)), Error::DType { name: "v", .. });
    let mut m = meta(2, 5, 2, 4, 32, 16, DType::BF16);
    m.k = tm(&[2, 5, 2, 32], DType::F16);
    expect_err!("k F16 with q BF16", check(&m, None, &d), Error::DType { name: "k", .. });
    for bad in [DType::I32, DType::I64, DType::U8, DType::Bool] {
        expect_err!(
            format!("q, k, v {bad}"),
            check(&meta(2, 5, 2, 4, 32, 16, bad), None, &d),
            Error::DType { name: "q", .. }
        );
        expect_err!(format!("g {bad}"), with(&|m| m.g = tm(&[2, 5, 4], bad)), Error::DType { name: "g", .. });
        expect_err!(format!("beta {bad}"), with(&|m| m.beta = tm(&[2, 5, 4], bad)), Error::DType { name: "beta", .. });
    }
}

#[test]
fn heads_and_head_dims() {
    let d = Options::default();
    expect_err!("HV = 3, H = 2", check(&meta(1, 2, 2, 3, 32, 32, F32), None, &d), Error::HeadGroups { h: 2, hv: 3 });
    expect_err!("HV = 2, H = 4", check(&meta(1, 2, 4, 2, 32, 32, F32), None, &d), Error::HeadGroups { h: 4, hv: 2 });
    expect_err!("HV = 0", check(&meta(1, 2, 2, 0, 32, 32, F32), None, &d), Error::HeadGroups { h: 2, hv: 0 });
    expect_err!("H = 0", check(&meta(1, 2, 0, 2, 32, 32, F32), None, &d), Error::Shape { name: "q", .. });
    for k in [0, 8, 24, 100, 272, 512] {
        expect_err!(format!("K = {k}"), check(&meta(1, 2, 1, 1, k, 32, F32), None, &d), Error::HeadDim {
            which: "K",
            got
        } if got == k);
    }
    for v in [0, 8, 40, 300] {
        expect_err!(format!("V = {v}"), check(&meta(1, 2, 1, 1, 32, v, F32), None, &d), Error::HeadDim {
            which: "V",
            got
        } if got == v);
    }
}

#[test]
fn initial_state_and_mask() {
    let kv = Options::default();
    let vk = Options::mlx();
    let with = |f: &dyn Fn(&mut InputsMeta), o: &Options| {
        let mut m = base();
        f(&mut m);
        check(&m, None, o)
    };
    // base: B = 2, HV = 4, K = 32, V = 16.
    expect_err!(
        "h0 vk-shaped in a kv call",
        with(&|m| m.h0 = tm(&[2, 4, 16, 32], F32), &kv),
        Error::Shape { name: "h0", .. }
    );
    expect_err!(
        "h0 kv-shaped in a vk call",
        with(&|m| m.h0 = tm(&[2, 4, 32, 16], F32), &vk),
        Error::Shape { name: "h0", .. }
    );
    expect_err!(
        "h0 with N = 1 (B = 2)",
        with(&|m| m.h0 = tm(&[1, 4, 32, 16], F32), &kv),
        Error::Shape { name: "h0", .. }
    );
    expect_err!("h0 with HV = 2", with(&|m| m.h0 = tm(&[2, 2, 32, 16], F32), &kv), Error::Shape { name: "h0", .. });
    expect_err!("h0 rank 3", with(&|m| m.h0 = tm(&[2, 4, 512], F32), &kv), Error::Shape { name: "h0", .. });
    for (o, shape) in [(&kv, [2, 4, 32, 16]), (&vk, [2, 4, 16, 32])] {
        for bad in [DType::F16, DType::BF16, DType::I32] {
            expect_err!(
                format!("h0 {bad} ({:?})", o.state_layout),
                with(&|m| m.h0 = tm(&shape, bad), o),
                Error::DType { name: "h0", .. }
            );
        }
    }
    expect_err!("mask [B, T+1]", with(&|m| m.mask = tm(&[2, 6], DType::U8), &kv), Error::Shape { name: "mask", .. });
    expect_err!("mask [B*T]", with(&|m| m.mask = tm(&[10], DType::U8), &kv), Error::Shape { name: "mask", .. });
    expect_err!(
        "mask [B, T, HV]",
        with(&|m| m.mask = tm(&[2, 5, 4], DType::U8), &kv),
        Error::Shape { name: "mask", .. }
    );
    for bad in [DType::F32, DType::F16, DType::I32, DType::I64] {
        expect_err!(
            format!("mask {bad}"),
            with(&|m| m.mask = tm(&[2, 5], bad), &kv),
            Error::DType { name: "mask", .. }
        );
    }
}

#[test]
fn cu_seqlens_rules() {
    let d = Options::default();
    let m = meta(1, 10, 1, 1, 16, 16, F32);
    let bad: [(&str, &[i64]); 7] = [
        ("not starting at 0", &[1, 5, 10]),
        ("negative start", &[-1, 5, 10]),
        ("decreasing", &[0, 6, 4, 10]),
        ("not ending at T", &[0, 5, 9]),
        ("past T", &[0, 5, 11]),
        ("too short (one entry)", &[0]),
        ("empty", &[]),
    ];
    for (what, cu) in bad {
        expect_err!(format!("cu_seqlens {what} {cu:?}"), check(&m, Some(cu), &d), Error::CuSeqlens(_));
    }
    let r = check(&meta(2, 10, 1, 1, 16, 16, F32), Some(&[0, 5, 10]), &d);
    expect_err!("cu_seqlens with B = 2", r, Error::CuSeqlens(_));
    // h0 must have one state per sequence, not per batch row.
    let mut m2 = m.clone();
    m2.h0 = tm(&[1, 1, 16, 16], F32);
    expect_err!(
        "cu_seqlens (3 seqs) with h0 N = 1",
        check(&m2, Some(&[0, 2, 2, 10]), &d),
        Error::Shape { name: "h0", .. }
    );
}

#[test]
fn options() {
    let d = Options::default();
    for s in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let r = check(&base(), None, &Options { scale: Some(s), ..d });
        expect_err!(format!("scale {s}"), r, Error::Option { name: "scale", .. });
    }
    for chunk in [0, 1, 8, 48, 128, 256] {
        let r = check(&base(), None, &Options { algorithm: Algorithm::Chunked { chunk }, ..d });
        expect_err!(format!("chunk {chunk}"), r, Error::Option { name: "chunk", .. });
    }
    // Backward-only tensors.
    let mut m = base();
    m.d_o = tm(&[2, 5, 4, 32], F32);
    expect_err!("do with V = 32 (V = 16)", Problem::new(&m, None, &d, true), Error::Shape { name: "do", .. });
    m.d_o = tm(&[2, 5, 4, 16], DType::I32);
    expect_err!("do I32", Problem::new(&m, None, &d, true), Error::DType { name: "do", .. });
    m.d_o = tm(&[2, 5, 4, 16], F32);
    m.dht = tm(&[2, 4, 16, 32], F32);
    expect_err!("dht vk-shaped in a kv call", Problem::new(&m, None, &d, true), Error::Shape { name: "dht", .. });
}

/// Uploads a case's inputs; returns the host data and device tensors.
fn dev_case(e: &Engine, c: &Case) -> (CaseData, DevData) {
    let d = c.data();
    let dev = d.upload(e);
    (d, dev)
}

/// Errors through `Engine::forward` with real tensors: typed, and raised before any pass is
/// recorded (a fresh engine's scratch pool stays empty), and the engine works afterwards.
#[test]
fn through_forward() {
    let e = engine_with_tiles(None, true);
    let c = Case { h0: true, mask: true, ..Case::new(2, 6, 1, 2, 32, 16) };
    let (_, dev) = dev_case(&e, &c);
    let good = dev.inputs(None);
    let d = c.opts;
    let up = |name: &str, shape: &[usize], dt: DType| {
        let n = shape.iter().product();
        e.upload(name, &HostTensor::from_f64(shape, &vec![0.0; n], dt)).unwrap()
    };

    let k_bad = up("k", &[2, 6, 1, 48], F32);
    expect_err!(
        "forward: k with another K",
        e.forward(&Inputs { k: &k_bad, ..good }, &d),
        Error::Shape { name: "k", .. }
    );
    let v_bad = up("v", &[2, 5, 2, 16], F32);
    expect_err!(
        "forward: v with another T",
        e.forward(&Inputs { v: &v_bad, ..good }, &d),
        Error::Shape { name: "v", .. }
    );
    let v_half = up("v", &[2, 6, 2, 16], DType::F16);
    expect_err!(
        "forward: v F16 with q F32",
        e.forward(&Inputs { v: &v_half, ..good }, &d),
        Error::DType { name: "v", .. }
    );
    let g_bad = up("g", &[2, 6, 1], F32);
    expect_err!("forward: g [B, T, H]", e.forward(&Inputs { g: &g_bad, ..good }, &d), Error::Shape { name: "g", .. });
    let h0_vk = up("h0", &[2, 2, 16, 32], F32);
    expect_err!(
        "forward: h0 vk-shaped, kv call",
        e.forward(&Inputs { h0: Some(&h0_vk), ..good }, &d),
        Error::Shape { name: "h0", .. }
    );
    let h0_bf = up("h0", &[2, 2, 32, 16], DType::BF16);
    expect_err!(
        "forward: h0 BF16",
        e.forward(&Inputs { h0: Some(&h0_bf), ..good }, &d),
        Error::DType { name: "h0", .. }
    );
    let mask_f = up("mask", &[2, 6], F32);
    expect_err!(
        "forward: mask F32",
        e.forward(&Inputs { mask: Some(&mask_f), ..good }, &d),
        Error::DType { name: "mask", .. }
    );
    expect_err!(
        "forward: cu_seqlens with B = 2",
        e.forward(&good.with_cu_seqlens(&[0, 6, 12]), &d),
        Error::CuSeqlens(_)
    );
    expect_err!(
        "forward: scale NaN",
        e.forward(&good, &Options { scale: Some(f32::NAN), ..d }),
        Error::Option { name: "scale", .. }
    );
    expect_err!(
        "forward: chunk 24",
        e.forward(&good, &Options { algorithm: Algorithm::Chunked { chunk: 24 }, ..d }),
        Error::Option { name: "chunk", .. }
    );
    // The chunked algorithm takes a scalar gate only: a per-key gate forced onto it is a typed
    // Unsupported naming the gate, not a panic (Auto routes it to the recurrent kernel).
    let g_per_key = up("g", &[2, 6, 2, 32], F32);
    for chunk in [16, 32, 64] {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            e.forward(&Inputs { g: &g_per_key, ..good }, &Options { algorithm: Algorithm::Chunked { chunk }, ..d })
        }));
        let r = r.unwrap_or_else(|_| panic!("Algorithm::Chunked {{ chunk: {chunk} }} panicked"));
        expect_err!(format!("forward: Algorithm::Chunked {{ chunk: {chunk} }}"), r, Error::Unsupported(_));
    }
    // Decode through the same engine: validation before GPU work too.
    let pool = up("pool", &[3, 2, 32, 16], F32);
    let mut x = good;
    x.h0 = None;
    expect_err!("decode: slot 3 of 3", e.decode(&x, &pool, &[0, 3], &d), Error::SlotOutOfRange { .. });

    assert_eq!(e.scratch_bytes(), (0, 0), "an invalid call touched the scratch pool (GPU work was recorded)");

    // The engine is healthy: a valid call after all the errors works and matches.
    let (eo, eh) = forward_errors(&e, &c).unwrap();
    println!("valid call after the errors: o {eo:.2e} ht {:.2e}", eh.unwrap());
    assert!(eo <= 1e-4 && eh.unwrap() <= 1e-4);
    assert!(e.scratch_bytes().0 > 0);
}

/// Tensors larger than one storage binding: `Error::TooLarge` naming the limit, without allocating.
#[test]
fn too_large() {
    let e = engine();
    let caps = e.gpu().caps();
    println!("max_storage_buffer_binding_size = {} bytes, max_buffer_size = {}", caps.max_binding, caps.max_buffer);
    let big = 200u64 << 20;
    assert!(big > caps.max_binding, "the test assumes a binding limit below 200 MiB (llvmpipe: 128 MiB)");

    let r = e.gpu().check_size("big", big);
    expect_err!("check_size 200 MiB", r, Error::TooLarge { limit_name: "max_storage_buffer_binding_size", .. });
    let msg = e.gpu().check_size("big", big).unwrap_err().to_string();
    assert!(msg.contains("max_storage_buffer_binding_size") && msg.contains("big"), "message: {msg}");
    e.gpu().check_size("at the limit", caps.max_binding).unwrap();
    expect_err!("check_size limit + 1", e.gpu().check_size("x", caps.max_binding + 1), Error::TooLarge { .. });

    let r = e.gpu().empty("big", &[(big / 4) as usize], DType::F32);
    expect_err!("Gpu::empty 200 MiB F32", r, Error::TooLarge { limit_name: "max_storage_buffer_binding_size", .. });
    let r = e.gpu().empty("big16", &[(big / 2) as usize], DType::BF16);
    expect_err!("Gpu::empty 200 MiB BF16", r, Error::TooLarge { .. });

    // Through forward: tiny inputs, but a final state of 50 sequences x 16 heads x 256 x 256 f32
    // (200 MiB), by cu_seqlens with empty sequences.
    let (t, h, hv, k, v) = (1usize, 1usize, 16usize, 256usize, 256usize);
    let up = |name: &str, shape: &[usize]| {
        let n = shape.iter().product();
        e.upload(name, &HostTensor::from_f64(shape, &vec![0.01; n], DType::F32)).unwrap()
    };
    let (q, kk, vv) = (up("q", &[1, t, h, k]), up("k", &[1, t, h, k]), up("v", &[1, t, hv, v]));
    let (g, beta) = (up("g", &[1, t, hv]), up("beta", &[1, t, hv]));
    let mut cu = vec![0i64; 50];
    cu.push(1);
    let opts = Options { output_final_state: true, ..Options::default() };
    let r = e.forward(&Inputs::new(&q, &kk, &vv, &g, &beta).with_cu_seqlens(&cu), &opts);
    expect_err!("forward with a 200 MiB ht", r, Error::TooLarge { .. });
    // Without the final state the same call is fine.
    let out = e.forward(&Inputs::new(&q, &kk, &vv, &g, &beta).with_cu_seqlens(&cu), &Options::default()).unwrap();
    assert!(e.download(&out.o).unwrap().to_f32().iter().all(|x| x.is_finite()));
}
