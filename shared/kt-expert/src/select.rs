//! `--experts SPEC`: which routed experts a server holds (until placement plans drive it).
//!
//! ```text
//! SPEC  := ITEM (';' ITEM)*          first item whose layers match decides; no match = none
//! ITEM  := [LAYERS '@'] RULE         no LAYERS = every layer
//! LAYERS:= N | A-B | A-              inclusive layer ranges
//! RULE  := all | none | mod:M:R      expert ids ≡ R (mod M)
//!        | range:A-B                 expert ids A..=B
//!        | list:A,B,...              those expert ids
//! ```
//! e.g. `mod:2:0` (even experts everywhere), `0-3@all;4-@range:0-7`.

use crate::ExpertError;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Rule {
    All,
    None,
    Mod { m: usize, r: usize },
    Range { lo: usize, hi: usize },
    List(Vec<usize>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Item {
    /// Inclusive layer range; `None` = all layers.
    layers: Option<(usize, usize)>,
    rule: Rule,
}

/// A parsed `--experts` spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    items: Vec<Item>,
}

impl Default for Selection {
    fn default() -> Self {
        Self { items: vec![Item { layers: None, rule: Rule::All }] }
    }
}

impl std::str::FromStr for Selection {
    type Err = ExpertError;

    fn from_str(spec: &str) -> Result<Self, ExpertError> {
        let bad = |reason: String| ExpertError::Spec { spec: spec.to_string(), reason };
        let num = |s: &str| {
            s.trim()
                .parse::<usize>()
                .map_err(|_| bad(format!("`{s}` is not a non-negative integer")))
        };
        let mut items = Vec::new();
        for part in spec.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (layers, rule) = match part.split_once('@') {
                Some((l, r)) => {
                    let range = match l.split_once('-') {
                        Some((a, "")) => (num(a)?, usize::MAX),
                        Some((a, b)) => (num(a)?, num(b)?),
                        None => (num(l)?, num(l)?),
                    };
                    if range.0 > range.1 {
                        return Err(bad(format!("layer range `{l}` is empty")));
                    }
                    (Some(range), r.trim())
                }
                None => (None, part),
            };
            let rule = match rule.split_once(':') {
                None if rule == "all" => Rule::All,
                None if rule == "none" => Rule::None,
                Some(("mod", rest)) => {
                    let (m, r) = rest
                        .split_once(':')
                        .ok_or_else(|| bad(format!("`{rule}`: mod:M:R was expected")))?;
                    let (m, r) = (num(m)?, num(r)?);
                    if m == 0 || r >= m {
                        return Err(bad(format!("`{rule}`: need M > 0 and R < M")));
                    }
                    Rule::Mod { m, r }
                }
                Some(("range", rest)) => {
                    let (a, b) = rest
                        .split_once('-')
                        .ok_or_else(|| bad(format!("`{rule}`: range:A-B was expected")))?;
                    let (lo, hi) = (num(a)?, num(b)?);
                    if lo > hi {
                        return Err(bad(format!("`{rule}` is empty")));
                    }
                    Rule::Range { lo, hi }
                }
                Some(("list", rest)) => {
                    Rule::List(rest.split(',').map(num).collect::<Result<_, _>>()?)
                }
                _ => {
                    return Err(bad(format!(
                        "`{rule}`: all, none, mod:M:R, range:A-B or list:A,B,... was expected"
                    )))
                }
            };
            items.push(Item { layers, rule });
        }
        if items.is_empty() {
            return Err(bad("empty".into()));
        }
        Ok(Self { items })
    }
}

impl Selection {
    /// Whether expert `expert` of `layer` is held.
    pub fn holds(&self, layer: usize, expert: usize) -> bool {
        let Some(item) =
            self.items.iter().find(|i| i.layers.is_none_or(|(lo, hi)| (lo..=hi).contains(&layer)))
        else {
            return false;
        };
        match &item.rule {
            Rule::All => true,
            Rule::None => false,
            Rule::Mod { m, r } => expert % m == *r,
            Rule::Range { lo, hi } => (*lo..=*hi).contains(&expert),
            Rule::List(ids) => ids.contains(&expert),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn specs() {
        let s: Selection = "mod:2:1".parse().unwrap();
        assert!(s.holds(0, 1) && s.holds(5, 3) && !s.holds(0, 2));
        let s: Selection = "0-1@all; 2-@range:0-3".parse().unwrap();
        assert!(s.holds(1, 60) && s.holds(2, 3) && !s.holds(9, 4));
        let s: Selection = "3@list:1,5".parse().unwrap();
        assert!(s.holds(3, 5) && !s.holds(3, 2) && !s.holds(2, 1));
        assert!(Selection::default().holds(7, 7));
        assert!(!"none".parse::<Selection>().unwrap().holds(0, 0));
    }

    #[test]
    fn bad_specs() {
        for bad in ["", "mod:0:0", "mod:2:2", "range:3-1", "x", "a@all", "3-1@all", "list:1,x"] {
            let e = bad.parse::<Selection>().unwrap_err();
            assert!(e.to_string().contains("--experts"), "{bad}: {e}");
        }
    }
}
