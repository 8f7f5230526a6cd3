//! Case files (`../shared/CASES.md`): the inputs of one call plus convention metadata in a
//! safetensors file, and the results written back. The CLI's `run` is a thin wrapper over [`run_case`].

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::ops::Inputs;
use crate::problem::{Algorithm, DType, GateSpace, Options, StateLayout};
use crate::tensor::{HostTensor, TensorFile};

/// How to run a case (the command line's flags).
#[derive(Clone, Copy, Debug, Default)]
pub struct RunFlags {
    pub algorithm: Algorithm,
    pub deterministic: bool,
}

/// Reads the convention metadata of a case: `gate_space`, `state_layout`, `scale`,
/// `output_final_state`. Unknown keys are ignored; a known key with a bad value is an error.
pub fn parse_metadata(meta: &std::collections::HashMap<String, String>) -> Result<Options> {
    let mut o = Options::default();
    let bad = |key: &str, value: &str, expected: &'static str| Error::Metadata {
        key: key.to_string(),
        value: value.to_string(),
        expected,
    };
    if let Some(v) = meta.get("gate_space") {
        o.gate_space = match v.trim() {
            "log" => GateSpace::Log,
            "linear" => GateSpace::Linear,
            _ => return Err(bad("gate_space", v, "`log` or `linear`")),
        };
    }
    if let Some(v) = meta.get("state_layout") {
        o.state_layout = match v.trim() {
            "kv" => StateLayout::Kv,
            "vk" => StateLayout::Vk,
            _ => return Err(bad("state_layout", v, "`kv` or `vk`")),
        };
    }
    if let Some(v) = meta.get("scale") {
        let s: f32 = v.trim().parse().map_err(|_| bad("scale", v, "a decimal number"))?;
        if !s.is_finite() {
            return Err(bad("scale", v, "a finite decimal number"));
        }
        o.scale = Some(s);
    }
    if let Some(v) = meta.get("output_final_state") {
        o.output_final_state = match v.trim() {
            "true" => true,
            "false" => false,
            _ => return Err(bad("output_final_state", v, "`true` or `false`")),
        };
    }
    Ok(o)
}

/// Computes a case on the engine and returns the results file (all F32): `o`, `ht` when
/// `output_final_state` is true; when the case has `do` (and optionally `dht`), also `dq dk dv dg
/// dbeta` and `dh0` when `h0` was given. Nothing is written unless every result was computed.
pub fn run_case(eng: &Engine, case: &TensorFile, flags: &RunFlags) -> Result<TensorFile> {
    let mut opts = parse_metadata(&case.metadata)?;
    opts.algorithm = flags.algorithm;
    opts.deterministic = flags.deterministic;
    let t = |name: &'static str| case.tensors.get(name);
    let req = |name: &'static str| t(name).ok_or(Error::Missing(name));
    let cu: Option<Vec<i64>> = match t("cu_seqlens") {
        Some(c) => {
            if c.shape.len() != 1 {
                return Err(Error::Shape { name: "cu_seqlens", got: c.shape.clone(), expected: "[N+1]".into() });
            }
            Some(c.to_i64().ok_or(Error::DType { name: "cu_seqlens", got: c.dtype, expected: "I32 or I64".into() })?)
        }
        None => None,
    };
    // Validate the whole case before anything touches the device.
    let meta = crate::problem::InputsMeta {
        q: Some(req("q")?.meta()),
        k: Some(req("k")?.meta()),
        v: Some(req("v")?.meta()),
        g: Some(req("g")?.meta()),
        beta: Some(req("beta")?.meta()),
        h0: t("h0").map(HostTensor::meta),
        mask: t("mask").map(HostTensor::meta),
        d_o: t("do").map(HostTensor::meta),
        dht: t("dht").map(HostTensor::meta),
    };
    let wants_grads = meta.d_o.is_some();
    crate::problem::Problem::new(&meta, cu.as_deref(), &opts, wants_grads)?;

    let up = |name: &'static str| eng.upload(name, req(name)?);
    let (q, k, v, g, beta) = (up("q")?, up("k")?, up("v")?, up("g")?, up("beta")?);
    let h0 = t("h0").map(|x| eng.upload("h0", x)).transpose()?;
    let mask = match t("mask") {
        // BOOL and U8 share one byte per element.
        Some(m) => Some(eng.upload("mask", &HostTensor { dtype: DType::U8, ..m.clone() })?),
        None => None,
    };
    let x = Inputs {
        q: &q,
        k: &k,
        v: &v,
        g: &g,
        beta: &beta,
        h0: h0.as_ref(),
        mask: mask.as_ref(),
        cu_seqlens: cu.as_deref(),
    };
    let mut res = TensorFile::default();
    if !wants_grads {
        let out = eng.forward(&x, &opts)?;
        res.tensors.insert("o".into(), eng.download(&out.o)?);
        if let Some(ht) = &out.ht {
            res.tensors.insert("ht".into(), eng.download(ht)?);
        }
        return Ok(res);
    }
    let (out, saved) = eng.forward_train(&x, &opts)?;
    let d_o = up("do")?;
    let dht = t("dht").map(|x| eng.upload("dht", x)).transpose()?;
    let grads = eng.backward(&saved, &d_o, dht.as_ref())?;
    res.tensors.insert("o".into(), eng.download(&out.o)?);
    if let Some(ht) = &out.ht {
        res.tensors.insert("ht".into(), eng.download(ht)?);
    }
    for (name, g) in
        [("dq", &grads.dq), ("dk", &grads.dk), ("dv", &grads.dv), ("dg", &grads.dg), ("dbeta", &grads.dbeta)]
    {
        res.tensors.insert(name.into(), eng.download(g)?);
    }
    if let Some(dh0) = &grads.dh0 {
        res.tensors.insert("dh0".into(), eng.download(dh0)?);
    }
    Ok(res)
}
