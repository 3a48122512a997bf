//! One evaluation: the base and each adapter of one loaded model on the datasets of a suite,
//! into per-example records, the [`Table`] and side-by-side greedy generations.
//!
//! The base is always scored first, with no adapter active (the same weights in memory); each
//! adapter is then made active in turn (`model.adapters.active`). Pair datasets keep the
//! base's log-probabilities to give each adapter its DPO rewards.
//!
//! Long items are cut as lm-evaluation-harness cuts them ([`EvalTruncation::Context`], the
//! default): tokenised without limits, each sequence then keeps its last `max_length + 1` tokens
//! ([`window`]); [`EvalTruncation::Training`] keeps the training limits of `tokenize`. The table
//! says which rule ran and how many items it cut ([`TruncationNote`]). Datasets of a suite with
//! `scoring = "open-pref-eval"` ([`Scoring::OpenPrefEval`]) are tokenised and cut by open_pref_eval's
//! own rules instead ([`crate::open_pref_eval`]), whatever `tokenize` and `truncation` say.

use std::collections::HashSet;

use reprpo_data::tokenize::{self, Group, Seq, TokenizeConfig};
use reprpo_data::{McItem, PreferencePair, Tok};
use reprpo_models::CausalLm;
use reprpo_models::adapter::AdapterHost;
use reprpo_models::generate::{Sampling, StopAt, generate};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::{EvalError, Result};
use crate::open_pref_eval;
use crate::score::{DpoReward, McScore, PrefScore, dpo_reward, mc_score, pref_score};
use crate::scorer::{ScoreMode, ScoreOptions, SeqLogp, score_groups};
use crate::suite::{Items, Loaded, Scoring, Shift};
use crate::table::{Cell, Column, Row, Table, TruncationNote, mc_cell, pref_cell, shift_rows};

/// Settings of an evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalOptions {
    /// How log-probabilities are computed for multiple-choice items.
    pub mc_mode: ScoreMode,
    /// How log-probabilities are computed for pairs.
    pub pair_mode: ScoreMode,
    /// Padded tokens per forward in full mode.
    pub batch_tokens: usize,
    /// DPO `beta` of the reward accuracy / margins.
    pub beta: f64,
    /// Score at most this many items per dataset.
    pub limit: Option<usize>,
    /// Greedy generations: this many prompts (0: none).
    pub generations: usize,
    /// New tokens per generation.
    pub max_new_tokens: usize,
    /// Draw a progress bar on stderr.
    pub progress: bool,
    /// How items longer than the model's context are cut: `context` (lm-evaluation-harness'
    /// rule, see [`window`]) or `training` (the `tokenize.*` limits, as training cuts pairs).
    pub truncation: EvalTruncation,
    /// The context in tokens for `truncation = "context"` (lm-evaluation-harness' `max_length`);
    /// unset: nothing is cut (`cargo xtask eval` sets the model's `max_position_embeddings`).
    pub max_length: Option<usize>,
    /// Tokenisation (by default the run's own; its length limits apply only with
    /// `truncation = "training"`).
    pub tokenize: TokenizeConfig,
}

/// How evaluation cuts long items.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum EvalTruncation {
    /// lm-evaluation-harness' `loglikelihood`: each choice's context + continuation keeps its
    /// last `max_length + 1` tokens (see [`window`]); nothing else is cut.
    #[default]
    Context,
    /// The training limits of `tokenize` (`max_length`, `max_prompt_length`, `truncation_mode`).
    Training,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            // Per group, the prompt cache where it cuts the work by 1.5x or more, else padded
            // batches (see `ScoreMode::Auto`; docs/perf.md, "Evaluation").
            mc_mode: ScoreMode::Auto,
            pair_mode: ScoreMode::Auto,
            batch_tokens: 4096,
            beta: 0.1,
            limit: None,
            generations: 4,
            max_new_tokens: 48,
            progress: false,
            truncation: EvalTruncation::Context,
            max_length: None,
            tokenize: TokenizeConfig::default(),
        }
    }
}

