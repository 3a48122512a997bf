//! Source scans that keep the non-CPU (device) training path honest (issue 14):
//!
//! - no library source under `crates/*/src` calls a candle fused op without a backward
//!   (`softmax_last_dim`, `rms_norm`, `layer_norm`, `RmsNorm` / `LayerNorm`, `rotary_emb`'s
//!   `rope*`, `sdpa`, flash attention): on CUDA they cut the graph silently;
//! - every host read (`to_vec0..3`, `to_scalar`, `to_device`, `Device::Cpu`, and calls of the
//!   local helpers that wrap one) in the files of the training and scoring steps is on an
//!   explicit allow-list with its reason, so a new one fails here until someone lists it.
//!
//! The scanners work on the code with comments, string and char literals and `#[cfg(test)]`
//! items blanked (line numbers kept); each has a unit that runs it on a string with a forbidden
//! call, so a scanner that finds nothing cannot pass silently.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use regex::Regex;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every `.rs` file under `dir`, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The path of `p` relative to the workspace root, with `/`.
fn rel(p: &Path) -> String {
    let root = root().canonicalize().unwrap();
    p.canonicalize()
        .unwrap()
        .strip_prefix(&root)
        .unwrap()
        .to_string_lossy()
        .replace('\\', "/")
}

/// The lines of `src` with comments and the contents of string and char literals replaced by
/// spaces (a string may span lines; raw strings are treated as plain ones), then every
/// `#[cfg(test)]` item blanked, up to its matching closing brace or its `;`.
fn code_lines(src: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let (mut in_str, mut in_block) = (false, false);
    for line in src.lines() {
        let c: Vec<char> = line.chars().collect();
        let mut out = String::with_capacity(line.len());
        let mut i = 0;
        while i < c.len() {
            if in_block {
                if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    in_block = false;
                    out.push_str("  ");
                    i += 2;
                } else {
                    out.push(' ');
                    i += 1;
                }
            } else if in_str {
                if c[i] == '\\' {
                    out.push_str("  ");
                    i += 2;
                    continue;
                }
                if c[i] == '"' {
                    in_str = false;
                    out.push('"');
                } else {
                    out.push(' ');
                }
                i += 1;
            } else if c[i] == '/' && c.get(i + 1) == Some(&'/') {
                break;
            } else if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                in_block = true;
                out.push_str("  ");
                i += 2;
            } else if c[i] == '"' {
                in_str = true;
                out.push('"');
                i += 1;
            } else if c[i] == '\'' && c.get(i + 2) == Some(&'\'') {
                out.push_str("' '");
                i += 3;
            } else if c[i] == '\'' && c.get(i + 1) == Some(&'\\') {
                // An escaped char literal: up to the closing quote.
                let end = (i + 2..c.len())
                    .find(|&j| c[j] == '\'')
                    .unwrap_or(c.len() - 1);
                out.push_str(&" ".repeat(end - i + 1));
                i = end + 1;
            } else {
                out.push(c[i]);
                i += 1;
            }
        }
        lines.push(out);
    }
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim() != "#[cfg(test)]" {
            i += 1;
            continue;
        }
        let (mut depth, mut opened) = (0i64, false);
        let mut j = i;
        while j < lines.len() {
            let mut done = false;
            for ch in lines[j].chars() {
                match ch {
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => depth -= 1,
                    ';' if !opened => done = true,
                    _ => {}
                }
                if done || (opened && depth == 0) {
                    done = true;
                    break;
                }
            }
            lines[j].clear();
            if done {
                break;
            }
            j += 1;
        }
        i = j + 1;
    }
    lines
}

// ---------------------------------------------------------------------------------------------
// (a) Fused candle ops without a backward.

/// Push `(line, what)` for every match of `re` in `code`.
fn add(found: &mut Vec<(usize, String)>, code: &str, re: &Regex, what: &str) {
    for m in re.find_iter(code) {
        let line = code[..m.start()].matches('\n').count() + 1;
        found.push((line, format!("{what}: `{}`", m.as_str().trim())));
    }
}

