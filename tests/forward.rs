//! Recurrent forward on the GPU against the float64 reference, over the option matrix.
mod common;
use common::*;
use wgdelta::*;

#[test]
fn smoke() {
    let e = engine();
    check_forward(e, &Case::new(1, 5, 1, 1, 16, 16));
    check_forward(e, &Case { h0: true, ..Case::new(2, 9, 2, 4, 32, 32) });
}
