//! Named dataset recipes (`datasets/<name>.toml`): where a dataset comes from, which converter
//! reads it and how much of it to keep, and the seeded mixing of several recipes into one
//! [`Converted`].
//!
//! # Format
//!
//! ```toml
//! description = "Anthropic HH-RLHF, helpful and harmless"   # optional, free text
//! converter = "hh-rlhf"        # a name from `Converter::NAMES`
//! sample = 2000                # optional: keep at most this many pairs and this many MC items
//! seed = 42                    # optional, default 42: the shuffle before `sample`, converters
//!
//! [source]                     # exactly one of `path` and `hub`
//! hub = "Anthropic/hh-rlhf"    # a Hugging Face dataset id ...
//! config = "default"           # ... with its config (default "default")
//! split = "train"              # ... and split (default "train")
//! # path = "crates/reprpo-data/embedded/train.jsonl"  # or a local file, relative to the workspace root
//! ```
//!
//! The recipe's name is its file stem. Unknown keys, a missing `converter` or `source`, both or
//! neither of `path` and `hub`, `config`/`split` beside `path`, an unknown converter and
//! `sample = 0` are [`DataError::Config`] errors naming the file and the key.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::Deserialize;

use crate::convert::{ConvertOptions, Converted, Converter, convert};
use crate::error::{DataError, Result};
use crate::read::read_table;

/// The seed a recipe gets when it names none.
pub const DEFAULT_RECIPE_SEED: u64 = 42;

/// A dataset on the Hugging Face Hub: id, config and split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSource {
    /// The dataset id, e.g. `Anthropic/hh-rlhf`.
    pub repo: String,
    /// The dataset config (subset), `"default"` unless the recipe says otherwise.
    pub config: String,
    /// The split, `"train"` unless the recipe says otherwise.
    pub split: String,
}

impl fmt::Display for HubSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (config {}, split {})",
            self.repo, self.config, self.split
        )
    }
}

/// Where a recipe's rows come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A local file, as written in the recipe (relative paths are relative to the workspace
    /// root; see [`Recipe::local_path`]).
    Path(PathBuf),
    /// A Hugging Face dataset, fetched by the resolver given to [`load_mixture`].
    Hub(HubSource),
}

/// One named dataset recipe, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Recipe {
    /// The recipe's name (its file stem).
    pub name: String,
    /// The recipe file it was read from.
    pub file: PathBuf,
    /// Where the rows come from.
    pub source: Source,
    /// The converter that turns the rows into pairs / MC items.
    pub converter: Converter,
    /// The converter's name as written in the recipe.
    pub converter_name: String,
    /// Keep at most this many pairs and this many MC items (after a seeded shuffle).
    pub sample: Option<usize>,
    /// Seed of the shuffle before `sample` and of converters that draw at random.
    pub seed: u64,
    /// Free-text description.
    pub description: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecipe {
    source: RawSource,
    converter: String,
    #[serde(default)]
    sample: Option<usize>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    description: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    hub: Option<String>,
    #[serde(default)]
    config: Option<String>,
    #[serde(default)]
    split: Option<String>,
}

/// The text between the first pair of backticks after `marker` in `message`.
fn backticked_after<'a>(message: &'a str, marker: &str) -> Option<&'a str> {
    let rest = &message[message.find(marker)? + marker.len()..];
    let rest = rest.strip_prefix('`')?;
    Some(&rest[..rest.find('`')?])
}

/// The dotted key a TOML error points at.
///
/// "missing field `x`" (only top-level keys are required): `x`. Otherwise the key on the line
/// where the error's span starts, prefixed with the `[table]` it sits in; inside an inline table
/// (`source = { ... }`) the field named by an "unknown field `x`" message is appended.
fn error_key(text: &str, err: &toml::de::Error) -> String {
    let message = err.message();
    if let Some(field) = backticked_after(message, "missing field ") {
        return field.to_string();
    }
    let start = err.span().map(|s| s.start).unwrap_or(0).min(text.len());
    let mut header = String::new();
    let mut offset = 0;
    let mut key = String::new();
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            header = trimmed
                .trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or_default()
                .trim()
                .to_string();
        }
        if offset + line.len() > start {
            if let Some((k, v)) = line.split_once('=') {
                key = k.trim().trim_matches('"').to_string();
                let brace = line.find('{').map(|i| offset + i);
                if v.trim_start().starts_with('{')
                    && brace.is_some_and(|b| start > b)
                    && let Some(field) = backticked_after(message, "unknown field ")
                {
                    key = format!("{key}.{field}");
                }
            }
            break;
        }
        offset += line.len();
    }
    match (header.is_empty(), key.is_empty()) {
        (true, _) => key,
        (false, true) => header,
        (false, false) => format!("{header}.{key}"),
    }
}