/// A model to score: the label of its row and the adapter index (`None`: the base).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    /// Row label.
    pub label: String,
    /// Adapter index on the model (`None` = base).
    pub adapter: Option<usize>,
}

/// One prompt's greedy continuations, one per subject.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    /// Dataset the prompt comes from.
    pub dataset: String,
    /// Item id.
    pub id: String,
    /// The prompt text.
    pub prompt: String,
    /// `(label, continuation)` per subject, base first.
    pub outputs: Vec<(String, String)>,
}

/// Everything an evaluation produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The aggregate table.
    pub table: Table,
    /// One JSON object per (subject, item): see `mc_record` and `pair_record`.
    pub examples: Vec<Value>,
    /// Greedy generations side by side.
    pub generations: Vec<Generation>,
    /// Items dropped by tokenisation (`drop_too_long`), by dataset.
    pub dropped: Vec<(String, usize)>,
}

impl EvalOptions {
    /// The tokenisation actually used: with `truncation = "context"`, `tokenize` without its
    /// length limits ([`window`] cuts afterwards).
    pub fn tokenize_config(&self) -> TokenizeConfig {
        match self.truncation {
            EvalTruncation::Training => self.tokenize.clone(),
            EvalTruncation::Context => TokenizeConfig {
                max_length: None,
                max_prompt_length: None,
                drop_too_long: false,
                ..self.tokenize.clone()
            },
        }
    }

    /// The cutting rule in words, for the table's header.
    pub fn truncation_rule(&self) -> String {
        match (self.truncation, self.max_length) {
            (EvalTruncation::Context, Some(l)) => format!(
                "lm-evaluation-harness rule: each choice keeps the last {} tokens of context + \
                 continuation (max_length = {l})",
                l + 1
            ),
            (EvalTruncation::Context, None) => "none (no max_length)".into(),
            (EvalTruncation::Training, _) => {
                let t = &self.tokenize;
                let n = |x: Option<usize>| x.map_or("none".into(), |v| v.to_string());
                format!(
                    "training limits: tokenize.max_length = {}, tokenize.max_prompt_length = {}, \
                     {:?}",
                    n(t.max_length),
                    n(t.max_prompt_length),
                    t.truncation_mode
                )
            }
        }
    }
}

/// lm-evaluation-harness' left truncation of one sequence (its `loglikelihood`:
/// `inp = (context_enc + continuation_enc)[-(max_length + 1):][:-1]`, scored on the
/// continuation's positions): the last `max_length + 1` tokens are kept, the first of them only
/// as context. The model then sees at most `max_length` input positions that matter (the last
/// token is only a target). `None` when the sequence fits. A continuation longer than the window
/// keeps its last `max_length` tokens counted (lm-eval has no defined result there).
pub fn window(s: &Seq, max_length: usize) -> Option<Seq> {
    let keep = max_length + 1;
    let cut = s.len().checked_sub(keep).filter(|&c| c > 0)?;
    Some(if cut < s.prompt.len() {
        Seq {
            prompt: s.prompt[cut..].to_vec(),
            completion: s.completion.clone(),
        }
    } else {
        let c = cut - s.prompt.len();
        Seq {
            prompt: s.completion[c..=c].to_vec(),
            completion: s.completion[c + 1..].to_vec(),
        }
    })
}

/// [`window`] on every sequence of a group; the shared prompt becomes their common prefix.
fn window_group(g: &mut Group, max_length: usize) {
    let mut cut = false;
    for s in &mut g.seqs {
        if let Some(w) = window(s, max_length) {
            *s = w;
            cut = true;
        }
    }
    if !cut {
        return;
    }
    g.truncated = true;
    let shared = g.seqs.iter().map(|s| s.prompt.as_slice()).reduce(|a, b| {
        let n = a.iter().zip(b).take_while(|(x, y)| x == y).count();
        &a[..n]
    });
    g.prompt = shared.unwrap_or_default().to_vec();
}

