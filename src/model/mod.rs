//! Networks with PyTorch names and layouts, written over candle tensors.
//!
//! A network is a pure function of its parameter tensors (in PyTorch's
//! `named_parameters()` order) and its buffers. The trainer decides per call which
//! parameters are trainable (candle `Var`s, gradients recorded) and which are frozen
//! (detached tensors, no gradient computed) — the mechanism behind LDT's cross-freezing.

pub mod cnn;
mod conv;
pub mod dispatch;
pub mod io;
pub mod layers;
mod matmul;
pub mod mlp;
pub mod resnet;
pub mod vit;

use crate::config::ModelConfig;
use crate::heap::HostVec;
use crate::rng::Rng;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};

/// How the forward treats BatchNorm and similar layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Batch statistics; running statistics updated (PyTorch `train()`).
    Train,
    /// Running statistics (PyTorch `eval()`).
    Eval,
    /// Batch statistics, buffers left as they are (stage-1 statistics pass).
    Stats,
}

/// PyTorch's default initializers, by parameter kind.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`: kaiming_uniform(a=sqrt(5)) weights and biases
    /// of Linear and Conv.
    FanIn(usize),
    /// All ones (norm weights).
    Ones,
    /// All zeros (norm biases, buffers).
    Zeros,
    /// `N(0, s^2)`: torchvision's kaiming_normal(fan_out, relu) convolutions
    /// (`s = sqrt(2 / fan_out)`) and timm's `trunc_normal_(std=s)` (cut at +-2, i.e. at
    /// 100 standard deviations for s = 0.02: no cut in practice).
    Normal(f32),
}

/// One named parameter tensor: an LDT "layer".
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    /// PyTorch name, e.g. `layer1.0.conv1.weight`.
    pub name: String,
    /// Shape in PyTorch layout.
    pub shape: Vec<usize>,
    /// Default initializer.
    pub init: Init,
}

impl TensorSpec {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// One named buffer (not a layer: never trained, never ranked).
#[derive(Clone, Debug, PartialEq)]
pub struct BufferSpec {
    /// PyTorch name, e.g. `bn1.running_mean`.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// `F32` or `I64` (`num_batches_tracked`).
    pub dtype: DType,
    /// Initial value.
    pub init: Init,
}

/// One block of a network's forward (resnet: the stem, each residual block, the head;
/// ViT: the embedding, each transformer block, the head; cnn/mlp: each layer group):
/// the unit block-wise recompute keeps the input of. Its parameters and buffers are
/// contiguous ranges of `Network::params()` / `Network::buffers()`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockSpec {
    /// The block's parameter indices.
    pub params: std::ops::Range<usize>,
    /// The block's buffer indices.
    pub buffers: std::ops::Range<usize>,
}

/// The blocks of `params` / `buffers` grouped by `key` of each name: consecutive names
/// with one key form a block, and each buffer joins the block of its key (a buffer whose
/// key names no block, or out of order, is an error naming it).
pub fn group_blocks(
    params: &[TensorSpec],
    buffers: &[BufferSpec],
    key: impl Fn(&str) -> String,
) -> Result<Vec<BlockSpec>> {
    let mut keys: Vec<String> = Vec::new();
    let mut blocks: Vec<BlockSpec> = Vec::new();
    for (i, p) in params.iter().enumerate() {
        let k = key(&p.name);
        if keys.last() == Some(&k) {
            blocks.last_mut().expect("a block per key").params.end = i + 1;
        } else {
            keys.push(k);
            blocks.push(BlockSpec {
                params: i..i + 1,
                buffers: 0..0,
            });
        }
    }
    let mut at = 0;
    for (k, b) in keys.iter().zip(blocks.iter_mut()) {
        b.buffers = at..at;
        while at < buffers.len() && key(&buffers[at].name) == *k {
            at += 1;
        }
        b.buffers.end = at;
    }
    if let Some(b) = buffers.get(at) {
        bail!(
            "buffer `{}` does not follow the parameters of its block",
            b.name
        );
    }
    Ok(blocks)
}

