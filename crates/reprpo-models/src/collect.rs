//! Side activations ("taps"): the input or the output of chosen linear modules, returned by a
//! forward next to the residual hidden states, and the rules of the reference ReprPO project
//! (wassname/repr-preference-optimization at bd9ae63, "side" mode) for choosing them: module
//! patterns ([`select_modules`]), the layer syntax ([`parse_layers`]) and both combined
//! ([`side_taps`]).
//!
//! # Recording
//! A [`Tap`] names a module by its Hugging Face path (`model.layers.3.self_attn.o_proj`, no PEFT
//! prefix) and a [`TapSide`]. [`ForwardSpec::taps`](crate::ForwardSpec::taps) asks for them;
//! [`Output::taps`](crate::Output::taps) returns them in the order asked. `adapter::Linear::forward`
//! records them (through the [`TapRecorder`] its `Ctx` carries), so every architecture gets them
//! without a copy of its forward:
//! - `Input`: the tensor the module multiplies, `[B, T, in]` (o_proj: the attention context,
//!   down_proj: `silu(gate) * up`);
//! - `Output`: what the adapted module returns, `[B, T, out]` (base + adapter delta, as PEFT's
//!   wrapper module returns it; the base alone with adapters off).
//!
//! Taps are part of the forward's graph, differentiable like hidden states. Phi-3's fused modules
//! are taps under their own names (`self_attn.qkv_proj`, `mlp.gate_up_proj`).
//!
//! Without logits a forward stops after the deepest block holding a tap or a requested hidden
//! state. With gradient checkpointing, the blocks holding a tap run without checkpointing (a
//! checkpointed block keeps none of its inner activations in the graph, so a tap there could not
//! carry a gradient); the other blocks are checkpointed as usual.
//!
//! # Choosing modules (the reference's rules)
//! A pattern that starts with `.*` or ends with `$` is a regular expression searched anywhere in
//! the name (Python's `re.search`); any other pattern is a suffix of the name. Matching is done
//! against PEFT's module names (`base_model.model.` + the path), as the reference does on its
//! PEFT-wrapped model, so `^base_model\.model\.model\.layers\.0\.` selects block 0 and `^model\.`
//! selects nothing. Only the adaptable linear layers can be chosen (not `lm_head`, norms, or
//! whole blocks, which the reference's patterns could also reach).
//!
//! Differences from the reference, on purpose: the result is in the model's module order (the
//! reference returns a set); every pattern that matches nothing is an error naming it (the
//! reference fails only when all of them match nothing; on Phi-3 the default output keys
//! `.*q_proj$`, `.*k_proj$`, `.*gate_proj$` match nothing, while `.*v_proj$` and `.*up_proj$`
//! select the fused `qkv_proj` and `gate_up_proj`); a pattern the `regex` crate cannot compile
//! (Python-only syntax: lookarounds, backreferences) is an error naming it.
//!
//! # Layers
//! [`parse_layers`] is the reference's `parse_collection_layers`, rule for rule (including an
//! empty spec giving no layers). At bd9ae63 the reference does not restrict side taps to the
//! parsed layers (it collects every block); [`side_taps`] does that with `layers: None` and the
//! intended restriction with `Some(layers)`.

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::Tensor;

use crate::error::{ModelError, Result};

/// PEFT's prefix of module names in a `PeftModel` (and of its state-dict keys).
pub(crate) const PEFT_PREFIX: &str = "base_model.model.";

/// Which side of a linear module a tap records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TapSide {
    /// The module's input `[B, T, in]`.
    Input,
    /// The module's output `[B, T, out]` (adapter delta included).
    Output,
}

/// One side activation to record.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tap {
    /// Hugging Face module path without PEFT's prefix, e.g. `model.layers.3.self_attn.o_proj`.
    pub module: String,
    /// Input or output.
    pub side: TapSide,
}