/// The per-example record of an MC item.
pub(crate) fn mc_record(model: &str, dataset: &str, item: &McItem, s: &McScore) -> Value {
    json!({
        "model": model, "dataset": dataset, "id": item.id, "row": item.source.row, "kind": "mc",
        "logps": s.logps, "tokens": s.tokens, "correct_choices": s.correct,
        "probs": s.probs, "prob_correct": s.prob_correct, "prob_correct_norm": s.prob_correct_norm,
        "pred": s.pred, "correct": s.acc, "correct_norm": s.acc_norm,
    })
}

/// The per-example record of a pair (`reward`: an adapter's DPO rewards against the base).
pub(crate) fn pair_record(
    model: &str,
    dataset: &str,
    pair: &PreferencePair,
    s: &PrefScore,
    reward: Option<&DpoReward>,
) -> Value {
    let mut v = json!({
        "model": model, "dataset": dataset, "id": pair.id, "row": pair.source.row, "kind": "pair",
        "logp_chosen": s.logp_chosen, "logp_rejected": s.logp_rejected,
        "tokens_chosen": s.tokens_chosen, "tokens_rejected": s.tokens_rejected,
        "delta": s.delta, "prob_correct": s.prob, "correct": s.correct,
    });
    if let (Some(r), Some(obj)) = (reward, v.as_object_mut()) {
        obj.insert("reward_chosen".into(), json!(r.chosen));
        obj.insert("reward_rejected".into(), json!(r.rejected));
        obj.insert("reward_margin".into(), json!(r.margin));
        obj.insert("reward_correct".into(), json!(r.correct));
    }
    v
}

/// A dataset after tokenisation: the kept items and their groups.
enum Prepared<'a> {
    Mc(Vec<(&'a McItem, Group)>),
    Pairs(Vec<(&'a PreferencePair, Group)>),
}

/// Tokenise a dataset and cut its items as `opts` says (open_pref_eval's rules under
/// [`Scoring::OpenPrefEval`]); the items dropped by tokenisation.
fn prepare<'a>(tok: &Tok, d: &'a Loaded, opts: &EvalOptions) -> Result<(Prepared<'a>, usize)> {
    if let Scoring::OpenPrefEval(cfg) = d.spec.scoring {
        let Items::Pairs(pairs) = &d.items else {
            return Err(EvalError::Invalid(format!(
                "dataset {}: scoring = \"open-pref-eval\" scores preference pairs only",
                d.spec.name
            )));
        };
        let groups = open_pref_eval::tokenize_pairs(tok, pairs, &cfg)?;
        return Ok((Prepared::Pairs(pairs.iter().zip(groups).collect()), 0));
    }
    let (mut p, dropped) = tokenize_dataset(tok, d, &opts.tokenize_config())?;
    if let (EvalTruncation::Context, Some(l)) = (opts.truncation, opts.max_length) {
        p.groups_mut().for_each(|g| window_group(g, l));
    }
    Ok((p, dropped))
}

impl Prepared<'_> {
    fn groups(&self) -> Vec<&Group> {
        match self {
            Prepared::Mc(v) => v.iter().map(|(_, g)| g).collect(),
            Prepared::Pairs(v) => v.iter().map(|(_, g)| g).collect(),
        }
    }

    fn groups_mut(&mut self) -> Box<dyn Iterator<Item = &mut Group> + '_> {
        match self {
            Prepared::Mc(v) => Box::new(v.iter_mut().map(|(_, g)| g)),
            Prepared::Pairs(v) => Box::new(v.iter_mut().map(|(_, g)| g)),
        }
    }
}

