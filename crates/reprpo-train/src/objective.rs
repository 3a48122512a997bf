//! One batch through the model and the loss: the policy forward (adapter on) and, for preference
//! losses, the reference forward (no gradient) with `ForwardSpec::reference`: the same weights
//! with the adapter off (`adapter.reference = "base"`), or with the frozen copy of the initial
//! adapter the trainer registered as the model's reference adapter (`"initial"`).
//!
//! For hidden-state losses both forwards stop after the deepest hidden state the loss reads and
//! skip the vocabulary projection (unless per-example weights need the DPO margin).
//!
//! # SFT
//! `loss = -sum_{b,t} m[b,t] logp[b,t] / sum_{b,t} m[b,t]` over the completion tokens of the
//! chosen sequences (the token mean over the batch, as TRL's SFT trainer).
//!
//! Nothing here reads the device: the counted positions come with the [`DeviceBatch`] (found on
//! the host when it was collated) and the metrics stay device scalars for the trainer to
//! accumulate and read when it logs.

use std::collections::BTreeMap;

use candle_core::{D, DType, IndexOp, Tensor};
use reprpo_losses::dpo::{DpoInputs, DpoState, LdTails, LossOut, WpoLogWeights, dpo_loss};
use reprpo_losses::reprpo::{HiddenPairs, reprpo_loss, stack_layers};
use reprpo_models::logps::{CountedRows, SeqLogps, row_token_logps, token_logps};
use reprpo_models::{CausalLm, ForwardSpec};

use crate::config::{LossFamily, TrainConfig};
use crate::data::DeviceBatch;
use crate::error::Result;

/// What a batch gives: the loss (differentiable) and its metrics (TRL's names; ReprPO's
/// components).
#[derive(Debug)]
pub struct BatchLoss {
    /// Scalar loss.
    pub loss: Tensor,
    /// Metrics of this batch: detached scalars on the batch's device (`loss` among them), each
    /// in the dtype the loss computed it in; read them to the host only when they are logged.
    pub metrics: BTreeMap<String, Tensor>,
    /// What a gradient intervention (`loss = "projgrad"` / `"projbp"`) leaves for after the
    /// backward pass ([`crate::gradproj::accumulate`] applies projgrad's rewrite).
    pub gradproj: Option<crate::gradproj::GradProj>,
}

/// A forward's spec; `reference`: the reference model (the model's frozen initial adapter when
/// it has one, else the base), never trained.
fn spec(layers: &[usize], logits: bool, reference: bool, train: bool, ckpt: bool) -> ForwardSpec {
    ForwardSpec {
        hidden_layers: layers.iter().map(|&l| l as isize).collect(),
        logits,
        adapters_off: false,
        reference,
        train,
        checkpoint: ckpt,
        dropout_seed: None,
        ..Default::default()
    }
}

fn halves(t: &Tensor, b: usize) -> Result<(Tensor, Tensor)> {
    Ok((t.i(..b)?, t.i(b..2 * b)?))
}

/// `sum over counted completion tokens of the mean logit over the vocabulary`, per row
/// (TRL's `logits/chosen` numerator), detached.
fn logits_sums(logits: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let t = logits.dim(1)?;
    let mean = logits
        .i((.., ..t - 1, ..))?
        .detach()
        .mean(D::Minus1)?
        .to_dtype(candle_core::DType::F32)?;
    Ok((mean * mask.i((.., 1..))?)?.sum(D::Minus1)?)
}