/// A network architecture: names, shapes, head, and the forward function.
pub trait Network: Send + Sync {
    /// Architecture name (`mlp`, `cnn`, ...).
    fn arch(&self) -> &str;
    /// Parameters in PyTorch `named_parameters()` order.
    fn params(&self) -> &[TensorSpec];
    /// Buffers in PyTorch `named_buffers()` order.
    fn buffers(&self) -> &[BufferSpec];
    /// Name prefixes of the head (the layers a head warm-up trains).
    fn head_prefixes(&self) -> Vec<String>;
    /// Input shape `[C, H, W]`.
    fn input_shape(&self) -> [usize; 3];
    /// Number of classes.
    fn num_classes(&self) -> usize;
    /// The forward's blocks, in order.
    fn blocks(&self) -> &[BlockSpec];
    /// Block `k`'s output from its input `x`: `params` and `buffers` are the block's
    /// ranges ([`BlockSpec`]); buffers are replaced in `Mode::Train`.
    fn forward_block(
        &self,
        k: usize,
        params: &[Tensor],
        buffers: &mut [Tensor],
        x: &Tensor,
        mode: Mode,
    ) -> Result<Tensor>;

    /// Logits `[N, classes]` from `x` `[N, C, H, W]`: the blocks in order. `params`
    /// follow `params()`; `buffers` follow `buffers()` and are replaced in `Mode::Train`.
    fn forward(
        &self,
        params: &[Tensor],
        buffers: &mut [Tensor],
        x: &Tensor,
        mode: Mode,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (k, b) in self.blocks().iter().enumerate() {
            let (p, bu) = (b.params.clone(), b.buffers.clone());
            h = self.forward_block(k, &params[p], &mut buffers[bu], &h, mode)?;
        }
        Ok(h)
    }

    /// Whether parameter `i` belongs to the head.
    fn is_head(&self, i: usize) -> bool {
        let name = &self.params()[i].name;
        self.head_prefixes().iter().any(|p| name.starts_with(p))
    }

    /// Total number of parameter elements.
    fn numel(&self) -> usize {
        self.params().iter().map(|s| s.numel()).sum()
    }
}

/// Builds the network named by `cfg.arch` for the given input shape and class count
/// (`model.num_classes`, when set, replaces the data's class count).
pub fn build(cfg: &ModelConfig, input: [usize; 3], classes: usize) -> Result<Box<dyn Network>> {
    let classes = match cfg.num_classes {
        Some(0) => bail!("config key `model.num_classes`: must be at least 1"),
        Some(k) => k,
        None => classes,
    };
    Ok(match cfg.arch.as_str() {
        "mlp" => Box::new(mlp::Mlp::new(input, &cfg.hidden, classes)?),
        "cnn" => Box::new(cnn::Cnn::new(
            input,
            &cfg.channels,
            cfg.fc_hidden,
            classes,
            false,
        )?),
        "cnn_bn" => Box::new(cnn::Cnn::new(
            input,
            &cfg.channels,
            cfg.fc_hidden,
            classes,
            true,
        )?),
        "resnet18" | "resnet34" | "resnet50" | "resnet101" => {
            Box::new(resnet::ResNet::new(&cfg.arch, input, classes)?)
        }
        "vit" => Box::new(vit::Vit::new(
            input,
            vit::VitShape {
                patch: cfg.patch,
                width: cfg.width,
                depth: cfg.depth,
                heads: cfg.heads,
                mlp_ratio: cfg.mlp_ratio,
            },
            classes,
        )?),
        other => bail!(
            "config key `model.arch`: unknown architecture `{other}`; allowed: {}",
            crate::config::ARCHS.join(", ")
        ),
    })
}

/// The values of one network: parameters (as `Var`s) and buffers.
pub struct NetState {
    /// Parameters in `Network::params()` order: the weights, or with host masters their
    /// bf16 working copies.
    pub params: Vec<Var>,
    /// Buffers in `Network::buffers()` order.
    pub buffers: Vec<Tensor>,
    /// With bf16 working weights ([`NetState::with_host_masters`]): each parameter's f32
    /// master in host memory, of which `params[i]` is the bf16 rounding. Whatever writes
    /// a weight writes its master and then [`NetState::refresh`]es the working copy.
    pub masters: Option<Vec<HostVec>>,
}