fn tokenize_dataset<'a>(
    tok: &Tok,
    d: &'a Loaded,
    cfg: &TokenizeConfig,
) -> Result<(Prepared<'a>, usize)> {
    Ok(match &d.items {
        Items::Mc(items) => {
            let groups = tokenize::tokenize_mc(tok, items, cfg)?;
            let kept: Vec<_> = items
                .iter()
                .zip(groups)
                .filter_map(|(it, g)| g.map(|g| (it, g)))
                .collect();
            let dropped = items.len() - kept.len();
            (Prepared::Mc(kept), dropped)
        }
        Items::Pairs(pairs) => {
            let t = tokenize::tokenize_pairs(tok, pairs, cfg)?;
            let dropped: HashSet<&str> = t.dropped.iter().map(String::as_str).collect();
            let kept: Vec<&PreferencePair> = pairs
                .iter()
                .filter(|p| !dropped.contains(p.id.as_str()))
                .collect();
            if kept.len() != t.pairs.len() {
                return Err(EvalError::Invalid(format!(
                    "dataset {}: {} pairs kept but {} tokenised",
                    d.spec.name,
                    kept.len(),
                    t.pairs.len()
                )));
            }
            let n = dropped.len();
            (Prepared::Pairs(kept.into_iter().zip(t.pairs).collect()), n)
        }
    })
}

fn mc_item_err(item: &McItem, e: EvalError) -> EvalError {
    EvalError::Item {
        dataset: item.source.dataset.clone(),
        row: item.source.row,
        id: item.id.clone(),
        field: "choices".into(),
        problem: e.to_string(),
    }
}

/// Score every subject on every dataset and generate side by side. `subjects[0]` must be the
/// base (`adapter: None`).
///
/// The job runs on a thread of candle's CPU pool (`Device::with_context`; a no-op when the caller
/// is already there), so that the parallel parts of every op share that pool's threads instead of
/// the calling thread handing each one over and waiting (docs/perf.md).
pub fn evaluate<M: CausalLm + AdapterHost + Send + ?Sized>(
    model: &mut M,
    tok: &Tok,
    subjects: &[Subject],
    datasets: &[Loaded],
    shifts: &[Shift],
    suite: &str,
    opts: &EvalOptions,
) -> Result<Report> {
    candle_core::Device::Cpu
        .with_context(|| evaluate_job(model, tok, subjects, datasets, shifts, suite, opts))
}

