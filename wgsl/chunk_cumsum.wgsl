// chunk_cumsum.wgsl — in-chunk cumulative log-decay (FLA's chunk_local_cumsum), and beta with
// masked tokens zeroed.
//
// Per local chunk lc and value head hv, for in-chunk position i < C:
//     gc[lc, hv, i] = sum_{i' <= i, i' < len, live} logdecay(g[start + i', hv])
//     bm[lc, hv, i] = beta[start + i, hv] if i < len and the token is live, else 0
// logdecay(x) = x for the log gate, log(max(x, 1e-30)) for the linear gate (a decay of 0 becomes a
// large negative log-decay, never -inf). A masked token is a step with decay 1 and beta 0 (SPEC 3):
// its key then never reaches the state or another token's output. Rows i >= len repeat the last
// gc and have bm = 0.
//
// Grid: (ceil(HV / WG), local chunks on y/z); one thread per (lc, hv), sequential over the chunk.
// Every load is issued before the first store: the compiler cannot tell that the stores to gc, bm do
// not alias g, beta, and with loads and stores interleaved it waited on each load in turn (0.04 ms a
// window on the H100 whatever its size, docs/PERF.md R53).

@group(0) @binding(2) var<storage, read> g: array<u32>;
@group(0) @binding(3) var<storage, read> beta: array<u32>;
@group(0) @binding(4) var<storage, read_write> gc: array<f32>;
@group(0) @binding(5) var<storage, read_write> bm: array<f32>;

fn ld_g(i: u32) -> f32 { return decode(G_DT, g[word_of(G_DT, i)], i); }
fn ld_beta(i: u32) -> f32 { return decode(BETA_DT, beta[word_of(BETA_DT, i)], i); }

fn log_decay(x: f32) -> f32 {
    if (GATE_LINEAR) {
        return log(max(x, 1e-30));
    }
    return x;
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let lc = local_chunk(wid);
    let hv = wid.x * WG + lid;
    if (lc >= P.n_local || hv >= HV) {
        return;
    }
    let ch = chunk_at(lc);
    let base = (lc * HV + hv) * CH;
    var xg: array<f32, 64>; // log-decay of each row (0 past len and where masked)
    var xb: array<f32, 64>; // beta likewise
    for (var i = 0u; i < CH; i++) {
        let row = ch.x + min(i, ch.y - 1u);
        let ok = i < ch.y && live(row);
        xg[i] = select(0.0, log_decay(ld_g(row * HV + hv)), ok);
        xb[i] = select(0.0, ld_beta(row * HV + hv), ok);
    }
    var acc = 0.0;
    for (var i = 0u; i < CH; i++) {
        acc += xg[i];
        gc[base + i] = acc;
        bm[base + i] = xb[i];
    }
}
