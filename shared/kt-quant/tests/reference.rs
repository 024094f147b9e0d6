//! kt-quant against the external reference: the vectors `tests/fixtures/quant/gen_vectors.py`
//! made with the `gguf` package (see its header for versions), compared bit for bit.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

mod common;

use common::{dequant_vectors, f32s, vectors};
use kt_core::GgmlType;
use kt_quant::{kernels, scalar_kernels, SUPPORTED};

/// Index and bit patterns of the first difference, if any.
fn first_bit_difference(got: &[f32], want: &[f32]) -> Option<(usize, u32, u32)> {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .enumerate()
        .find(|(_, (g, w))| g.to_bits() != w.to_bits())
        .map(|(i, (g, w))| (i, g.to_bits(), w.to_bits()))
}

#[test]
fn manifest_covers_every_supported_format() {
    let v = vectors();
    for ty in SUPPORTED {
        let d = v.iter().find(|v| v.kind == "dequantize" && v.ty == ty);
        let d = d.unwrap_or_else(|| panic!("no vectors for {ty}"));
        let expected_source =
            if matches!(ty, GgmlType::Q8_1 | GgmlType::Q8_K) { "definition" } else { "gguf" };
        assert_eq!(d.source, expected_source, "{ty}");
        assert_eq!(d.input.len(), ty.row_bytes(d.elements).unwrap(), "{ty}");
        assert_eq!(d.expected.len(), 4 * d.elements, "{ty}");
        assert!(f32s(&d.expected).iter().all(|v| v.is_finite()), "{ty}: NaN-free by construction");
    }
}

#[test]
fn dequantize_is_bit_exact_with_gguf() {
    for ty in SUPPORTED {
        let (blocks, want) = dequant_vectors(ty);
        let n = want.len();

        let mut got = vec![f32::NAN; n];
        kt_quant::dequantize_row(ty, &blocks, &mut got).unwrap();
        assert_eq!(first_bit_difference(&got, &want), None, "{ty} dequantize_row");

        let got = kt_quant::dequantize(ty, &blocks, n).unwrap();
        assert_eq!(first_bit_difference(&got, &want), None, "{ty} dequantize");

        for table in [kernels(ty).unwrap(), scalar_kernels(ty).unwrap()] {
            let mut got = vec![f32::NAN; n];
            (table.dequantize)(&blocks, &mut got);
            assert_eq!(first_bit_difference(&got, &want), None, "{ty} {}", table.isa);
        }
    }
}

#[test]
fn dequantize_reads_unaligned_rows() {
    for ty in SUPPORTED {
        let (blocks, want) = dequant_vectors(ty);
        for offset in 1..4 {
            let mut shifted = vec![0xA5u8; offset];
            shifted.extend_from_slice(&blocks);
            let src = &shifted[offset..];
            let mut got = vec![f32::NAN; want.len()];
            kt_quant::dequantize_row(ty, src, &mut got).unwrap();
            assert_eq!(first_bit_difference(&got, &want), None, "{ty} at offset {offset}");
        }
    }
}

#[test]
fn dequantize_row_by_row_matches_whole_tensor() {
    for ty in SUPPORTED {
        let (blocks, want) = dequant_vectors(ty);
        // Rows of 1, 2 and 3 blocks (or elements) wherever they start.
        for row_blocks in 1..=3 {
            let elems = row_blocks * ty.block_size();
            let bytes = ty.row_bytes(elems).unwrap();
            let mut got = vec![f32::NAN; want.len()];
            for (src, dst) in blocks.chunks(bytes).zip(got.chunks_mut(elems)) {
                kt_quant::dequantize_row(ty, src, dst).unwrap();
            }
            assert_eq!(first_bit_difference(&got, &want), None, "{ty} rows of {row_blocks}");
        }
    }
}

#[test]
fn quantize_row_is_bit_exact_with_gguf() {
    let sets: Vec<_> = vectors().into_iter().filter(|v| v.kind == "quantize").collect();
    let tested: Vec<GgmlType> = sets.iter().map(|v| v.ty).collect();
    assert_eq!(tested, [GgmlType::Q8_0, GgmlType::F16, GgmlType::BF16]);
    for v in sets {
        assert_eq!(v.source, "gguf");
        let x = f32s(&v.input);
        assert_eq!(x.len(), v.elements);
        let mut got = vec![0xA5u8; v.expected.len()];
        kt_quant::quantize_row(v.ty, &x, &mut got).unwrap();
        let diff = got.iter().zip(&v.expected).position(|(g, w)| g != w);
        assert_eq!(diff, None, "{}: first differing byte", v.ty);

        // The same through the kernel table of a weight format using it.
        let weight = match v.ty {
            GgmlType::Q8_0 => GgmlType::Q4_0,
            t => t,
        };
        assert_eq!(kt_quant::quantize_for_vec_dot(weight, &x).unwrap(), v.expected, "{}", v.ty);
    }
}