/// `(line, what)` for every call or import of a candle fused op without a backward in `src`.
fn fused_op_hits(src: &str) -> Vec<(usize, String)> {
    let lines = code_lines(src);
    let code = lines.join("\n");
    let mut found = Vec::new();
    // Names that are candle's own wherever they appear (the project defines none of them).
    add(
        &mut found,
        &code,
        &Regex::new(
            r"\b(softmax_last_dim|rotary_emb|rope_thd|sdpa|layer_norm|candle_flash_attn)\b",
        )
        .unwrap(),
        "a fused op without backward",
    );
    // Crate names that may be aliased: `use candle_nn as nn;`.
    let mut crates = vec!["candle_nn".to_string()];
    let alias = Regex::new(r"\buse\s+candle_nn\s+as\s+(\w+)\s*;").unwrap();
    crates.extend(alias.captures_iter(&code).map(|c| c[1].to_string()));
    // `use candle_nn::...;` statements: forbidden names, globs, and the names `ops` is bound to.
    let mut ops_names = Vec::new();
    let uses = Regex::new(r"(?s)\buse\s+candle_nn\s*::([^;]*);").unwrap();
    let bad_item = Regex::new(r"\b(rms_norm|RmsNorm|LayerNorm|rope|rope_i|rope_thd)\b").unwrap();
    let ops_item = Regex::new(r"\bops(?:\s+as\s+(\w+))?\b").unwrap();
    for c in uses.captures_iter(&code) {
        let body = c.get(1).unwrap();
        let line = code[..body.start()].matches('\n').count() + 1;
        if let Some(m) = bad_item.find(body.as_str()) {
            found.push((line, format!("an import of candle_nn's `{}`", m.as_str())));
        }
        if body.as_str().contains('*') {
            found.push((
                line,
                "a glob import from candle_nn (hides which ops run)".into(),
            ));
        }
        for o in ops_item.captures_iter(body.as_str()) {
            // `use candle_nn::ops::{..}` imports items, not the module; `ops` alone binds it.
            let after = &body.as_str()[o.get(0).unwrap().end()..];
            if !after.trim_start().starts_with("::") {
                ops_names.push(
                    o.get(1)
                        .map_or("ops".to_string(), |a| a.as_str().to_string()),
                );
            }
        }
    }
    for k in &crates {
        add(
            &mut found,
            &code,
            &Regex::new(&format!(
                r"(?:^|[^:\w]){k}\s*::\s*(ops\s*::\s*rms_norm|rms_norm|RmsNorm|LayerNorm)\b"
            ))
            .unwrap(),
            "candle_nn's rms_norm / RmsNorm / LayerNorm (no backward)",
        );
    }
    for o in &ops_names {
        add(
            &mut found,
            &code,
            &Regex::new(&format!(r"(?:^|[^:\w]){o}\s*::\s*rms_norm\b")).unwrap(),
            "candle_nn::ops::rms_norm through a `use` of the module",
        );
    }
    found.sort();
    found.dedup();
    found
}

#[test]
fn no_library_source_calls_a_fused_op_without_backward() {
    let mut bad = Vec::new();
    let mut scanned = 0;
    for krate in std::fs::read_dir(root().join("crates")).unwrap() {
        let src = krate.unwrap().path().join("src");
        if !src.is_dir() {
            continue;
        }
        for f in rust_files(&src) {
            scanned += 1;
            for (line, what) in fused_op_hits(&std::fs::read_to_string(&f).unwrap()) {
                bad.push(format!("{}:{line}: {what}", rel(&f)));
            }
        }
    }
    assert!(scanned > 30, "scanned only {scanned} files: wrong root?");
    assert!(
        bad.is_empty(),
        "candle fused ops without backward on a library path (use ops::softmax(x, D::Minus1), \
         reprpo_models::ops::{{rms_norm, rope}}, rms_norm_slow / layer_norm_slow, or a custom \
         op with its own bwd):\n{}",
        bad.join("\n")
    );
}

