//! The reference ReprPO project's method space in training: the `[method]` configuration (what
//! is collected, the transform, the loss), the named presets of its `experiments.py`
//! (`hs-ether-prefvec`, `side-none-rank-use_dpo_loss_False`, ...), the setup built once per run
//! (layers and module taps resolved and the transform initialised, every bad combination an
//! error naming its key before any work starts), and the batch loss.
//!
//! # One batch
//! The reference model (no gradient) and the policy each run one forward over the batch's
//! chosen and rejected rows with full logits, collecting hidden states (`collect_hs`, keys =
//! hidden-state indices) or the inputs / outputs of the selected linear modules (keys = module
//! paths). Per half: the activations (f32), the attention mask, the summed next-token
//! log-probabilities under the attention mask (prompt included, as the reference's
//! `compute_logprobs`), and for the chosen half the unshifted token NLL
//! ([`reprpo_models::logps::unshifted_nll`]). The transform maps all four activation maps with
//! the same parameters, then [`reprpo_losses::methods::method_loss`] gives the loss and the
//! reference's metrics.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, IndexOp, Tensor, Var};
use reprpo_losses::methods::{
    Collected, MethodInputs, MethodLoss, MseConfig, PrefVecConfig, RankConfig, method_loss,
};
use reprpo_models::collect::{Tap, TapSide, linear_names, parse_layers, side_taps};
use reprpo_models::logps::{token_logps, unshifted_nll};
use reprpo_models::transform::{
    self, ActTransform, EtherConfig, HraConfig, ModelMatrices, OrthoConfig, SvdConfig,
    TransformConfig, TransformSite,
};
use reprpo_models::{ForwardSpec, Output};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::data::DeviceBatch;
use crate::error::{Result, TrainError};
use crate::objective::BatchLoss;
use crate::trainer::TrainModel;

/// The `[method]` table: the reference project's `ReprPOConfig` (its defaults: side
/// activations, the `ether` transform, the `prefvec` loss).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, documented::DocumentedFields)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct MethodConfig {
    /// The loss on the collected activations: `prefvec`, `rank` or `mse` (options in
    /// `[method.prefvec]`, `[method.rank]`, `[method.mse]`).
    pub loss: String,
    /// The transform before the loss: `none`, `ether`, `hra`, `svd`, `supr` or `ortho` (options
    /// in `[method.ether]`, `[method.hra]`, `[method.svd]`, `[method.ortho]`).
    pub transform: String,
    /// Collect residual hidden states (true) or inputs / outputs of linear modules (false).
    pub collect_hs: bool,
    /// Layers in the reference's syntax: `-2,-1`, `range(3,10,2)`, fractions `0.5,0.9`.
    pub collection_layers: String,
    /// Module patterns whose inputs are collected (`collect_input`): a leading `.*` or trailing
    /// `$` makes a regex searched in the module path, anything else a suffix.
    pub collection_keys_in: Vec<String>,
    /// Module patterns whose outputs are collected (`collect_input = false`).
    pub collection_keys_out: Vec<String>,
    /// Side mode: collect module inputs (true) or outputs (false).
    pub collect_input: bool,
    /// Side mode: keep only modules in `collection_layers`; false collects every block, as the
    /// reference does at bd9ae63 (its layer setting does not reach side modules there).
    pub side_layers: bool,
    /// Options of the `mse` loss.
    pub mse: MseConfig,
    /// Options of the `prefvec` loss.
    pub prefvec: PrefVecConfig,
    /// Options of the `rank` loss.
    pub rank: RankConfig,
    /// Options of the `ether` transform.
    pub ether: EtherConfig,
    /// Options of the `hra` transform.
    pub hra: HraConfig,
    /// Options of the `svd` transform.
    pub svd: SvdConfig,
    /// Options of the `ortho` transform.
    pub ortho: OrthoConfig,
}

impl Default for MethodConfig {
    fn default() -> Self {
        MethodConfig {
            loss: "prefvec".into(),
            transform: "ether".into(),
            collect_hs: false,
            collection_layers: "range(.3,-2)".into(),
            collection_keys_in: vec![".*o_proj$".into(), ".*down_proj$".into()],
            collection_keys_out: [
                ".*q_proj$",
                ".*k_proj$",
                ".*v_proj$",
                ".*gate_proj$",
                ".*up_proj$",
            ]
            .map(String::from)
            .to_vec(),
            collect_input: true,
            side_layers: false,
            mse: MseConfig::default(),
            prefvec: PrefVecConfig::default(),
            rank: RankConfig::default(),
            ether: EtherConfig::default(),
            hra: HraConfig::default(),
            svd: SvdConfig::default(),
            ortho: OrthoConfig::default(),
        }
    }
}

