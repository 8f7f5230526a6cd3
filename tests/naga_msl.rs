//! Every WGSL kernel, in every reduction variant, goes through naga the way wgpu's Metal and Vulkan
//! backends take it: WGSL front end, validation, override constants from real pipeline keys, then
//! MSL and SPIR-V. No GPU needed: this is what keeps the Metal path honest on a Linux machine.
use std::collections::BTreeMap;
use wgdelta::device::{Caps, CoopShape};
use wgdelta::kernels::backward::{reduce_partials_key, BackwardSpec};
use wgdelta::kernels::chunked::{ChunkSpec, ForwardPurpose};
use wgdelta::kernels::recurrent::{RecurrentSpec, StateSrc, Tiles};
use wgdelta::kernels::{assemble_mma, Accum, Kernel, PipelineKey, Reduce, MMA_TILES};
use wgdelta::problem::{InputsMeta, TensorMeta};
use wgdelta::{DType, GateKind, GateSpace, Options, Problem, StateLayout};

use naga::valid::{Capabilities, ShaderStages, SubgroupOperationSet, ValidationFlags, Validator};

/// A device description for `Tiles::choose`: Apple-like subgroups of 32, or none.
fn caps(subgroup: bool) -> Caps {
    Caps {
        f16: true,
        f64: false,
        subgroup,
        subgroup_min: if subgroup { 32 } else { 0 },
        subgroup_max: if subgroup { 32 } else { 0 },
        f32_atomic: false,
        timestamp: false,
        passthrough: false,
        coop_matrix: Vec::new(),
        max_binding: 1 << 30,
        max_buffer: 1 << 30,
        max_workgroup_storage: 32768,
        max_invocations: 1024,
        max_storage_buffers: 31,
        max_workgroups_per_dim: 65535,
    }
}

/// Capabilities every kernel may assume. `unpack2x16float` (the f16 loader in `wgsl/prelude.wgsl`)
/// needs SHADER_FLOAT16_IN_FLOAT32, i.e. wgpu's `DownlevelFlags::SHADER_F16_IN_F32`, which Vulkan on
/// Mesa lacks when the device has no `shaderFloat16` (see the issue-2 report).
/// What every kernel may assume: nothing optional (f16 is decoded with integer operations).
const BASE: Capabilities = Capabilities::empty();

fn validator(caps: Capabilities) -> Validator {
    let mut v = Validator::new(ValidationFlags::all(), caps);
    if caps.contains(Capabilities::SUBGROUP) {
        v.subgroup_stages(ShaderStages::COMPUTE);
        v.subgroup_operations(SubgroupOperationSet::all());
    }
    v
}

/// A validated problem: `[1, 4, H, K]`, `[1, 4, HV, V]` with the given options.
#[allow(clippy::too_many_arguments)]
fn problem(
    h: usize,
    hv: usize,
    k: usize,
    v: usize,
    dt: DType,
    gate: GateKind,
    opts: Options,
    mask: bool,
    h0: bool,
    varlen: bool,
) -> Problem {
    let (b, t) = (1, 4);
    let cu: &[i64] = &[0, 1, 4];
    let n = if varlen { 2 } else { b };
    let gshape: Vec<usize> = match gate {
        GateKind::Scalar => vec![b, t, hv],
        GateKind::PerKey => vec![b, t, hv, k],
    };
    let sshape = match opts.state_layout {
        StateLayout::Kv => [n, hv, k, v],
        StateLayout::Vk => [n, hv, v, k],
    };
    let m = InputsMeta {
        q: Some(TensorMeta::new(&[b, t, h, k], dt)),
        k: Some(TensorMeta::new(&[b, t, h, k], dt)),
        v: Some(TensorMeta::new(&[b, t, hv, v], dt)),
        g: Some(TensorMeta::new(&gshape, if dt == DType::BF16 { DType::F32 } else { dt })),
        beta: Some(TensorMeta::new(&[b, t, hv], dt)),
        h0: h0.then(|| TensorMeta::new(&sshape, DType::F32)),
        mask: mask.then(|| TensorMeta::new(&[b, t], DType::U8)),
        ..Default::default()
    };
    Problem::new(&m, varlen.then_some(cu), &opts, false).expect("valid problem")
}

