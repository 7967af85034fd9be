//! Networks with PyTorch names and layouts, written over candle tensors.
//!
//! A network is a pure function of its parameter tensors (in PyTorch's
//! `named_parameters()` order) and its buffers. The trainer decides per call which
//! parameters are trainable (candle `Var`s, gradients recorded) and which are frozen
//! (detached tensors, no gradient computed) — the mechanism behind LDT's cross-freezing.

pub mod attention;
mod batch_norm;
pub mod cnn;
mod conv;
pub mod dispatch;
pub mod edsr;
pub mod io;
pub mod layers;
mod matmul;
pub mod mlp;
pub mod pth;
pub mod resnet;
pub mod swinir;
pub mod vit;

use crate::config::ModelConfig;
use crate::heap::HostVec;
use crate::rng::Rng;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};
use std::sync::Arc;

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
    /// Values the network computes ([`Network::table`]): a buffer's, such as `swinir`'s
    /// relative position indices and attention masks.
    Table,
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

/// A piece of a block that block-wise recompute keeps the input of and recomputes on
/// its own ([`Network::segments`]): its parameter and buffer ranges within the block's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// The segment's parameter indices, relative to its block's first.
    pub params: std::ops::Range<usize>,
    /// The segment's buffer indices, relative to its block's first.
    pub buffers: std::ops::Range<usize>,
}

impl Segment {
    /// The whole of block `b` as one segment.
    pub fn whole(b: &BlockSpec) -> Self {
        Segment {
            params: 0..b.params.len(),
            buffers: 0..b.buffers.len(),
        }
    }
}

