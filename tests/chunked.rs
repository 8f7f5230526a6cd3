//! Chunked forward on the GPU against the float64 reference (and the recurrent kernel), over the
//! option matrix of issue #3. Every check prints its errors.
mod common;
use common::*;
use wgdelta::*;

fn chunked(c: Case, chunk: u32) -> Case {
    Case { opts: Options { algorithm: Algorithm::Chunked { chunk }, ..c.opts }, ..c }
}

#[test]
fn smoke() {
    let e = engine();
    check_forward(e, &chunked(Case::new(1, 5, 1, 1, 16, 16), 16));
    check_forward(e, &chunked(Case::new(1, 40, 1, 1, 16, 16), 16));
    check_forward(e, &chunked(Case { h0: true, ..Case::new(2, 9, 2, 4, 32, 32) }, 16));
}
