//! A Hugging Face model folder: `config.json` and the weights in safetensors files.
//!
//! The weights are, in order of preference: the shards that `model.safetensors.index.json`
//! lists in its `weight_map` (tensor name → file name), the single `model.safetensors`, or
//! every `*.safetensors` file in the folder.

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use kt_core::WeightTensor;

use crate::safetensors::{SafetensorsFile, SafetensorsInfo};
use crate::FormatError;

pub const CONFIG_FILE: &str = "config.json";
pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const SINGLE_FILE: &str = "model.safetensors";

/// An opened Hugging Face model folder.
pub struct HfFolder {
    dir: PathBuf,
    config: serde_json::Value,
    config_path: PathBuf,
    files: Vec<SafetensorsFile>,
    paths: Vec<PathBuf>,
    index: HashMap<String, (usize, usize)>,
}

impl std::fmt::Debug for HfFolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfFolder")
            .field("dir", &self.dir)
            .field("paths", &self.paths)
            .field("tensors", &self.index.len())
            .finish()
    }
}

impl HfFolder {
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, FormatError> {
        let dir = dir.as_ref();
        let bad =
            |reason: String| FormatError::BadFolder { dir: dir.display().to_string(), reason };
        if !dir.is_dir() {
            return Err(bad("is not a folder".to_owned()));
        }

        let config_path = dir.join(CONFIG_FILE);
        let config = match std::fs::read(&config_path) {
            Ok(bytes) => read_json(&config_path, &bytes)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(bad(format!("has no {CONFIG_FILE}")));
            }
            Err(e) => return Err(FormatError::io(&config_path, e)),
        };

        let index_path = dir.join(INDEX_FILE);
        let (paths, weight_map) = if index_path.is_file() {
            let (paths, map) = read_index(dir, &index_path)?;
            (paths, Some(map))
        } else if dir.join(SINGLE_FILE).is_file() {
            (vec![dir.join(SINGLE_FILE)], None)
        } else {
            let paths = safetensors_files(dir)?;
            if paths.is_empty() {
                return Err(bad(format!("has no .safetensors files (and no {INDEX_FILE})")));
            }
            (paths, None)
        };

        let files = paths.iter().map(SafetensorsFile::open).collect::<Result<Vec<_>, _>>()?;
        let mut index = HashMap::new();
        for (f, file) in files.iter().enumerate() {
            for (t, info) in file.tensor_infos().iter().enumerate() {
                if let Some((g, _)) = index.insert(info.name.clone(), (f, t)) {
                    return Err(FormatError::DuplicateTensor {
                        name: info.name.clone(),
                        first: files.get(g).map(|x| x.name().to_owned()).unwrap_or_default(),
                        second: file.name().to_owned(),
                    });
                }
            }
        }

        // Every tensor the index promises must be where it says.
        if let Some(map) = weight_map {
            for (tensor, shard) in map {
                let in_shard = index
                    .get(&tensor)
                    .and_then(|&(f, _)| paths.get(f))
                    .is_some_and(|p| p.file_name() == Some(OsStr::new(&shard)));
                if !in_shard {
                    return Err(FormatError::BadFolder {
                        dir: index_path.display().to_string(),
                        reason: format!(
                            "lists tensor `{tensor}` in {shard}, which does not hold it"
                        ),
                    });
                }
            }
        }

        Ok(Self { dir: dir.to_owned(), config, config_path, files, paths, index })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `config.json`, parsed.
    pub fn config(&self) -> &serde_json::Value {
        &self.config
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The safetensors files, in the order they were opened.
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    pub fn files(&self) -> &[SafetensorsFile] {
        &self.files
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn tensor_info(&self, name: &str) -> Option<&SafetensorsInfo> {
        let &(f, t) = self.index.get(name)?;
        self.files.get(f)?.tensor_infos().get(t)
    }

    /// Tensor names, file after file, each file's in data order.
    pub fn tensor_names(&self) -> Vec<String> {
        self.files.iter().flat_map(|f| f.tensor_names()).collect()
    }

    /// The tensor `name` (F32, F16 or BF16), its data a zero-copy slice of its file.
    pub fn tensor(&self, name: &str) -> Result<WeightTensor, FormatError> {
        let file = self.index.get(name).and_then(|&(f, _)| self.files.get(f)).ok_or_else(|| {
            FormatError::TensorNotFound {
                source_name: self.dir.display().to_string(),
                name: name.to_owned(),
            }
        })?;
        file.tensor(name)
    }
}

fn read_json(path: &Path, bytes: &[u8]) -> Result<serde_json::Value, FormatError> {
    serde_json::from_slice(bytes)
        .map_err(|source| FormatError::Json { file: path.display().to_string(), source })
}

/// `(tensor, shard file name)` pairs.
type WeightMap = Vec<(String, String)>;

/// The shard paths `model.safetensors.index.json` names (each once, sorted) and its weight map.
fn read_index(dir: &Path, index_path: &Path) -> Result<(Vec<PathBuf>, WeightMap), FormatError> {
    let bytes = std::fs::read(index_path).map_err(|e| FormatError::io(index_path, e))?;
    let json = read_json(index_path, &bytes)?;
    let bad =
        |reason: String| FormatError::BadFolder { dir: index_path.display().to_string(), reason };
    let Some(map) = json.get("weight_map").and_then(|m| m.as_object()) else {
        return Err(bad("has no `weight_map` object".to_owned()));
    };
    let mut weight_map = Vec::with_capacity(map.len());
    let mut shards = BTreeSet::new();
    for (tensor, shard) in map {
        let Some(shard) = shard.as_str() else {
            return Err(bad(format!("maps tensor `{tensor}` to {shard}, not a file name")));
        };
        // A plain file name in this folder: no separators, no `..`.
        if Path::new(shard).file_name() != Some(OsStr::new(shard)) {
            return Err(bad(format!(
                "maps tensor `{tensor}` to `{shard}`, which is not a file name in the folder"
            )));
        }
        if shards.insert(shard.to_owned()) && !dir.join(shard).is_file() {
            return Err(bad(format!(
                "lists shard {shard} (holding `{tensor}`), which is missing from {}",
                dir.display()
            )));
        }
        weight_map.push((tensor.clone(), shard.to_owned()));
    }
    Ok((shards.into_iter().map(|s| dir.join(s)).collect(), weight_map))
}

/// Every `*.safetensors` file in `dir`, sorted.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, FormatError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| FormatError::io(dir, e))? {
        let path = entry.map_err(|e| FormatError::io(dir, e))?.path();
        if path.extension() == Some(OsStr::new("safetensors")) && path.is_file() {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}
