//! Feeds arbitrary bytes to the GGUF parser, then reads every tensor and metadata value of
//! whatever parsed. Any panic, overflow or out-of-bounds read is a finding.
#![no_main]

use kt_core::SharedBytes;
use kt_formats::{GgufFile, Value};
use libfuzzer_sys::fuzz_target;

fn walk(v: &Value) -> usize {
    let scalars = (v.as_u64(), v.as_i64(), v.as_f64(), v.as_f32(), v.as_bool(), v.as_u32());
    let mut n = usize::from(scalars.0.is_some()) + v.as_str().map_or(0, str::len);
    let _ = v.to_string();
    if let Some(a) = v.as_array() {
        n += a.len();
        for x in a.iter() {
            n += walk(&x);
        }
        let _ = (a.to_u64s(), a.to_f32s(), a.as_strings(), a.elem_type());
    }
    n
}

fuzz_target!(|data: &[u8]| {
    let Ok(file) = GgufFile::from_bytes("fuzz.gguf", SharedBytes::new(data.to_vec())) else {
        return;
    };
    let mut n = 0usize;
    for (key, value) in file.metadata().iter() {
        n += key.len() + walk(value);
        // Lookup finds this very entry (compared by address: NaN != NaN).
        assert!(file.metadata().get(key).is_some_and(|v| std::ptr::eq(v, value)));
    }
    let _ = file.arch();
    for info in file.tensor_infos() {
        let t = file.tensor(&info.name).expect("a tensor of a parsed file loads");
        assert_eq!(t.data.len(), info.n_bytes);
        n += t.data.iter().map(|&b| usize::from(b)).sum::<usize>();
        let _ = (t.rows(), t.row_len(), t.row(0));
    }
    std::hint::black_box(n);
});