impl Recipe {
    /// Parse and validate recipe `name` from the TOML `text` of `file`.
    pub fn parse(name: &str, file: &Path, text: &str) -> Result<Recipe> {
        let config_err = |key: &str, problem: String| DataError::Config {
            file: file.to_path_buf(),
            key: key.to_string(),
            problem,
        };
        let raw: RawRecipe = toml::from_str(text)
            .map_err(|e| config_err(&error_key(text, &e), e.message().trim().to_string()))?;
        let converter = raw.converter.parse::<Converter>().map_err(|_| {
            config_err(
                "converter",
                format!(
                    "unknown converter `{}` (known: {})",
                    raw.converter,
                    Converter::NAMES.join(", ")
                ),
            )
        })?;
        let s = raw.source;
        let source = match (s.path, s.hub) {
            (Some(_), Some(_)) => {
                return Err(config_err(
                    "source",
                    "give exactly one of `path` and `hub`, not both".into(),
                ));
            }
            (None, None) => {
                return Err(config_err(
                    "source",
                    "give exactly one of `path` (a local file) and `hub` (a dataset id)".into(),
                ));
            }
            (Some(path), None) => {
                for (key, v) in [("source.config", &s.config), ("source.split", &s.split)] {
                    if v.is_some() {
                        return Err(config_err(key, "only a `hub` source has one".into()));
                    }
                }
                if path.trim().is_empty() {
                    return Err(config_err("source.path", "is empty".into()));
                }
                Source::Path(PathBuf::from(path))
            }
            (None, Some(repo)) => {
                if repo.trim().is_empty() {
                    return Err(config_err("source.hub", "is empty".into()));
                }
                Source::Hub(HubSource {
                    repo,
                    config: s.config.unwrap_or_else(|| "default".into()),
                    split: s.split.unwrap_or_else(|| "train".into()),
                })
            }
        };
        if raw.sample == Some(0) {
            return Err(config_err(
                "sample",
                "must be at least 1 (omit it to keep everything)".into(),
            ));
        }
        Ok(Recipe {
            name: name.to_string(),
            file: file.to_path_buf(),
            source,
            converter,
            converter_name: raw.converter,
            sample: raw.sample,
            seed: raw.seed.unwrap_or(DEFAULT_RECIPE_SEED),
            description: raw.description.unwrap_or_default(),
        })
    }

    /// Read and validate one recipe file; its name is the file stem.
    pub fn load(file: &Path) -> Result<Recipe> {
        let text = std::fs::read_to_string(file).map_err(|source| DataError::Io {
            file: file.to_path_buf(),
            source,
        })?;
        let name = file
            .file_stem()
            .and_then(|s| s.to_str())
            .ok_or_else(|| DataError::Config {
                file: file.to_path_buf(),
                key: String::new(),
                problem: "the file name is not valid UTF-8".into(),
            })?;
        Recipe::parse(name, file, &text)
    }

    /// The local file of a `path` source, resolved against `root` (the workspace root, the
    /// parent of `datasets/`); absolute paths are kept. `None` for a hub source.
    pub fn local_path(&self, root: &Path) -> Option<PathBuf> {
        match &self.source {
            Source::Path(p) => Some(root.join(p)),
            Source::Hub(_) => None,
        }
    }
}