/// Block `k`'s output from its input `x` as its segments in order: the forward of a
/// network whose blocks are made of segments ([`Network::forward_segment`]).
pub fn fold_segments(
    net: &dyn Network,
    k: usize,
    params: &[Tensor],
    buffers: &mut [Tensor],
    x: &Tensor,
    mode: Mode,
) -> Result<Tensor> {
    let mut carried = vec![x.clone()];
    for (j, s) in net.segments(k).into_iter().enumerate() {
        let (p, b) = (&params[s.params], &mut buffers[s.buffers]);
        carried = net.forward_segment(k, j, p, b, &carried, mode)?;
    }
    match <[Tensor; 1]>::try_from(carried) {
        Ok([y]) => Ok(y),
        Err(c) => bail!("block {k} ends with {} carried tensors, not one", c.len()),
    }
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
    /// Number of classes (0 for a network that is not a classifier, such as `edsr`).
    fn num_classes(&self) -> usize;
    /// The shape of one example's output: `[classes]` for a classifier (the default),
    /// `[3, s*H, s*W]` for an `edsr` of scale `s` on `[3, H, W]` inputs.
    fn output_shape(&self) -> Vec<usize> {
        vec![self.num_classes()]
    }
    /// The forward's blocks, in order.
    fn blocks(&self) -> &[BlockSpec];
    /// The initial values of buffer `i` whose init is [`Init::Table`], in its dtype on
    /// `device`. By default an error: only `swinir` has such buffers.
    fn table(&self, i: usize, _device: &Device) -> Result<Tensor> {
        bail!(
            "{}: buffer `{}` has no computed values",
            self.arch(),
            self.buffers()[i].name
        )
    }
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

    /// Block `k`'s segments in order (by default the whole block as one): block-wise
    /// recompute keeps each segment's carried tensors and recomputes one segment at a
    /// time, so a backward holds one segment's activations instead of the block's
    /// (resnet: a residual block's convolution units and its shortcut).
    fn segments(&self, k: usize) -> Vec<Segment> {
        vec![Segment::whole(&self.blocks()[k])]
    }

    /// Segment `j` of block `k`: the tensors carried out of it from those carried into
    /// it (a block's input is `[x]`, its output `[y]`); `params` and `buffers` are the
    /// segment's ranges, buffers replaced in `Mode::Train`. A block's segments in order
    /// compute [`Network::forward_block`] op for op (the same bits).
    fn forward_segment(
        &self,
        k: usize,
        j: usize,
        params: &[Tensor],
        buffers: &mut [Tensor],
        carried: &[Tensor],
        mode: Mode,
    ) -> Result<Vec<Tensor>> {
        match (j, carried) {
            (0, [x]) => Ok(vec![self.forward_block(k, params, buffers, x, mode)?]),
            _ => bail!(
                "block {k} has one segment, not segment {j} of {} tensors",
                carried.len()
            ),
        }
    }

    /// The output `[N, ..output_shape()]` (a classifier's logits `[N, classes]`) from
    /// `x` `[N, C, H, W]`: the blocks in order. `params` follow `params()`; `buffers`
    /// follow `buffers()` and are replaced in `Mode::Train`.
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
/// (`model.num_classes`, when set, replaces the data's class count; `edsr` and
/// `swinir`, not classifiers, take none, and need `model.scale`).
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
        "edsr" => Box::new(edsr::Edsr::new(
            input,
            edsr::EdsrShape {
                scale: cfg.scale.ok_or_else(|| {
                    anyhow::anyhow!(
                        "config key `model.scale`: unset, and edsr needs its upscaling \
                         factor (2, 3 or 4) to be built; set it or take it from the data"
                    )
                })?,
                num_feat: cfg.num_feat,
                num_block: cfg.num_block,
                res_scale: cfg.res_scale,
            },
        )?),
        "swinir" => Box::new(swinir::Swinir::new(
            input,
            swinir::SwinirShape {
                scale: cfg.scale.ok_or_else(|| {
                    anyhow::anyhow!(
                        "config key `model.scale`: unset, and swinir needs its upscaling \
                         factor (2, 3 or 4) to be built; set it or take it from the data"
                    )
                })?,
                embed_dim: cfg.embed_dim,
                depths: cfg.depths.clone(),
                num_heads: cfg.num_heads.clone(),
                window_size: cfg.window_size,
                mlp_ratio: cfg.mlp_ratio.unwrap_or(crate::config::SWINIR_MLP_RATIO),
            },
        )?),
        "vit" => Box::new(vit::Vit::new(
            input,
            vit::VitShape {
                patch: cfg.patch,
                width: cfg.width,
                depth: cfg.depth,
                heads: cfg.heads,
                mlp_ratio: cfg.mlp_ratio.unwrap_or(crate::config::VIT_MLP_RATIO),
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
    /// bf16 working copies; empty when the working copies are streamed.
    pub params: Vec<Var>,
    /// Buffers in `Network::buffers()` order.
    pub buffers: Vec<Tensor>,
    /// With bf16 working weights ([`NetState::with_host_masters`]) or streamed weights
    /// ([`NetState::streamed`]): each parameter's f32 master in host memory, of which
    /// `params[i]` is the bf16 rounding (or from which a block's working copies are
    /// fetched). Whatever writes a weight writes its master ([`NetState::masters_mut`])
    /// and then [`NetState::refresh`]es the working copy. Shared with the weight fetches
    /// in flight, which read it on a copy stream.
    pub masters: Option<Arc<Vec<HostVec>>>,
    /// Set when weights stay in host memory between uses: a forward fetches a
    /// segment's working copies from the masters ([`NetState::fetcher`]), but for the
    /// layers [`NetState::place`] keeps on the device.
    pub stream: Option<Streamed>,
}

/// How a streamed network's working copies are made ([`NetState::streamed`]), and
/// which layers stay on the device.
#[derive(Clone, Debug)]
pub struct Streamed {
    /// Working dtype: f32 (the masters' values), or bf16 (their rounding).
    pub dtype: DType,
    /// Each parameter's shape.
    pub shapes: Vec<Vec<usize>>,
    /// Where the working copies go.
    pub device: Device,
    /// Per layer, its f32 weight kept on the device ([`NetState::place`]: the trained
    /// set, with the optimizer on the device), whose master is then empty; `None` for
    /// a layer streamed from its master.
    pub resident: Vec<Option<Var>>,
}

/// Where a layer's value lives: what an update or a fold writes ([`NetState::held`]).
pub enum Held<'a> {
    /// A tensor on the device.
    Device(&'a Var),
    /// Its f32 master in host memory (a working copy, if any, is refreshed from it).
    Master,
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
        Ok(NetState {
            params,
            buffers: init_buffers(net, rng, device)?,
            masters: None,
            stream: None,
        })
    }

    /// [`NetState::init`] straight into the streamed layout ([`NetState::streamed`]): the
    /// same values (the same draws from `rng`), each weight made in host memory and kept
    /// there as its master, so no more than one weight's values exist outside the
    /// masters at a time.
    pub fn init_streamed(
        net: &dyn Network,
        rng: &mut Rng,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let mut masters = Vec::with_capacity(net.params().len());
        for s in net.params() {
            masters.push(HostVec::from_slice(&init_values(s.init, s.numel(), rng)?));
        }
        Ok(NetState {
            params: Vec::new(),
            buffers: init_buffers(net, rng, device)?,
            masters: Some(Arc::new(masters)),
            stream: Some(Streamed {
                dtype,
                shapes: net.params().iter().map(|s| s.shape.clone()).collect(),
                device: device.clone(),
                resident: vec![None; net.params().len()],
            }),
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
                .map(|m| Arc::new(m.iter().map(|x| HostVec::from_slice(x)).collect())),
            stream: match &self.stream {
                Some(s) => Some(Streamed {
                    resident: s
                        .resident
                        .iter()
                        .map(|v| match v {
                            Some(v) => Ok(Some(Var::from_tensor(&v.as_tensor().copy()?)?)),
                            None => Ok(None),
                        })
                        .collect::<Result<_>>()?,
                    ..s.clone()
                }),
                None => None,
            },
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
            masters: Some(Arc::new(masters)),
            stream: None,
        })
    }

    /// This state with every weight in host memory as an f32 master and no working copy
    /// on the device between uses: each forward fetches a block's working copies
    /// ([`NetState::fetch`]; `dtype` f32 or bf16) and drops them after the block (the
    /// layout of ZeRO-Infinity's parameter offload). The working copies are the values
    /// (or, in bf16, the rounding) the resident layouts use, so a step computes the same
    /// bits.
    /// The weights may be on any device (the host, to never hold them all on the run's
    /// device); the buffers move to `device`, where the working copies will be made.
    pub fn streamed(self, dtype: DType, device: &Device) -> Result<Self> {
        if self.stream.is_some() {
            return Ok(self);
        }
        let shapes = self.shapes();
        let n = shapes.len();
        let device = device.clone();
        let masters = match self.masters {
            Some(m) => m,
            None => Arc::new(
                self.params
                    .iter()
                    .map(|v| {
                        let t = v.as_tensor().flatten_all()?.to_dtype(DType::F32)?;
                        Ok(HostVec::from_slice(&t.to_vec1::<f32>()?))
                    })
                    .collect::<Result<Vec<_>>>()?,
            ),
        };
        let buffers = self
            .buffers
            .iter()
            .map(|b| b.to_device(&device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(NetState {
            params: Vec::new(),
            buffers,
            masters: Some(masters),
            stream: Some(Streamed {
                dtype,
                shapes,
                device,
                resident: vec![None; n],
            }),
        })
    }

    /// Number of parameters.
    pub fn len(&self) -> usize {
        match (&self.masters, &self.stream) {
            (Some(m), Some(_)) => m.len(),
            _ => self.params.len(),
        }
    }

    /// Whether the network has no parameters.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Each parameter's shape.
    pub fn shapes(&self) -> Vec<Vec<usize>> {
        match &self.stream {
            Some(s) => s.shapes.clone(),
            None => self.params.iter().map(|p| p.dims().to_vec()).collect(),
        }
    }

    /// The masters for writing (`None` without). An error while a weight fetch still
    /// reads them: every fetch is waited for before anything writes a weight.
    pub fn masters_mut(&mut self) -> Result<Option<&mut Vec<HostVec>>> {
        match &mut self.masters {
            None => Ok(None),
            Some(m) => match Arc::get_mut(m) {
                Some(m) => Ok(Some(m)),
                None => bail!("the master weights are written while a weight fetch reads them"),
            },
        }
    }

    /// Writes parameter `i`'s working copy from its master (rounded to bf16 on the host,
    /// then uploaded); a no-op without masters or when streamed (the next fetch reads
    /// the master).
    pub fn refresh(&self, i: usize) -> Result<()> {
        let (Some(m), None) = (&self.masters, &self.stream) else {
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
        if let Held::Device(v) = self.held(i) {
            return Ok(v.as_tensor().detach());
        }
        Ok(match (&self.masters, &self.stream) {
            (Some(m), Some(s)) => Tensor::from_slice(&m[i], s.shapes[i].as_slice(), &s.device)?,
            (Some(m), None) => {
                let p = &self.params[i];
                Tensor::from_slice(&m[i], p.shape(), p.device())?
            }
            (None, _) => self.params[i].as_tensor().detach(),
        })
    }

    /// All weights in f32 ([`NetState::weight`]): what export and checkpoints read.
    pub fn weights(&self) -> Result<Vec<Tensor>> {
        (0..self.len()).map(|i| self.weight(i)).collect()
    }

    /// Each weight as evaluation reads it ([`Weights`]): resident tensors, or with
    /// masters their host values, uploaded a block at a time.
    pub fn weight_refs(&self) -> Weights<'_> {
        Weights((0..self.len()).map(|i| self.weight_ref(i)).collect())
    }

    /// Weight `i` as evaluation reads it ([`NetState::weight_refs`]).
    pub fn weight_ref(&self, i: usize) -> WeightRef<'_> {
        if let (Held::Device(v), Some(_)) = (self.held(i), &self.stream) {
            return WeightRef::Device(v.as_tensor().detach());
        }
        match &self.masters {
            Some(m) => WeightRef::Host {
                values: &m[i],
                shape: match &self.stream {
                    Some(s) => s.shapes[i].clone(),
                    None => self.params[i].dims().to_vec(),
                },
                device: match &self.stream {
                    Some(s) => s.device.clone(),
                    None => self.params[i].device().clone(),
                },
            },
            None => WeightRef::Device(self.params[i].as_tensor().detach()),
        }
    }

    /// Exchanges layer `i` with `other`'s, wherever each lives (its tensor on the
    /// device, its master and working copy), by moving them, never copying: a
    /// re-partition hands a layer's two copies between the branches. Both states must
    /// have the same layout.
    pub fn swap_layer(&mut self, other: &mut NetState, i: usize) -> Result<()> {
        let layout = |s: &NetState| (s.masters.is_some(), s.stream.is_some(), s.params.len());
        if layout(self) != layout(other) {
            bail!("layer {i} is exchanged between networks of different layouts");
        }
        if let (Some(a), Some(b)) = (&mut self.stream, &mut other.stream) {
            std::mem::swap(&mut a.resident[i], &mut b.resident[i]);
        }
        if !self.params.is_empty() {
            std::mem::swap(&mut self.params[i], &mut other.params[i]);
        }
        if let (Some(a), Some(b)) = (self.masters_mut()?, other.masters_mut()?) {
            std::mem::swap(&mut a[i], &mut b[i]);
        }
        Ok(())
    }

    /// Host bytes of the master weights (0 without).
    pub fn master_bytes(&self) -> u64 {
        self.masters
            .iter()
            .flat_map(|m| m.iter())
            .map(|x| 4 * x.len() as u64)
            .sum()
    }

    /// The parameter tensors for a forward where `trainable[i]` selects which layers
    /// record gradients; the others are detached (frozen, no gradient computed). Empty
    /// when streamed: a streamed forward fetches block by block ([`NetState::fetch`]).
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

    /// Where layer `i`'s value lives: on the device (a resident layout without masters,
    /// or a streamed layer [`NetState::place`] keeps there), or in its master.
    pub fn held(&self, i: usize) -> Held<'_> {
        match (&self.stream, &self.masters) {
            (Some(s), _) => match &s.resident[i] {
                Some(v) => Held::Device(v),
                None => Held::Master,
            },
            (None, Some(_)) => Held::Master,
            (None, None) => Held::Device(&self.params[i]),
        }
    }

    /// Layer `i`'s tensor on the device between uses, the one a forward tracks (its
    /// gradient's key): the parameter, or a streamed state's resident layer; `None`
    /// for a streamed layer (its working copy is fetched).
    pub fn var(&self, i: usize) -> Option<&Var> {
        match &self.stream {
            Some(s) => s.resident[i].as_ref(),
            None => self.params.get(i),
        }
    }

    /// Keeps the layers of `resident` on the device and streams the others, in a
    /// streamed state (a no-op otherwise): the trained set stays where the device
    /// optimizer updates it, the frozen set waits in host memory. A layer coming to
    /// the device becomes an f32 `Var` made from its master, whose host copy is freed;
    /// a layer leaving is read back into its master (first, so the device never holds
    /// both sets). Values move, never change: what follows computes the same bits
    /// wherever a layer waited. An error while a weight fetch reads the masters.
    pub fn place(&mut self, resident: &[bool]) -> Result<()> {
        let (Some(s), Some(m)) = (&mut self.stream, &mut self.masters) else {
            return Ok(());
        };
        let moves = |s: &Streamed, keep: bool| -> Vec<usize> {
            (0..s.resident.len())
                .filter(|&i| s.resident[i].is_some() != resident[i] && resident[i] == keep)
                .collect()
        };
        let (leave, come) = (moves(s, false), moves(s, true));
        if leave.is_empty() && come.is_empty() {
            return Ok(());
        }
        let Some(m) = Arc::get_mut(m) else {
            bail!("weights are moved between device and host while a weight fetch reads them");
        };
        for i in leave {
            if let Some(v) = s.resident[i].take() {
                m[i] = HostVec::from_slice(&v.as_tensor().flatten_all()?.to_vec1::<f32>()?);
            }
        }
        for i in come {
            let t = Tensor::from_slice(&m[i], s.shapes[i].as_slice(), &s.device)?;
            s.resident[i] = Some(Var::from_tensor(&t)?);
            m[i] = HostVec::zeroed(0);
        }
        Ok(())
    }

    /// A streamed state's resident layers as a forward uses them (`trainable`: tracked,
    /// else detached), in its working dtype (bf16: the recorded cast, whose backward
    /// delivers the f32 gradient); `None` for the streamed ones.
    pub fn resident_view(&self, trainable: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let Some(s) = &self.stream else {
            bail!("resident layers are kept apart only in a streamed state");
        };
        s.resident
            .iter()
            .zip(trainable)
            .map(|(v, &t)| {
                let Some(v) = v else { return Ok(None) };
                let w = match t {
                    true => v.as_tensor().clone(),
                    false => v.as_tensor().detach(),
                };
                Ok(Some(w.to_dtype(s.dtype)?))
            })
            .collect()
    }

    /// Working copies of parameters `range` of a streamed state, made from the masters
    /// (`track[j]`: parameter `range.start + j` becomes a `Var` that records gradients);
    /// what a weight fetch runs on its copy stream. Shares the masters with the caller
    /// (`Arc`), so it can run on another thread.
    pub fn fetcher(&self) -> Result<Fetcher> {
        match (&self.masters, &self.stream) {
            (Some(m), Some(s)) => Ok(Fetcher {
                masters: m.clone(),
                stream: Streamed {
                    resident: Vec::new(),
                    ..s.clone()
                },
            }),
            _ => bail!("weights are fetched only from a streamed state"),
        }
    }
}

/// Makes a streamed state's working copies from its masters ([`NetState::fetcher`]).
pub struct Fetcher {
    masters: Arc<Vec<HostVec>>,
    stream: Streamed,
}

impl Fetcher {
    /// Parameter `i`'s master values and shape: what its working copy is made from.
    pub fn master(&self, i: usize) -> (&[f32], &[usize]) {
        (&self.masters[i], &self.stream.shapes[i])
    }

    /// The working copies' dtype (f32, or bf16: the masters' rounding) and device.
    pub fn target(&self) -> (DType, &Device) {
        (self.stream.dtype, &self.stream.device)
    }
}

/// One weight as evaluation reads it.
#[derive(Clone, Debug)]
pub enum WeightRef<'a> {
    /// A tensor on the device.
    Device(Tensor),
    /// f32 values in host memory (a master), uploaded when its block runs.
    Host {
        /// The values.
        values: &'a [f32],
        /// Its shape.
        shape: Vec<usize>,
        /// Where it is uploaded to.
        device: Device,
    },
}

impl WeightRef<'_> {
    /// The weight as an f32 tensor on its device.
    pub fn tensor(&self) -> Result<Tensor> {
        Ok(match self {
            WeightRef::Device(t) => t.clone(),
            WeightRef::Host {
                values,
                shape,
                device,
            } => Tensor::from_slice(values, shape.as_slice(), device)?,
        })
    }
}