/// The loss of one batch. `train` turns adapter dropout on (masks drawn from `dropout_seed`
/// when given, so a run is reproducible and a checkpointed block replays them);
/// `progress` in `[0, 1]` drives the ReprPO coefficients. Read gradients with
/// [`reprpo_models::checkpoint::backward`] (required with `train.grad_checkpointing`).
#[allow(clippy::too_many_arguments)]
pub fn batch_loss(
    model: &dyn CausalLm,
    cfg: &TrainConfig,
    family: LossFamily,
    batch: &DeviceBatch,
    progress: f64,
    dpo_state: &mut DpoState,
    train: bool,
    dropout_seed: Option<u64>,
    method: Option<&crate::method::MethodSetup>,
) -> Result<BatchLoss> {
    let ckpt = cfg.train.grad_checkpointing && train;
    let spec = |layers: &[usize], logits: bool, refr: bool, train: bool, ckpt: bool| {
        let mut s = spec(layers, logits, refr, train, ckpt);
        if train {
            s.dropout_seed = dropout_seed;
        }
        s
    };
    match family {
        LossFamily::Sft => {
            let last = [model.num_layers()];
            let rows = batch.counted();
            let lp = counted_logps(model, batch, rows, &spec(&last, false, false, train, ckpt))?;
            // The sum of `lp.count`, known on the host (no read back).
            let n = (rows.owner.len() as f32).max(1.0);
            let loss = (lp.sum.sum_all()?.neg()? / f64::from(n))?;
            let mut metrics = BTreeMap::new();
            metrics.insert("loss".into(), loss.detach());
            metrics.insert("nll_loss".into(), loss.detach());
            Ok(BatchLoss {
                loss,
                metrics,
                gradproj: None,
            })
        }
        LossFamily::Dpo if cfg.dpo.ld_alpha.is_none() && !cfg.dpo.use_weighting => {
            // Only the counted positions are projected onto the vocabulary (LD-DPO's tails and
            // WPO's weights read per-token values and full logits: the branch below).
            let b = batch.pairs;
            let last = [model.num_layers()];
            let rows = batch.counted();
            let p = counted_logps(model, batch, rows, &spec(&last, false, false, train, ckpt))?;
            let r = counted_logps(model, batch, rows, &spec(&last, false, true, false, false))?;
            let (pc, pr) = halves(&p.sum, b)?;
            let (rc, rr) = halves(&r.sum.detach(), b)?;
            let (nc, nr) = halves(&p.count, b)?;
            let mut inputs = DpoInputs::new(pc, pr, rc, rr, nc, nr);
            let (lc, lr) = halves(&p.logits_sum, b)?;
            inputs.chosen_logits_sum = Some(lc);
            inputs.rejected_logits_sum = Some(lr);
            let out = dpo_loss(&inputs, &cfg.dpo, dpo_state)?;
            finish(out)
        }
        LossFamily::Dpo => {
            let b = batch.pairs;
            let pol = model.forward(
                &batch.ids,
                Some(&batch.attention),
                None,
                &spec(&[], true, false, train, ckpt),
            )?;
            let refr = model.forward(
                &batch.ids,
                Some(&batch.attention),
                None,
                &spec(&[], true, true, false, false),
            )?;
            let pl = pol.logits.ok_or_else(|| missing("logits"))?;
            let rl = refr.logits.ok_or_else(|| missing("logits"))?.detach();
            let p = token_logps(&pl, &batch.ids, &batch.loss_mask)?;
            let r = token_logps(&rl, &batch.ids, &batch.loss_mask)?;
            let mut inputs = dpo_inputs(&p, &r, b)?;
            if cfg.dpo.ld_alpha.is_some() {
                let tail = tail_mask(&batch.loss_mask, &p.count, b)?;
                let sum_tail = |lp: &SeqLogps| -> Result<(Tensor, Tensor)> {
                    halves(&(&lp.per_token * &tail)?.sum(D::Minus1)?, b)
                };
                let (pc, pr) = sum_tail(&p)?;
                let (rc, rr) = sum_tail(&r)?;
                inputs.ld_tails = Some(LdTails {
                    policy_chosen: pc,
                    policy_rejected: pr,
                    reference_chosen: rc,
                    reference_rejected: rr,
                });
            }
            if cfg.dpo.use_weighting {
                let w = wpo_log_weights(&pl, &p, &batch.loss_mask)?;
                let (chosen, rejected) = halves(&w, b)?;
                inputs.wpo_log_weights = Some(WpoLogWeights { chosen, rejected });
            }
            let ls = logits_sums(&pl, &batch.loss_mask)?;
            let (lc, lr) = halves(&ls, b)?;
            inputs.chosen_logits_sum = Some(lc);
            inputs.rejected_logits_sum = Some(lr);
            let out = dpo_loss(&inputs, &cfg.dpo, dpo_state)?;
            finish(out)
        }
        LossFamily::Method => {
            let setup = method.ok_or_else(|| missing("method setup"))?;
            crate::method::method_batch_loss(model, setup, batch, train, ckpt, dropout_seed)
        }
        LossFamily::GradProj => {
            crate::gradproj::gradproj_batch_loss(model, cfg, batch, train, ckpt, dropout_seed)
        }
        LossFamily::ReprPo => {
            let b = batch.pairs;
            let layers = cfg.reprpo.hidden_state_indices(model.num_layers())?;
            let need_z = cfg.reprpo.example_weights;
            let pol = model.forward(
                &batch.ids,
                Some(&batch.attention),
                None,
                &spec(&layers, need_z, false, train, ckpt),
            )?;
            let refr = model.forward(
                &batch.ids,
                Some(&batch.attention),
                None,
                &spec(&layers, need_z, true, false, false),
            )?;
            let split = |o: &reprpo_models::Output, detach: bool| -> Result<(Tensor, Tensor)> {
                let hs: Vec<Tensor> = o
                    .hidden
                    .iter()
                    .map(|(_, h)| if detach { h.detach() } else { h.clone() })
                    .collect();
                let idx: Vec<usize> = (0..hs.len()).collect();
                // The loss reduces over hidden x tokens: compute it in f32 whatever the model's
                // dtype (bf16 sums of that size lose the cosines' and norms' precision).
                let all = stack_layers(&hs, &idx)?.to_dtype(DType::F32)?;
                Ok((all.i((.., ..b))?, all.i((.., b..2 * b))?))
            };
            let (pc, pr) = split(&pol, false)?;
            let (rc, rr) = split(&refr, true)?;
            let mask = if cfg.train.hidden_mask == "completion" {
                &batch.loss_mask
            } else {
                &batch.attention
            };
            let (mc, mr) = halves(mask, b)?;
            let mut inputs = HiddenPairs::new(pc, pr, rc, rr, mc, mr);
            if need_z {
                let pl = pol
                    .logits
                    .as_ref()
                    .ok_or_else(|| missing("logits"))?
                    .detach();
                let rl = refr
                    .logits
                    .as_ref()
                    .ok_or_else(|| missing("logits"))?
                    .detach();
                let p = token_logps(&pl, &batch.ids, &batch.loss_mask)?;
                let r = token_logps(&rl, &batch.ids, &batch.loss_mask)?;
                let (pcs, prs) = halves(&p.sum, b)?;
                let (rcs, rrs) = halves(&r.sum, b)?;
                inputs.dpo_z = Some(((pcs - prs)? - (rcs - rrs)?)?);
            }
            let out = reprpo_loss(&inputs, &cfg.reprpo, progress)?;
            finish(out)
        }
    }
}

