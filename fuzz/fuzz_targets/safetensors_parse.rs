//! Feeds arbitrary bytes to the safetensors parser, then reads every tensor of whatever parsed.
#![no_main]

use kt_core::SharedBytes;
use kt_formats::SafetensorsFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = SafetensorsFile::from_bytes("fuzz.safetensors", SharedBytes::new(data.to_vec()))
    else {
        return;
    };
    let mut n = 0usize;
    for info in file.tensor_infos() {
        let bytes = file.tensor_bytes(&info.name).expect("tensor bytes of a parsed file");
        assert_eq!(bytes.len(), info.data_offsets.1 - info.data_offsets.0);
        if let Ok(t) = file.tensor(&info.name) {
            n += t.data.iter().map(|&b| usize::from(b)).sum::<usize>();
        }
    }
    std::hint::black_box(n);
});
