//! The Metal twins in `msl_overrides/` bind exactly what their WGSL twins bind: same buffer
//! indices, read/write-ness, element types and names, same `Params` struct, every override constant
//! consumed. (No Metal compiler here: this checks the interface, not the kernel's results.) Also
//! compiles every WGSL kernel variant with naga.

use wgdelta::kernels::backward::BackwardSpec;
use wgdelta::kernels::recurrent::Tiles;
use wgdelta::kernels::{assemble, msl_constants, Accum, Kernel, Reduce};
use wgdelta::problem::{DType, InputsMeta, Options, Problem, TensorMeta};

/// One binding as both languages can express it: (index, address space, writable, element type, name).
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord, Clone)]
struct Binding {
    index: u32,
    space: &'static str,
    writable: bool,
    elem: String,
    name: String,
}

fn wgsl_module(kernel: Kernel, reduce: Reduce, accum: Option<Accum>) -> naga::Module {
    let src = assemble(kernel, reduce, accum);
    naga::front::wgsl::parse_str(&src)
        .unwrap_or_else(|e| panic!("{kernel:?} {reduce:?} {accum:?}: {}", e.emit_to_string(&src)))
}

fn msl_elem(m: &naga::Module, ty: naga::Handle<naga::Type>) -> String {
    use naga::{Scalar, TypeInner};
    match &m.types[ty].inner {
        TypeInner::Scalar(Scalar::U32) => "uint".into(),
        TypeInner::Scalar(Scalar::F32) => "float".into(),
        TypeInner::Scalar(Scalar::I32) => "int".into(),
        TypeInner::Atomic(Scalar::F32) => "atomic_float".into(),
        TypeInner::Atomic(Scalar::U32) => "atomic_uint".into(),
        TypeInner::Array { base, .. } => msl_elem(m, *base),
        TypeInner::Struct { .. } => m.types[ty].name.clone().unwrap_or_default(),
        other => panic!("no MSL spelling for {other:?}"),
    }
}

fn wgsl_bindings(m: &naga::Module) -> Vec<Binding> {
    let mut out: Vec<Binding> = m
        .global_variables
        .iter()
        .filter_map(|(_, gv)| {
            let rb = gv.binding.as_ref()?;
            assert_eq!(rb.group, 0, "wgdelta kernels use one bind group");
            let (space, writable) = match gv.space {
                naga::AddressSpace::Uniform => ("constant", false),
                naga::AddressSpace::Storage { access } => ("device", access.contains(naga::StorageAccess::STORE)),
                other => panic!("unexpected address space {other:?}"),
            };
            Some(Binding {
                index: rb.binding,
                space,
                writable,
                elem: msl_elem(m, gv.ty),
                name: gv.name.clone().unwrap_or_default(),
            })
        })
        .collect();
    out.sort();
    out
}

/// The `kernel void <entry>(...)` parameter list of an MSL source.
fn msl_signature<'a>(src: &'a str, entry: &str) -> &'a str {
    let head = format!("kernel void {entry}(");
    let start = src.find(&head).unwrap_or_else(|| panic!("MSL has no `{head}`")) + head.len();
    let len = src[start..].find(")\n{").expect("end of the kernel signature");
    &src[start..start + len]
}

fn msl_bindings(src: &str, entry: &str) -> Vec<Binding> {
    let mut out: Vec<Binding> = msl_signature(src, entry)
        .split(",\n")
        .map(str::trim)
        .filter(|p| p.contains("[[buffer("))
        .map(|p| {
            let (decl, attr) = p.split_once("[[buffer(").expect("buffer attribute");
            let index: u32 = attr.trim_end_matches(")]]").parse().expect("buffer index");
            let decl = decl.replace(['*', '&'], " ");
            let words: Vec<&str> = decl.split_whitespace().collect();
            let name = words.last().expect("name").to_string();
            let space = match words[0] {
                "constant" => "constant",
                "device" => "device",
                other => panic!("unexpected MSL address space `{other}` in `{p}`"),
            };
            let writable = space == "device" && !words.contains(&"const");
            let elem = words[words.len() - 2].to_string();
            Binding { index, space, writable, elem, name }
        })
        .collect();
    out.sort();
    out
}

/// Fields of `struct Params` as (name, type), from naga and from the MSL text.
fn wgsl_params(m: &naga::Module) -> Vec<(String, String)> {
    let (_, ty) = m.types.iter().find(|(_, t)| t.name.as_deref() == Some("Params")).expect("struct Params");
    let naga::TypeInner::Struct { members, .. } = &ty.inner else { panic!("Params is not a struct") };
    members.iter().map(|mb| (mb.name.clone().unwrap_or_default(), msl_elem(m, mb.ty))).collect()
}

fn msl_params(src: &str) -> Vec<(String, String)> {
    let start = src.find("struct Params {").expect("MSL struct Params") + "struct Params {".len();
    let body = &src[start..start + src[start..].find("};").expect("end of Params")];
    body.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (ty, name) = l.trim_end_matches(';').split_once(' ').expect("`type name;`");
            (name.trim().to_string(), ty.to_string())
        })
        .collect()
}

