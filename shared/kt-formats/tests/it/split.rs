use std::path::PathBuf;

use kt_core::GgmlType;
use kt_formats::gguf::writer::GgufWriter;
use kt_formats::gguf::SplitName;
use kt_formats::{FormatError, GgufFile, GgufModel, TensorSource};

use crate::support::*;

/// Part `no` (0-based) of a `count`-part set, holding tensor `blk.{no}.w`.
fn part(no: u16, count: u16) -> GgufWriter {
    let mut w = GgufWriter::new();
    if no == 0 {
        w.metadata("general.architecture", "qwen3moe");
    }
    w.metadata("split.no", no).metadata("split.count", count);
    if no == 0 {
        w.metadata("split.tensors.count", i32::from(count));
    }
    w.tensor(format!("blk.{no}.w"), GgmlType::F32, vec![2], pattern(8, no as u8)).unwrap();
    w
}

fn write_set(dir: &TempDir, prefix: &str, count: u16) -> Vec<PathBuf> {
    (0..count)
        .map(|no| {
            let p = dir.join(&format!("{prefix}-{:05}-of-{count:05}.gguf", no + 1));
            part(no, count).write(&p).unwrap();
            p
        })
        .collect()
}

#[test]
fn split_names_parse() {
    let s = SplitName::parse("DeepSeek-V3-Q4_K_M-00002-of-00009.gguf").unwrap();
    assert_eq!((s.prefix.as_str(), s.no, s.count), ("DeepSeek-V3-Q4_K_M", 2, 9));
    assert_eq!(s.sibling(9), "DeepSeek-V3-Q4_K_M-00009-of-00009.gguf");
    let s = SplitName::parse("m-1-of-12.GGUF").unwrap();
    assert_eq!((s.no, s.count, s.sibling(3)), (1, 12, "m-3-of-12.gguf".to_owned()));
    for bad in [
        "m.gguf",
        "m-00000-of-00003.gguf",
        "m-00004-of-00003.gguf",
        "-00001-of-00002.gguf",
        "m-0000a-of-00002.gguf",
        "m-00001-of-.gguf",
        "m-00001-of-00002.bin",
        "m-99999999999-of-99999999999.gguf",
        ".gguf",
        "",
        "é",
    ] {
        assert_eq!(SplitName::parse(bad), None, "{bad}");
    }
}

#[test]
fn any_part_or_the_folder_opens_the_whole_set() {
    let dir = TempDir::new("split");
    let paths = write_set(&dir, "model", 3);
    dir.write("README.md", b"not a model");
    dir.write("config.json", b"{}");
    for open in [paths[0].clone(), paths[1].clone(), paths[2].clone(), dir.path().to_owned()] {
        let m = GgufModel::open(&open).unwrap();
        assert_eq!(m.paths(), &paths[..]);
        assert_eq!(m.arch(), Some("qwen3moe"));
        assert_eq!(m.metadata().get_u64("split.no"), Some(0));
        assert_eq!(m.tensor_names(), ["blk.0.w", "blk.1.w", "blk.2.w"]);
        for no in 0..3u8 {
            let t = m.tensor(&format!("blk.{no}.w")).unwrap();
            assert_eq!(&*t.data, &pattern(8, no)[..]);
        }
        assert!(m.contains("blk.2.w"));
        assert_eq!(m.tensor_info("blk.1.w").unwrap().shape, [2]);
        assert_msg(&m.tensor("blk.3.w").unwrap_err(), &["no tensor named `blk.3.w`"]);
    }
}

#[test]
fn a_missing_part_is_named() {
    let dir = TempDir::new("missing-part");
    let paths = write_set(&dir, "model", 4);
    std::fs::remove_file(&paths[2]).unwrap();
    std::fs::remove_file(&paths[3]).unwrap();
    for open in [paths[0].clone(), dir.path().to_owned()] {
        let e = GgufModel::open(&open).unwrap_err();
        assert!(matches!(e, FormatError::BadSplit { .. }), "{e}");
        assert_msg(
            &e,
            &["missing 2 part(s)", "model-00003-of-00004.gguf, model-00004-of-00004.gguf"],
        );
    }
}