impl Tap {
    /// The input of `module`.
    pub fn input(module: impl Into<String>) -> Self {
        Tap {
            module: module.into(),
            side: TapSide::Input,
        }
    }

    /// The output of `module`.
    pub fn output(module: impl Into<String>) -> Self {
        Tap {
            module: module.into(),
            side: TapSide::Output,
        }
    }
}

/// Collects the taps of one forward; `adapter::Linear::forward` hands it its input and output.
#[derive(Debug, Default)]
pub struct TapRecorder {
    /// Module -> (record input, record output).
    wanted: HashMap<String, (bool, bool)>,
    got: Mutex<HashMap<(String, TapSide), Tensor>>,
}

impl TapRecorder {
    /// A recorder for `taps`.
    pub(crate) fn new(taps: &[Tap]) -> Self {
        let mut wanted: HashMap<String, (bool, bool)> = HashMap::new();
        for t in taps {
            let w = wanted.entry(t.module.clone()).or_default();
            match t.side {
                TapSide::Input => w.0 = true,
                TapSide::Output => w.1 = true,
            }
        }
        TapRecorder {
            wanted,
            got: Mutex::new(HashMap::new()),
        }
    }

    /// Keep `input` / `output` of module `name` if a tap asks for them.
    pub(crate) fn record(&self, name: &str, input: &Tensor, output: &Tensor) -> Result<()> {
        let Some(&(want_in, want_out)) = self.wanted.get(name) else {
            return Ok(());
        };
        let mut got = self.lock()?;
        if want_in {
            got.insert((name.to_string(), TapSide::Input), input.clone());
        }
        if want_out {
            got.insert((name.to_string(), TapSide::Output), output.clone());
        }
        Ok(())
    }

    /// The recorded tensors of `taps`, in their order; an error names a tap that was not run.
    pub(crate) fn finish(&self, taps: &[Tap]) -> Result<Vec<(String, Tensor)>> {
        let got = self.lock()?;
        taps.iter()
            .map(|t| {
                let key = (t.module.clone(), t.side);
                got.get(&key)
                    .map(|x| (t.module.clone(), x.clone()))
                    .ok_or_else(|| {
                        ModelError::Invalid(format!(
                            "tap {:?} of `{}` was not recorded by the forward",
                            t.side, t.module
                        ))
                    })
            })
            .collect()
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, HashMap<(String, TapSide), Tensor>>> {
        self.got
            .lock()
            .map_err(|_| ModelError::Invalid("tap recorder: lock poisoned".into()))
    }
}

/// The decoder block (`model.layers.<l>.`) a module path belongs to.
pub(crate) fn block_of(module: &str) -> Option<usize> {
    let rest = module.strip_prefix("model.layers.")?;
    rest.split('.').next()?.parse().ok()
}

/// One pattern as the reference reads it: a regex searched anywhere, or a suffix.
enum Pattern {
    Regex(regex::Regex),
    Suffix(String),
}

impl Pattern {
    fn new(p: &str) -> Result<Self> {
        if !(p.starts_with(".*") || p.ends_with('$')) {
            return Ok(Pattern::Suffix(p.to_string()));
        }
        regex::Regex::new(p).map(Pattern::Regex).map_err(|e| {
            ModelError::Invalid(format!(
                "module pattern `{p}` is not a regular expression the `regex` crate accepts \
                 (lookarounds and backreferences of Python's `re` are not supported): {e}"
            ))
        })
    }

