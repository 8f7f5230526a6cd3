// chunk_bwd_local.wgsl — v_new and the chunk-local part of dv (FLA's chunk_bwd_dv_local).
//
// Per local chunk lc and value head hv (key head hk), rows i, j < len (the chunk's length):
//     v_new_i = u_i - w_i h                    h = saved state at the chunk's start, K x V
//     dvn_j   = sum_{i >= j} P_ij do_i         P_ij = scale exp(gc_i - gc_j) q_i . k_j
// Outputs vn, dvn [L, HV, C, V] (rows >= len 0); chunk_bwd_state adds the walk's term to dvn.
//
// Grid: (HV, local chunks on y/z).
// Tiling as chunk_output.wgsl: P = Q K^T (C x C) first, each thread owning a 4x4 block in registers
// (p_block, chunk_qk.wgsl), kept in workgroup memory (lp) row by row: a row of P is a row of the
// transposed left operand P^T.
// Then, per tile of BVO value columns, one product over K + C terms into two 4x4 register blocks:
//     vn[:, tile]  = u - W h[:, tile]         (terms < K: w and rows of h)
//     dvn[:, tile] = P^T do[:, tile]          (terms >= K: rows of P and of do)
// in slices of BS terms, staged like the first product and fetched one slice ahead.

// Bindings 2-4 (q, k, gc): chunk_qk.wgsl.
@group(0) @binding(5) var<storage, read> w: array<f32>;
@group(0) @binding(6) var<storage, read> u: array<f32>;
@group(0) @binding(7) var<storage, read> ck: array<f32>;
@group(0) @binding(8) var<storage, read> dout: array<u32>;
@group(0) @binding(9) var<storage, read_write> vn: array<f32>;
@group(0) @binding(10) var<storage, read_write> dvn: array<f32>;

fn ld_do(i: u32, row: u32) -> f32 { return select(0.0, decode(DO_DT, dout[word_of(DO_DT, i)], i), live(row)); }

// Slice s0 of [W | P^T] [h ; do] for value columns c0 .. c0 + BVO: below K, w and rows of h;
// past K, rows of do (the left side is P, already in workgroup memory).
fn fetch_out(s0: u32, lid: u32, ch: vec3<u32>, hb: u32, hs: u32, hv: u32, c0: u32) -> Slice {
    var f: Slice;
    if (s0 < K) {
        for (var x = 0u; x < CH * BS / WG; x++) {
            let e = lid + WG * x;
            let i = e / BS;
            f.l[x] = select(0.0, w[(hb + min(i, ch.y - 1u)) * K + s0 + e % BS], i < ch.y);
        }
        for (var x = 0u; x < BS * BVO / WG; x++) {
            let e = lid + WG * x;
            f.r[x] = ck[hs + (s0 + e / BVO) * V + c0 + e % BVO];
        }
    } else {
        for (var x = 0u; x < BS * BVO / WG; x++) {
            let e = lid + WG * x;
            let i = s0 - K + e / BVO;
            let row = ch.x + min(i, ch.y - 1u);
            f.r[x] = select(0.0, ld_do((row * HV + hv) * V + c0 + e % BVO, row), i < ch.y);
        }
    }
    return f;
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let lc = local_chunk(wid);
    if (lc >= P.n_local) {
        return;
    }
    let hv = wid.x;
    let hk = hv / GROUP;
    let ch = chunk_at(lc);
    let hb = (lc * HV + hv) * CH;

    // P: thread (ti, tj) owns rows ti*4 .. +4, columns tj*4 .. +4, kept row by row.
    let q4 = CH / 4u;
    let ti = lid / q4;
    let tj = lid % q4;
    let pm = p_block(lid, ch, hk, hb, P.scale);
    if (ti < q4) {
        for (var a = 0u; a < 4u; a++) {
            lp[(ti * 4u + a) * CP + tj] = pm[a];
        }
    }

    // Output tiles: thread (tr, tc) owns rows tr*4 .. +4, columns tc*4 .. +4 of vn and dvn.
    let tc = lid % (BVO / 4u);
    let tr = lid / (BVO / 4u);
    let in_tile = tr < q4;
    let hs = h_base(lc, hv); // the saved state at the chunk's start (its window slice of ck)
    for (var c0 = 0u; c0 < V; c0 += BVO) {
        var vacc: array<vec4<f32>, 4>;
        var dacc: array<vec4<f32>, 4>;
        var ny = fetch_out(0u, lid, ch, hb, hs, hv, c0);
        for (var s0 = 0u; s0 < K + CH; s0 += BS) {
            workgroupBarrier();
            stage_kc(ny, s0, lid);
            workgroupBarrier();
            if (s0 + BS < K + CH) {
                ny = fetch_out(s0 + BS, lid, ch, hb, hs, hv, c0);
            }
            if (in_tile) {
                if (s0 < K) {
                    product_kc(&vacc, s0, tr, tc);
                } else {
                    product_kc(&dacc, s0, tr, tc);
                }
            }
        }
        if (in_tile) {
            for (var a = 0u; a < 4u; a++) {
                let i = tr * 4u + a;
                let at = (hb + i) * V + c0 + tc * 4u;
                for (var cc = 0u; cc < 4u; cc++) {
                    let ok = i < ch.y;
                    vn[at + cc] = select(0.0, u[at + cc] - vacc[a][cc], ok);
                    dvn[at + cc] = select(0.0, dacc[a][cc], ok);
                }
            }
        }
    }
}