/// Summed log-probabilities of the counted tokens per sequence, with only the positions they are
/// predicted from projected onto the vocabulary (the rows `t - 1` of the final hidden states for
/// every counted token `t`): the same values as [`token_logps`] on full logits, without the
/// prompt's and the padding's logits (most of the vocabulary projection's work, forward and
/// backward). Differentiable through the policy's forward when `spec` tracks it.
struct Counted {
    /// `[rows]` f32.
    sum: Tensor,
    /// `[rows]` f32, constant.
    count: Tensor,
    /// `[rows]`: the sum over counted positions of the mean logit over the vocabulary (TRL's
    /// `logits/chosen` numerator), detached.
    logits_sum: Tensor,
}

fn counted_logps(
    model: &dyn CausalLm,
    batch: &DeviceBatch,
    counted: &CountedRows,
    spec: &ForwardSpec,
) -> Result<Counted> {
    let (rows, t) = batch.ids.dims2()?;
    let dev = batch.ids.device();
    let mut count = vec![0f32; rows];
    for &r in &counted.owner {
        count[r] += 1.0;
    }
    let n = counted.pick.len();
    let count = Tensor::from_vec(count, rows, dev)?;
    if n == 0 {
        let z = Tensor::zeros(rows, DType::F32, dev)?;
        return Ok(Counted {
            sum: z.clone(),
            count,
            logits_sum: z,
        });
    }
    let last = model.num_layers();
    let out = model.forward(&batch.ids, Some(&batch.attention), None, spec)?;
    let normed = out
        .hidden
        .into_iter()
        .find(|(i, _)| *i == last)
        .map(|(_, h)| h)
        .ok_or_else(|| missing("final hidden state"))?;
    let hdim = normed.dim(2)?;
    let sel = normed
        .reshape((rows * t, hdim))?
        .index_select(&Tensor::from_slice(&counted.pick, n, dev)?, 0)?;
    let logits = model.project(&sel)?;
    let lp = row_token_logps(&logits, &counted.targets)?.to_dtype(DType::F32)?;
    // [rows, n] 0/1: which sequence each counted token belongs to.
    let mut onehot = vec![0f32; rows * n];
    for (k, &r) in counted.owner.iter().enumerate() {
        onehot[r * n + k] = 1.0;
    }
    let s = Tensor::from_vec(onehot, (rows, n), dev)?;
    let per_seq = |x: &Tensor| -> Result<Tensor> { Ok(s.matmul(&x.unsqueeze(1)?)?.squeeze(1)?) };
    let mean_logit = logits.detach().mean(D::Minus1)?.to_dtype(DType::F32)?;
    Ok(Counted {
        sum: per_seq(&lp)?,
        count,
        logits_sum: per_seq(&mean_logit)?,
    })
}

