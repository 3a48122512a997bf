//! `cargo xtask eval` on data files without a suite file, truncation as lm-evaluation-harness
//! does it, and `--help`'s key list (issue 16, evaluation; issue-notes, "Evaluation
//! truncation"). Every file is written by the test: the train fixture's small Llama (byte-level
//! tokenizer, one token per byte) with its `max_position_embeddings` lowered, and small JSONL
//! files of pairs and multiple-choice items.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::xtask_in;
use reprpo_data::Tok;
use reprpo_data::tokenize::{Origin, Seq, TokenizeConfig, tokenize_groups};
use reprpo_models::{ForwardSpec, Llama};
use serde_json::{Value, json};

/// `dir/model`: the train fixture's Llama with `max_position_embeddings = ctx`.
fn model_folder(dir: &Path, ctx: usize) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/train/model");
    let m = dir.join("model");
    std::fs::create_dir_all(&m).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, m.join(p.file_name().unwrap())).unwrap();
    }
    let cfg = m.join("config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["max_position_embeddings"] = json!(ctx);
    std::fs::write(&cfg, v.to_string()).unwrap();
    m.canonicalize().unwrap()
}

/// A PEFT folder (the fixture LoRA) whose base is `base`.
fn peft_folder(dir: &Path, base: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/train/lora");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        dir.join("adapter_model.safetensors"),
    )
    .unwrap();
    let text = std::fs::read_to_string(src.join("adapter_config.json")).unwrap();
    let mut cfg: Value = serde_json::from_str(&text).unwrap();
    cfg["base_model_name_or_path"] = json!(base.display().to_string());
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
    dir.to_path_buf()
}

fn write_jsonl(path: &Path, rows: &[Value]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text).unwrap();
}

fn pairs(path: &Path) {
    let rows = [
        ("Q: sky?\nA:", " blue", " green"),
        ("Q: grass?\nA:", " green", " red"),
        ("Q: snow?\nA:", " white", " black"),
    ]
    .map(|(p, c, r)| json!({"prompt": p, "chosen": c, "rejected": r}));
    write_jsonl(path, &rows);
}

/// `eval` in `cwd` with no generations and no progress bar.
fn eval(cwd: &Path, out: &Path, args: &[&str]) -> (bool, String, String) {
    let out = out.display().to_string();
    let mut all = vec!["eval", "--out", &out, "--no-progress", "generations=0"];
    all.extend_from_slice(args);
    xtask_in(cwd, &all, &[])
}