fn evaluate_job<M: CausalLm + AdapterHost + ?Sized>(
    model: &mut M,
    tok: &Tok,
    subjects: &[Subject],
    datasets: &[Loaded],
    shifts: &[Shift],
    suite: &str,
    opts: &EvalOptions,
) -> Result<Report> {
    if subjects.first().is_none_or(|s| s.adapter.is_some()) {
        return Err(EvalError::Invalid(
            "evaluate: the first subject must be the base (no adapter)".into(),
        ));
    }
    if opts.max_length == Some(0) {
        return Err(EvalError::Config {
            file: "(overrides)".into(),
            key: "max_length".into(),
            problem: "must be at least 1".into(),
        });
    }
    let mut prepared = Vec::with_capacity(datasets.len());
    let mut dropped = Vec::new();
    let mut truncation = TruncationNote {
        rule: truncation_rule(opts, datasets),
        items: Vec::new(),
    };
    for d in datasets {
        let (p, n) = prepare(tok, d, opts)?;
        if n > 0 {
            dropped.push((d.spec.name.clone(), n));
        }
        let groups = p.groups();
        let cut = groups.iter().filter(|g| g.truncated).count();
        if cut > 0 {
            truncation
                .items
                .push((d.spec.name.clone(), cut, groups.len()));
        }
        prepared.push(p);
    }
    let columns: Vec<Column> = datasets
        .iter()
        .zip(&prepared)
        .map(|(d, p)| Column {
            name: d.spec.name.clone(),
            role: d.spec.role,
            kind: match p {
                Prepared::Mc(_) => "mc".into(),
                Prepared::Pairs(_) => "pairs".into(),
            },
        })
        .collect();
    let total: usize = prepared.iter().map(|p| p.groups().len()).sum::<usize>() * subjects.len();
    let bar = progress_bar(opts.progress, total as u64);
    let mut tick = |n: usize| {
        if let Some(b) = &bar {
            b.inc(n as u64);
        }
    };

    let mut rows = Vec::with_capacity(subjects.len());
    let mut examples = Vec::new();
    let mut base_pairs: Vec<Option<Vec<PrefScore>>> = vec![None; datasets.len()];
    for subject in subjects {
        model.adapter_set_mut().active = subject.adapter;
        let mut cells: Vec<Option<Cell>> = Vec::with_capacity(datasets.len());
        for (di, (d, p)) in datasets.iter().zip(&prepared).enumerate() {
            let name = &d.spec.name;
            match p {
                Prepared::Mc(items) => {
                    let groups: Vec<&Group> = items.iter().map(|(_, g)| g).collect();
                    let so = score_opts(opts, opts.mc_mode, tok);
                    let lps = score_groups(&*model, &groups, &so, &mut tick)?;
                    let mut scores = Vec::with_capacity(items.len());
                    for ((item, g), lp) in items.iter().zip(&lps) {
                        let (l, n) = split(lp);
                        let s =
                            mc_score(&l, &n, &item.correct).map_err(|e| mc_item_err(item, e))?;
                        let rec = mc_record(&subject.label, name, item, &s);
                        examples.push(mark_truncated(rec, g));
                        scores.push(s);
                    }
                    cells.push(Some(mc_cell(&scores)));
                }
                Prepared::Pairs(pairs) => {
                    let groups: Vec<&Group> = pairs.iter().map(|(_, g)| g).collect();
                    let so = score_opts(opts, opts.pair_mode, tok);
                    let lps = score_groups(&*model, &groups, &so, &mut tick)?;
                    let mut scores = Vec::with_capacity(pairs.len());
                    for ((pair, _), lp) in pairs.iter().zip(&lps) {
                        let (l, n) = split(lp);
                        let (Some(&lw), Some(&ll), Some(&nw), Some(&nl)) =
                            (l.first(), l.get(1), n.first(), n.get(1))
                        else {
                            return Err(EvalError::Invalid(format!(
                                "pair {} of {name}: expected two completions",
                                pair.id
                            )));
                        };
                        let s = pref_score(lw, nw, ll, nl).map_err(|e| EvalError::Item {
                            dataset: pair.source.dataset.clone(),
                            row: pair.source.row,
                            id: pair.id.clone(),
                            field: "chosen/rejected".into(),
                            problem: e.to_string(),
                        })?;
                        scores.push(s);
                    }
                    let rewards: Option<Vec<DpoReward>> = match (&base_pairs[di], subject.adapter) {
                        (Some(base), Some(_)) => Some(
                            scores
                                .iter()
                                .zip(base)
                                .map(|(s, b)| dpo_reward(s, b, opts.beta))
                                .collect(),
                        ),
                        _ => None,
                    };
                    for (i, ((pair, g), s)) in pairs.iter().zip(&scores).enumerate() {
                        let r = rewards.as_ref().and_then(|r| r.get(i));
                        let rec = pair_record(&subject.label, name, pair, s, r);
                        examples.push(mark_truncated(rec, g));
                    }
                    cells.push(Some(pref_cell(&scores, rewards.as_deref())?));
                    if subject.adapter.is_none() {
                        base_pairs[di] = Some(scores);
                    }
                }
            }
        }
        rows.push(Row {
            model: subject.label.clone(),
            cells,
        });
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let generations = generations(model, tok, subjects, datasets, opts)?;
    model.adapter_set_mut().active = None;
    let shifts = shift_rows(&columns, &rows, shifts);
    Ok(Report {
        table: Table {
            suite: suite.to_string(),
            columns,
            rows,
            shifts,
            truncation,
        },
        examples,
        generations,
        dropped,
    })
}

/// The table's cutting rule: `opts`' rule, or open_pref_eval's for the datasets it scores (named
/// when the suite mixes both).
fn truncation_rule(opts: &EvalOptions, datasets: &[Loaded]) -> String {
    let mut rules: Vec<(String, Vec<&str>)> = Vec::new();
    for d in datasets {
        let rule = match d.spec.scoring {
            Scoring::Default => opts.truncation_rule(),
            Scoring::OpenPrefEval(cfg) => cfg.rule(),
        };
        match rules.iter_mut().find(|(r, _)| *r == rule) {
            Some((_, names)) => names.push(&d.spec.name),
            None => rules.push((rule, vec![&d.spec.name])),
        }
    }
    match rules.as_slice() {
        [] => opts.truncation_rule(),
        [(rule, _)] => rule.clone(),
        several => several
            .iter()
            .map(|(rule, names)| format!("{}: {rule}", names.join(", ")))
            .collect::<Vec<_>>()
            .join("; "),
    }
}

/// A per-example record with `truncated`: whether any of the item's sequences was cut.
fn mark_truncated(mut rec: Value, g: &Group) -> Value {
    if let Some(obj) = rec.as_object_mut() {
        obj.insert("truncated".into(), json!(g.truncated));
    }
    rec
}

fn split(lp: &[SeqLogp]) -> (Vec<f64>, Vec<usize>) {
    (
        lp.iter().map(|x| x.sum).collect(),
        lp.iter().map(|x| x.tokens).collect(),
    )
}

fn score_opts(opts: &EvalOptions, mode: ScoreMode, tok: &Tok) -> ScoreOptions {
    ScoreOptions {
        mode,
        batch_tokens: opts.batch_tokens,
        pad: tok.pad,
    }
}

fn progress_bar(on: bool, total: u64) -> Option<indicatif::ProgressBar> {
    if !on {
        return None;
    }
    let b = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{elapsed_precise} [{bar:40}] {pos}/{len} items ({per_sec}, eta {eta})",
    ) {
        b.set_style(style);
    }
    Some(b)
}

