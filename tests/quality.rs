//! `ldt::task::quality` against an independent computation: `tests/sr/quality.json`,
//! written by `scripts/make_quality_fixtures.py` with numpy and OpenCV (`cv2.filter2D`)
//! following BasicSR's conventions. Every case agrees to 1e-4 dB PSNR and 1e-5 SSIM (the
//! tolerance of issue #20); infinite PSNRs (identical images) agree exactly, and so does
//! every quantized byte.

use ldt::task::quality::{psnr, quantize, ssim, Channel};
use serde_json::Value;

const PSNR_TOL: f64 = 1e-4;
const SSIM_TOL: f64 = 1e-5;

fn fixture() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sr/quality.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn hex(s: &Value) -> Vec<u8> {
    let s = s.as_str().unwrap().as_bytes();
    s.chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    // The fixture writes each f32 as the shortest decimal of its f64 value: exact.
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn quantize_matches_tensor2img_exactly() {
    let q = &fixture()["quantize"];
    let want: Vec<u8> = q["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u8)
        .collect();
    let x = floats(&q["input"]);
    assert!(x.len() > 1000);
    let got = quantize(&x);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "quantize({:e}) (value {i})", x[i]);
    }
    assert_eq!(got.len(), want.len());
}

#[test]
fn psnr_and_ssim_match_the_reference() {
    let doc = fixture();
    let (mut max_p, mut max_s, mut n) = (0.0f64, 0.0f64, 0);
    for case in doc["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let dims: Vec<usize> = case["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let shape = [dims[0], dims[1], dims[2]];
        let a = hex(&case["a"]);
        let b = hex(&case["b"]);
        if let Some(out) = case.get("b_output") {
            assert_eq!(quantize(&floats(out)), b, "{name}: b = quantize(b_output)");
        }
        for s in case["scores"].as_array().unwrap() {
            let border = s["border"].as_u64().unwrap() as usize;
            let ch = match s["channel"].as_str().unwrap() {
                "y" => Channel::Y,
                "rgb" => Channel::Rgb,
                other => panic!("{name}: channel {other}"),
            };
            let at = format!("{name} {shape:?} border {border} {ch:?}");
            let p = psnr(&a, &b, shape, border, ch).unwrap();
            match s["psnr"].as_f64() {
                None => assert_eq!(p, f64::INFINITY, "{at}: PSNR"),
                Some(want) => {
                    let d = (p - want).abs();
                    assert!(d <= PSNR_TOL, "{at}: PSNR {p} vs {want}");
                    max_p = max_p.max(d);
                }
            }
            let q = ssim(&a, &b, shape, border, ch).unwrap();
            let want = s["ssim"].as_f64().unwrap();
            let d = (q - want).abs();
            assert!(d <= SSIM_TOL, "{at}: SSIM {q} vs {want}");
            max_s = max_s.max(d);
            n += 1;
        }
    }
    assert!(n >= 30, "only {n} scores in the fixture");
    println!(
        "{n} scores: max |PSNR - reference| = {max_p:.3e} dB (tolerance {PSNR_TOL:e}), \
         max |SSIM - reference| = {max_s:.3e} (tolerance {SSIM_TOL:e})"
    );
}