/// The scanner finds each kind of forbidden call, whatever the import, and nothing in the
/// project's own ops, the differentiable candle ops, comments, strings or test modules.
#[test]
fn fused_op_scanner_catches_forbidden_calls() {
    let bad = r#"
use candle_nn::ops::softmax_last_dim;
use candle_nn::{ops, RmsNorm};
use candle_nn::rotary_emb::rope_i;
use candle_nn as nn;
use candle_nn::ops::*;
fn f(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let a = candle_nn::ops::rms_norm(x, w, 1e-5)?;
    let b = ops::rms_norm(x, w, 1e-5)?;
    let c = candle_nn::rotary_emb::rope(x, &cos, &sin)?;
    let d = nn::LayerNorm::new(w.clone(), w.clone(), 1e-5);
    let e = candle_nn::ops::sdpa(&q, &k, &v, 1.0, 1.0)?;
    let g = candle_nn::ops::layer_norm(x, w, w, 1e-5)?;
    let h = nn::rms_norm(64, 1e-5, vb)?;
}
"#;
    let hits = fused_op_hits(bad);
    let lines: Vec<usize> = hits.iter().map(|(l, _)| *l).collect();
    for want in 2..=14 {
        if want == 5 || want == 7 {
            continue; // `use candle_nn as nn;` and the fn line are fine by themselves
        }
        assert!(lines.contains(&want), "line {want} not caught: {hits:?}");
    }
    let fine = r#"
use crate::ops::{rms_norm, rope};
fn f(x: &Tensor) -> Result<Tensor> {
    let a = crate::ops::rms_norm(x, w, 1e-5)?;
    let b = rms_norm(x, w, 1e-5)?;
    let c = crate::ops::rope(x, &cos, &sin)?;
    let d = candle_nn::ops::softmax(x, D::Minus1)?;
    let e = candle_nn::ops::rms_norm_slow(x, w, 1e-5)?;
    let s = "candle_nn::ops::softmax_last_dim is not used"; // nor rotary_emb::rope here
    /* candle_nn::ops::sdpa */
    let cfg = config.rms_norm_eps;
}
#[cfg(test)]
mod tests {
    fn reference() { candle_nn::ops::softmax_last_dim(&x).unwrap(); }
}
"#;
    assert_eq!(fused_op_hits(fine), vec![]);
}

// ---------------------------------------------------------------------------------------------
// (b) Host reads on the training and scoring steps.

/// The files of the training step (objective, trainer, optimizers, batches), the model and the
/// losses.
fn step_files() -> Vec<PathBuf> {
    let r = root();
    let mut files: Vec<PathBuf> = ["objective.rs", "trainer.rs", "data.rs"]
        .iter()
        .map(|f| r.join("crates/reprpo-train/src").join(f))
        .collect();
    files.extend(rust_files(&r.join("crates/reprpo-train/src/optim")));
    files.extend(rust_files(&r.join("crates/reprpo-models/src")));
    files.extend(rust_files(&r.join("crates/reprpo-losses/src")));
    files
}

/// Helpers of these files that read a tensor back, with the files their calls are searched in
/// (`*`: all): a new call of one is a new host read.
const HELPERS: &[(&str, &str)] = &[
    ("crates/reprpo-train/src/trainer.rs", "read_back"),
    ("crates/reprpo-train/src/trainer.rs", "read_means"),
    ("crates/reprpo-train/src/trainer.rs", "check_finite"),
    ("crates/reprpo-losses/src/cka.rs", "per_layer"),
    ("*", "metrics_f64"),
    ("*", "clip_grad_norm"),
    ("*", "host_mask"),
    ("*", "row_logps"),
    ("*", "preference_scores"),
];

/// A host read: the file, the function it is in, and what (`to_vec`, `to_scalar`, `to_device`,
/// `Device::Cpu`, or `helper()`).
type Key = (String, String, String);

