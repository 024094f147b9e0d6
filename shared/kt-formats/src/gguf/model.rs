//! A GGUF model: one file, a split set (`NAME-00001-of-00003.gguf`, as written by
//! `llama-gguf-split`), or a folder holding either (as KTransformers' `--gguf_path` accepts).
//!
//! Split parts carry `split.no` (0-based), `split.count` and, in the first part,
//! `split.tensors.count`; the model's metadata is the first part's, its tensors are the union
//! of all parts'.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use kt_core::WeightTensor;

use super::{GgufFile, Metadata, TensorInfo};
use crate::FormatError;

/// A parsed split-file name: `{prefix}-{no}-of-{count}.gguf`, `no` 1-based.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitName {
    pub prefix: String,
    pub no: u32,
    pub count: u32,
    no_width: usize,
    count_width: usize,
}

impl SplitName {
    /// Parses a file name such as `DeepSeek-V3-Q4_K_M-00002-of-00009.gguf`; `None` when the
    /// name does not follow the pattern or has `no` outside `1..=count`.
    pub fn parse(file_name: &str) -> Option<Self> {
        let stem = strip_gguf_ext(file_name)?;
        let (left, count_s) = stem.rsplit_once("-of-")?;
        let (prefix, no_s) = left.rsplit_once('-')?;
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if prefix.is_empty() || !digits(no_s) || !digits(count_s) {
            return None;
        }
        let no: u32 = no_s.parse().ok()?;
        let count: u32 = count_s.parse().ok()?;
        if no == 0 || no > count {
            return None;
        }
        Some(Self {
            prefix: prefix.to_owned(),
            no,
            count,
            no_width: no_s.len(),
            count_width: count_s.len(),
        })
    }

    /// The file name of part `no` of the same set.
    pub fn sibling(&self, no: u32) -> String {
        format!(
            "{}-{:0nw$}-of-{:0cw$}.gguf",
            self.prefix,
            no,
            self.count,
            nw = self.no_width,
            cw = self.count_width
        )
    }
}

fn strip_gguf_ext(file_name: &str) -> Option<&str> {
    let cut = file_name.len().checked_sub(5)?;
    let (stem, ext) = (file_name.get(..cut)?, file_name.get(cut..)?);
    ext.eq_ignore_ascii_case(".gguf").then_some(stem)
}

/// A GGUF model, possibly split over several files.
pub struct GgufModel {
    name: String,
    parts: Vec<GgufFile>,
    paths: Vec<PathBuf>,
    index: HashMap<String, (usize, usize)>,
}

impl std::fmt::Debug for GgufModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufModel")
            .field("name", &self.name)
            .field("paths", &self.paths)
            .field("tensors", &self.index.len())
            .finish()
    }
}

impl GgufModel {
    /// Opens a `.gguf` file, the split set a `NAME-0000N-of-0000M.gguf` file belongs to, or
    /// the one model in a folder.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, FormatError> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| FormatError::io(path, e))?;
        if meta.is_dir() {
            return open_dir(path);
        }
        let split = path.file_name().and_then(|n| n.to_str()).and_then(SplitName::parse);
        match split {
            Some(split) if split.count > 1 => open_split(path, &split),
            _ => {
                let file = GgufFile::open(path)?;
                Self::from_parts(path.display().to_string(), vec![file], vec![path.to_owned()])
            }
        }
    }

    /// Assembles a model from parsed parts, in split order. Checks that their `split.no` and
    /// `split.count` metadata, where present, agree with their positions, and that no tensor
    /// name appears twice. `paths` may be empty (for parts parsed from memory).
    pub fn from_parts(
        name: impl Into<String>,
        parts: Vec<GgufFile>,
        paths: Vec<PathBuf>,
    ) -> Result<Self, FormatError> {
        let name = name.into();
        if parts.is_empty() {
            return Err(FormatError::BadSplit { path: name, reason: "no GGUF files".to_owned() });
        }
        let bad = |part: &GgufFile, reason: String| FormatError::BadSplit {
            path: part.name().to_owned(),
            reason,
        };
        let n = parts.len();
        for (i, part) in parts.iter().enumerate() {
            let m = part.metadata();
            if let Some(v) = m.get("split.count") {
                if v.as_u64() != Some(n as u64) {
                    let hint = if n == 1 {
                        "; open one file of the set, named NAME-0000N-of-0000M.gguf, or their folder"
                    } else {
                        ""
                    };
                    return Err(bad(
                        part,
                        format!("metadata split.count is {v} but the set has {n} file(s){hint}"),
                    ));
                }
            }
            if let Some(v) = m.get("split.no") {
                if v.as_u64() != Some(i as u64) {
                    return Err(bad(
                        part,
                        format!(
                            "metadata split.no is {v} but the file is part {} of {n} \
                             (split.no counts from 0)",
                            i + 1
                        ),
                    ));
                }
            }
        }

        let mut index = HashMap::new();
        for (p, part) in parts.iter().enumerate() {
            for (t, info) in part.tensor_infos().iter().enumerate() {
                if let Some((q, _)) = index.insert(info.name.clone(), (p, t)) {
                    let first = parts.get(q).map(|f| f.name().to_owned()).unwrap_or_default();
                    return Err(FormatError::DuplicateTensor {
                        name: info.name.clone(),
                        first,
                        second: part.name().to_owned(),
                    });
                }
            }
        }

        if let Some(v) = parts[0].metadata().get("split.tensors.count") {
            if v.as_u64() != Some(index.len() as u64) {
                return Err(bad(
                    &parts[0],
                    format!(
                        "metadata split.tensors.count is {v} but the {n} file(s) hold {} tensors",
                        index.len()
                    ),
                ));
            }
        }

        Ok(Self { name, parts, paths, index })
    }

    /// The path the model was opened from (or the name given to [`GgufModel::from_parts`]).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The metadata of the first part.
    pub fn metadata(&self) -> &Metadata {
        self.parts[0].metadata()
    }

    /// `general.architecture`.
    pub fn arch(&self) -> Option<&str> {
        self.metadata().arch()
    }

    /// The files, in split order.
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    pub fn parts(&self) -> &[GgufFile] {
        &self.parts
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        let &(p, t) = self.index.get(name)?;
        self.parts.get(p)?.tensor_infos().get(t)
    }

    /// Tensor names, in file order, part after part.
    pub fn tensor_names(&self) -> Vec<String> {
        self.parts.iter().flat_map(|p| p.tensor_infos().iter().map(|t| t.name.clone())).collect()
    }

    /// Tensor descriptions, in file order, part after part.
    pub fn tensor_infos(&self) -> impl Iterator<Item = &TensorInfo> {
        self.parts.iter().flat_map(|p| p.tensor_infos().iter())
    }

    /// The tensor `name`, its data a zero-copy slice of the file holding it.
    pub fn tensor(&self, name: &str) -> Result<WeightTensor, FormatError> {
        let not_found = || FormatError::TensorNotFound {
            source_name: self.name.clone(),
            name: name.to_owned(),
        };
        let &(p, t) = self.index.get(name).ok_or_else(not_found)?;
        let part = self.parts.get(p).ok_or_else(not_found)?;
        let info = part.tensor_infos().get(t).ok_or_else(not_found)?;
        part.load(info)
    }
}

fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// The `.gguf` files directly in `dir`, sorted by name.
fn gguf_files(dir: &Path) -> Result<Vec<(String, PathBuf)>, FormatError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| FormatError::io(dir, e))? {
        let entry = entry.map_err(|e| FormatError::io(dir, e))?;
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else { continue };
        if strip_gguf_ext(&name).is_some() && path.is_file() {
            out.push((name, path));
        }
    }
    out.sort();
    Ok(out)
}

/// Opens every part of the set that `path` (named by `split`) belongs to.
fn open_split(path: &Path, split: &SplitName) -> Result<GgufModel, FormatError> {
    let dir = dir_of(path);
    let mut found: BTreeMap<u32, PathBuf> = BTreeMap::new();
    for (name, p) in gguf_files(dir)? {
        let Some(s) = SplitName::parse(&name) else { continue };
        if s.prefix != split.prefix || s.count != split.count {
            continue;
        }
        if let Some(other) = found.insert(s.no, p.clone()) {
            return Err(FormatError::BadSplit {
                path: path.display().to_string(),
                reason: format!(
                    "both {} and {} claim to be part {} of {}",
                    other.display(),
                    p.display(),
                    s.no,
                    s.count
                ),
            });
        }
    }
    let missing: Vec<String> = (1..=split.count)
        .filter(|no| !found.contains_key(no))
        .map(|no| split.sibling(no))
        .collect();
    if !missing.is_empty() {
        const SHOWN: usize = 4;
        let mut list = missing.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
        if missing.len() > SHOWN {
            list.push_str(&format!(" and {} more", missing.len() - SHOWN));
        }
        return Err(FormatError::BadSplit {
            path: path.display().to_string(),
            reason: format!(
                "split set `{}` of {} parts is missing {} part(s) in {}: {list}",
                split.prefix,
                split.count,
                missing.len(),
                dir.display()
            ),
        });
    }
    let paths: Vec<PathBuf> = found.into_values().collect();
    let parts = paths.iter().map(GgufFile::open).collect::<Result<Vec<_>, _>>()?;
    GgufModel::from_parts(path.display().to_string(), parts, paths)
}

/// Opens the one model (a file or a split set) in `dir`.
fn open_dir(dir: &Path) -> Result<GgufModel, FormatError> {
    let files = gguf_files(dir)?;
    // Model key → its files.
    let mut models: BTreeMap<String, Vec<(String, PathBuf)>> = BTreeMap::new();
    for (name, path) in files {
        let key = match SplitName::parse(&name) {
            Some(s) if s.count > 1 => format!("{}-*-of-{}", s.prefix, s.count),
            _ => name.clone(),
        };
        models.entry(key).or_default().push((name, path));
    }
    let bad = |reason: String| FormatError::BadFolder { dir: dir.display().to_string(), reason };
    let mut models = models.into_iter();
    let Some((_, files)) = models.next() else {
        return Err(bad("holds no .gguf files".to_owned()));
    };
    if models.len() > 0 {
        let all: Vec<String> = std::iter::once(describe(&files))
            .chain(models.map(|(_, files)| describe(&files)))
            .collect();
        return Err(bad(format!(
            "holds {} models, not one: {}; pass the path of the file to load",
            all.len(),
            all.join("; ")
        )));
    }
    let Some((name, path)) = files.first() else {
        return Err(bad("holds no .gguf files".to_owned()));
    };
    match SplitName::parse(name) {
        Some(split) if split.count > 1 => open_split(path, &split),
        _ => {
            let file = GgufFile::open(path)?;
            GgufModel::from_parts(dir.display().to_string(), vec![file], vec![path.clone()])
        }
    }
}

fn describe(files: &[(String, PathBuf)]) -> String {
    match files {
        [(name, _)] => name.clone(),
        [(first, _), ..] => format!("{first} (+{} more parts)", files.len() - 1),
        [] => String::new(),
    }
}