/// Real pipeline keys of `kernel` in variant `reduce`, over head dims, dtypes, gates, conventions,
/// masks and state sources (what `ops::recurrent` would build), with a label each.
/// Representative specialisations of every kernel in one source variant.
fn keys(kernel: Kernel, reduce: Reduce, accum: Option<Accum>, tile: Option<u32>) -> Vec<(String, PipelineKey)> {
    match kernel {
        k if k.mma() => mma_keys(k, tile.expect("an mma kernel has a tile size")),
        Kernel::RecurrentFwd => recurrent_keys(reduce),
        Kernel::RecurrentBwd => backward_keys(reduce, accum.expect("the backward accumulates")),
        Kernel::ReducePartials => vec![("reduce_partials".into(), reduce_partials_key())],
        k if k.chunked() => chunked_keys(k),
        k => panic!("add {k:?}'s keys here"),
    }
}

fn chunked_keys(kernel: Kernel) -> Vec<(String, PipelineKey)> {
    let mut out = Vec::new();
    for (i, (k, v)) in [(16, 16), (64, 32), (128, 128), (256, 256)].into_iter().enumerate() {
        for chunk in [16, 32, 64] {
            let opts = if i % 2 == 0 { Options::default() } else { Options::mlx() };
            let dt = [DType::F32, DType::F16, DType::BF16][(i + chunk as usize / 16) % 3];
            let p = problem(1, 2, k, v, dt, GateKind::Scalar, opts, i == 1, i != 2, i == 3);
            let mut spec = ChunkSpec::choose(chunk, k, v);
            spec.w16 = i == 1; // the w/u pass writing the f16 operands (and the pack pass not)
            let key = if kernel.chunk_bwd() {
                spec.bwd_key(kernel, &p, dt, (i % 2 == 0).then_some(DType::BF16))
            } else {
                spec.key(kernel, &p)
            };
            if kernel == Kernel::ChunkKktSolve {
                // A backward's gates-only dispatch (the constant the dispatch adds to the key).
                let gates = key.clone().with_constant("SOLVE", 0.0);
                out.push((format!("K={k} V={v} chunk={chunk} {dt} {spec:?} SOLVE=false"), gates));
            }
            out.push((format!("K={k} V={v} chunk={chunk} {dt} {spec:?}"), key));
        }
    }
    out
}

/// Keys of a cooperative-matrix pass: the head dims and chunk sizes whose tiles fit, f16/bf16 inputs.
fn mma_keys(kernel: Kernel, tile: u32) -> Vec<(String, PipelineKey)> {
    // An adapter offering `tile` x `tile` f16 -> f32 tiles and 48 KiB of workgroup memory; the variants
    // are the forward's own choice (`ChunkSpec::for_forward`) for each purpose.
    let caps = Caps {
        coop_matrix: vec![CoopShape { m: tile, n: tile, k: tile, ab: "f16", cr: "f32" }],
        max_workgroup_storage: 48 << 10,
        ..caps(true)
    };
    let purposes = [ForwardPurpose::Inference, ForwardPurpose::Training, ForwardPurpose::Stages];
    let mut out = Vec::new();
    for (i, (k, v)) in [(16, 16), (64, 32), (128, 128), (128, 64)].into_iter().enumerate() {
        for chunk in [16, 32, 64] {
            let opts = if i % 2 == 0 { Options::default() } else { Options::mlx() };
            let dt = [DType::F16, DType::BF16][(i + chunk as usize / 16) % 2];
            let p = problem(1, 2, k, v, dt, GateKind::Scalar, opts, i == 1, i != 2, i == 3);
            let spec = if kernel.chunk_bwd() {
                ChunkSpec::for_backward(chunk, &p, &caps)
            } else {
                ChunkSpec::for_forward(chunk, &p, &caps, purposes[(i + chunk as usize / 16) % 3])
            };
            assert_eq!(spec.mma, Some(tile), "K={k} chunk={chunk}: {spec:?} does not fit {tile}x{tile} tiles");
            // The output pass (forward) and the local pass (backward) run only where out16 says so.
            if matches!(kernel, Kernel::ChunkOutputMma | Kernel::ChunkBwdLocalMma) && !spec.out16 {
                continue;
            }
            let key = if kernel.chunk_bwd() {
                spec.bwd_key(kernel, &p, dt, (i % 2 == 0).then_some(DType::BF16))
            } else {
                spec.key(kernel, &p)
            };
            out.push((format!("K={k} V={v} chunk={chunk} {dt} {spec:?}"), key));
        }
    }
    out
}