impl NetState {
    /// PyTorch-style random initialization from `rng`.
    pub fn init(net: &dyn Network, rng: &mut Rng, device: &Device) -> Result<Self> {
        let params = net
            .params()
            .iter()
            .map(|s| {
                Ok(Var::from_tensor(&init_tensor(
                    s.init,
                    &s.shape,
                    DType::F32,
                    rng,
                    device,
                )?)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let buffers = net
            .buffers()
            .iter()
            .map(|b| init_tensor(b.init, &b.shape, b.dtype, rng, device))
            .collect::<Result<Vec<_>>>()?;
        Ok(NetState {
            params,
            buffers,
            masters: None,
        })
    }

    /// A deep copy (new storage for every tensor and master).
    pub fn deep_clone(&self) -> Result<Self> {
        Ok(NetState {
            params: self
                .params
                .iter()
                .map(|v| Ok(Var::from_tensor(&v.as_tensor().copy()?)?))
                .collect::<Result<Vec<_>>>()?,
            buffers: self
                .buffers
                .iter()
                .map(|t| Ok(t.copy()?))
                .collect::<Result<Vec<_>>>()?,
            masters: self
                .masters
                .as_ref()
                .map(|m| m.iter().map(|x| HostVec::from_slice(x)).collect()),
        })
    }

    /// This state with its f32 weights moved to host memory as masters and bf16 working
    /// copies in their place (the layout ZeRO-Offload uses with fp16): the device holds
    /// 2 bytes per weight. The working copies are the rounding the bf16 forward makes
    /// of f32 weights, so a step computes the bits it computes from f32 weights.
    pub fn with_host_masters(self) -> Result<Self> {
        if self.masters.is_some() {
            return Ok(self);
        }
        let mut masters = Vec::with_capacity(self.params.len());
        let mut params = Vec::with_capacity(self.params.len());
        for v in self.params {
            let t = v.as_tensor();
            let values = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            masters.push(HostVec::from_slice(&values));
            params.push(Var::from_tensor(&t.to_dtype(DType::BF16)?)?);
        }
        Ok(NetState {
            params,
            buffers: self.buffers,
            masters: Some(masters),
        })
    }

    /// Writes parameter `i`'s working copy from its master (rounded to bf16 on the host,
    /// then uploaded); a no-op without masters.
    pub fn refresh(&self, i: usize) -> Result<()> {
        let Some(m) = &self.masters else {
            return Ok(());
        };
        let p = &self.params[i];
        let bits: Vec<half::bf16> = m[i].iter().map(|&x| half::bf16::from_f32(x)).collect();
        p.set(&Tensor::from_vec(bits, p.shape(), p.device())?)?;
        Ok(())
    }

    /// Weight `i` in f32, detached, on the state's device: the parameter, or its master
    /// uploaded.
    pub fn weight(&self, i: usize) -> Result<Tensor> {
        let p = &self.params[i];
        Ok(match &self.masters {
            Some(m) => Tensor::from_slice(&m[i], p.shape(), p.device())?,
            None => p.as_tensor().detach(),
        })
    }

    /// All weights in f32 ([`NetState::weight`]): what evaluation, export and
    /// checkpoints read.
    pub fn weights(&self) -> Result<Vec<Tensor>> {
        (0..self.params.len()).map(|i| self.weight(i)).collect()
    }

    /// Host bytes of the master weights (0 without).
    pub fn master_bytes(&self) -> u64 {
        self.masters
            .iter()
            .flatten()
            .map(|x| 4 * x.len() as u64)
            .sum()
    }

    /// The parameter tensors for a forward where `trainable[i]` selects which layers
    /// record gradients; the others are detached (frozen, no gradient computed).
    pub fn view(&self, trainable: &[bool]) -> Vec<Tensor> {
        self.params
            .iter()
            .zip(trainable)
            .map(|(v, &t)| {
                if t {
                    v.as_tensor().clone()
                } else {
                    v.as_tensor().detach()
                }
            })
            .collect()
    }

    /// All parameters detached (evaluation).
    pub fn frozen_view(&self) -> Vec<Tensor> {
        self.params.iter().map(|v| v.as_tensor().detach()).collect()
    }
}

fn init_tensor(
    init: Init,
    shape: &[usize],
    dtype: DType,
    rng: &mut Rng,
    device: &Device,
) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let t = match init {
        Init::Zeros => Tensor::zeros(shape, dtype, device)?,
        Init::Ones => Tensor::ones(shape, dtype, device)?,
        Init::FanIn(fan_in) => {
            let b = 1.0 / (fan_in as f32).sqrt();
            Tensor::from_vec(rng.uniform_vec(n, -b, b), shape, device)?
        }
        Init::Normal(s) => Tensor::from_vec(normal_vec(rng, n, s), shape, device)?,
    };
    Ok(t)
}

/// `n` values `N(0, std^2)` (Box-Muller on the project's generator), as f32.
fn normal_vec(rng: &mut Rng, n: usize, std: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        // 1 - u lies in (0, 1]: the logarithm is finite.
        let r = (-2.0 * (1.0 - rng.next_f64()).ln()).sqrt();
        let t = 2.0 * std::f64::consts::PI * rng.next_f64();
        out.push((r * t.cos()) as f32 * std);
        out.push((r * t.sin()) as f32 * std);
    }
    out.truncate(n);
    out
}