fn sample_problem() -> Problem {
    let t = |s: &[usize]| Some(TensorMeta::new(s, DType::F32));
    let meta = InputsMeta {
        q: t(&[1, 8, 2, 64]),
        k: t(&[1, 8, 2, 64]),
        v: t(&[1, 8, 4, 64]),
        g: t(&[1, 8, 4]),
        beta: t(&[1, 8, 4]),
        d_o: t(&[1, 8, 4, 64]),
        ..Default::default()
    };
    Problem::new(&meta, None, &Options::default(), true).expect("valid")
}

#[test]
fn msl_override_interface_matches_wgsl_twin() {
    for kernel in Kernel::ALL {
        let Some((msl, entry)) = kernel.msl_override() else { continue };
        // The twin implements the f32-atomic variant; the reduction variant does not change bindings.
        for reduce in [Reduce::Subgroup, Reduce::Workgroup] {
            let m = wgsl_module(kernel, reduce, Some(Accum::F32Atomic));
            let (w, s) = (wgsl_bindings(&m), msl_bindings(msl, entry));
            println!("{kernel:?} {reduce:?}: {} bindings", w.len());
            for b in &w {
                println!(
                    "  {:>2} {:<8} {:<5} {:<12} {}",
                    b.index,
                    b.space,
                    if b.writable { "rw" } else { "read" },
                    b.elem,
                    b.name
                );
            }
            assert_eq!(w, s, "{kernel:?}: MSL bindings differ from the WGSL twin's");
            assert_eq!(w.len(), kernel.slots().len(), "WGSL bindings vs the host's slot table");
            assert_eq!(wgsl_params(&m), msl_params(msl), "{kernel:?}: struct Params differs");
            let ep = m.entry_points.iter().find(|e| e.name == "main").expect("WGSL entry point `main`");
            assert_eq!(ep.stage, naga::ShaderStage::Compute);
        }
        // Constants: the host prepends one line per key constant; the twin must use every one of
        // them and declare none of them itself, and derive the WGSL's defaulted overrides.
        let p = sample_problem();
        let tiles = Tiles { kt: 8, kr: 8, bv: 8, reduce: Reduce::Subgroup };
        let spec =
            BackwardSpec { tiles, accum: Accum::F32Atomic, every: 64, do_dtype: DType::F32, dht: None, dh0: false };
        let key = spec.key(&p);
        let consts = msl_constants(&key);
        let is_word = |c: char| c.is_alphanumeric() || c == '_';
        for (name, _) in key.constants_f64() {
            let used = msl.match_indices(name).any(|(i, _)| {
                let before = msl[..i].chars().next_back().is_none_or(|c| !is_word(c));
                let after = msl[i + name.len()..].chars().next().is_none_or(|c| !is_word(c));
                before && after
            });
            assert!(used, "MSL twin never reads constant {name}");
            assert!(!msl.contains(&format!("constexpr uint {name} =")), "MSL twin redeclares {name}");
            assert!(consts.contains(&format!("constant constexpr uint {name} = ")), "prelude lacks {name}");
        }
        let m = wgsl_module(kernel, Reduce::Subgroup, Some(Accum::F32Atomic));
        for o in m.overrides.iter().map(|(_, o)| o) {
            let name = o.name.as_deref().unwrap_or_default();
            let in_key = key.constants_f64().iter().any(|(n, _)| *n == name);
            let derived = msl.contains(&format!("constexpr uint {name} ="));
            assert!(in_key || derived, "WGSL override {name} is neither set by the key nor derived in the MSL");
        }
        println!("{kernel:?}: MSL entry `{entry}`, {} constants from the key", key.constants.len());

        // The check itself bites: a read-only output or a shifted index is caught.
        let w = wgsl_bindings(&m);
        let ro = msl.replacen("device float* dv [[buffer(10)]]", "device const float* dv [[buffer(10)]]", 1);
        let shifted = msl.replacen("[[buffer(9)]]", "[[buffer(13)]]", 1);
        assert!(ro != msl && shifted != msl, "mutations did not apply");
        assert_ne!(w, msl_bindings(&ro, entry));
        assert_ne!(w, msl_bindings(&shifted, entry));
    }
}

#[test]
fn every_wgsl_variant_validates() {
    let caps = naga::valid::Capabilities::all();
    let mut n = 0;
    for kernel in Kernel::ALL {
        for reduce in [Reduce::Subgroup, Reduce::Workgroup] {
            for accum in [None, Some(Accum::F32Atomic), Some(Accum::CasLoop), Some(Accum::Deterministic)] {
                if (accum.is_some() && !kernel.accumulates()) || (reduce == Reduce::Subgroup && !kernel.reduces()) {
                    continue;
                }
                let m = wgsl_module(kernel, reduce, accum);
                naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps)
                    .validate(&m)
                    .unwrap_or_else(|e| panic!("{kernel:?} {reduce:?} {accum:?}: {e:?}"));
                n += 1;
            }
        }
    }
    println!("{n} WGSL variants validate");
}