#[test]
fn split_metadata_must_agree_with_file_names() {
    let dir = TempDir::new("split-meta");
    write_set(&dir, "m", 2);
    // Part 2 claims to be part 3 of 3.
    let p = dir.join("m-00002-of-00002.gguf");
    part(2, 3).write(&p).unwrap();
    assert_msg(
        &GgufModel::open(dir.path()).unwrap_err(),
        &["m-00002-of-00002.gguf", "split.count is 3"],
    );
    let mut bytes = part(0, 2).to_bytes();
    let at = kv_type_pos(&bytes, "split.no") + 4;
    bytes[at] = 1;
    std::fs::write(dir.join("m-00001-of-00002.gguf"), &bytes).unwrap();
    part(1, 2).write(&p).unwrap();
    assert_msg(
        &GgufModel::open(dir.path()).unwrap_err(),
        &["m-00001-of-00002.gguf", "split.no is 1", "part 1 of 2"],
    );
}

#[test]
fn split_tensor_count_must_match() {
    let dir = TempDir::new("split-count");
    let paths = write_set(&dir, "m", 2);
    let mut w = part(0, 2);
    w.tensor("extra", GgmlType::F32, vec![1], vec![0; 4]).unwrap();
    w.write(&paths[0]).unwrap();
    assert_msg(
        &GgufModel::open(&paths[1]).unwrap_err(),
        &["split.tensors.count is 2", "hold 3 tensors"],
    );
}

#[test]
fn a_lone_file_that_says_it_is_split_is_an_error() {
    let dir = TempDir::new("lone");
    let p = dir.join("renamed.gguf");
    part(0, 2).write(&p).unwrap();
    assert_msg(
        &GgufModel::open(&p).unwrap_err(),
        &["renamed.gguf", "split.count is 2", "1 file(s)"],
    );
}

#[test]
fn duplicate_tensors_across_parts_name_both_files() {
    let dir = TempDir::new("dup");
    let paths = write_set(&dir, "m", 2);
    let mut w = part(1, 2);
    w.tensor("blk.0.w", GgmlType::F32, vec![1], vec![0; 4]).unwrap();
    w.write(&paths[1]).unwrap();
    let e = GgufModel::open(&paths[0]).unwrap_err();
    assert!(matches!(e, FormatError::DuplicateTensor { .. }));
    assert_msg(&e, &["`blk.0.w` appears twice", "m-00001-of-00002.gguf", "m-00002-of-00002.gguf"]);
}

#[test]
fn folders_hold_exactly_one_model() {
    let dir = TempDir::new("one");
    small_writer().write(dir.join("tiny.gguf")).unwrap();
    let m = GgufModel::open(dir.path()).unwrap();
    assert_eq!(m.paths(), [dir.join("tiny.gguf")]);
    assert_eq!(m.name(), dir.path().display().to_string());
    assert_eq!(m.tensor_names().len(), 3);

    write_set(&dir, "big", 2);
    let e = GgufModel::open(dir.path()).unwrap_err();
    assert!(matches!(e, FormatError::BadFolder { .. }));
    assert_msg(&e, &["holds 2 models", "big-00001-of-00002.gguf (+1 more parts)", "tiny.gguf"]);
    // Naming one file still works.
    assert_eq!(GgufModel::open(dir.join("tiny.gguf")).unwrap().tensor_names().len(), 3);
    assert_eq!(GgufModel::open(dir.join("big-00002-of-00002.gguf")).unwrap().paths().len(), 2);

    let empty = TempDir::new("empty");
    empty.write("notes.txt", b"");
    assert_msg(&GgufModel::open(empty.path()).unwrap_err(), &["holds no .gguf files"]);
}

#[test]
fn models_from_memory_and_generic_use() {
    let parts: Vec<GgufFile> = (0..2u16)
        .map(|no| GgufFile::from_bytes(format!("p{no}"), shared(&part(no, 2).to_bytes())).unwrap())
        .collect();
    let m = GgufModel::from_parts("mem", parts, vec![]).unwrap();
    fn count<S: TensorSource>(s: &S) -> usize {
        s.tensor_names().iter().filter(|n| s.contains(n) && s.tensor(n).is_ok()).count()
    }
    assert_eq!(count(&m), 2);
    assert_eq!(count(&&m), 2);
    assert_eq!(count(&std::sync::Arc::new(m)), 2);
    assert!(GgufModel::from_parts("none", vec![], vec![]).is_err());
}