/// `(key, line)` for every host read in `src` (of file `file`).
fn host_read_hits(file: &str, src: &str) -> Vec<(Key, usize)> {
    let lines = code_lines(src);
    let fn_re = Regex::new(r"\bfn\s+([A-Za-z_]\w*)").unwrap();
    let mut pats: Vec<(Regex, String)> = [
        (r"\bto_vec[0-3]\b", "to_vec"),
        (r"\bto_scalar\b", "to_scalar"),
        (r"\bto_device\b", "to_device"),
        (r"\bDevice\s*::\s*Cpu\b", "Device::Cpu"),
    ]
    .iter()
    .map(|(p, w)| (Regex::new(p).unwrap(), w.to_string()))
    .collect();
    for (f, h) in HELPERS {
        if *f == "*" || *f == file {
            let re = Regex::new(&format!(r"(?:^|[^\w])(?:fn\s+)?{h}\s*\(")).unwrap();
            pats.push((re, format!("{h}()")));
        }
    }
    let mut func = "<top level>".to_string();
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        if let Some(c) = fn_re.captures(l) {
            func = c[1].to_string();
        }
        for (re, what) in &pats {
            for m in re.find_iter(l) {
                // The helper's own definition is not a call.
                if m.as_str().contains("fn ") {
                    continue;
                }
                out.push(((file.to_string(), func.clone(), what.clone()), i + 1));
            }
        }
    }
    out
}

/// One allowed host read: where (file, function, what), how many, how often it runs, its class
/// ((i) a logged scalar or result, (ii) a necessary check or data the host needs, (iii) an
/// avoidable round trip, or "off" the device step path) and why.
struct Allowed {
    file: &'static str,
    func: &'static str,
    what: &'static str,
    count: usize,
    when: &'static str,
    class: &'static str,
    reason: &'static str,
}

const fn a(
    file: &'static str,
    func: &'static str,
    what: &'static str,
    count: usize,
    when: &'static str,
    class: &'static str,
    reason: &'static str,
) -> Allowed {
    Allowed {
        file,
        func,
        what,
        count,
        when,
        class,
        reason,
    }
}

const TRAINER: &str = "crates/reprpo-train/src/trainer.rs";
const OPTIM: &str = "crates/reprpo-train/src/optim/mod.rs";
const PEFT: &str = "crates/reprpo-models/src/peft.rs";
const LOGPS: &str = "crates/reprpo-models/src/logps.rs";
const CPU_KERNEL: &str = "inside a fused CPU kernel or its gate (fused_cpu): never on a device";
const QUANT_BNB: &str = "crates/reprpo-models/src/quant/bnb.rs";
const QUANT_MOD: &str = "crates/reprpo-models/src/quant/mod.rs";
const WEIGHTS: &str = "crates/reprpo-models/src/weights.rs";
const QUANT_LOAD: &str = "a bitsandbytes checkpoint's packed weights and quantisation state read or \
     written on the host when a model loads or saves, never in a step";
const QUANT_DEQUANT: &str = "a quantised base dequantises each layer's weight on the host in every \
     forward and backward; on the CPU that is where it runs, on a GPU the weight is then uploaded \
     (a round trip per layer and pass: a CUDA dequantise kernel is GPU part 2's, issue 18)";

const SPECTRAL: &str = "crates/reprpo-models/src/transform/spectral.rs";
const SPECTRAL_WHY: &str = "svd / supr transforms: the embedding and head eigendecomposition (faer, f64) when the run \
     starts, never in a step";