fn config_error(key: &str, problem: impl std::fmt::Display) -> TrainError {
    TrainError::Config {
        key: key.into(),
        problem: problem.to_string(),
    }
}

impl MethodConfig {
    /// The loss with its options.
    pub fn method_loss(&self) -> Result<MethodLoss> {
        Ok(match self.loss.as_str() {
            "mse" => MethodLoss::Mse(self.mse.clone()),
            "prefvec" => MethodLoss::Prefvec(self.prefvec.clone()),
            "rank" => MethodLoss::Rank(self.rank.clone()),
            other => {
                return Err(config_error(
                    "method.loss",
                    format!("unknown method loss {other:?}; known: prefvec, rank, mse"),
                ));
            }
        })
    }

    /// The transform with its options.
    pub fn transform_config(&self) -> Result<TransformConfig> {
        Ok(match self.transform.as_str() {
            "none" => TransformConfig::None,
            "ether" => TransformConfig::Ether(self.ether.clone()),
            "hra" => TransformConfig::Hra(self.hra.clone()),
            "svd" => TransformConfig::Svd(self.svd.clone()),
            "supr" => TransformConfig::Supr(Default::default()),
            "ortho" => TransformConfig::Ortho(self.ortho.clone()),
            other => {
                return Err(config_error(
                    "method.transform",
                    format!(
                        "unknown transform {other:?}; known: none, ether, hra, svd, supr, ortho"
                    ),
                ));
            }
        })
    }
}

/// A transform's configuration error under its `method.*` key (`collect_hs` and
/// `collection_layers` are `[method]` keys, the rest the transform's own table's).
fn transform_error(e: reprpo_models::ModelError, transform: &str) -> TrainError {
    match e {
        reprpo_models::ModelError::Config { key, problem, .. } => {
            let key = if key == "collect_hs" || key == "collection_layers" || key == "kind" {
                format!("method.{}", if key == "kind" { "transform" } else { &key })
            } else {
                format!("method.{transform}.{key}")
            };
            TrainError::Config { key, problem }
        }
        other => TrainError::Model(other),
    }
}

/// The reference's experiment names that train a method (its `experiments.py`, bd9ae63),
/// with the `[method]` keys each sets; `dpo` is the DPO family's preset, and `projgrad` /
/// `projbp` are the gradient interventions' (`crate::gradproj`).
pub fn presets() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let base = |hs: bool, t: &str, l: &str| json!({"collect_hs": hs, "transform": t, "loss": l});
    for l in ["prefvec", "rank", "mse"] {
        out.push((format!("side-none-{l}"), base(false, "none", l)));
        for t in ["ether", "supr", "none", "hra", "svd"] {
            out.push((format!("hs-{t}-{l}"), base(true, t, l)));
        }
    }
    for h in ["ether", "etherplus", "oft", "etherplusHH"] {
        let mut v = base(true, "ether", "prefvec");
        v["ether"] = json!({ "Htype": h });
        out.push((format!("hs-ether-prefvec-Htype_{h}"), v));
    }
    let flips = [
        ("prefvec", "use_angle_loss", true),
        ("prefvec", "use_dpo_loss", false),
        ("prefvec", "use_orth_loss", true),
        ("prefvec", "use_proj_abs_loss", false),
        ("prefvec", "use_proj_loss", false),
        ("prefvec", "use_sep_loss", true),
        ("rank", "use_dpo_loss", false),
        ("rank", "use_nll_loss", true),
        ("rank", "use_rank_retain", true),
    ];
    for (l, field, value) in flips {
        let mut v = base(false, "none", l);
        v[l] = json!({ field: value });
        let py = if value { "True" } else { "False" };
        out.push((format!("side-none-{l}-{field}_{py}"), v));
    }
    let mut v = base(false, "none", "prefvec");
    v["prefvec"] = json!({ "beta": 3.0 });
    out.push(("side-none-prefvec2".into(), v));
    let mut v = base(true, "ether", "rank");
    v["rank"] = json!({ "use_nll_loss": true, "beta": 0.1, "alpha": 100.0 });
    out.push(("hs-ether-rank2".into(), v));
    for l in ["prefvec", "rank"] {
        let mut v = base(true, "supr", l);
        v["collection_layers"] = json!("-2,1");
        out.push((format!("hs-supr-{l}2"), v));
    }
    out.into_iter()
        .map(|(n, m)| (n, json!({ "method": m, "train": { "lr": 7e-5 } })))
        .collect()
}