    /// Whether the PEFT name `peft_name` matches.
    fn matches(&self, peft_name: &str) -> bool {
        match self {
            Pattern::Regex(r) => r.is_match(peft_name),
            Pattern::Suffix(s) => peft_name.ends_with(s.as_str()),
        }
    }
}

/// The modules of `names` (module paths as `AdapterHost::linears` gives them, in model order)
/// that any of `patterns` selects, in model order, each once (rules in the module docs). Errors:
/// a pattern the `regex` crate cannot compile, or patterns that match nothing (all named).
pub fn select_modules(patterns: &[String], names: &[&str]) -> Result<Vec<String>> {
    if patterns.is_empty() {
        return Err(ModelError::Invalid("no module patterns given".into()));
    }
    let compiled = patterns
        .iter()
        .map(|p| Pattern::new(p))
        .collect::<Result<Vec<_>>>()?;
    let mut used = vec![false; patterns.len()];
    let mut out = Vec::new();
    for name in names {
        let peft_name = format!("{PEFT_PREFIX}{name}");
        let mut hit = false;
        for (p, u) in compiled.iter().zip(used.iter_mut()) {
            if p.matches(&peft_name) {
                *u = true;
                hit = true;
            }
        }
        if hit {
            out.push((*name).to_string());
        }
    }
    if used.iter().any(|u| !u) {
        return Err(unmatched(patterns, &used, names));
    }
    Ok(out)
}

/// The error of [`select_modules`] naming the patterns that matched nothing.
fn unmatched(patterns: &[String], used: &[bool], names: &[&str]) -> ModelError {
    let unused: Vec<&String> = patterns
        .iter()
        .zip(used)
        .filter(|(_, u)| !**u)
        .map(|(p, _)| p)
        .collect();
    let example = names
        .first()
        .copied()
        .unwrap_or("model.layers.0.self_attn.q_proj");
    ModelError::Invalid(format!(
        "module pattern(s) {} match no linear layer of the model (patterns are matched against \
         PEFT's names, e.g. `{PEFT_PREFIX}{example}`)",
        quoted(&unused)
    ))
}

/// `` `a`, `b` `` (patterns as written, no escaping).
fn quoted(patterns: &[&String]) -> String {
    let q: Vec<String> = patterns.iter().map(|p| format!("`{p}`")).collect();
    q.join(", ")
}

/// The taps of side mode: the modules `patterns` select among `names` (see [`select_modules`]),
/// restricted to the blocks in `layers` when given, each on `side`, in model order.
///
/// `layers: None` is what the reference does at bd9ae63 (every block, whatever its
/// `collection_layers` say); `Some` is the restriction its layer setting intends. An error when
/// nothing is left.
pub fn side_taps(
    patterns: &[String],
    layers: Option<&[usize]>,
    side: TapSide,
    names: &[&str],
) -> Result<Vec<Tap>> {
    let modules = select_modules(patterns, names)?;
    let kept: Vec<Tap> = modules
        .into_iter()
        .filter(|m| layers.is_none_or(|ls| block_of(m).is_some_and(|b| ls.contains(&b))))
        .map(|module| Tap { module, side })
        .collect();
    if kept.is_empty() {
        return Err(ModelError::Invalid(format!(
            "module pattern(s) {} select no linear layer in layers {layers:?}",
            quoted(&patterns.iter().collect::<Vec<_>>())
        )));
    }
    Ok(kept)
}

/// The reference's `parse_collection_layers(spec, num_layers)`, rule for rule:
/// 1. `range(a, b[, c])` (after trimming; text up to the trailing `)`s) or a comma list; empty
///    items are dropped, each item is read as Python's `float` reads it (`.3`, `1e0`, `inf`, `1_0`);
/// 2. a negative value becomes `N + trunc(v)` (so `-1.5 -> N - 1`, `-0.5 -> N`), a range's step
///    included;
/// 3. an integral value stays, any other becomes `trunc(v * N)` (`1.0` is layer 1, `0.5` is N/2);
/// 4. every value (a range's start, stop and step included) must be in `[0, N)`;
/// 5. a range is `a..b` by step `c` (default 1; 0 is an error);
/// 6. duplicates are dropped, the first kept; order is kept.
///
/// An empty spec gives no layers, as in the reference; callers that need layers reject it.
/// Errors name the spec and say what the reference raises.
pub fn parse_layers(spec: &str, num_layers: usize) -> Result<Vec<usize>> {
    let fail = |why: String| {
        ModelError::Invalid(format!(
            "collection layers \"{spec}\" ({num_layers} layers): {why}"
        ))
    };
    let (is_range, body) = split_range(spec.trim());
    let values = layer_values(body, num_layers).map_err(fail)?;
    let layers = if is_range {
        range_of(&values).map_err(fail)?
    } else {
        values
    };
    let mut out: Vec<usize> = Vec::with_capacity(layers.len());
    for l in layers {
        if !out.contains(&l) {
            out.push(l);
        }
    }
    Ok(out)
}

/// Rules 1-4 of [`parse_layers`] on the comma list `body`, each rule over every item before the
/// next (so the first error is the reference's).
fn layer_values(body: &str, num_layers: usize) -> std::result::Result<Vec<usize>, String> {
    let n = num_layers as f64;
    let items = body
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| py_float(s).ok_or_else(|| format!("cannot read `{s}` as a number")))
        .collect::<std::result::Result<Vec<f64>, String>>()?;
    let items = items
        .into_iter()
        .map(|v| match v >= 0.0 {
            true => Ok(v),
            false => py_trunc(v).map(|t| n + t),
        })
        .collect::<std::result::Result<Vec<f64>, String>>()?;
    let items = items
        .into_iter()
        .map(|v| py_trunc(v).map(|t| if t == v { t } else { (v * n).trunc() }))
        .collect::<std::result::Result<Vec<f64>, String>>()?;
    if let Some(bad) = items.iter().find(|&&v| v < 0.0 || v >= n) {
        return Err(format!(
            "invalid collection layer {bad:.0}, must be between 0 and {}",
            num_layers as i64 - 1
        ));
    }
    Ok(items.iter().map(|&v| v as usize).collect())
}