/// Greedy continuations of the first `opts.generations` prompts (taken from the datasets in
/// suite order, distinct prompts) for every subject.
fn generations<M: CausalLm + AdapterHost + ?Sized>(
    model: &mut M,
    tok: &Tok,
    subjects: &[Subject],
    datasets: &[Loaded],
    opts: &EvalOptions,
) -> Result<Vec<Generation>> {
    let mut prompts: Vec<(String, String, String)> = Vec::new();
    let mut seen = HashSet::new();
    'outer: for d in datasets {
        let items: Vec<(&str, &str)> = match &d.items {
            Items::Mc(v) => v
                .iter()
                .map(|i| (i.id.as_str(), i.prompt.as_str()))
                .collect(),
            Items::Pairs(v) => v
                .iter()
                .map(|p| (p.id.as_str(), p.prompt.as_str()))
                .collect(),
        };
        for (id, p) in items {
            if prompts.len() >= opts.generations {
                break 'outer;
            }
            if seen.insert(p.to_string()) {
                prompts.push((d.spec.name.clone(), id.to_string(), p.to_string()));
            }
        }
    }
    let stop = StopAt {
        tokens: vec![tok.eos],
    };
    let mut out = Vec::with_capacity(prompts.len());
    for (dataset, id, prompt) in prompts {
        let mut ids = tok.bos.into_iter().collect::<Vec<u32>>();
        let enc = tok.encode(&prompt, false)?;
        if enc.first().is_some_and(|&f| Some(f) == tok.bos) {
            ids.clear();
        }
        ids.extend(enc);
        let mut outputs = Vec::with_capacity(subjects.len());
        for s in subjects {
            model.adapter_set_mut().active = s.adapter;
            let new = generate(&*model, &ids, opts.max_new_tokens, &Sampling::Greedy, &stop)?;
            outputs.push((s.label.clone(), tok.decode(&new, true)?));
        }
        out.push(Generation {
            dataset,
            id,
            prompt,
            outputs,
        });
    }
    Ok(out)
}