/// The preset of a method experiment name (case-insensitive), if it is one.
pub fn preset(name: &str) -> Option<Value> {
    presets()
        .into_iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

/// The doc line of a `method.*` key (`f` without the `method.` prefix).
pub(crate) fn key_doc(f: &str) -> Option<&'static str> {
    use documented::DocumentedFields as _;
    let doc = match f.split_once('.') {
        None => MethodConfig::get_field_docs(f),
        Some(("mse", k)) => MseConfig::get_field_docs(k),
        Some(("prefvec", k)) => PrefVecConfig::get_field_docs(k),
        Some(("rank", k)) => RankConfig::get_field_docs(k),
        Some(("ether", "Htype")) => EtherConfig::get_field_docs("htype"),
        Some(("ether", k)) => EtherConfig::get_field_docs(k),
        Some(("hra", "apply_GS")) => HraConfig::get_field_docs("apply_gs"),
        Some(("hra", k)) => HraConfig::get_field_docs(k),
        Some(("svd", k)) => SvdConfig::get_field_docs(k),
        Some(("ortho", k)) => OrthoConfig::get_field_docs(k),
        Some(_) => return None,
    };
    doc.ok()
}

/// What a forward collects.
#[derive(Debug, Clone)]
pub enum Collect {
    /// Hidden-state indices (keys are their decimal strings).
    Hidden(Vec<usize>),
    /// Module inputs or outputs (keys are the module paths).
    Taps(Vec<Tap>),
}

/// A run's method: the loss, what is collected, and the transform with its parameters.
#[derive(Debug)]
pub struct MethodSetup {
    /// The loss and its options.
    pub loss: MethodLoss,
    /// What each forward collects.
    pub collect: Collect,
    /// The transform (trainable parameters beside the adapter's).
    pub transform: Box<dyn ActTransform>,
}

/// The file of the transform's parameters in a checkpoint or run folder.
pub const TRANSFORM_FILE: &str = "transform.safetensors";

impl MethodSetup {
    /// Resolve `cfg.method` against `model`: layers, module taps, widths, the transform (seeded
    /// by `train.seed`). Errors name the `method.*` key.
    pub fn new(cfg: &crate::config::TrainConfig, model: &dyn TrainModel) -> Result<Self> {
        let m = &cfg.method;
        let loss = m.method_loss()?;
        let tcfg = m.transform_config()?;
        let n = model.lm().num_layers();
        let layers = parse_layers(&m.collection_layers, n)
            .map_err(|e| config_error("method.collection_layers", e))?;
        if layers.is_empty() && (m.collect_hs || m.side_layers) {
            return Err(config_error("method.collection_layers", "selects no layer"));
        }
        let linears = model.linears();
        let (collect, sizes) = if m.collect_hs {
            let hidden = model.lm().vocab_matrices().1.dim(1)?;
            let sizes = layers.iter().map(|l| (l.to_string(), hidden)).collect();
            (Collect::Hidden(layers.clone()), sizes)
        } else {
            let (keys, key_name, side) = if m.collect_input {
                (
                    &m.collection_keys_in,
                    "method.collection_keys_in",
                    TapSide::Input,
                )
            } else {
                (
                    &m.collection_keys_out,
                    "method.collection_keys_out",
                    TapSide::Output,
                )
            };
            let names = linear_names(model);
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let restrict = m.side_layers.then_some(layers.as_slice());
            let taps =
                side_taps(keys, restrict, side, &names).map_err(|e| config_error(key_name, e))?;
            let mut sizes = BTreeMap::new();
            for t in &taps {
                if let Some(l) = linears.iter().find(|l| l.name == t.module) {
                    let w = if m.collect_input {
                        l.in_dim()
                    } else {
                        l.out_dim()
                    };
                    sizes.insert(t.module.clone(), w);
                }
            }
            (Collect::Taps(taps), sizes)
        };
        let (embed, head) = model.lm().vocab_matrices();
        let matrices = ModelMatrices { embed, head };
        let site = TransformSite {
            sizes: &sizes,
            matrices: Some(&matrices),
            device: model.lm().device(),
            seed: cfg.train.seed,
            hidden_states: m.collect_hs,
        };
        let transform =
            transform::build(&tcfg, &site).map_err(|e| transform_error(e, &m.transform))?;
        Ok(MethodSetup {
            loss,
            collect,
            transform,
        })
    }

    /// The transform's trainable parameters (optimised with the adapter's).
    pub fn params(&self) -> Vec<(String, Var)> {
        self.transform.params()
    }