/// LD-DPO's tail mask `[2B, T-1]`: completion tokens beyond the shared length
/// `min(n_c, n_r)` of their pair (counted from the completion's start).
fn tail_mask(loss_mask: &Tensor, count: &Tensor, b: usize) -> Result<Tensor> {
    let m = loss_mask.i((.., 1..))?.to_dtype(DType::F32)?.contiguous()?;
    let pos = m.cumsum(D::Minus1)?;
    let (nc, nr) = halves(count, b)?;
    let shared = nc.minimum(&nr)?;
    let shared = Tensor::cat(&[&shared, &shared], 0)?.unsqueeze(1)?;
    Ok((m * pos.broadcast_gt(&shared)?.to_dtype(DType::F32)?)?)
}

/// WPO's per-sequence log-weight (TRL's `aligned_logps`), detached:
/// `w[b] = sum_t m[b,t] (logp[b,t] - log sum_v p[b,t,v]^2) / max(sum_t m[b,t], 1)` with
/// `log sum_v p_v^2 = logsumexp_v(2 log_softmax(logits)_v)`.
fn wpo_log_weights(logits: &Tensor, lp: &SeqLogps, loss_mask: &Tensor) -> Result<Tensor> {
    let t = logits.dim(1)?;
    let x = logits.i((.., ..t - 1, ..))?.detach().to_dtype(DType::F32)?;
    let lsm = candle_core::Tensor::log_sum_exp(&x, D::Minus1)?;
    let lsm = x.broadcast_sub(&lsm.unsqueeze(D::Minus1)?)?;
    let lss = (lsm * 2.0)?.log_sum_exp(D::Minus1)?;
    let m = loss_mask.i((.., 1..))?.to_dtype(DType::F32)?;
    let aligned = (lp.per_token.detach() - (lss * &m)?)?.sum(D::Minus1)?;
    Ok(aligned.div(&lp.count.clamp(1f32, f32::MAX)?)?)
}

fn dpo_inputs(p: &SeqLogps, r: &SeqLogps, b: usize) -> Result<DpoInputs> {
    let (pc, pr) = halves(&p.sum, b)?;
    let (rc, rr) = halves(&r.sum, b)?;
    let (nc, nr) = halves(&p.count, b)?;
    Ok(DpoInputs::new(pc, pr, rc, rr, nc, nr))
}

/// The loss and its metrics, `loss` added (detached); nothing is read back.
fn finish(out: LossOut) -> Result<BatchLoss> {
    let mut metrics = out.metrics;
    metrics.insert("loss".into(), out.loss.detach());
    Ok(BatchLoss {
        loss: out.loss,
        metrics,
        gradproj: None,
    })
}

fn missing(what: &str) -> crate::error::TrainError {
    crate::error::TrainError::Model(reprpo_models::ModelError::Invalid(format!(
        "the forward returned no {what}"
    )))
}