/// A network's weights for evaluation, export and selection: on the device, or in host
/// memory and uploaded one block at a time, so evaluating a streamed network holds one
/// block's weights on the device.
pub struct Weights<'a>(pub Vec<WeightRef<'a>>);

impl Weights<'_> {
    /// Resident tensors.
    pub fn of(tensors: Vec<Tensor>) -> Weights<'static> {
        Weights(tensors.into_iter().map(WeightRef::Device).collect())
    }

    /// Every weight as a tensor (export, fingerprints): resident ones where they are,
    /// masters as host tensors (nothing goes to the device).
    pub fn all(&self) -> Result<Vec<Tensor>> {
        self.0
            .iter()
            .map(|w| match w {
                WeightRef::Device(t) => Ok(t.clone()),
                WeightRef::Host { values, shape, .. } => {
                    Ok(Tensor::from_slice(values, shape.as_slice(), &Device::Cpu)?)
                }
            })
            .collect()
    }

    /// The network's output in `mode` (buffers replaced in `Mode::Train`), segment by
    /// segment ([`Network::segments`]): each segment's weights are made just before it
    /// runs and dropped after.
    pub fn forward(
        &self,
        net: &dyn Network,
        buffers: &mut [Tensor],
        x: &Tensor,
        mode: Mode,
    ) -> Result<Tensor> {
        let mut carried = vec![x.clone()];
        for (k, b) in net.blocks().iter().enumerate() {
            let (weights, bufs) = (&self.0[b.params.clone()], &mut buffers[b.buffers.clone()]);
            for (j, s) in net.segments(k).into_iter().enumerate() {
                let p = weights[s.params]
                    .iter()
                    .map(WeightRef::tensor)
                    .collect::<Result<Vec<_>>>()?;
                carried = net.forward_segment(k, j, &p, &mut bufs[s.buffers], &carried, mode)?;
            }
        }
        match <[Tensor; 1]>::try_from(carried) {
            Ok([y]) => Ok(y),
            Err(c) => bail!("the network's last block carries {} tensors out", c.len()),
        }
    }
}