/// The workspace root for a recipe folder: the parent of `datasets/` (or `.` when `dir` has no
/// parent).
pub fn workspace_root(dir: &Path) -> PathBuf {
    match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Every `*.toml` recipe in `dir` (not recursive), by name.
pub fn load_dir(dir: &Path) -> Result<BTreeMap<String, Recipe>> {
    let io = |source| DataError::Io {
        file: dir.to_path_buf(),
        source,
    };
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        if path.is_file() && path.extension().is_some_and(|e| e == "toml") {
            let recipe = Recipe::load(&path)?;
            out.insert(recipe.name.clone(), recipe);
        }
    }
    Ok(out)
}

/// Extensions (before an optional `.gz`) that make a dataset spec a file path.
const DATA_EXTENSIONS: &[&str] = &["jsonl", "json", "csv", "parquet"];

/// A dataset given as a file where a recipe name is expected: `FILE` or `FILE:CONVERTER`, as
/// `(path, converter name)`; the converter is `auto` ([`crate::convert::infer`]) unless named.
///
/// A spec is a file when its path part looks like a path ([`crate::hub::local_path`]: `/`, `./`,
/// `../`, `~/`, an existing parent folder, ...) or ends in `.jsonl`, `.json`, `.csv` or
/// `.parquet`, each optionally gzipped; recipe names have none of these. `None` for a recipe
/// name. A relative path stays relative (to the working directory of whoever reads it:
/// configurations store them absolute, see `reprpo_train`'s config layer).
pub fn path_spec(spec: &str) -> Option<(PathBuf, String)> {
    let (path, converter) = match spec.rsplit_once(':') {
        Some((p, c)) if !c.is_empty() && !c.contains(['/', '\\', '.']) => (p, c),
        _ => (spec, "auto"),
    };
    let lower = path.to_ascii_lowercase();
    let base = lower.strip_suffix(".gz").unwrap_or(&lower);
    let has_ext = DATA_EXTENSIONS
        .iter()
        .any(|e| base.strip_suffix(e).is_some_and(|s| s.ends_with('.')));
    let local = crate::hub::local_path(path);
    if local.is_none() && !has_ext {
        return None;
    }
    Some((
        local.unwrap_or_else(|| PathBuf::from(path)),
        converter.to_string(),
    ))
}

impl Recipe {
    /// The ad-hoc recipe of a data file (see [`path_spec`]): named after the file (its stem
    /// without `.gz` and the extension: ids are `<stem>/<row>`), every row kept, the default
    /// seed. A missing file is [`DataError::Invalid`] naming it (and the working directory a
    /// relative path is taken against); an unknown converter a
    /// [`DataError::Config`] naming the spec.
    pub fn from_file(path: &Path, converter_name: &str) -> Result<Recipe> {
        if !path.is_file() {
            let against = match std::env::current_dir() {
                Ok(cwd) if path.is_relative() => {
                    format!(" (relative to the working directory {})", cwd.display())
                }
                _ => String::new(),
            };
            return Err(DataError::Invalid(format!(
                "{}: no such data file{against}",
                path.display()
            )));
        }
        let converter = converter_name
            .parse::<Converter>()
            .map_err(|e| DataError::Config {
                file: path.to_path_buf(),
                key: "converter".into(),
                problem: e.to_string(),
            })?;
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let stem = file_name.strip_suffix(".gz").unwrap_or(&file_name);
        let stem = stem.rsplit_once('.').map_or(stem, |(s, _)| s).to_string();
        Ok(Recipe {
            name: stem,
            file: path.to_path_buf(),
            source: Source::Path(path.to_path_buf()),
            converter,
            converter_name: converter_name.to_string(),
            sample: None,
            seed: DEFAULT_RECIPE_SEED,
            description: format!("the file {}", path.display()),
        })
    }
}

/// The recipes `names` from `dir`, in the order given; a name that is a file ([`path_spec`])
/// gives that file's ad-hoc recipe ([`Recipe::from_file`]).
///
/// An unknown name is [`DataError::UnknownRecipe`] listing the known names.
pub fn resolve(names: &[String], dir: &Path) -> Result<Vec<Recipe>> {
    let all = load_dir(dir)?;
    names
        .iter()
        .map(|name| {
            if let Some((path, converter)) = path_spec(name) {
                return Recipe::from_file(&path, &converter);
            }
            all.get(name)
                .cloned()
                .ok_or_else(|| DataError::UnknownRecipe {
                    name: name.clone(),
                    known: all.keys().cloned().collect::<Vec<_>>().join(", "),
                })
        })
        .collect()
}