/// `(true, inside)` for `range(inside)` (the text after the first `(`, trailing `)`s removed).
fn split_range(s: &str) -> (bool, &str) {
    if s.starts_with("range(") && s.ends_with(')') {
        let inside = s.split_once('(').map_or("", |(_, r)| r);
        (true, inside.trim_end_matches(')'))
    } else {
        (false, s)
    }
}

/// `range(a, b, c)` of validated values (start, stop, optional step; more are ignored).
fn range_of(v: &[usize]) -> std::result::Result<Vec<usize>, String> {
    let (Some(&a), Some(&b)) = (v.first(), v.get(1)) else {
        return Err("a range needs a start and a stop (Python: list index out of range)".into());
    };
    let step = v.get(2).copied().unwrap_or(1);
    if step == 0 {
        return Err("the range's step must not be zero".into());
    }
    Ok((a..b).step_by(step).collect())
}

/// Python's `int(v)` of a float, as a float: truncation, an error for infinities and NaN.
fn py_trunc(v: f64) -> std::result::Result<f64, String> {
    if v.is_nan() {
        Err("cannot convert float NaN to integer".into())
    } else if v.is_infinite() {
        Err("cannot convert float infinity to integer".into())
    } else {
        Ok(v.trunc())
    }
}

/// Python's `float(s)` of a trimmed decimal string: Rust's parser plus Python's underscores
/// between digits (`1_000`).
fn py_float(s: &str) -> Option<f64> {
    if !s.contains('_') {
        return s.parse().ok();
    }
    let b = s.as_bytes();
    let ok = b.iter().enumerate().all(|(i, &c)| {
        c != b'_'
            || (i > 0 && b[i - 1].is_ascii_digit() && b.get(i + 1).is_some_and(u8::is_ascii_digit))
    });
    if ok {
        s.replace('_', "").parse().ok()
    } else {
        None
    }
}

/// The module paths of a model's adaptable linear layers, in model order (what
/// [`select_modules`] and [`side_taps`] choose from).
pub fn linear_names(host: &dyn crate::adapter::AdapterHost) -> Vec<String> {
    host.linears().iter().map(|l| l.name.clone()).collect()
}