fn init_tensor(
    init: Init,
    shape: &[usize],
    dtype: DType,
    rng: &mut Rng,
    device: &Device,
) -> Result<Tensor> {
    Ok(match init {
        Init::Zeros => Tensor::zeros(shape, dtype, device)?,
        Init::Ones => Tensor::ones(shape, dtype, device)?,
        _ => Tensor::from_vec(
            init_values(init, shape.iter().product(), rng)?,
            shape,
            device,
        )?,
    })
}

/// The initial buffers of `net` on `device` (after the parameters' draws from `rng`;
/// [`Init::Table`] ones from [`Network::table`]).
fn init_buffers(net: &dyn Network, rng: &mut Rng, device: &Device) -> Result<Vec<Tensor>> {
    net.buffers()
        .iter()
        .enumerate()
        .map(|(i, b)| match b.init {
            Init::Table => net.table(i, device),
            init => init_tensor(init, &b.shape, b.dtype, rng, device),
        })
        .collect()
}

/// `n` f32 values of `init`, drawn from `rng` where it is random; an error for
/// [`Init::Table`] (a buffer's, computed by its network).
fn init_values(init: Init, n: usize, rng: &mut Rng) -> Result<Vec<f32>> {
    Ok(match init {
        Init::Table => bail!("computed values are a buffer's, not a parameter's"),
        Init::Zeros => vec![0.0; n],
        Init::Ones => vec![1.0; n],
        Init::FanIn(fan_in) => {
            let b = 1.0 / (fan_in as f32).sqrt();
            rng.uniform_vec(n, -b, b)
        }
        Init::Normal(s) => normal_vec(rng, n, s),
    })
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