const ALLOWED: &[Allowed] = &[
    a(
        "crates/reprpo-models/src/frozen.rs",
        "cpu_fwd",
        "Device::Cpu",
        2,
        "micro-batch",
        "off",
        CPU_KERNEL,
    ),
    a(
        "crates/reprpo-models/src/llama.rs",
        "take_raw",
        "to_device",
        1,
        "once",
        "off",
        "the random presets drawn tensor by tensor when the model is built",
    ),
    a(
        QUANT_BNB,
        "read_four_bit",
        "to_vec",
        1,
        "once",
        "off",
        QUANT_LOAD,
    ),
    a(
        QUANT_BNB,
        "read_int8",
        "to_vec",
        3,
        "once",
        "off",
        QUANT_LOAD,
    ),
    a(
        QUANT_BNB,
        "tensor_from_bytes",
        "Device::Cpu",
        1,
        "once",
        "off",
        QUANT_LOAD,
    ),
    a(QUANT_BNB, "vec_f32", "to_vec", 1, "once", "off", QUANT_LOAD),
    a(QUANT_BNB, "vec_u8", "to_vec", 1, "once", "off", QUANT_LOAD),
    a(
        QUANT_BNB,
        "write_four_bit",
        "Device::Cpu",
        1,
        "once",
        "off",
        QUANT_LOAD,
    ),
    a(
        QUANT_BNB,
        "write_int8",
        "Device::Cpu",
        1,
        "once",
        "off",
        QUANT_LOAD,
    ),
    a(
        QUANT_MOD,
        "quantize",
        "Device::Cpu",
        1,
        "once",
        "off",
        "a weight quantised as it is loaded, on the host",
    ),
    a(
        QUANT_MOD,
        "dequantize",
        "Device::Cpu",
        3,
        "micro-batch",
        "iii",
        QUANT_DEQUANT,
    ),
    a(
        QUANT_MOD,
        "dequantize",
        "to_device",
        1,
        "micro-batch",
        "iii",
        QUANT_DEQUANT,
    ),
    a(
        SPECTRAL,
        "gram_eigen",
        "Device::Cpu",
        1,
        "once",
        "off",
        SPECTRAL_WHY,
    ),
    a(
        SPECTRAL,
        "gram_eigen",
        "to_device",
        1,
        "once",
        "off",
        SPECTRAL_WHY,
    ),
    a(
        SPECTRAL,
        "gram_eigen",
        "to_vec",
        1,
        "once",
        "off",
        SPECTRAL_WHY,
    ),
    a(
        SPECTRAL,
        "spectral_matrix",
        "Device::Cpu",
        2,
        "once",
        "off",
        SPECTRAL_WHY,
    ),
    a(
        SPECTRAL,
        "spectral_matrix",
        "to_device",
        1,
        "once",
        "off",
        SPECTRAL_WHY,
    ),
    a(
        TRAINER,
        "load_model",
        "Device::Cpu",
        1,
        "once",
        "off",
        "parsing model.device, no read",
    ),
    a(
        TRAINER,
        "train",
        "Device::Cpu",
        1,
        "once",
        "off",
        "runs the job on the CPU pool, no read",
    ),
    a(
        TRAINER,
        "read_back",
        "to_vec",
        1,
        "-",
        "i",
        "the helper itself: the metric sums kept on the device (and the non-finite state when \
       asked) in one read",
    ),
    a(
        TRAINER,
        "read_means",
        "read_back()",
        1,
        "-",
        "i",
        "the helper itself: a window's metrics with the non-finite state",
    ),
    a(
        TRAINER,
        "log_window",
        "read_means()",
        1,
        "logging step",
        "i",
        "the logged means of the window's metrics (accumulated on the device in f64) and the \
       non-finite state, one read every logging_steps",
    ),
    a(
        TRAINER,
        "check_finite",
        "to_vec",
        1,
        "-",
        "ii",
        "the helper itself: the non-finite state (first bad step, what, value), read only if \
       something was watched since the last read",
    ),
    a(
        TRAINER,
        "evaluate_now",
        "check_finite()",
        1,
        "eval",
        "ii",
        "the non-finite state before an evaluation; no read when the logging step already read it",
    ),
    a(
        TRAINER,
        "run",
        "check_finite()",
        1,
        "end",
        "ii",
        "the non-finite state at the end of the stage; no read when the logging step already read \
       it (before a checkpoint: check_before_save)",
    ),
    a(
        TRAINER,
        "check_before_save",
        "check_finite()",
        1,
        "checkpoint",
        "ii",
        "the non-finite state before writing a checkpoint, where there are no parameters to \
       measure",
    ),
    a(
        TRAINER,
        "check_before_save",
        "to_vec",
        1,
        "checkpoint",
        "ii",
        "before writing a checkpoint: the non-finite state and the largest magnitude of every \
       parameter and AdamW moment in one read, so no non-finite or exploding checkpoint is written",
    ),
    a(
        TRAINER,
        "resume",
        "Device::Cpu",
        1,
        "once",
        "off",
        "runs the resumed job on the CPU pool, no read",
    ),
    a(
        PEFT,
        "check_finite",
        "to_vec",
        1,
        "adapter load",
        "off",
        "the count of non-finite values of every tensor of an adapter file, one read per file \
       at load, never during a step",
    ),
    a(
        TRAINER,
        "evaluate",
        "read_back()",
        1,
        "eval",
        "i",
        "the evaluation's metric means, one read per evaluation (the results)",
    ),
    a(
        TRAINER,
        "train_sft",
        "read_means()",
        1,
        "every 50 SFT steps",
        "i",
        "the SFT stage's logged nll with the non-finite state",
    ),
    a(
        TRAINER,
        "train_sft",
        "check_finite()",
        1,
        "end of SFT stage",
        "ii",
        "the non-finite state before the SFT adapter is written",
    ),
    a(
        TRAINER,
        "scores",
        "preference_scores()",
        1,
        "per stage",
        "i",
        "the summary's held-out preference accuracy, before and after each stage",
    ),
    a(
        TRAINER,
        "preference_scores",
        "to_vec",
        2,
        "per stage",
        "i",
        "the summary's scores",
    ),
    a(
        OPTIM,
        "clip_grad_norm",
        "to_scalar",
        1,
        "-",
        "off",
        "the host-returning wrapper for the doctor's check; the trainer keeps the norm and the \
       clipping coefficient on the device (global_grad_norm, clip_grads_to)",
    ),
    a(
        OPTIM,
        "load_state",
        "to_device",
        2,
        "resume",
        "off",
        "optimizer moments (f32, or 8-bit codes and absmax) onto the device",
    ),
    a(
        OPTIM,
        "state",
        "Device::Cpu",
        1,
        "checkpoint",
        "off",
        "the one-byte marker of the 8-bit optimizer's kind, made on the host for the checkpoint",
    ),
    a(
        QUANT_MOD,
        "quantize",
        "to_device",
        1,
        "once",
        "off",
        "a weight quantised as it is loaded, on the host",
    ),
    a(
        QUANT_MOD,
        "quantize",
        "to_vec",
        1,
        "once",
        "off",
        "a weight quantised as it is loaded, on the host",
    ),
    a(
        WEIGHTS,
        "linear",
        "Device::Cpu",
        1,
        "once",
        "off",
        "a checkpoint tensor read onto the host to be quantised as the model loads",
    ),
    a(
        WEIGHTS,
        "prequantized",
        "Device::Cpu",
        1,
        "once",
        "off",
        "a pre-quantised checkpoint's packed weight and state kept on the host, where they are \
       dequantised",
    ),
    a(
        WEIGHTS,
        "take_raw",
        "to_device",
        1,
        "once",
        "off",
        "in-memory tensors moved to the model's device as the model loads",
    ),
    a(
        "crates/reprpo-models/src/generate.rs",
        "generate",
        "to_vec",
        1,
        "token",
        "ii",
        "generation's argmax / sampling on the host, one read per token (evaluation samples \
       only, not training or scoring; left as is)",
    ),
    a(LOGPS, "shifted_logps", "to_vec", 1, "-", "off", CPU_KERNEL),
    a(LOGPS, "unshifted_nll", "to_vec", 1, "-", "off", CPU_KERNEL),
    a(LOGPS, "bwd", "to_vec", 1, "-", "off", CPU_KERNEL),
    a(
        LOGPS,
        "row_logps",
        "to_vec",
        1,
        "eval batch",
        "i",
        "the scoring step's output: per-completion log-probabilities for the tables",
    ),
    a(
        "crates/reprpo-models/src/orth.rs",
        "load_adapter_boft_cpu_fallback",
        "Device::Cpu",
        1,
        "load",
        "off",
        "default device of an empty model, no read",
    ),
    a(
        PEFT,
        "load_adapter",
        "Device::Cpu",
        1,
        "load",
        "off",
        "default device of an empty model, no read",
    ),
    a(
        PEFT,
        "save_adapter",
        "to_device",
        1,
        "checkpoint",
        "ii",
        "the adapter written to disk",
    ),
    a(
        PEFT,
        "save_adapter",
        "Device::Cpu",
        1,
        "checkpoint",
        "ii",
        "the adapter written to disk",
    ),
    a(
        PEFT,
        "trainable_from",
        "to_device",
        1,
        "load",
        "off",
        "loaded weights onto the device",
    ),
    a(
        PEFT,
        "export_merged",
        "Device::Cpu",
        2,
        "end of run",
        "ii",
        "the merged model on disk",
    ),
    a(
        PEFT,
        "export_merged",
        "to_device",
        1,
        "end of run",
        "ii",
        "the merged model on disk",
    ),
    a(
        "crates/reprpo-models/src/phi3.rs",
        "rope_tables",
        "to_scalar",
        1,
        "forward",
        "ii",
        "LongRoPE only: max(position) picks the factor set on the host, as transformers does; \
       left as is (only Phi-3 models with LongRoPE; fix: build both tables, select on the \
       device)",
    ),
    a(
        "crates/reprpo-losses/src/cka.rs",
        "per_layer",
        "to_vec",
        1,
        "-",
        "off",
        CPU_KERNEL,
    ),
    a(
        "crates/reprpo-losses/src/cka.rs",
        "term",
        "per_layer()",
        3,
        "-",
        "off",
        CPU_KERNEL,
    ),
    a(
        "crates/reprpo-losses/src/cka.rs",
        "bwd",
        "to_vec",
        1,
        "-",
        "off",
        CPU_KERNEL,
    ),
    a(
        "crates/reprpo-losses/src/dpo.rs",
        "metrics_f64",
        "to_scalar",
        1,
        "-",
        "off",
        "the helper itself; no longer called on the training step (the loss tests use it)",
    ),
    a(
        "crates/reprpo-losses/src/dpo.rs",
        "dpo_loss",
        "to_scalar",
        1,
        "micro-batch",
        "iii",
        "bco_pair with the running mean only (a rare loss; TRL <= 0.2x's option): \
       RunningMoments kept on the host, left as is (fix: keep the moments as device tensors)",
    ),
    a(
        "crates/reprpo-losses/src/fused.rs",
        "bwd_typed",
        "to_vec",
        1,
        "-",
        "off",
        CPU_KERNEL,
    ),
    a(
        "crates/reprpo-losses/src/fused.rs",
        "host_mask",
        "to_vec",
        1,
        "-",
        "off",
        CPU_KERNEL,
    ),
    a(
        "crates/reprpo-losses/src/fused.rs",
        "reroute_retain",
        "host_mask()",
        2,
        "-",
        "off",
        CPU_KERNEL,
    ),
    a(
        "crates/reprpo-losses/src/pool.rs",
        "bwd",
        "to_vec",
        1,
        "-",
        "off",
        CPU_KERNEL,
    ),
    a(
        "crates/reprpo-losses/src/reprpo.rs",
        "loss_impl",
        "to_vec",
        1,
        "-",
        "off",
        CPU_KERNEL,
    ),
    a(
        "crates/reprpo-losses/src/reprpo.rs",
        "loss_impl",
        "host_mask()",
        4,
        "-",
        "off",
        CPU_KERNEL,
    ),
];

