//! Gradient checkpointing for the decoder stack: with [`ForwardSpec::checkpoint`] a decoder
//! block's activations are not kept for the backward pass but recomputed there, one block at a
//! time. candle has no checkpointing (`../shared/docs/candle-notes.md`); this is it, by hand.
//!
//! # How
//! For block `f` with adapter parameters `θ` and input `x`:
//! 1. forward: `y = f(x)` is computed in a *no-grad scope* (the adapter `Var`s are read detached,
//!    so no op records a graph and every intermediate is freed as soon as it is consumed), and
//!    `y` is wrapped in a `CustomOp1` over `x`: the graph keeps only `x` (and the op);
//! 2. backward, given `g = ∂L/∂y`: `x' = Var(x)`, `y' = f(x')` recomputed with the graph,
//!    `s = Σ (y' ⊙ stopgrad(g))` and `∇s`: then `∂s/∂x' = gᵀ ∂f/∂x = ∂L/∂x` is returned to candle
//!    as the op's input gradient, and `∂s/∂θ = ∂L/∂θ|_f` goes to a side channel, because a
//!    custom op can only return gradients for its tensor arguments.
//!
//! [`backward`] runs `loss.backward()` with the side channel open and merges what it collected
//! into the returned store (summing with any gradient the store already holds for the same
//! parameter), so the caller reads every adapter gradient with `grads.get(var.as_tensor())`
//! whether checkpointing was on or not. The side channel is per thread and per call: candle runs
//! a backward pass on the calling thread, each call starts empty, and gradient accumulation over
//! several calls gets only each call's own gradients. A plain `loss.backward()` over a
//! checkpointed forward with adapter parameters is an error, not a silent loss of gradients.
//!
//! # Dropout
//! The recomputation must see the same dropout masks as the forward. Inside a checkpointed block
//! (and whenever [`ForwardSpec::dropout_seed`] is set) adapter dropout draws its masks from a
//! generator seeded per block and per draw (see `block_seed`), so the recomputation repeats
//! them exactly; otherwise dropout uses candle's generator as before.
//!
//! [`ForwardSpec::checkpoint`]: crate::ForwardSpec::checkpoint
//! [`ForwardSpec::dropout_seed`]: crate::ForwardSpec::dropout_seed

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor, TensorId, Var};
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::error::{ModelError, Result};

/// A decoder block `x -> block(l, x)` that can be kept in the graph (owns what it needs).
pub(crate) type BlockFn = Arc<dyn Fn(usize, &Tensor) -> Result<Tensor> + Send + Sync>;

thread_local! {
    /// Adapter parameters are read detached (no graph is recorded through them).
    static NO_GRAD: Cell<bool> = const { Cell::new(false) };
    /// Seeded dropout: `(block seed, draws so far)`.
    static DROPOUT: Cell<Option<(u64, u64)>> = const { Cell::new(None) };
    /// Adapter gradients collected by the checkpoint ops of the running [`backward`].
    static SIDE: RefCell<Option<HashMap<TensorId, (Tensor, Tensor)>>> = const { RefCell::new(None) };
}

/// Whether adapter parameters are read detached on this thread (inside a checkpointed forward).
pub(crate) fn no_grad() -> bool {
    NO_GRAD.with(Cell::get)
}

/// An adapter parameter as the forward should read it: detached in a no-grad scope.
pub(crate) fn param(v: &Var) -> Tensor {
    if no_grad() {
        v.as_tensor().detach()
    } else {
        v.as_tensor().clone()
    }
}

/// A generator for the next dropout draw when seeded dropout is on (see the module docs);
/// `None`: use candle's generator.
pub(crate) fn dropout_rng() -> Option<StdRng> {
    DROPOUT.with(|d| {
        let (seed, n) = d.get()?;
        d.set(Some((seed, n + 1)));
        Some(StdRng::seed_from_u64(splitmix64(seed ^ splitmix64(n))))
    })
}

/// SplitMix64's finaliser: a bijective mix of 64 bits.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The dropout seed of block `l` in a forward seeded with `seed`: `splitmix64(seed + l)`.
pub(crate) fn block_seed(seed: u64, l: usize) -> u64 {
    splitmix64(seed.wrapping_add(l as u64))
}

/// A seed that differs from call to call (std's randomly keyed hasher; no extra dependency).
pub(crate) fn fresh_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// Restores the previous thread-local state when dropped.
struct Scope {
    no_grad: bool,
    dropout: Option<(u64, u64)>,
}

impl Drop for Scope {
    fn drop(&mut self) {
        NO_GRAD.with(|c| c.set(self.no_grad));
        DROPOUT.with(|c| c.set(self.dropout));
    }
}

/// Run `f` with the no-grad flag and the dropout seed set (restored afterwards, also on error).
pub(crate) fn scoped<R>(no_grad: bool, dropout_seed: Option<u64>, f: impl FnOnce() -> R) -> R {
    let _restore = Scope {
        no_grad: NO_GRAD.with(|c| c.replace(no_grad)),
        dropout: DROPOUT.with(|c| c.replace(dropout_seed.map(|s| (s, 0)))),
    };
    f()
}

fn to_candle(e: ModelError) -> candle_core::Error {
    match e {
        ModelError::Candle(c) => c,
        other => candle_core::Error::Msg(other.to_string()),
    }
}

