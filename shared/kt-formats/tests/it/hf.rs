use kt_core::GgmlType;
use kt_formats::{FormatError, HfFolder, TensorSource};

use crate::support::*;

const CONFIG: &[u8] =
    br#"{"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 8, "num_experts": 4}"#;

fn shard(names: &[&str], seed: u8) -> Vec<u8> {
    let entries: Vec<(&str, &str, &[usize], Vec<u8>)> =
        names.iter().map(|n| (*n, "BF16", &[2usize, 2][..], pattern(8, seed))).collect();
    safetensors(&entries)
}

fn index(map: &[(&str, &str)]) -> Vec<u8> {
    let map: serde_json::Map<String, serde_json::Value> =
        map.iter().map(|(t, f)| ((*t).to_owned(), serde_json::Value::from(*f))).collect();
    serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map}).to_string().into_bytes()
}

#[test]
fn single_file_folder() {
    let dir = TempDir::new("hf-single");
    dir.write("config.json", CONFIG);
    dir.write("model.safetensors", &shard(&["a", "b"], 1));
    // Ignored: model.safetensors wins over other safetensors files when there is no index.
    dir.write("consolidated.safetensors", &shard(&["a"], 2));
    dir.write("tokenizer.json", b"{}");
    let hf = HfFolder::open(dir.path()).unwrap();
    assert_eq!(hf.config()["hidden_size"], 8);
    assert_eq!(hf.config_path(), dir.join("config.json"));
    assert_eq!(hf.paths(), [dir.join("model.safetensors")]);
    assert_eq!(hf.tensor_names(), ["a", "b"]);
    let t = hf.tensor("a").unwrap();
    assert_eq!((t.ty, t.shape.clone(), &*t.data), (GgmlType::BF16, vec![2, 2], &pattern(8, 1)[..]));
    assert_msg(&hf.tensor("zz").unwrap_err(), &["no tensor named `zz`", "hf-single"]);
}

#[test]
fn sharded_folder_with_index() {
    let dir = TempDir::new("hf-index");
    dir.write("config.json", CONFIG);
    dir.write("model-00001-of-00002.safetensors", &shard(&["a", "b"], 1));
    dir.write("model-00002-of-00002.safetensors", &shard(&["c"], 2));
    dir.write("stray.safetensors", &shard(&["a"], 3));
    dir.write(
        "model.safetensors.index.json",
        &index(&[
            ("a", "model-00001-of-00002.safetensors"),
            ("b", "model-00001-of-00002.safetensors"),
            ("c", "model-00002-of-00002.safetensors"),
        ]),
    );
    let hf = HfFolder::open(dir.path()).unwrap();
    assert_eq!(hf.paths().len(), 2);
    assert_eq!(hf.tensor_names(), ["a", "b", "c"]);
    assert_eq!(&*hf.tensor("c").unwrap().data, &pattern(8, 2)[..]);
    assert!(hf.contains("b") && !hf.contains("d"));

    fn generic<S: TensorSource>(s: &S) -> Vec<String> {
        s.tensor_names()
    }
    assert_eq!(generic(&hf).len(), 3);
}

#[test]
fn index_problems_are_named() {
    let dir = TempDir::new("hf-index-bad");
    dir.write("config.json", CONFIG);
    dir.write("model-00001-of-00002.safetensors", &shard(&["a"], 1));
    let idx = |map: &[(&str, &str)]| dir.write("model.safetensors.index.json", &index(map));

    idx(&[("a", "model-00001-of-00002.safetensors"), ("c", "model-00002-of-00002.safetensors")]);
    let e = HfFolder::open(dir.path()).unwrap_err();
    assert!(matches!(e, FormatError::BadFolder { .. }));
    assert_msg(
        &e,
        &[
            "model.safetensors.index.json",
            "model-00002-of-00002.safetensors (holding `c`), which is missing",
        ],
    );

    idx(&[("a", "model-00001-of-00002.safetensors"), ("b", "model-00001-of-00002.safetensors")]);
    assert_msg(
        &HfFolder::open(dir.path()).unwrap_err(),
        &["lists tensor `b` in model-00001-of-00002.safetensors, which does not hold it"],
    );

    for evil in ["../model-00001-of-00002.safetensors", "/etc/passwd", "sub/x.safetensors", ".."] {
        idx(&[("a", evil)]);
        assert_msg(&HfFolder::open(dir.path()).unwrap_err(), &["not a file name in the folder"]);
    }

    dir.write("model.safetensors.index.json", br#"{"weight_map": {"a": 3}}"#);
    assert_msg(&HfFolder::open(dir.path()).unwrap_err(), &["maps tensor `a` to 3"]);
    dir.write("model.safetensors.index.json", br#"{"metadata": {}}"#);
    assert_msg(&HfFolder::open(dir.path()).unwrap_err(), &["has no `weight_map` object"]);
    dir.write("model.safetensors.index.json", b"{");
    assert_msg(
        &HfFolder::open(dir.path()).unwrap_err(),
        &["model.safetensors.index.json: invalid JSON"],
    );
}

#[test]
fn without_index_every_safetensors_file_is_read() {
    let dir = TempDir::new("hf-all");
    dir.write("config.json", CONFIG);
    dir.write("b.safetensors", &shard(&["y"], 1));
    dir.write("a.safetensors", &shard(&["x"], 2));
    dir.write("notes.txt", b"");
    let hf = HfFolder::open(dir.path()).unwrap();
    assert_eq!(hf.tensor_names(), ["x", "y"]);

    dir.write("c.safetensors", &shard(&["x"], 3));
    let e = HfFolder::open(dir.path()).unwrap_err();
    assert!(matches!(e, FormatError::DuplicateTensor { .. }));
    assert_msg(&e, &["`x` appears twice", "a.safetensors", "c.safetensors"]);

    // A broken shard names itself.
    dir.write("c.safetensors", &[1, 0, 0, 0, 0, 0, 0, 0, b'{']);
    assert_msg(&HfFolder::open(dir.path()).unwrap_err(), &["c.safetensors: invalid JSON"]);
}

#[test]
fn folder_problems_are_named() {
    let dir = TempDir::new("hf-bad");
    dir.write("model.safetensors", &shard(&["a"], 1));
    let e = HfFolder::open(dir.path()).unwrap_err();
    assert!(matches!(e, FormatError::BadFolder { .. }));
    assert_msg(&e, &["hf-bad", "has no config.json"]);

    dir.write("config.json", b"{\"hidden_size\": ");
    assert_msg(&HfFolder::open(dir.path()).unwrap_err(), &["config.json: invalid JSON"]);

    let empty = TempDir::new("hf-empty");
    empty.write("config.json", CONFIG);
    assert_msg(&HfFolder::open(empty.path()).unwrap_err(), &["has no .safetensors files"]);

    assert_msg(&HfFolder::open(empty.join("config.json")).unwrap_err(), &["is not a folder"]);

    let trunc = TempDir::new("hf-trunc");
    trunc.write("config.json", CONFIG);
    let mut b = shard(&["a"], 1);
    b.pop();
    trunc.write("model.safetensors", &b);
    assert_msg(
        &HfFolder::open(trunc.path()).unwrap_err(),
        &["model.safetensors: tensor `a`", "do not lie within"],
    );
}