/// Compare the hits with an allow-list: unlisted reads, count changes and stale entries.
fn check_reads(hits: &[(Key, usize)], allowed: &[Allowed]) -> Vec<String> {
    let mut found: BTreeMap<&Key, Vec<usize>> = BTreeMap::new();
    for (k, line) in hits {
        found.entry(k).or_default().push(*line);
    }
    let mut problems = Vec::new();
    for (k, lines) in &found {
        let at = lines
            .iter()
            .map(|l| format!("{}:{l}", k.0))
            .collect::<Vec<_>>()
            .join(", ");
        match allowed
            .iter()
            .find(|e| (e.file, e.func, e.what) == (k.0.as_str(), k.1.as_str(), k.2.as_str()))
        {
            None => problems.push(format!(
                "unlisted host read `{}` in fn {} at {at}: avoid it, or list it with a reason",
                k.2, k.1
            )),
            Some(e) if e.count != lines.len() => problems.push(format!(
                "`{}` in fn {}: {} found at {at}, {} listed",
                k.2,
                k.1,
                lines.len(),
                e.count
            )),
            Some(_) => {}
        }
    }
    for e in allowed {
        let k: Key = (e.file.into(), e.func.into(), e.what.into());
        if !found.contains_key(&k) {
            problems.push(format!(
                "stale allow-list entry {}: fn {} `{}`",
                e.file, e.func, e.what
            ));
        }
    }
    problems
}