    /// Write the transform's parameters and constants to `dir/transform.safetensors` (nothing
    /// for a transform without any).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let tensors = transform::tensors(self.transform.as_ref());
        if tensors.is_empty() {
            return Ok(());
        }
        let file = dir.join(TRANSFORM_FILE);
        candle_core::safetensors::save(&tensors.into_iter().collect(), &file)
            .map_err(|e| crate::error::TrainError::Model(e.into()))?;
        Ok(())
    }

    /// Load what [`MethodSetup::save`] wrote in `dir` (a transform with tensors requires the
    /// file).
    pub fn load(&self, dir: &Path) -> Result<()> {
        if transform::tensors(self.transform.as_ref()).is_empty() {
            return Ok(());
        }
        let file = dir.join(TRANSFORM_FILE);
        let dev = self
            .params()
            .first()
            .map(|(_, v)| v.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        transform::load_into(self.transform.as_ref(), &file, &dev)?;
        Ok(())
    }

    fn spec(&self, reference: bool, train: bool, ckpt: bool, seed: Option<u64>) -> ForwardSpec {
        let mut s = ForwardSpec {
            logits: true,
            reference,
            train,
            checkpoint: ckpt,
            dropout_seed: seed,
            ..Default::default()
        };
        match &self.collect {
            Collect::Hidden(l) => s.hidden_layers = l.iter().map(|&i| i as isize).collect(),
            Collect::Taps(t) => s.taps = t.clone(),
        }
        s
    }
}

/// One forward's two halves: (chosen, rejected) activations, log-probabilities, and the
/// chosen half's unshifted NLL.
fn halves(out: Output, batch: &DeviceBatch, detach: bool) -> Result<([Collected; 2], Tensor)> {
    let b = batch.pairs;
    let pairs: Vec<(String, Tensor)> = if out.taps.is_empty() {
        out.hidden
            .into_iter()
            .map(|(i, h)| (i.to_string(), h))
            .collect()
    } else {
        out.taps
    };
    let logits = out
        .logits
        .ok_or_else(|| config_error("method", "the forward returned no logits"))?;
    let logits = if detach { logits.detach() } else { logits };
    let lp = token_logps(&logits, &batch.ids, &batch.attention)?.sum;
    let nll = unshifted_nll(
        &logits.i(..b)?,
        &batch.ids.i(..b)?,
        &batch.attention.i(..b)?,
    )?;
    let half = |lo: usize| -> Result<Collected> {
        let mut acts = BTreeMap::new();
        for (k, x) in &pairs {
            let x = x.i(lo..lo + b)?.to_dtype(DType::F32)?;
            acts.insert(k.clone(), if detach { x.detach() } else { x });
        }
        Ok(Collected {
            acts,
            mask: batch.attention.i(lo..lo + b)?,
            logps: lp.i(lo..lo + b)?,
        })
    };
    Ok(([half(0)?, half(b)?], nll))
}

/// The loss of one batch under the run's method (see the module docs).
pub fn method_batch_loss(
    model: &dyn reprpo_models::CausalLm,
    setup: &MethodSetup,
    batch: &DeviceBatch,
    train: bool,
    ckpt: bool,
    dropout_seed: Option<u64>,
) -> Result<BatchLoss> {
    let seed = if train { dropout_seed } else { None };
    let refr = model.forward(
        &batch.ids,
        Some(&batch.attention),
        None,
        &setup.spec(true, false, false, None),
    )?;
    let pol = model.forward(
        &batch.ids,
        Some(&batch.attention),
        None,
        &setup.spec(false, train, ckpt, seed),
    )?;
    let ([rc, rr], nll_ref) = halves(refr, batch, true)?;
    let ([pc, pr], nll_pi) = halves(pol, batch, false)?;
    let maps = setup
        .transform
        .apply(&[&pc.acts, &pr.acts, &rc.acts, &rr.acts], train)?;
    let with = |c: Collected, acts: &BTreeMap<String, Tensor>| Collected {
        acts: acts.clone(),
        ..c
    };
    let inputs = MethodInputs {
        pi_cho: with(pc, &maps[0]),
        pi_rej: with(pr, &maps[1]),
        ref_cho: with(rc, &maps[2]),
        ref_rej: with(rr, &maps[3]),
        nll_pi: Some(nll_pi),
        nll_ref: Some(nll_ref),
    };
    let out = method_loss(&inputs, &setup.loss)?;
    let mut metrics = out.metrics;
    metrics.insert("loss".into(), out.loss.detach());
    Ok(BatchLoss {
        loss: out.loss,
        metrics,
        gradproj: None,
    })
}