/// The op that stands for one checkpointed block in the graph (its argument is the block input).
struct Checkpoint {
    run: BlockFn,
    layer: usize,
    /// The adapter parameters the block reads (their gradients go to the side channel).
    params: Vec<Var>,
    dropout_seed: Option<u64>,
    /// The output computed without a graph; handed to candle (and dropped here) by the forward.
    out: Mutex<Option<Tensor>>,
}

impl Checkpoint {
    fn take_out(&self) -> candle_core::Result<Tensor> {
        let mut slot = self
            .out
            .lock()
            .map_err(|_| candle_core::Error::Msg("checkpoint: lock poisoned".into()))?;
        slot.take()
            .ok_or_else(|| candle_core::Error::Msg("checkpoint: forward run twice".into()))
    }
}

/// `t`'s storage as one contiguous buffer starting at 0 (what a custom op's output must be).
fn whole(t: Tensor) -> candle_core::Result<Tensor> {
    let n = t.elem_count();
    let fits = t.layout().contiguous_offsets() == Some((0, n));
    if fits { Ok(t) } else { t.force_contiguous() }
}

impl CustomOp1 for Checkpoint {
    fn name(&self) -> &'static str {
        "checkpoint"
    }

    fn cpu_fwd(&self, _x: &CpuStorage, _l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        reprpo_kernels::ran_cpu_kernel(self.name());
        let out = whole(self.take_out()?)?;
        let (guard, layout) = out.storage_and_layout();
        match &*guard {
            Storage::Cpu(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            _ => candle_core::bail!("checkpoint: block output is not on the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _x: &candle_core::CudaStorage,
        _l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let out = whole(self.take_out()?)?;
        let (guard, layout) = out.storage_and_layout();
        match &*guard {
            Storage::Cuda(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            _ => candle_core::bail!("checkpoint: block output is not on the GPU"),
        }
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let open = SIDE.with(|s| s.borrow().is_some());
        if !self.params.is_empty() && !open {
            candle_core::bail!(
                "a checkpointed forward needs reprpo_models::checkpoint::backward (a plain \
                 backward() cannot return the adapter gradients)"
            );
        }
        let xv = Var::from_tensor(&x.detach())?;
        let y = scoped(false, self.dropout_seed, || {
            (self.run)(self.layer, xv.as_tensor())
        })
        .map_err(to_candle)?;
        let s = (y * g.detach())?.sum_all()?;
        let mut grads = s.backward()?;
        drop(s);
        SIDE.with(|side| {
            let mut side = side.borrow_mut();
            if let Some(map) = side.as_mut() {
                for p in &self.params {
                    let Some(gp) = grads.remove(p.as_tensor()) else {
                        continue;
                    };
                    add_grad(map, p.as_tensor(), gp)?;
                }
            }
            Ok::<_, candle_core::Error>(())
        })?;
        Ok(grads.remove(xv.as_tensor()))
    }
}

fn add_grad(
    map: &mut HashMap<TensorId, (Tensor, Tensor)>,
    var: &Tensor,
    g: Tensor,
) -> candle_core::Result<()> {
    match map.get_mut(&var.id()) {
        Some((_, acc)) => *acc = (&*acc + &g)?.detach(),
        None => {
            map.insert(var.id(), (var.clone(), g));
        }
    }
    Ok(())
}

/// Block `l` on `x`, checkpointed: computed without keeping its activations, recomputed in the
/// backward pass (see the module docs). `params`: the adapter parameters the block reads.
pub(crate) fn checkpointed(
    run: &BlockFn,
    l: usize,
    x: &Tensor,
    params: Vec<Var>,
    dropout_seed: Option<u64>,
) -> Result<Tensor> {
    let out = scoped(true, dropout_seed, || run(l, &x.detach()))?.detach();
    if params.is_empty() && !x.track_op() {
        // Nothing upstream or inside wants a gradient (e.g. the reference forward).
        return Ok(out);
    }
    // The op must have a tracked argument to be reached by the backward pass; the embeddings
    // feeding block 0 are constants, so give them a (copied) leaf.
    let arg = if x.track_op() {
        x.clone()
    } else {
        Var::from_tensor(x)?.into_inner()
    };
    Ok(arg.apply_op1(Checkpoint {
        run: run.clone(),
        layer: l,
        params,
        dropout_seed,
        out: Mutex::new(Some(out)),
    })?)
}

/// `loss.backward()`, plus the adapter gradients that checkpointed blocks computed during it
/// (summed into the store where it already has a gradient for the same parameter). Use it
/// instead of `loss.backward()` everywhere: without checkpointing it returns exactly what
/// `loss.backward()` returns. Each call returns only its own gradients.
pub fn backward(loss: &Tensor) -> Result<GradStore> {
    struct Close(Option<HashMap<TensorId, (Tensor, Tensor)>>);
    impl Drop for Close {
        fn drop(&mut self) {
            let prev = self.0.take();
            SIDE.with(|s| *s.borrow_mut() = prev);
        }
    }
    // Save whatever an enclosing call had open (a backward inside a backward) and restore it.
    let close = Close(SIDE.with(|s| s.borrow_mut().replace(HashMap::new())));
    let result = loss.backward();
    let side = SIDE.with(|s| s.borrow_mut().take()).unwrap_or_default();
    drop(close);
    let mut grads = result?;
    for (_, (var, g)) in side {
        let total = match grads.remove(&var) {
            Some(prev) => (prev + g)?.detach(),
            None => g,
        };
        grads.insert(&var, total);
    }
    Ok(grads)
}