/// Shuffle `items` with `StdRng::seed_from_u64(seed)` and keep the first `n`.
fn cap<T>(items: &mut Vec<T>, n: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    items.shuffle(&mut rng);
    items.truncate(n);
}

/// Read, convert and cap one recipe.
///
/// The source's files (one for a `path`; those the `hub` resolver returns, in its order) are
/// read and converted with `ConvertOptions { dataset, seed: recipe.seed }`, where `dataset` is
/// the recipe name, or `<name>.<i>` (1-based) for the i-th of several files so that ids stay
/// unique. With `sample = n` the pairs are shuffled with `StdRng::seed_from_u64(recipe.seed)`
/// and the first `n` kept; the MC items likewise, with a fresh rng from the same seed. Without
/// `sample` the converter's order is kept.
pub fn load_recipe(
    recipe: &Recipe,
    root: &Path,
    hub: &dyn Fn(&HubSource) -> Result<Vec<PathBuf>>,
) -> Result<Converted> {
    let files = match &recipe.source {
        Source::Path(p) => vec![root.join(p)],
        Source::Hub(h) => {
            let files = hub(h)?;
            if files.is_empty() {
                return Err(DataError::Hub {
                    repo: h.to_string(),
                    message: format!("the resolver gave no files for recipe `{}`", recipe.name),
                });
            }
            files
        }
    };
    let several = files.len() > 1;
    let mut out = Converted::default();
    for (i, file) in files.iter().enumerate() {
        let table = read_table(file)?;
        let dataset = if several {
            format!("{}.{}", recipe.name, i + 1)
        } else {
            recipe.name.clone()
        };
        let opts = ConvertOptions {
            dataset,
            seed: recipe.seed,
        };
        let c = convert(recipe.converter, &table, &opts)?;
        out.pairs.extend(c.pairs);
        out.mc.extend(c.mc);
        out.skipped += c.skipped;
    }
    if let Some(n) = recipe.sample {
        cap(&mut out.pairs, n, recipe.seed);
        cap(&mut out.mc, n, recipe.seed);
    }
    Ok(out)
}

/// The seed [`load_mixture`] shuffles with: 64-bit FNV-1a over, for each recipe in order, its
/// name's bytes, a `0xff` byte and its seed as 8 little-endian bytes. It changes when a
/// recipe's seed, name or position changes.
pub fn mixture_seed(recipes: &[Recipe]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for r in recipes {
        let bytes = r
            .name
            .bytes()
            .chain(std::iter::once(0xff))
            .chain(r.seed.to_le_bytes());
        for b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Load several recipes and mix them, shuffled with [`mixture_seed`]`(recipes)`; see
/// [`load_mixture_seeded`].
pub fn load_mixture(
    recipes: &[Recipe],
    root: &Path,
    hub: &dyn Fn(&HubSource) -> Result<Vec<PathBuf>>,
) -> Result<Converted> {
    load_mixture_seeded(recipes, root, hub, mixture_seed(recipes))
}

/// Load several recipes and mix them with an explicit `seed`.
///
/// Exactly: each recipe is loaded with [`load_recipe`] (read, convert, cap with its own seed);
/// the pairs of all recipes are concatenated in recipe order, then shuffled with
/// `StdRng::seed_from_u64(seed)` (`SliceRandom::shuffle`); the MC items likewise, with a fresh
/// rng from the same seed; `skipped` is the sum. Same recipes and seed: identical output.
pub fn load_mixture_seeded(
    recipes: &[Recipe],
    root: &Path,
    hub: &dyn Fn(&HubSource) -> Result<Vec<PathBuf>>,
    seed: u64,
) -> Result<Converted> {
    let mut out = Converted::default();
    for recipe in recipes {
        let c = load_recipe(recipe, root, hub)?;
        out.pairs.extend(c.pairs);
        out.mc.extend(c.mc);
        out.skipped += c.skipped;
    }
    out.pairs.shuffle(&mut StdRng::seed_from_u64(seed));
    out.mc.shuffle(&mut StdRng::seed_from_u64(seed));
    Ok(out)
}