/// The lines of `examples.jsonl`.
fn examples(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("examples.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `(model, dataset)` of every example, deduplicated and sorted.
fn scored(out: &Path) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = examples(out)
        .iter()
        .map(|e| {
            (
                e["model"].as_str().unwrap().into(),
                e["dataset"].as_str().unwrap().into(),
            )
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

/// Task 1: `--data ROLE=FILE` builds a suite from files (converter inferred: pairs and MC),
/// relative to the working directory, with adapters and `model.*` keys; `NAME:ROLE=FILE:CONV`
/// names the column and the converter; `--suite` + `--data` adds to the suite; bad roles,
/// missing files and clashing names are errors that name the argument.
#[test]
fn data_files_make_an_adhoc_suite() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_folder(tmp.path(), 256);
    let peft = peft_folder(&tmp.path().join("peft"), &model);
    pairs(&tmp.path().join("data/pairs.jsonl"));
    let mc =
        json!({"prompt": "Q: two plus two?\nA:", "choices": [" four", " five"], "correct": [0]});
    write_jsonl(&tmp.path().join("data/mc.jsonl"), &[mc]);
    let out = tmp.path().join("out");
    let m = format!("model.name_or_path={}", model.display());
    let args = [
        "--data",
        "ood=data/pairs.jsonl",
        "--data",
        "test=data/mc.jsonl",
        "--adapter",
        peft.to_str().unwrap(),
        &m,
    ];
    let (ok, stdout, err) = eval(tmp.path(), &out, &args);
    assert!(ok, "{stdout}{err}");
    assert!(
        stdout.contains("suite data")
            && stdout.contains("pairs (OOD)")
            && stdout.contains("mc (ID)"),
        "{stdout}"
    );
    let want: Vec<(String, String)> = [
        ("base", "mc"),
        ("base", "pairs"),
        ("peft", "mc"),
        ("peft", "pairs"),
    ]
    .map(|(a, b)| (a.into(), b.into()))
    .to_vec();
    assert_eq!(scored(&out), want);
    let kinds: Vec<String> = examples(&out)
        .iter()
        .filter(|e| e["model"] == "base")
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kinds, ["pair", "pair", "pair", "mc"]);

    // A name and a converter; added to a named suite.
    let args = [
        "--suite",
        "default",
        "--data",
        "mine:unrelated=data/pairs.jsonl:pairs",
        &m,
        "limit=1",
    ];
    let (ok, stdout, err) = eval(tmp.path(), &out, &args);
    assert!(ok, "{stdout}{err}");
    assert!(
        stdout.contains("mine (unrelated)") && stdout.contains("default-ood (OOD)"),
        "{stdout}"
    );

    // Errors name the argument and what is wrong.
    for (arg, want) in [
        (
            "bogus=data/pairs.jsonl",
            vec!["bogus", "train, test, ood, unrelated"],
        ),
        (
            "ood=data/absent.jsonl",
            vec!["absent.jsonl", "no such data file", "working directory"],
        ),
        ("data/pairs.jsonl", vec!["[NAME:]ROLE=FILE"]),
        (":ood=data/pairs.jsonl", vec!["NAME", "empty"]),
    ] {
        let (ok, _, err) = eval(tmp.path(), &out, &["--data", arg, &m]);
        assert!(!ok, "{arg}");
        assert!(want.iter().all(|w| err.contains(w)), "{arg}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let clash = [
        "--data",
        "ood=data/pairs.jsonl",
        "--data",
        "test=data/pairs.jsonl",
        &m,
    ];
    let (ok, _, err) = eval(tmp.path(), &out, &clash);
    assert!(!ok);
    assert!(
        err.contains("two datasets named `pairs`") && err.contains("NAME:ROLE=FILE"),
        "{err}"
    );
}

/// Task 1: `recipe = "FILE"` in a suite file is a data file relative to the suite's folder (not
/// the working directory); a missing one says against what it was resolved.
#[test]
fn suite_files_take_data_paths_relative_to_their_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_folder(tmp.path(), 256);
    let suites = tmp.path().join("suites");
    pairs(&suites.join("data/pairs.jsonl"));
    let suite = suites.join("mine.toml");
    std::fs::write(
        &suite,
        "[[dataset]]\nname = \"held\"\nrole = \"test\"\nrecipe = \"data/pairs.jsonl\"\n",
    )
    .unwrap();
    let cwd = tmp.path().join("elsewhere");
    std::fs::create_dir_all(&cwd).unwrap();
    let out = tmp.path().join("out");
    let m = format!("model.name_or_path={}", model.display());
    let s = suite.display().to_string();
    let (ok, stdout, err) = eval(&cwd, &out, &["--suite", &s, &m]);
    assert!(ok, "{stdout}{err}");
    assert!(stdout.contains("held (ID)"), "{stdout}");
    assert_eq!(scored(&out), [("base".to_string(), "held".to_string())]);
    std::fs::write(
        &suite,
        "[[dataset]]\nname = \"held\"\nrole = \"test\"\nrecipe = \"data/absent.jsonl\"\n",
    )
    .unwrap();
    let (ok, _, err) = eval(&cwd, &out, &["--suite", &s, &m]);
    assert!(!ok);
    assert!(
        err.contains("dataset[1].recipe")
            && err.contains("absent.jsonl")
            && err.contains("relative to its folder")
            && err.contains(suites.canonicalize().unwrap().to_str().unwrap()),
        "{err}"
    );
}

/// The summed log-probability of `seq`'s continuation as lm-evaluation-harness'
/// `_loglikelihood_tokens` computes it, written out here on a direct forward:
/// `inp = (context_enc + continuation_enc)[-(max_length + 1):][:-1]`,
/// `logits = log_softmax(model(inp))[inplen - contlen : inplen]`, gathered at the continuation.
fn lm_eval_logp(model: &Llama, seq: &Seq, max_length: usize) -> f64 {
    let whole: Vec<u32> = seq.prompt.iter().chain(&seq.completion).copied().collect();
    let window = &whole[whole.len().saturating_sub(max_length + 1)..];
    let inp = &window[..window.len() - 1];
    let cont = &seq.completion;
    let ids = Tensor::new(inp, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let out = model
        .forward(&ids, None, None, &ForwardSpec::logits())
        .unwrap();
    let logits = out.logits.unwrap().squeeze(0).unwrap();
    let rows: Vec<Vec<f64>> = logits.to_dtype(DType::F64).unwrap().to_vec2().unwrap();
    let n = inp.len();
    cont.iter()
        .enumerate()
        .map(|(j, &t)| {
            let row = &rows[n - cont.len() + j];
            let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
            row[t as usize] - lse
        })
        .sum()
}

/// MC items of the truncation test: long prompts (about 40 bytes) or short ones.
fn mc_items(long: bool) -> Vec<Value> {
    let prompts = if long {
        [
            "Q: what colour is the sky on a clear day?\nA:",
            "Q: how many legs does a spider have?\nA:",
        ]
    } else {
        ["Q: sky?\nA:", "Q: legs?\nA:"]
    };
    prompts
        .iter()
        .map(|p| json!({"prompt": p, "choices": [" blue", " no", " eight or so"], "correct": [0]}))
        .collect()
}

/// The base's logps per item of `examples.jsonl`, and its `truncated` flags.
fn base_logps(out: &Path) -> (Vec<Vec<f64>>, Vec<bool>) {
    let base: Vec<Value> = examples(out)
        .into_iter()
        .filter(|e| e["model"] == "base")
        .collect();
    let lps = base
        .iter()
        .map(|e| {
            e["logps"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect();
    (
        lps,
        base.iter()
            .map(|e| e["truncated"].as_bool().unwrap())
            .collect(),
    )
}

/// Task 2: by default each choice keeps the last `max_position_embeddings + 1` tokens of context
/// and continuation (lm-evaluation-harness' rule): the scores equal that rule's log-likelihood on a
/// direct forward of the kept tokens, in both scoring modes, and the header says how many items
/// were cut; short items are not cut; `truncation=training` uses the training limits and says so.
#[test]
fn long_items_are_cut_as_lm_eval_does_and_the_header_says_so() {
    const CTX: usize = 24;
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = model_folder(tmp.path(), CTX);
    write_jsonl(&tmp.path().join("long.jsonl"), &mc_items(true));
    write_jsonl(&tmp.path().join("short.jsonl"), &mc_items(false));
    let model = Llama::load(&model_dir, DType::F32, &Device::Cpu).unwrap();
    let tok = Tok::from_dir(&model_dir).unwrap();
    let untruncated = TokenizeConfig {
        max_length: None,
        max_prompt_length: None,
        ..Default::default()
    };
    let out = tmp.path().join("out");
    let m = format!("model.name_or_path={}", model_dir.display());
    for (file, long) in [("long.jsonl", true), ("short.jsonl", false)] {
        let items = mc_items(long);
        let groups: Vec<(Origin, &str, Vec<&str>)> = items
            .iter()
            .map(|it| {
                let choices = it["choices"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c.as_str().unwrap());
                (
                    Origin {
                        dataset: "x",
                        row: 1,
                    },
                    it["prompt"].as_str().unwrap(),
                    choices.collect(),
                )
            })
            .collect();
        let toks = tokenize_groups(&tok, &groups, false, &untruncated).unwrap();
        let mut expected = Vec::new();
        let mut cut = Vec::new();
        for g in toks.iter().map(|g| g.as_ref().unwrap()) {
            expected.push(
                g.seqs
                    .iter()
                    .map(|s| lm_eval_logp(&model, s, CTX))
                    .collect::<Vec<_>>(),
            );
            cut.push(g.seqs.iter().any(|s| s.len() > CTX + 1));
        }
        assert_eq!(cut, [long, long], "the items are long or short as meant");
        let data = format!("test={file}");
        for mode in ["mc_mode=full", "mc_mode=prefix-cache"] {
            let (ok, stdout, err) = eval(tmp.path(), &out, &["--data", &data, &m, mode]);
            assert!(ok, "{stdout}{err}");
            assert!(stdout.contains(&format!("max_length = {CTX}")), "{stdout}");
            let header = if long {
                format!(
                    "TRUNCATED 2 of 2 items of {}",
                    file.trim_end_matches(".jsonl")
                )
            } else {
                "no item truncated".to_string()
            };
            assert!(stdout.contains(&header), "{stdout}");
            let (got, flags) = base_logps(&out);
            assert_eq!(flags, cut);
            for (g, e) in got.iter().flatten().zip(expected.iter().flatten()) {
                assert!((g - e).abs() < 1e-4, "{mode} {file}: {g} vs lm-eval's {e}");
            }
            let json = std::fs::read_to_string(out.join("table.json")).unwrap();
            assert!(json.contains("\"truncation\""), "{json}");
        }
    }
    // The training limits only when asked for.
    let args = [
        "--data",
        "test=short.jsonl",
        &m,
        "truncation=training",
        "tokenize.max_length=10",
        "tokenize.max_prompt_length=5",
    ];
    let (ok, stdout, err) = eval(tmp.path(), &out, &args);
    assert!(ok, "{stdout}{err}");
    assert!(
        stdout.contains("TRUNCATED 2 of 2 items of short") && stdout.contains("training limits"),
        "{stdout}"
    );
    let (ok, _, err) = eval(
        tmp.path(),
        &out,
        &["--data", "test=short.jsonl", &m, "max_length=0"],
    );
    assert!(!ok);
    assert!(
        err.contains("max_length") && err.contains("at least 1"),
        "{err}"
    );
}

/// `(key, default)` of every leaf of a serialised config, as `--help` shows it.
fn leaves(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(m) => m
            .iter()
            .for_each(|(k, x)| leaves(&format!("{prefix}{k}."), x, out)),
        Value::Null => out.push((prefix.trim_end_matches('.').into(), "(unset)".into())),
        x => out.push((prefix.trim_end_matches('.').into(), x.to_string())),
    }
}

/// Task 3: `eval --help` lists every key of the model and evaluation structs with the default
/// of their `Default` impls and a doc.
#[test]
fn help_lists_every_key_with_its_default() {
    let (ok, stdout, err) = common::xtask(&["eval", "--help"]);
    assert!(ok, "{err}");
    let mut keys = Vec::new();
    let model = serde_json::to_value(reprpo_train::TrainConfig::default().model).unwrap();
    leaves("model.", &model, &mut keys);
    leaves(
        "",
        &serde_json::to_value(reprpo_eval::EvalOptions::default()).unwrap(),
        &mut keys,
    );
    assert!(keys.len() > 15 && keys.iter().any(|(k, _)| k == "truncation"));
    for (k, v) in keys {
        let line = stdout
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with(&format!("{k} = ")))
            .unwrap_or_else(|| panic!("{k} missing from --help:\n{stdout}"));
        let (lhs, doc) = line.split_once("  # ").unwrap_or_else(|| panic!("{line}"));
        assert_eq!(lhs.trim(), format!("{k} = {v}"));
        assert!(doc.trim().len() > 5, "{k} has no doc: {line}");
    }
}