#[test]
fn host_reads_on_step_paths_are_listed() {
    for e in ALLOWED {
        assert!(
            ["i", "ii", "iii", "off"].contains(&e.class)
                && !e.reason.is_empty()
                && !e.when.is_empty(),
            "{}: fn {}: class and reason",
            e.file,
            e.func
        );
    }
    let mut hits = Vec::new();
    for f in step_files() {
        let src = std::fs::read_to_string(&f).unwrap();
        hits.extend(host_read_hits(&rel(&f), &src));
    }
    let problems = check_reads(&hits, ALLOWED);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let per_step = ALLOWED
        .iter()
        .filter(|e| matches!(e.when, "micro-batch" | "step"))
        .count();
    eprintln!(
        "{} host reads listed ({per_step} run every step or micro-batch)",
        ALLOWED.len()
    );
}

/// A new read fails the check (direct or through a helper), a changed count fails, a stale
/// entry fails; reads in comments, strings and test modules do not count.
#[test]
fn host_read_scanner_catches_new_reads() {
    let src = r#"
fn step(t: &Tensor) -> Result<f64> {
    let v: Vec<f32> = t.to_vec1()?; // a new read
    let x = read_back(&t)?;
    let s = "to_scalar in a string";
    Ok(v[0] as f64 + x)
}
fn read_back(t: &Tensor) -> Result<f64> {
    Ok(t.to_scalar::<f64>()?)
}
#[cfg(test)]
mod tests {
    fn check() { let _ = t.to_vec2::<f32>(); }
}
"#;
    let file = "crates/reprpo-train/src/trainer.rs";
    let hits = host_read_hits(file, src);
    let keys: Vec<(&str, &str, usize)> = hits
        .iter()
        .map(|((_, f, w), l)| (f.as_str(), w.as_str(), *l))
        .collect();
    assert_eq!(
        keys,
        vec![
            ("step", "to_vec", 3),
            ("step", "read_back()", 4),
            ("read_back", "to_scalar", 9)
        ]
    );
    let listed = [
        a(file, "read_back", "to_scalar", 1, "-", "ii", "the helper"),
        a(file, "step", "read_back()", 2, "step", "ii", "miscounted"),
        a(file, "gone", "to_vec", 1, "step", "ii", "stale"),
    ];
    let problems = check_reads(&hits, &listed).join("\n");
    assert!(
        problems.contains("unlisted host read `to_vec` in fn step"),
        "{problems}"
    );
    assert!(problems.contains("1 found at"), "{problems}");
    assert!(problems.contains("stale allow-list entry"), "{problems}");
    assert!(!problems.contains("to_scalar"), "{problems}");
}