fn backward_keys(reduce: Reduce, accum: Accum) -> Vec<(String, PipelineKey)> {
    let c = caps(reduce == Reduce::Subgroup);
    let mut out = Vec::new();
    for (i, (k, v)) in [(16, 16), (64, 32), (128, 128), (256, 64)].into_iter().enumerate() {
        let opts = if i % 2 == 0 { Options::default() } else { Options::mlx() };
        let gate = if i % 3 == 0 { GateKind::PerKey } else { GateKind::Scalar };
        let p = problem(2, 4, k, v, DType::BF16, gate, opts, i == 1, i != 2, i == 3);
        let mut tiles = Tiles::choose(k, v, 4096, &c).for_backward(k);
        tiles.reduce = reduce;
        if reduce == Reduce::Subgroup && tiles.kt > c.subgroup_min {
            continue;
        }
        let spec = BackwardSpec {
            tiles,
            accum,
            every: 64,
            do_dtype: DType::F32,
            dht: (i % 2 == 0).then_some(DType::F32),
            dh0: i != 2,
        };
        out.push((format!("K={k} V={v} {gate:?} {accum:?} {tiles:?}"), spec.key(&p)));
    }
    out
}

fn recurrent_keys(reduce: Reduce) -> Vec<(String, PipelineKey)> {
    let c = caps(reduce == Reduce::Subgroup);
    let dts = [DType::F32, DType::F16, DType::BF16];
    let srcs = [
        (StateSrc::Zeros, false, false),
        (StateSrc::H0, true, false),
        (StateSrc::InPlace, true, true),
        (StateSrc::Zeros, true, false),
    ];
    let mut out = Vec::new();
    for (i, (k, v)) in
        [(16, 16), (32, 64), (64, 32), (128, 128), (192, 64), (256, 256), (256, 16)].into_iter().enumerate()
    {
        for (j, dt) in dts.into_iter().enumerate() {
            let n = i * 3 + j;
            let mut opts = if n % 2 == 0 { Options::default() } else { Options::mlx() };
            if n % 5 == 0 {
                opts.gate_space = GateSpace::Linear;
            }
            let gate = if n % 3 == 0 { GateKind::PerKey } else { GateKind::Scalar };
            let (h, hv) = [(1, 1), (2, 4), (1, 4)][n % 3];
            let (src, store, slots) = srcs[n % 4];
            let varlen = n % 4 == 3;
            let p = problem(h, hv, k, v, dt, gate, opts, n % 2 == 1, src == StateSrc::H0, varlen);
            // Both tilings: decode (a few tokens) and long sequences.
            let max_len = if n % 2 == 0 { 1 } else { 4096 };
            let tiles = Tiles::choose(k, v, max_len, &c);
            assert_eq!(tiles.reduce, reduce, "K={k}: Tiles::choose on {c:?} picked {:?}", tiles.reduce);
            assert!(tiles.valid(k, v, &c), "chosen tiles {tiles:?} invalid for K={k} V={v}");
            let spec = RecurrentSpec {
                tiles,
                state_src: src,
                store_state: store,
                use_slots: slots,
                decode: max_len <= 16,
                checkpoint: if n % 3 == 1 { 64 } else { 0 },
                max_y: c.max_workgroups_per_dim,
            };
            let label = format!(
                "K={k} V={v} {dt} {:?} {:?}/{:?} H={h} HV={hv} {src:?} store={store} slots={slots} varlen={varlen} len={max_len} KT={} KR={} BV={}",
                gate, opts.gate_space, opts.state_layout, tiles.kt, tiles.kr, tiles.bv
            );
            // A decode key of the kv layout reduces through workgroup memory whatever the device
            // (its column's threads are spread over the workgroup): it belongs to that variant.
            let key = spec.key(&p);
            if key.reduce == reduce {
                out.push((label, key));
            }
        }
    }
    // Extreme forced tilings too: one column per workgroup, and KT beyond K.
    let p = problem(1, 1, 32, 32, DType::F32, GateKind::Scalar, Options::default(), false, false, false);
    for tiles in [Tiles { kt: 2, kr: 16, bv: 1, reduce }, Tiles { kt: 32, kr: 1, bv: 8, reduce }] {
        let spec = RecurrentSpec {
            tiles,
            state_src: StateSrc::Zeros,
            store_state: true,
            use_slots: false,
            decode: false,
            checkpoint: 0,
            max_y: c.max_workgroups_per_dim,
        };
        out.push((format!("forced {tiles:?}"), spec.key(&p)));
    }
    out
}

/// The source variants of a kernel: reduction x accumulation, or the tile sizes of a
/// cooperative-matrix kernel.
fn variants(kernel: Kernel) -> Vec<(Reduce, Option<Accum>, Option<u32>)> {
    if kernel.mma() {
        return MMA_TILES.iter().map(|&t| (Reduce::Workgroup, None, Some(t))).collect();
    }
    let reduces = if kernel.reduces() { vec![Reduce::Subgroup, Reduce::Workgroup] } else { vec![Reduce::Workgroup] };
    let accums: Vec<Option<Accum>> = if kernel.accumulates() {
        vec![Some(Accum::F32Atomic), Some(Accum::CasLoop), Some(Accum::Deterministic)]
    } else {
        vec![None]
    };
    reduces.iter().flat_map(|&r| accums.iter().map(move |&a| (r, a, None))).collect()
}

