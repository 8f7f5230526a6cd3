// chunk_output.wgsl — the output (FLA's chunk_fwd_o).
//
// Per local chunk lc, value head hv (key head hk), rows i < len:
//     o_i = scale * ( exp(gc_i) q_i S  +  sum_{j <= i} (q_i . k_j) exp(gc_i - gc_j) v_new_j )
// with S = h[lc] the state at the start of the chunk; a masked row writes 0.
// Output o [rows, HV, V] (f32), rows of the chunk only.
//
// Grid: (HV * V / BVO, local chunks on y/z).
// Tiling: the causal, decay-masked P = Q K^T ∘ Γ (C x C) is built first, each thread owning a 4x4
// block in registers (p_block, chunk_qk.wgsl: K-slices of q and k staged transposed as vec4 over rows),
// then kept transposed in workgroup memory. The output tile is one product over K + C terms,
//     o[:, tile] = [exp(gc) ∘ Q | P] [S[:, tile] ; v_new[:, tile]]
// taken in slices of BS terms; each thread accumulates 4 rows x 4 columns with two vec4 reads of
// workgroup memory per 16 FMAs. Rows of the transposed slices are padded by one vec4 (CP), so
// staging writes spread over banks. Each slice's global reads are issued one slice ahead into
// registers (fixed counts, so they all fly at once), so no slice waits on memory.

// Bindings 2-4 (q, k, gc): chunk_qk.wgsl.
@group(0) @binding(5) var<storage, read> h: array<f32>;
@group(0) @binding(6) var<storage, read> vn: array<f32>;
@group(0) @binding(7) var<storage, read_write> o: array<f32>;


// Slice s0 of [exp(gc) ∘ Q | P] [S ; v_new]: below K, exp(gc) ∘ q and rows of S; past K, rows of
// v_new (the left side is P, already in workgroup memory).
fn fetch_out(s0: u32, lid: u32, ch: vec3<u32>, hk: u32, sb: u32, vb: u32) -> Slice {
    var f: Slice;
    if (s0 < K) {
        for (var x = 0u; x < CH * BS / WG; x++) {
            let e = lid + WG * x;
            let i = e / BS;
            let at = ((ch.x + min(i, ch.y - 1u)) * H + hk) * K + s0 + e % BS;
            f.l[x] = select(0.0, exp(gcs[i]) * ld_q(at), i < ch.y);
        }
        for (var x = 0u; x < BS * BVO / WG; x++) {
            let e = lid + WG * x;
            f.r[x] = h[sb + (s0 + e / BVO) * V + e % BVO];
        }
    } else {
        for (var x = 0u; x < BS * BVO / WG; x++) {
            let e = lid + WG * x;
            f.r[x] = vn[vb + (s0 - K + e / BVO) * V + e % BVO];
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
    let tiles = V / BVO;
    let hv = wid.x / tiles;
    let j0 = (wid.x % tiles) * BVO;
    let hk = hv / GROUP;
    let ch = chunk_at(lc);
    let hb = (lc * HV + hv) * CH;

    // P ∘ Γ (scale applied at the end): thread (ti, tj) owns rows ti*4 .. +4, columns tj*4 .. +4, kept
    // transposed.
    let q4 = CH / 4u;
    let ti = lid / q4;
    let tj = lid % q4;
    let pm = p_block(lid, ch, hk, hb, 1.0);
    if (ti < q4) {
        for (var a = 0u; a < 4u; a++) {
            for (var b = 0u; b < 4u; b++) {
                lp[(tj * 4u + b) * CP + ti][a] = pm[a][b];
            }
        }
    }

    // Output tile: thread (tr, tc) owns rows tr*4 .. +4, columns tc*4 .. +4.
    let tc = lid % (BVO / 4u);
    let tr = lid / (BVO / 4u);
    let in_tile = tr < q4;
    var acc: array<vec4<f32>, 4>;
    let sb = h_base(lc, hv) + j0;
    let vb = hb * V + j0;
    var ny = fetch_out(0u, lid, ch, hk, sb, vb);
    for (var s0 = 0u; s0 < K + CH; s0 += BS) {
        workgroupBarrier();
        stage_kc(ny, s0, lid);
        workgroupBarrier();
        if (s0 + BS < K + CH) {
            ny = fetch_out(s0 + BS, lid, ch, hk, sb, vb);
        }
        if (in_tile) {
            product_kc(&acc, s0, tr, tc);
        }
    }
    if (in_tile) {
        for (var a = 0u; a < 4u; a++) {
            let i = tr * 4u + a;
            if (i < ch.y) {
                let row = ch.x + i;
                let live_row = live(row);
                let ob = (row * HV + hv) * V + j0 + tc * 4u;
                for (var cc = 0u; cc < 4u; cc++) {
                    o[ob + cc] = select(0.0, P.scale * acc[a][cc], live_row);
                }
            }
        }
    }
}