/// Optional naga capabilities a variant may need: subgroups for the subgroup reduction, float
/// atomics for the atomic accumulation, cooperative matrices with f16 and subgroups for the mma
/// kernels; nothing else.
fn needs(reduce: Reduce, accum: Option<Accum>, tile: Option<u32>) -> Capabilities {
    let mut c = BASE;
    if tile.is_some() {
        c |= Capabilities::COOPERATIVE_MATRIX | Capabilities::SHADER_FLOAT16 | Capabilities::SUBGROUP;
    }
    if reduce == Reduce::Subgroup {
        c |= Capabilities::SUBGROUP;
    }
    if accum == Some(Accum::F32Atomic) {
        c |= Capabilities::SHADER_FLOAT32_ATOMIC;
    }
    c
}

/// Parse, validate, specialise and translate every kernel variant to MSL and SPIR-V.
#[test]
fn every_kernel_to_msl_and_spirv() {
    let mut failures = Vec::new();
    for kernel in Kernel::ALL {
        for (reduce, accum, tile) in variants(kernel) {
            let src = assemble_mma(kernel, reduce, accum, tile.unwrap_or(16));
            let name = format!("{} ({reduce:?}, {accum:?}, tile {tile:?})", kernel.label());
            let module = match naga::front::wgsl::parse_str(&src) {
                Ok(m) => m,
                Err(e) => panic!("{name}: WGSL parse error:\n{}", e.emit_to_string(&src)),
            };
            let info = match validator(Capabilities::all()).validate(&module) {
                Ok(i) => i,
                Err(e) => panic!("{name}: validation error:\n{}", e.emit_to_string(&src)),
            };
            // Each variant needs exactly its own optional capability (subgroups, float atomics) and
            // nothing else; the portable variants need none.
            let need = needs(reduce, accum, tile);
            if let Err(e) = validator(need).validate(&module) {
                panic!("{name}: needs more than {need:?}:\n{}", e.emit_to_string(&src));
            }
            if need != BASE {
                assert!(validator(BASE).validate(&module).is_err(), "{name}: validated without {need:?}");
            }
            let strict = validator(Capabilities::empty()).validate(&module).is_ok();
            println!("{name}: validates with no optional capability at all: {strict}");
            let overrides: Vec<String> = module.overrides.iter().filter_map(|(_, o)| o.name.clone()).collect();
            println!("{name}: {} bytes of WGSL, overrides {overrides:?}", src.len());

            let keys = keys(kernel, reduce, accum, tile);
            let mut sizes: BTreeMap<String, (usize, usize, usize)> = BTreeMap::new();
            for (label, key) in &keys {
                assert_eq!(key.kernel, kernel);
                assert_eq!(key.reduce, reduce);
                let mut constants = naga::back::PipelineConstants::default();
                for &(n, bits) in &key.constants {
                    constants.insert(n.to_string(), f64::from_bits(bits));
                }
                let ep = Some((naga::ShaderStage::Compute, "main"));
                let (m, i) = match naga::back::pipeline_constants::process_overrides(&module, &info, ep, &constants) {
                    Ok(x) => x,
                    Err(e) => {
                        failures.push(format!("{name} [{label}]: overrides: {e}"));
                        continue;
                    }
                };
                // The workgroup size override resolved to KT * BV.
                let get = |n: &str| key.constants.iter().find(|c| c.0 == n).map(|c| f64::from_bits(c.1) as u32);
                let ep = &m.entry_points[0];
                assert!(ep.workgroup_size_overrides.is_none(), "{name} [{label}]: workgroup size still an override");
                if let (Some(kt), Some(bv)) = (get("KT"), get("BV")) {
                    assert_eq!(ep.workgroup_size, [kt * bv, 1, 1], "{name} [{label}]: workgroup size");
                }
                // MSL as wgpu's Metal backend writes it: unchecked (release) and Restrict (checked
                // builds). Metal has 8x8 simdgroup matrices only: 16x16 tiles are for Vulkan.
                let mut msl_len = [0usize; 2];
                let metal = tile.is_none_or(|t| t == 8);
                for (slot, policy) in
                    [naga::proc::BoundsCheckPolicy::Unchecked, naga::proc::BoundsCheckPolicy::Restrict]
                        .into_iter()
                        .enumerate()
                        .filter(|_| metal)
                {
                    let opts = naga::back::msl::Options {
                        lang_version: (2, 4),
                        bounds_check_policies: naga::proc::BoundsCheckPolicies {
                            index: policy,
                            buffer: policy,
                            image_load: policy,
                            binding_array: naga::proc::BoundsCheckPolicy::Unchecked,
                        },
                        zero_initialize_workgroup_memory: false,
                        ..Default::default()
                    };
                    let popts = naga::back::msl::PipelineOptions {
                        entry_point: Some((naga::ShaderStage::Compute, "main".into())),
                        ..Default::default()
                    };
                    match naga::back::msl::write_string(&m, &i, &opts, &popts) {
                        Ok((msl, _)) => {
                            assert!(
                                msl.contains("kernel void main"),
                                "{name} [{label}]: no compute entry point in MSL"
                            );
                            if tile.is_some() {
                                assert!(
                                    msl.contains("simdgroup_multiply_accumulate") && msl.contains("8x8"),
                                    "{name} [{label}]: mma variant without 8x8 simdgroup matrices"
                                );
                            } else if reduce == Reduce::Subgroup {
                                assert!(
                                    msl.contains("simd_shuffle_xor"),
                                    "{name} [{label}]: subgroup variant without simd_shuffle_xor"
                                );
                            } else {
                                assert!(
                                    !msl.contains("simd_"),
                                    "{name} [{label}]: workgroup variant uses simd_ builtins"
                                );
                            }
                            msl_len[slot] = msl.len();
                        }
                        Err(e) => failures.push(format!("{name} [{label}]: MSL ({policy:?}): {e:?}")),
                    }
                }
                let spv_opts = naga::back::spv::Options { lang_version: (1, 3), ..Default::default() };
                let spv_pipe = naga::back::spv::PipelineOptions {
                    shader_stage: naga::ShaderStage::Compute,
                    entry_point: "main".into(),
                };
                let spv_len = match naga::back::spv::write_vec(&m, &i, &spv_opts, Some(&spv_pipe)) {
                    Ok(words) => {
                        assert_eq!(words.first(), Some(&0x0723_0203), "{name} [{label}]: SPIR-V magic");
                        // WGDELTA_DUMP_SPIRV=DIR keeps each module for spirv-dis.
                        if let Ok(dir) = std::env::var("WGDELTA_DUMP_SPIRV") {
                            let file: String = format!("{name} {label}")
                                .chars()
                                .map(|c| if c.is_alphanumeric() { c } else { '_' })
                                .collect();
                            std::fs::write(format!("{dir}/{file}.spv"), bytemuck::cast_slice(&words)).expect("dump");
                        }
                        words.len() * 4
                    }
                    Err(e) => {
                        failures.push(format!("{name} [{label}]: SPIR-V: {e:?}"));
                        0
                    }
                };
                println!("  {label:<100} MSL {:>6} B (checked {:>6} B)  SPIR-V {spv_len:>6} B", msl_len[0], msl_len[1]);
                sizes.insert(label.clone(), (msl_len[0], msl_len[1], spv_len));
            }
            let (lo, hi) = sizes.values().fold((usize::MAX, 0), |(lo, hi), s| (lo.min(s.0), hi.max(s.0)));
            println!("{name}: {} specialisations, MSL {lo}..{hi} bytes", sizes.len());
        }
    }
    assert!(failures.is_empty(), "{} translation failures:\n{}", failures.len(), failures.join("\n"));
}

/// The keys name only constants the WGSL declares, and every override without a default is given
/// (process_overrides fails otherwise; this checks the two lists directly for a clearer message).
#[test]
fn keys_match_declared_overrides() {
    for kernel in Kernel::ALL {
        for (reduce, accum, tile) in variants(kernel) {
            let src = assemble_mma(kernel, reduce, accum, tile.unwrap_or(16));
            let module = naga::front::wgsl::parse_str(&src).expect("parses");
            let declared: Vec<(String, bool)> =
                module.overrides.iter().filter_map(|(_, o)| o.name.clone().map(|n| (n, o.init.is_some()))).collect();
            for (label, key) in keys(kernel, reduce, accum, tile) {
                for &(n, _) in &key.constants {
                    assert!(
                        declared.iter().any(|(d, _)| d == n),
                        "{label}: key constant {n} is not declared in the WGSL"
                    );
                }
                for (d, has_default) in &declared {
                    if !has_default {
                        assert!(
                            key.constants.iter().any(|&(n, _)| n == d),
                            "{label}: override {d} has no default and no value"
                        );
                    }
                }
            }
        }
    }
}
