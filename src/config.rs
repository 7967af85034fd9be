//! The run configuration: a TOML file, `--set key=value` overrides, validation.
//!
//! Every field has a default (see `configs/reference.toml`, which documents each one).
//! Unknown keys, wrong types and out-of-range values are errors that name the key and
//! what is allowed, so a typo never silently falls back to a default.
//!
//! Paths come out absolute: a relative path written in a config file resolves against
//! that file's directory, one given with `--set` against the working directory (where
//! the shell that typed it is), so a run's saved `config.toml` works from anywhere.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Training method (`train.method`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Plain fine-tuning of all layers.
    Erm,
    /// Head only for `train.lp_steps`, then all layers.
    LpFt,
    /// Dual branch with a `names` partition: backbone stable, head unstable.
    Deft,
    /// The dual branch of the paper (PM and AM, DPU, composite).
    Ldt,
    /// One live network alternating phases P and A, counterparts in the host buffer.
    LdtS,
}

impl Method {
    /// The name used in configs, tables and file names.
    pub fn name(self) -> &'static str {
        match self {
            Method::Erm => "erm",
            Method::LpFt => "lp-ft",
            Method::Deft => "deft",
            Method::Ldt => "ldt",
            Method::LdtS => "ldt-s",
        }
    }

    /// Parses a method name as written in configs and on the command line.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "erm" => Method::Erm,
            "lp-ft" => Method::LpFt,
            "deft" => Method::Deft,
            "ldt" => Method::Ldt,
            "ldt-s" => Method::LdtS,
            _ => bail!("unknown method `{s}`; allowed: erm, lp-ft, deft, ldt, ldt-s"),
        })
    }
}

/// What a run trains for (`task`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    /// Class labels: cross-entropy, accuracy.
    Classification,
    /// Low- to high-resolution images: a pixel loss, PSNR and SSIM.
    SuperResolution,
}

impl Task {
    /// The name used in configs and manifests.
    pub fn name(self) -> &'static str {
        match self {
            Task::Classification => "classification",
            Task::SuperResolution => "super-resolution",
        }
    }
}

/// Super-resolution's pixel loss (`sr.loss`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SrLoss {
    /// Mean absolute error (BasicSR's `L1Loss`, EDSR's loss).
    L1,
    /// Mean of `sqrt(d^2 + eps)` (BasicSR's `CharbonnierLoss`).
    Charbonnier,
}

/// `[sr]`: the loss and scoring of `task = "super-resolution"`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SrConfig {
    /// `l1` or `charbonnier`.
    pub loss: SrLoss,
    /// Charbonnier's `eps` (BasicSR's default 1e-12).
    pub charbonnier_eps: f64,
    /// Pixels cut from each side before PSNR and SSIM; unset = the scale (BasicSR's
    /// `crop_border`, as SR papers report).
    pub border: Option<usize>,
}

impl Default for SrConfig {
    fn default() -> Self {
        SrConfig {
            loss: SrLoss::L1,
            charbonnier_eps: 1e-12,
            border: None,
        }
    }
}

impl SrConfig {
    /// This section's range checks.
    fn validate(&self) -> Result<()> {
        check(
            self.charbonnier_eps > 0.0 && self.charbonnier_eps.is_finite(),
            "sr.charbonnier_eps",
            "must be a positive number, e.g. 1e-12 (BasicSR) or 1e-6",
        )
    }
}

/// Upper bound of `threads` and `offload.threads`: far above any useful value, low
/// enough that a typo (an extra zero or three) fails here instead of stalling the
/// machine with a hundred thousand threads.
pub const MAX_THREADS: usize = 1024;

/// Upper bound of `data.prefetch` (each prefetched batch is held in memory).
pub const MAX_PREFETCH: usize = 1024;

/// Whole run configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Seed for initialization, data order, splits and the `random` criterion.
    pub seed: u64,
    /// Compute device: `cpu` (or `cuda:N` with the `cuda` feature).
    pub device: String,
    /// CPU threads for compute; 0 = all cores.
    pub threads: usize,
    /// What the run trains for; unset = the data's (a manifest's `task`, else
    /// classification).
    pub task: Option<Task>,
    /// Network.
    pub model: ModelConfig,
    /// Data.
    pub data: DataConfig,
    /// Augmentation of the training batches.
    pub augment: AugmentConfig,
    /// Training loop.
    pub train: TrainConfig,
    /// Optimizer of the training stage.
    pub optim: OptimConfig,
    /// Stage 1: warm-up, statistics, partition, DPU coefficients.
    pub stage1: Stage1Config,
    /// Dual-branch settings shared by `ldt`, `deft` and `ldt-s`.
    pub ldt: LdtConfig,
    /// Single-branch (`ldt-s`) phase lengths.
    pub ldt_s: LdtSConfig,
    /// Counterpart buffer and copy engine.
    pub offload: OffloadSettings,
    /// Evaluation.
    pub eval: EvalConfig,
    /// Super-resolution's loss and scoring.
    pub sr: SrConfig,
    /// Weight snapshots at given steps.
    pub snapshots: SnapshotConfig,
    /// Checkpoints and resume.
    pub checkpoint: CheckpointConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            seed: 0,
            device: "cpu".into(),
            threads: 0,
            task: None,
            model: ModelConfig::default(),
            data: DataConfig::default(),
            augment: AugmentConfig::default(),
            train: TrainConfig::default(),
            optim: OptimConfig::default(),
            stage1: Stage1Config::default(),
            ldt: LdtConfig::default(),
            ldt_s: LdtSConfig::default(),
            offload: OffloadSettings::default(),
            eval: EvalConfig::default(),
            sr: SrConfig::default(),
            snapshots: SnapshotConfig::default(),
            checkpoint: CheckpointConfig::default(),
        }
    }
}

/// Every `model.arch` a configuration may name (`crate::model::build` builds each).
pub const ARCHS: [&str; 10] = [
    "mlp",
    "cnn",
    "cnn_bn",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "vit",
    "edsr",
    "swinir",
];

/// The upscaling factors of `edsr` (`model.scale`): BasicSR's `Upsample` takes 2^n and
/// 3; these are the factors EDSR was published and is benchmarked with.
pub const EDSR_SCALES: [usize; 3] = [2, 3, 4];

/// The upscaling factors of `swinir` (`model.scale`): SwinIR-light's, the factors it
/// was published and is benchmarked with (its one-step upsampler would take any).
pub const SWINIR_SCALES: [usize; 3] = [2, 3, 4];

/// `model.mlp_ratio` of `vit` when unset (timm's).
pub const VIT_MLP_RATIO: f64 = 4.0;

/// `model.mlp_ratio` of `swinir` when unset (SwinIR-light's).
pub const SWINIR_MLP_RATIO: f64 = 2.0;

/// The rules of `swinir`'s size settings (`model.embed_dim`, `depths`, `num_heads`,
/// `window_size`, `mlp_ratio`), each error naming its key: positive sizes, one head
/// count per residual group, each dividing the embedding width, a positive MLP width.
pub fn check_swinir_shape(
    embed_dim: usize,
    depths: &[usize],
    num_heads: &[usize],
    window_size: usize,
    mlp_ratio: f64,
) -> Result<()> {
    if embed_dim == 0 {
        bail!("config key `model.embed_dim`: must be at least 1");
    }
    if depths.is_empty() || depths.contains(&0) {
        bail!(
            "config key `model.depths`: need at least one residual group, each of at least \
             one block, got {depths:?}"
        );
    }
    if num_heads.len() != depths.len() {
        bail!(
            "config key `model.num_heads`: one head count per entry of `model.depths` \
             ({}), got {num_heads:?}",
            depths.len()
        );
    }
    if let Some(h) = num_heads
        .iter()
        .find(|&&h| h == 0 || !embed_dim.is_multiple_of(h))
    {
        bail!(
            "config key `model.num_heads`: {h} heads do not divide `model.embed_dim` = \
             {embed_dim}"
        );
    }
    if window_size == 0 {
        bail!("config key `model.window_size`: must be at least 1");
    }
    if !mlp_ratio.is_finite() || (embed_dim as f64 * mlp_ratio) as usize == 0 {
        bail!("config key `model.mlp_ratio`: {mlp_ratio} gives an MLP width of 0");
    }
    Ok(())
}

/// `[model]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Architecture: `mlp`, `cnn`, `cnn_bn`, `resnet18`, `resnet34`, `resnet50`,
    /// `resnet101`, `vit`, `edsr` (super-resolution: BasicSR's EDSR; with the defaults
    /// of `scale`, `num_feat`, `num_block` and `res_scale` the EDSR baseline), `swinir`
    /// (super-resolution: BasicSR's SwinIR, lightweight form; with the defaults of
    /// `embed_dim`, `depths`, `num_heads`, `window_size` and `mlp_ratio` SwinIR-light).
    pub arch: String,
    /// Weights to start from, with PyTorch names: safetensors, or a PyTorch checkpoint
    /// (`.pth`/`.pt`/`.bin`, read without running anything from it); otherwise
    /// PyTorch-style random init.
    pub init: Option<PathBuf>,
    /// Hidden widths of `mlp`.
    pub hidden: Vec<usize>,
    /// Convolution channels of `cnn` / `cnn_bn`.
    pub channels: Vec<usize>,
    /// Width of the hidden fully connected layer of `cnn` / `cnn_bn`.
    pub fc_hidden: usize,
    /// Classes of the head; unset = the data's class count (the manifest's).
    pub num_classes: Option<usize>,
    /// With `init`: re-initialize the head (seeded) instead of loading it, so that a
    /// checkpoint whose head has another class count than `num_classes` can be used.
    pub reset_head: bool,
    /// `vit`: patch size (the image sides must be multiples of it).
    pub patch: usize,
    /// `vit`: embedding width D.
    pub width: usize,
    /// `vit`: number of transformer blocks.
    pub depth: usize,
    /// `vit`: attention heads (must divide `width`).
    pub heads: usize,
    /// `vit` and `swinir`: MLP hidden width as a multiple of the embedding width
    /// (`int(width * mlp_ratio)`); unset = the architecture's own, 4 for `vit` (timm's)
    /// and 2 for `swinir` (SwinIR-light's).
    pub mlp_ratio: Option<f64>,
    /// `edsr` and `swinir`: upscaling factor, 2, 3 or 4; unset = the data's scale (a
    /// network is built only once it is known).
    pub scale: Option<usize>,
    /// `edsr`: feature channels (BasicSR's `num_feat`; the baseline's 64).
    pub num_feat: usize,
    /// `edsr`: residual blocks of the body (BasicSR's `num_block`; the baseline's 16).
    pub num_block: usize,
    /// `edsr`: factor on each residual block's branch before its add (BasicSR's
    /// `res_scale`; the baseline's 1, EDSR-L's 0.1).
    pub res_scale: f64,
    /// `swinir`: embedding width (BasicSR's `embed_dim`; SwinIR-light's 60). Each
    /// entry of `num_heads` divides it.
    pub embed_dim: usize,
    /// `swinir`: Swin transformer blocks of each residual group (RSTB), one entry per
    /// group (BasicSR's `depths`).
    pub depths: Vec<usize>,
    /// `swinir`: attention heads of each residual group (BasicSR's `num_heads`, one
    /// entry per entry of `depths`; `vit`'s one count is `heads`).
    pub num_heads: Vec<usize>,
    /// `swinir`: side of the attention windows; the input sides must be multiples of it
    /// (of the smaller side when that is not larger: BasicSR then attends over windows
    /// that large, without shift).
    pub window_size: usize,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            arch: "cnn".into(),
            init: None,
            hidden: vec![128, 64],
            channels: vec![16, 32],
            fc_hidden: 64,
            num_classes: None,
            reset_head: false,
            patch: 4,
            width: 96,
            depth: 3,
            heads: 3,
            mlp_ratio: None,
            scale: None,
            num_feat: 64,
            num_block: 16,
            res_scale: 1.0,
            embed_dim: 60,
            depths: vec![6, 6, 6, 6],
            num_heads: vec![6, 6, 6, 6],
            window_size: 8,
        }
    }
}

/// `[data]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Where the examples come from: `manifest` (a `dg-benchmark/v1` manifest of
    /// safetensors or IDX splits) or `image-folder` (`root/<domain>/<class>/*.png|jpg`).
    pub format: DataFormat,
    /// The benchmark's `manifest.json` (format `dg-benchmark/v1`).
    pub manifest: PathBuf,
    /// `image-folder`: the directory of domains, `root/<domain>/<class>/<image>` or
    /// `root/<domain>/{train,test}/<class>/<image>`.
    pub root: Option<PathBuf>,
    /// Domains trained on (by name); empty = the manifest's `source` roles. Required
    /// for `image-folder`.
    pub sources: Vec<String>,
    /// Held-out domains (by name); empty = every domain not in `sources` (or the
    /// manifest's `target` roles when `sources` is empty too).
    pub targets: Vec<String>,
    /// The model's input `[H, W]`: images are resized (aspect kept) and center-cropped
    /// to it; unset = the stored size (manifest data). Required for `image-folder`.
    pub image_size: Option<[usize; 2]>,
    /// `image-folder`: channels of the model's input, 3 (RGB: grayscale replicated,
    /// alpha dropped) or 1 (luma, as PIL's `convert("L")`).
    pub channels: usize,
    /// `image-folder`: share of each class of a domain held out as its test split when
    /// the domain has no `train`/`test` folders (seeded by `data.split_seed`).
    pub test_fraction: f64,
    /// `image-folder`: seed of the train/test split (apart from `seed`, so that runs
    /// with different seeds are scored on the same test images).
    pub split_seed: u64,
    /// `image-folder`: `error` on an image that cannot be read, or `skip` it (every
    /// image is then decoded once when the data opens, and the skipped ones counted).
    pub on_bad_image: OnBadImage,
    /// Per-channel mean subtracted from the [0, 1] pixels, or `"imagenet"`; unset = none.
    pub mean: Option<Normalization>,
    /// Per-channel standard deviation the pixels are divided by, or `"imagenet"`.
    pub std: Option<Normalization>,
    /// Threads that gather (decode, augment) batches ahead of the step; 0 = one for
    /// stored data, up to 4 (the cores) for image folders.
    pub workers: usize,
    /// Optional batch schedule (safetensors of i64 index tensors into the concatenated
    /// source train splits); when set, batches come from it instead of the shuffler.
    pub schedule: Option<PathBuf>,
    /// Tensor of `schedule` that holds the training batches.
    pub schedule_key: String,
    /// Batches prepared ahead by the loader thread.
    pub prefetch: usize,
    /// Fraction of each source domain's train split held out for model selection
    /// (training-domain validation, as DomainBed); 0 = no selection.
    pub val_fraction: f64,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            format: DataFormat::Manifest,
            manifest: PathBuf::from("data/rotmnist5k/manifest.json"),
            root: None,
            sources: Vec::new(),
            targets: Vec::new(),
            image_size: None,
            channels: 3,
            test_fraction: 0.2,
            split_seed: 0,
            on_bad_image: OnBadImage::Error,
            mean: None,
            std: None,
            workers: 0,
            schedule: None,
            schedule_key: "train_batches".into(),
            prefetch: 2,
            val_fraction: 0.0,
        }
    }
}

/// `data.format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataFormat {
    /// A `dg-benchmark/v1` manifest (`data.manifest`).
    Manifest,
    /// Class folders per domain under `data.root`.
    ImageFolder,
}

/// `data.on_bad_image`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnBadImage {
    /// Stop with an error naming the file.
    Error,
    /// Leave the file out (counted and the first ones named).
    Skip,
}

/// `data.mean` / `data.std`: per-channel values or a named preset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Normalization {
    /// A preset by name: `imagenet` (torchvision's ImageNet statistics).
    Preset(String),
    /// One value per channel (or one for all).
    Values(Vec<f64>),
}

/// ImageNet's per-channel mean (RGB), torchvision's values.
pub const IMAGENET_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
/// ImageNet's per-channel standard deviation (RGB), torchvision's values.
pub const IMAGENET_STD: [f64; 3] = [0.229, 0.224, 0.225];

impl Normalization {
    /// The per-channel values for `channels` channels; `key` names the field in errors.
    pub fn values(&self, key: &str, channels: usize, std: bool) -> Result<Vec<f64>> {
        let v = match self {
            Normalization::Preset(p) if p == "imagenet" => {
                let v = if std { IMAGENET_STD } else { IMAGENET_MEAN };
                if channels != 3 {
                    bail!(
                        "config key `{key}`: the `imagenet` preset is for 3 (RGB) channels, \
                         the input has {channels}; give the values, e.g. [0.5]"
                    );
                }
                v.to_vec()
            }
            Normalization::Preset(p) => bail!(
                "config key `{key}`: unknown preset `{p}`; use \"imagenet\" or a list of \
                 per-channel values"
            ),
            Normalization::Values(v) if v.len() == 1 => vec![v[0]; channels],
            Normalization::Values(v) if v.len() == channels => v.clone(),
            Normalization::Values(v) => bail!(
                "config key `{key}`: {} values for an input of {channels} channels; give one \
                 per channel (or one for all)",
                v.len()
            ),
        };
        if let Some(x) = v.iter().find(|x| !x.is_finite() || (std && **x <= 0.0)) {
            bail!(
                "config key `{key}`: {x} is not {}",
                if std {
                    "a positive number"
                } else {
                    "a finite number"
                }
            );
        }
        Ok(v)
    }
}

/// `[augment]`: random transforms of the training batches (never of evaluation),
/// drawn per (seed, stage, batch, example) so that a resumed run repeats them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    /// Mirror left-right with probability 1/2.
    pub hflip: bool,
    /// `[min_scale, max_scale]`: crop a random region of that share of the image's
    /// area (aspect ratio in [3/4, 4/3]) and resize it to the input size
    /// (torchvision's `RandomResizedCrop`); unset = resize and center-crop.
    pub random_resized_crop: Option<[f64; 2]>,
    /// Brightness, contrast and saturation factors drawn from `[1 - j, 1 + j]` (one
    /// value for all three, or `[b, c, s]`; torchvision's `ColorJitter` without hue,
    /// applied in that fixed order); unset = none.
    pub color_jitter: Option<Jitter>,
}

/// `augment.color_jitter`: one strength or three.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Jitter {
    /// The same strength for brightness, contrast and saturation.
    All(f64),
    /// `[brightness, contrast, saturation]`.
    Each([f64; 3]),
}

impl Jitter {
    /// `[brightness, contrast, saturation]` strengths.
    pub fn strengths(&self) -> [f64; 3] {
        match self {
            Jitter::All(j) => [*j; 3],
            Jitter::Each(j) => *j,
        }
    }
}

impl AugmentConfig {
    /// Whether any transform is on.
    pub fn any(&self) -> bool {
        self.hflip || self.random_resized_crop.is_some() || self.color_jitter.is_some()
    }

    /// This section's range checks.
    fn validate(&self) -> Result<()> {
        if let Some([lo, hi]) = self.random_resized_crop {
            check(
                0.0 < lo && lo <= hi && hi <= 1.0,
                "augment.random_resized_crop",
                "must be [min_scale, max_scale] with 0 < min_scale <= max_scale <= 1, \
                 e.g. [0.08, 1.0]",
            )?;
        }
        if let Some(j) = &self.color_jitter {
            check(
                j.strengths().iter().all(|s| (0.0..=1.0).contains(s)),
                "augment.color_jitter",
                "strengths must be in [0, 1], e.g. 0.4 or [0.4, 0.4, 0.4]",
            )?;
        }
        Ok(())
    }
}

/// `[train]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// `erm`, `lp-ft`, `deft`, `ldt` or `ldt-s`.
    pub method: Method,
    /// Optimizer steps of the training stage.
    pub steps: usize,
    /// Examples per step.
    pub batch_size: usize,
    /// `erm`/`lp-ft`: head-only warm-up steps before training (0 = none).
    pub head_warmup_steps: usize,
    /// `lp-ft`: steps that train the head only, then all layers.
    pub lp_steps: usize,
    /// Print a progress line every N steps when stdout is not a terminal.
    pub log_every: usize,
    /// `stop` or `skip` on a non-finite loss or gradient.
    pub on_nonfinite: OnNonFinite,
    /// Clip the global L2 norm of each optimizer step's gradients to this value
    /// (`torch.nn.utils.clip_grad_norm_`); 0 = off.
    pub clip_grad_norm: f64,
    /// Micro-batches per optimizer step: each batch of `batch_size` examples is split into
    /// this many parts whose gradients are averaged (same update, less activation memory).
    pub accumulate: usize,
    /// Arithmetic of forward and backward: `f32`, or `bf16` weights and activations with
    /// f32 master weights, gradients and optimizer state (with `offload.optimizer =
    /// "host"` the device holds only bf16 weights and gradients; the f32 masters live on
    /// the host).
    pub precision: Precision,
    /// Activation memory: `none` keeps every activation of the forward for the backward;
    /// `blocks` keeps only each block's input and recomputes one block at a time during
    /// the backward (same bits, about one more forward of compute); `auto` picks
    /// `blocks` only when `none` does not fit `offload.device_bytes`.
    pub recompute: Recompute,
}

/// What the forward keeps for the backward (`train.recompute`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recompute {
    /// Every activation.
    None,
    /// Each block's input; the backward recomputes one block at a time.
    Blocks,
    /// `blocks` when the plan keeping every activation does not fit
    /// `offload.device_bytes`, else `none`; chosen before stage 1, printed with the
    /// reason.
    Auto,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            method: Method::Erm,
            steps: 600,
            batch_size: 32,
            head_warmup_steps: 0,
            lp_steps: 100,
            log_every: 50,
            on_nonfinite: OnNonFinite::Stop,
            clip_grad_norm: 0.0,
            accumulate: 1,
            precision: Precision::F32,
            recompute: Recompute::None,
        }
    }
}

/// Training arithmetic (`train.precision`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32.
    F32,
    /// bf16 copies of the weights and bf16 activations in forward and backward; the
    /// master weights, gradients and optimizer state stay f32 (with the optimizer on the
    /// host the masters live there and the device keeps only the bf16 copies);
    /// normalization, softmax and the loss reduce in f32.
    Bf16,
}

/// Optimizer kind (`optim.name`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimName {
    /// Adam (L2 weight decay added to the gradient, as `torch.optim.Adam`).
    Adam,
    /// AdamW (decoupled weight decay, as `torch.optim.AdamW`).
    Adamw,
    /// SGD with optional momentum (as `torch.optim.SGD`).
    Sgd,
}

/// Learning-rate schedule (`optim.schedule`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Constant after the linear warm-up.
    Constant,
    /// Cosine decay to zero after the linear warm-up.
    Cosine,
}

/// A learning rate for the layers whose name starts with `prefix`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LrGroup {
    /// Name prefix, e.g. `fc.` or `layer4.`.
    pub prefix: String,
    /// Learning rate of the group (the schedule scales it like the base rate).
    pub lr: f64,
}

/// `[optim]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// `adam`, `adamw` or `sgd`.
    pub name: OptimName,
    /// Base learning rate.
    pub lr: f64,
    /// Adam betas; beta1 = 0 keeps no first-moment buffer (the authors' setting).
    pub betas: [f64; 2],
    /// Adam epsilon.
    pub eps: f64,
    /// Weight decay (L2 for adam/sgd, decoupled for adamw).
    pub weight_decay: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// `constant` or `cosine`.
    pub schedule: Schedule,
    /// Linear learning-rate warm-up steps.
    pub lr_warmup_steps: usize,
    /// Per-group learning rates; the first matching prefix wins.
    pub groups: Vec<LrGroup>,
}

/// The authors' beta2: 0.99^0.8 (computed in f64, as their script does).
pub fn authors_beta2() -> f64 {
    0.99f64.powf(0.8)
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            name: OptimName::Adam,
            lr: 1e-4,
            betas: [0.0, authors_beta2()],
            eps: 1e-8,
            weight_decay: 0.0,
            momentum: 0.0,
            schedule: Schedule::Constant,
            lr_warmup_steps: 0,
            groups: Vec::new(),
        }
    }
}

/// Partition criterion (`stage1.criterion`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Criterion {
    /// Unbiased variance of all entries of the stacked gradients (authors' script).
    Var,
    /// Per-element variance across batches, averaged over the layer (paper's wording).
    VarCross,
    /// Mean of all entries of the stacked gradients.
    Mean,
    /// `var / |mean|`.
    VarOverMean,
    /// Seeded random order.
    Random,
    /// Explicit name patterns (`stage1.stable_names` / `stage1.unstable_names`).
    Names,
}

impl Criterion {
    /// The name in configs and reports (`var`, `var_over_mean`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Criterion::Var => "var",
            Criterion::VarCross => "var_cross",
            Criterion::Mean => "mean",
            Criterion::VarOverMean => "var_over_mean",
            Criterion::Random => "random",
            Criterion::Names => "names",
        }
    }

    /// Whether it ranks layers by statistics of their gradients (a statistics pass).
    pub fn needs_statistics(self) -> bool {
        !matches!(self, Criterion::Random | Criterion::Names)
    }
}

/// The word `auto` of a stage-1 setting the search chooses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AutoWord {
    /// `"auto"`.
    Auto,
}

/// `stage1.unstable_ratio`: a fraction, or `"auto"` (the search picks one of
/// `stage1.search_ratios` on the source validation hold-out).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged, expecting = "a fraction in [0, 1] or \"auto\"")]
pub enum RatioChoice {
    /// This fraction of layers goes to the unstable set.
    Fixed(f64),
    /// Chosen by the search.
    Auto(AutoWord),
}

/// `stage1.criterion`: a criterion, or `"auto"` (the search picks one of
/// `stage1.search_criteria` on the source validation hold-out).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "one of \"var\", \"var_cross\", \"mean\", \"var_over_mean\", \"random\", \"names\" or \"auto\""
)]
pub enum CriterionChoice {
    /// This criterion.
    Fixed(Criterion),
    /// Chosen by the search.
    Auto(AutoWord),
}

/// The network a search probe is scored by (`stage1.probe_network`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeNetwork {
    /// Each layer from the branch that trains it: where the composite is heading. A
    /// probe is short beside the DPU's half-lives (thousands of steps with the
    /// authors' coefficients), over which the composite itself barely leaves the
    /// start, whatever the candidate.
    Leading,
    /// The kept composite itself (meaningful with a DPU warm-up or long probes).
    Composite,
}

/// Which layers the stage-1 warm-up trains (`stage1.warmup_layers`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WarmupLayers {
    /// The head only (the paper's warm-up).
    Head,
    /// Every layer (how the fixtures' `init` was made from `random_init`).
    All,
}

/// `[stage1]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Stage1Config {
    /// Warm-up steps on D1 before the statistics (0 = none).
    pub warmup_steps: usize,
    /// `head` or `all`.
    pub warmup_layers: WarmupLayers,
    /// Warm-up Adam learning rate.
    pub warmup_lr: f64,
    /// Warm-up Adam betas.
    pub warmup_betas: [f64; 2],
    /// Fraction of the source training data that goes to D1 (warm-up); the rest is D2.
    pub split_fraction: f64,
    /// Statistics mini-batches (at least 2).
    pub stat_batches: usize,
    /// Examples per statistics batch.
    pub stat_batch_size: usize,
    /// `var`, `var_cross`, `mean`, `var_over_mean`, `random`, `names` or `auto`.
    pub criterion: CriterionChoice,
    /// Also compute `var_cross` (per-element variance across batches) for the report when
    /// the criterion does not need it: it holds two f64 moments per parameter (4x the f32
    /// weights) through the statistics pass. Otherwise it is reported as NaN.
    pub cross_variance: bool,
    /// Fraction of layers that go to the unstable set, in [0, 1], or `auto`.
    pub unstable_ratio: RatioChoice,
    /// The unstable ratios an `auto` ratio chooses from.
    pub search_ratios: Vec<f64>,
    /// The criteria an `auto` criterion chooses from.
    pub search_criteria: Vec<Criterion>,
    /// Optimizer steps of each search probe: the run's own first steps with one
    /// candidate partition, then scored on the source validation hold-out.
    pub probe_steps: usize,
    /// What a probe is scored by: `leading` (each layer from the branch that trains
    /// it) or `composite`.
    pub probe_network: ProbeNetwork,
    /// `names` criterion: name prefixes of the stable set.
    pub stable_names: Vec<String>,
    /// `names` criterion: name prefixes of the unstable set (default: the model's head).
    pub unstable_names: Vec<String>,
    /// A `partition.json` to use instead of running stage 1.
    pub partition: Option<PathBuf>,
    /// Re-partition every N optimizer steps of training (0 = never): the statistics pass
    /// again, on the composite and fresh D2 batches, and layers moved between the sets
    /// with their optimizer state (`ldt` and `ldt-s`).
    pub repartition_every: usize,
}

impl Default for Stage1Config {
    fn default() -> Self {
        Stage1Config {
            warmup_steps: 0,
            warmup_layers: WarmupLayers::Head,
            warmup_lr: 1e-3,
            warmup_betas: [0.9, 0.999],
            split_fraction: 0.5,
            stat_batches: 300,
            stat_batch_size: 4,
            criterion: CriterionChoice::Fixed(Criterion::Var),
            cross_variance: false,
            unstable_ratio: RatioChoice::Fixed(0.5),
            search_ratios: vec![0.3, 0.4, 0.5, 0.6, 0.7],
            search_criteria: vec![Criterion::Var, Criterion::VarOverMean, Criterion::Mean],
            probe_steps: 100,
            probe_network: ProbeNetwork::Leading,
            stable_names: Vec::new(),
            unstable_names: Vec::new(),
            partition: None,
            repartition_every: 0,
        }
    }
}

/// DPU coefficient rule (`ldt.dpu`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dpu {
    /// `w = base + slope * i / n` by rank inside each set.
    Rank,
    /// One coefficient `ldt.fixed_w` for every layer.
    Fixed,
}

/// Warm-up of the DPU coefficients over the first exchanges (`ldt.dpu_warmup`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DpuWarmup {
    /// The authors' arithmetic: every exchange uses the layer's coefficient.
    None,
    /// `w_n = w * (1 - (1 + n/gamma)^-power)` (timm's EMA warm-up shape), n = 1, 2, ...
    Timm,
    /// `w_n = w * (1 + n) / (10 + n)`, n = 1, 2, ...
    Ratio,
}

/// Where the dual branch keeps its two networks (`ldt.placement`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// Both branches live (fastest).
    Resident,
    /// One live network; each step is a P and an A half-step through the buffer.
    Swap,
}

/// `[ldt]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LdtConfig {
    /// DPU exchange every N optimizer steps of a branch.
    pub ema_every: usize,
    /// `rank` or `fixed`.
    pub dpu: Dpu,
    /// Coefficient of the fixed rule.
    pub fixed_w: f64,
    /// Stable set: base coefficient.
    pub stable_base: f64,
    /// Stable set: slope over the rank.
    pub stable_slope: f64,
    /// Unstable set: base coefficient.
    pub unstable_base: f64,
    /// Unstable set: slope over the rank.
    pub unstable_slope: f64,
    /// `resident` or `swap` (dual branch only).
    pub placement: Placement,
    /// `none`, `timm` or `ratio`: scale each exchange's coefficients by a schedule in the
    /// number of exchanges so far (keeps the DPU ranking; `none` = the authors' rule).
    pub dpu_warmup: DpuWarmup,
    /// `timm` warm-up: gamma.
    pub dpu_warmup_gamma: f64,
    /// `timm` warm-up: power.
    pub dpu_warmup_power: f64,
}

impl Default for LdtConfig {
    fn default() -> Self {
        LdtConfig {
            ema_every: 10,
            dpu: Dpu::Rank,
            fixed_w: 0.999,
            stable_base: 0.99,
            stable_slope: 0.01,
            unstable_base: 0.999,
            unstable_slope: 0.001,
            placement: Placement::Resident,
            dpu_warmup: DpuWarmup::None,
            dpu_warmup_gamma: 1.0,
            dpu_warmup_power: 0.75,
        }
    }
}

/// `[ldt_s]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LdtSConfig {
    /// Optimizer steps of phase P before swapping to A.
    pub p_steps: usize,
    /// Optimizer steps of phase A before swapping to P.
    pub a_steps: usize,
    /// Feed each batch to P and then to A (the equivalence mode of SPEC.md).
    pub repeat_batch: bool,
}

impl Default for LdtSConfig {
    fn default() -> Self {
        LdtSConfig {
            p_steps: 50,
            a_steps: 50,
            repeat_batch: false,
        }
    }
}

/// Where a device backend runs the DPU fold (`offload.ema`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmaPlacement {
    /// On the host's threads (`crate::offload::fused_ema`), after copying the live tensors to pinned
    /// host memory.
    Host,
    /// In device memory: the counterpart is copied in through the staging area, folded by
    /// one kernel launch per staging fill and copied back.
    Device,
    /// In place in mapped pinned host memory: one kernel launch reads and writes the
    /// counterpart across the bus (slots in the spill file go the `Device` way).
    Mapped,
}

/// Where the optimizer keeps its state and runs (`offload.optimizer`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerPlacement {
    /// Beside the weights, on the compute device.
    Device,
    /// In host memory: each trained gradient comes to the host, a fused multi-threaded
    /// update runs on f32 master weights and moments there, and the updated weights go
    /// back (the same arithmetic and bits as `device`).
    Host,
}

/// Where the weights live between uses (`offload.params`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamsPlacement {
    /// On the device, the whole network.
    Resident,
    /// In host memory as f32 masters; each segment's working copies are fetched on a
    /// copy stream just before the segment runs (one ahead) and dropped after it. With
    /// `offload.optimizer = "host"` every layer streams; with `"device"` the trained
    /// set stays on the device, where the optimizer updates it, and the frozen set
    /// streams (at an LDT-S phase switch the sets trade places). Needs block-wise
    /// recompute; same bits as `resident`.
    Stream,
    /// `stream` when the plan with resident weights does not fit
    /// `offload.device_bytes`, else `resident`; chosen before stage 1, printed with the
    /// reason.
    Auto,
}

/// `[offload]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OffloadSettings {
    /// Host RAM budget of the counterpart buffer, in bytes.
    pub host_bytes: u64,
    /// File for counterparts beyond `host_bytes` (memory-mapped); none = error instead.
    pub path: Option<PathBuf>,
    /// Bounded staging area for chunked swaps, in bytes.
    pub staging_bytes: u64,
    /// Copy-engine worker threads (streams).
    pub threads: usize,
    /// Where a GPU run folds the counterparts: `host` (worker threads), `device` (a PTX
    /// kernel in device memory) or `mapped` (a PTX kernel on the pinned host buffer).
    pub ema: EmaPlacement,
    /// Where the trained sets' optimizer state lives: `device` or `host`. With `host` and
    /// `train.precision = "bf16"` the f32 master weights of the whole network live on the
    /// host too, and the device holds their bf16 roundings.
    pub optimizer: OptimizerPlacement,
    /// Where the weights live between uses: `resident` on the device, `stream` in host
    /// memory (fetched segment by segment; with the optimizer on the device, the frozen
    /// set only), `auto` by `device_bytes`.
    pub params: ParamsPlacement,
    /// The device memory the run may plan for, in bytes (0 = no limit): a run whose
    /// planned peak (weights, gradients, device optimizer state, staging, activations)
    /// exceeds it stops before stage 1, naming the largest consumers and the settings
    /// that shrink them.
    pub device_bytes: u64,
}

impl Default for OffloadSettings {
    fn default() -> Self {
        OffloadSettings {
            host_bytes: 8 << 30,
            path: None,
            staging_bytes: 64 << 20,
            threads: 2,
            ema: EmaPlacement::Host,
            optimizer: OptimizerPlacement::Device,
            params: ParamsPlacement::Resident,
            device_bytes: 0,
        }
    }
}

/// The compute device named by the `device` key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The host CPU.
    Cpu,
    /// The CUDA GPU of this index.
    Cuda(usize),
}

impl DeviceSpec {
    /// `cpu` or `cuda:N`; anything else is `None`.
    pub fn parse(s: &str) -> Option<DeviceSpec> {
        if s == "cpu" {
            return Some(DeviceSpec::Cpu);
        }
        let n = s.strip_prefix("cuda:")?;
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        n.parse().ok().map(DeviceSpec::Cuda)
    }
}

/// `[eval]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Evaluate every N steps (0 = only at the end).
    pub every: usize,
    /// Examples per evaluation forward.
    pub batch_size: usize,
    /// ldt, ldt-s: also evaluate each branch (PM and AM) at every evaluation, not only
    /// the composite (they are always evaluated at the end).
    pub branches: bool,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            every: 0,
            batch_size: 256,
            branches: false,
        }
    }
}

/// What to do with a non-finite loss or gradient (`train.on_nonfinite`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnNonFinite {
    /// Stop the run naming the step, the layer and the value.
    Stop,
    /// Skip that optimizer step (counted and logged) and go on.
    Skip,
}

/// Whether to continue from the newest checkpoint (`checkpoint.resume`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Resume {
    /// Start fresh: checkpoints of an earlier run in the directory are removed, with a
    /// warning, so that a later resume never continues that run's history.
    Never,
    /// Continue from the newest complete checkpoint of the run directory, if any.
    Auto,
}

/// `[checkpoint]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Write a checkpoint every N training steps (0 = none; with N > 0 also at the end).
    pub every: usize,
    /// Complete checkpoints kept (older ones are removed).
    pub keep_last: usize,
    /// `never` or `auto` (`ldt train --resume` sets `auto`).
    pub resume: Resume,
    /// A new run into a directory holding another run's outputs (exports, metrics,
    /// summary, partition, checkpoints) removes them first (`ldt train --overwrite`);
    /// without it such a run is refused, so that outputs of two runs never mix.
    pub overwrite: bool,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            every: 0,
            keep_last: 2,
            resume: Resume::Never,
            overwrite: false,
        }
    }
}

/// `[snapshots]`
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotConfig {
    /// Steps after which `step{N}_pm/am.safetensors` (or `step{N}.safetensors`) are written.
    pub at_steps: Vec<usize>,
}

/// `Err` naming `key` with `msg` unless `ok`.
fn check(ok: bool, key: &str, msg: &str) -> Result<()> {
    if !ok {
        bail!("config key `{key}`: {msg}");
    }
    Ok(())
}

impl TrainConfig {
    /// This section's range checks.
    fn validate(&self) -> Result<()> {
        check(self.steps >= 1, "train.steps", "must be at least 1")?;
        check(
            self.batch_size >= 1,
            "train.batch_size",
            "must be at least 1",
        )?;
        check(
            (1..=self.batch_size).contains(&self.accumulate),
            "train.accumulate",
            &format!(
                "must be between 1 and train.batch_size ({}): each step's batch is split into that many micro-batches",
                self.batch_size
            ),
        )?;
        check(self.log_every >= 1, "train.log_every", "must be at least 1")?;
        Ok(())
    }
}

impl OptimConfig {
    /// This section's range checks.
    fn validate(&self) -> Result<()> {
        check(
            self.lr > 0.0 && self.lr.is_finite(),
            "optim.lr",
            "must be a positive number",
        )?;
        for (i, b) in self.betas.iter().enumerate() {
            check(
                (0.0..1.0).contains(b),
                &format!("optim.betas[{i}]"),
                "must be in [0, 1)",
            )?;
        }
        check(
            self.eps > 0.0 && self.eps.is_finite(),
            "optim.eps",
            "must be a positive number",
        )?;
        check(
            self.weight_decay >= 0.0 && self.weight_decay.is_finite(),
            "optim.weight_decay",
            "must be a finite number >= 0",
        )?;
        check(
            (0.0..1.0).contains(&self.momentum),
            "optim.momentum",
            "must be in [0, 1)",
        )?;
        for (i, g) in self.groups.iter().enumerate() {
            check(
                g.lr > 0.0 && g.lr.is_finite(),
                &format!("optim.groups[{i}].lr (prefix `{}`)", g.prefix),
                "must be a positive number",
            )?;
        }
        Ok(())
    }
}

impl Stage1Config {
    /// This section's range checks.
    fn validate(&self) -> Result<()> {
        check(
            self.warmup_lr > 0.0 && self.warmup_lr.is_finite(),
            "stage1.warmup_lr",
            "must be a positive number",
        )?;
        for (i, b) in self.warmup_betas.iter().enumerate() {
            check(
                (0.0..1.0).contains(b),
                &format!("stage1.warmup_betas[{i}]"),
                "must be in [0, 1)",
            )?;
        }
        check(
            self.split_fraction > 0.0 && self.split_fraction < 1.0,
            "stage1.split_fraction",
            "must be in (0, 1): both D1 (warm-up) and D2 (statistics) need data",
        )?;
        check(
            self.stat_batches >= 2,
            "stage1.stat_batches",
            "must be at least 2: a variance needs two batches",
        )?;
        check(
            self.stat_batch_size >= 1,
            "stage1.stat_batch_size",
            "must be at least 1",
        )?;
        if let RatioChoice::Fixed(r) = self.unstable_ratio {
            check(
                (0.0..=1.0).contains(&r),
                "stage1.unstable_ratio",
                "must be in [0, 1] or \"auto\"",
            )?;
        }
        check(
            !self.search_ratios.is_empty(),
            "stage1.search_ratios",
            "must name at least one ratio",
        )?;
        for (i, r) in self.search_ratios.iter().enumerate() {
            check(
                (0.0..=1.0).contains(r),
                &format!("stage1.search_ratios[{i}]"),
                "must be in [0, 1]",
            )?;
            check(
                !self.search_ratios[..i].contains(r),
                &format!("stage1.search_ratios[{i}]"),
                &format!("{r} is listed twice"),
            )?;
        }
        check(
            !self.search_criteria.is_empty(),
            "stage1.search_criteria",
            "must name at least one criterion",
        )?;
        for (i, c) in self.search_criteria.iter().enumerate() {
            let key = format!("stage1.search_criteria[{i}]");
            check(
                *c != Criterion::Names,
                &key,
                "`names` fixes the sets by name: there is nothing to search",
            )?;
            check(
                !self.search_criteria[..i].contains(c),
                &key,
                &format!("`{}` is listed twice", c.name()),
            )?;
        }
        check(
            self.probe_steps >= 1,
            "stage1.probe_steps",
            "must be at least 1",
        )?;
        if self.searching() {
            check(
                self.partition.is_none(),
                "stage1.partition",
                "a partition file fixes the sets: remove it, or set fixed                  `stage1.unstable_ratio` and `stage1.criterion`",
            )?;
            check(
                self.criterion != CriterionChoice::Fixed(Criterion::Names),
                "stage1.unstable_ratio",
                "`auto` ranks layers, but `stage1.criterion = \"names\"` fixes the sets by \
                 name: set a ranking criterion (or \"auto\") or a fixed ratio",
            )?;
        }
        Ok(())
    }

    /// Whether stage 1 searches the unstable ratio or the criterion (`auto`).
    pub fn searching(&self) -> bool {
        matches!(self.unstable_ratio, RatioChoice::Auto(_))
            || matches!(self.criterion, CriterionChoice::Auto(_))
    }

    /// The criteria stage 1 ranks by: the fixed one, or the search's candidates.
    pub fn criteria(&self) -> Vec<Criterion> {
        match self.criterion {
            CriterionChoice::Fixed(c) => vec![c],
            CriterionChoice::Auto(_) => self.search_criteria.clone(),
        }
    }

    /// The unstable ratios stage 1 may use: the fixed one, or the search's candidates.
    pub fn ratios(&self) -> Vec<f64> {
        match self.unstable_ratio {
            RatioChoice::Fixed(r) => vec![r],
            RatioChoice::Auto(_) => self.search_ratios.clone(),
        }
    }
}

impl LdtConfig {
    /// This section's range checks.
    fn validate(&self) -> Result<()> {
        check(self.ema_every >= 1, "ldt.ema_every", "must be at least 1")?;
        for (k, v) in [
            ("ldt.fixed_w", self.fixed_w),
            ("ldt.stable_base", self.stable_base),
            ("ldt.unstable_base", self.unstable_base),
            (
                "ldt.stable_base + ldt.stable_slope",
                self.stable_base + self.stable_slope,
            ),
            (
                "ldt.unstable_base + ldt.unstable_slope",
                self.unstable_base + self.unstable_slope,
            ),
        ] {
            check(
                (0.0..=1.0).contains(&v),
                k,
                "EMA coefficients must lie in [0, 1]",
            )?;
        }
        check(
            self.dpu_warmup_gamma > 0.0,
            "ldt.dpu_warmup_gamma",
            "must be positive",
        )?;
        check(
            self.dpu_warmup_power > 0.0,
            "ldt.dpu_warmup_power",
            "must be positive",
        )?;
        Ok(())
    }
}

impl LdtSConfig {
    /// This section's range checks.
    fn validate(&self) -> Result<()> {
        check(self.p_steps >= 1, "ldt_s.p_steps", "must be at least 1")?;
        check(self.a_steps >= 1, "ldt_s.a_steps", "must be at least 1")?;
        Ok(())
    }
}

impl OffloadSettings {
    /// This section's range checks.
    fn validate(&self) -> Result<()> {
        check(self.threads >= 1, "offload.threads", "must be at least 1")?;
        check(
            self.threads <= MAX_THREADS,
            "offload.threads",
            &format!("must be at most {MAX_THREADS}"),
        )?;
        Ok(())
    }
}

impl EvalConfig {
    /// This section's range checks.
    fn validate(&self) -> Result<()> {
        check(
            self.batch_size >= 1,
            "eval.batch_size",
            "must be at least 1",
        )?;
        Ok(())
    }
}

impl DataConfig {
    /// The loader threads `workers` asks for (0 = automatic: one for stored data,
    /// which needs only copying; for image folders, which need decoding, one per core
    /// up to 4).
    pub fn loader_threads(&self) -> usize {
        match (self.workers, self.format) {
            (0, DataFormat::Manifest) => 1,
            (0, DataFormat::ImageFolder) => std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .min(4),
            (n, _) => n,
        }
    }

    /// This section's range checks.
    fn validate(&self) -> Result<()> {
        check(
            (1..=MAX_PREFETCH).contains(&self.prefetch),
            "data.prefetch",
            &format!("must be in 1..={MAX_PREFETCH} (batches held in memory ahead)"),
        )?;
        check(
            (0.0..0.9).contains(&self.val_fraction),
            "data.val_fraction",
            "must be in [0, 0.9)",
        )?;
        check(
            self.val_fraction == 0.0 || self.schedule.is_none(),
            "data.val_fraction",
            "cannot hold out examples when `data.schedule` fixes the batches; set it to 0",
        )?;
        check(
            self.workers <= MAX_THREADS,
            "data.workers",
            &format!("must be at most {MAX_THREADS} (0 = automatic)"),
        )?;
        check(
            self.image_size.is_none_or(|s| s[0] > 0 && s[1] > 0),
            "data.image_size",
            "must be [H, W] with positive sizes, e.g. [224, 224]",
        )?;
        check(
            self.mean.is_some() == self.std.is_some(),
            "data.mean",
            "give `data.mean` and `data.std` together (e.g. both \"imagenet\")",
        )?;
        for (key, v, std) in [
            ("data.mean", &self.mean, false),
            ("data.std", &self.std, true),
        ] {
            if let Some(v) = v {
                let channels = match self.format {
                    DataFormat::ImageFolder => self.channels,
                    // Checked against the stored channel count when the data opens.
                    DataFormat::Manifest => match v {
                        Normalization::Values(v) => v.len().max(1),
                        Normalization::Preset(_) => 3,
                    },
                };
                v.values(key, channels, std)?;
            }
        }
        if self.format == DataFormat::ImageFolder {
            check(
                self.root.is_some(),
                "data.root",
                "`data.format = \"image-folder\"` needs the folder of domains, e.g. \
                 root = \"images\" holding images/<domain>/<class>/*.jpg",
            )?;
            check(
                !self.sources.is_empty(),
                "data.sources",
                "name the domains to train on (folders under `data.root`), e.g. \
                 sources = [\"photo\"]",
            )?;
            check(
                self.image_size.is_some(),
                "data.image_size",
                "image folders hold images of any size: give the model's input, e.g. \
                 image_size = [224, 224]",
            )?;
            check(
                self.channels == 1 || self.channels == 3,
                "data.channels",
                "must be 3 (RGB) or 1 (grayscale)",
            )?;
            check(
                self.test_fraction > 0.0 && self.test_fraction < 1.0,
                "data.test_fraction",
                "must be in (0, 1)",
            )?;
            check(
                self.schedule.is_none(),
                "data.schedule",
                "a batch schedule indexes a manifest's splits; it cannot be used with image folders",
            )?;
        } else {
            check(
                self.root.is_none(),
                "data.root",
                "is for `data.format = \"image-folder\"`; set that too, or remove `root`",
            )?;
        }
        if let Some(d) = self.sources.iter().find(|d| self.targets.contains(d)) {
            bail!(
                "config keys `data.sources` and `data.targets` both name domain `{d}`; a \
                 domain is either trained on or held out"
            );
        }
        check(
            self.targets.is_empty() || !self.sources.is_empty(),
            "data.targets",
            "give `data.sources` too (which domains are trained on)",
        )?;
        Ok(())
    }
}

impl CheckpointConfig {
    /// This section's range checks.
    fn validate(&self) -> Result<()> {
        check(
            self.keep_last >= 1,
            "checkpoint.keep_last",
            "must be at least 1",
        )?;
        Ok(())
    }
}

impl ModelConfig {
    /// The `[model]` checks that do not need the data: a known architecture and
    /// positive widths (the same rules `model::build` applies, caught before any run
    /// directory is created).
    fn validate(&self) -> Result<()> {
        let m = self;
        match m.arch.as_str() {
            "mlp" => {
                if m.hidden.is_empty() {
                    bail!(
                        "config key `model.hidden`: the mlp needs at least one hidden width \
                         (an empty list would silently train a linear model), e.g. [128, 64]"
                    );
                }
                if m.hidden.contains(&0) {
                    bail!(
                        "config key `model.hidden`: widths must be positive, got {:?}",
                        m.hidden
                    );
                }
            }
            "cnn" | "cnn_bn" => {
                if m.channels.is_empty() || m.channels.contains(&0) {
                    bail!(
                        "config key `model.channels`: need at least one positive channel \
                         count, got {:?}",
                        m.channels
                    );
                }
                if m.fc_hidden == 0 {
                    bail!("config key `model.fc_hidden`: must be at least 1");
                }
            }
            "edsr" => {
                if let Some(s) = m.scale.filter(|s| !EDSR_SCALES.contains(s)) {
                    bail!("config key `model.scale`: edsr upscales by 2, 3 or 4, not {s}");
                }
                if m.num_feat == 0 {
                    bail!("config key `model.num_feat`: must be at least 1");
                }
                if !m.res_scale.is_finite() {
                    bail!(
                        "config key `model.res_scale`: must be a finite number, got {}",
                        m.res_scale
                    );
                }
            }
            "swinir" => {
                if let Some(s) = m.scale.filter(|s| !SWINIR_SCALES.contains(s)) {
                    bail!("config key `model.scale`: swinir upscales by 2, 3 or 4, not {s}");
                }
                check_swinir_shape(
                    m.embed_dim,
                    &m.depths,
                    &m.num_heads,
                    m.window_size,
                    m.mlp_ratio.unwrap_or(SWINIR_MLP_RATIO),
                )?;
            }
            other if ARCHS.contains(&other) => {}
            other => bail!(
                "config key `model.arch`: unknown architecture `{other}`; allowed: {}",
                ARCHS.join(", ")
            ),
        }
        Ok(())
    }
}

impl Config {
    /// Whether the device holds bf16 working weights whose f32 masters live on the host
    /// (`train.precision = "bf16"` with `offload.optimizer = "host"`).
    pub fn host_masters(&self) -> bool {
        self.train.precision == Precision::Bf16
            && self.offload.optimizer == OptimizerPlacement::Host
    }

    /// Whether the weights are streamed (`offload.params = "stream"`, or `auto` once
    /// decided so).
    pub fn streamed(&self) -> bool {
        self.offload.params == ParamsPlacement::Stream
    }

    /// Reads `path`, applies `overrides` (`a.b=value`, value in TOML syntax or a bare
    /// string), validates, and makes every path absolute: a relative path written in the
    /// file resolves against the file's directory, one given with `--set` (typed in a
    /// shell) or left at its default against the working directory.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let dir = std::fs::canonicalize(parent)
            .with_context(|| format!("cannot resolve the directory of {}", path.display()))?;
        Self::parse(&text, &path.display().to_string(), overrides, Some(&dir))
    }

    /// Parses TOML text (named `origin` in errors) with overrides, validates, and makes
    /// relative paths absolute against the working directory (there is no config file
    /// to resolve them against).
    pub fn from_toml(text: &str, origin: &str, overrides: &[String]) -> Result<Config> {
        Self::parse(text, origin, overrides, None)
    }

    /// [`Config::from_toml`], resolving the relative paths that `text` itself sets (and
    /// no `--set` replaces) against `dir`, the config file's directory, when given.
    fn parse(text: &str, origin: &str, overrides: &[String], dir: Option<&Path>) -> Result<Config> {
        let mut table: toml::Table =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("config {origin}: {e}"))?;
        let written = table.clone();
        let _: Config =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("config {origin}: {e}"))?;
        for o in overrides {
            apply_override(&mut table, o)?;
        }
        let merged = toml::to_string(&table).context("re-serializing the config")?;
        let mut cfg: Config = toml::from_str(&merged).map_err(|e| {
            // The merged text is not what the user wrote (its line numbers mean nothing
            // to them): name the first `--set` that breaks the config instead.
            let culprit = first_bad_override(text, overrides);
            match culprit {
                Some((o, e)) => {
                    anyhow::anyhow!("config {origin}: --set `{o}`: {}", e.message().trim_end())
                }
                None => anyhow::anyhow!(
                    "config {origin} with --set {}: {e}",
                    overrides.join(" --set ")
                ),
            }
        })?;
        cfg.validate().with_context(|| format!("config {origin}"))?;
        let file = dir.map(|dir| ConfigFile {
            name: origin,
            dir,
            written: &written,
            overrides,
        });
        cfg.resolve_paths(file.as_ref())?;
        Ok(cfg)
    }

    /// Every path field by its key: path resolution walks this list, so a new path
    /// field is one line here.
    fn path_fields(&mut self) -> Vec<(&'static str, Option<&mut PathBuf>)> {
        vec![
            ("model.init", self.model.init.as_mut()),
            ("data.manifest", Some(&mut self.data.manifest)),
            ("data.schedule", self.data.schedule.as_mut()),
            ("data.root", self.data.root.as_mut()),
            ("stage1.partition", self.stage1.partition.as_mut()),
            ("offload.path", self.offload.path.as_mut()),
        ]
    }

    /// Makes every relative path absolute against the working directory (for configs
    /// built in code; [`Config::load`] and [`Config::from_toml`] already did), so that
    /// the `config.toml` a run writes works from any directory.
    pub fn absolute_paths(&mut self) -> Result<()> {
        self.resolve_paths(None)
    }

    /// Makes every relative path absolute: against `file`'s directory where that file
    /// sets the key, else against the working directory.
    fn resolve_paths(&mut self, file: Option<&ConfigFile>) -> Result<()> {
        let cwd = std::env::current_dir()
            .context("cannot read the working directory to resolve the config's paths")?;
        for (key, path) in self.path_fields() {
            let Some(path) = path else { continue };
            if path.is_absolute() {
                continue;
            }
            *path = match file.filter(|f| f.sets(key)) {
                Some(f) => f.resolve(key, path, &cwd)?,
                None => join_relative(&cwd, path),
            };
        }
        Ok(())
    }

    /// Range checks that types alone cannot express: each section checks itself, then
    /// the checks that span sections. Every error names the key and what is allowed.
    pub fn validate(&self) -> Result<()> {
        let c = self;
        c.train.validate()?;
        c.optim.validate()?;
        c.stage1.validate()?;
        c.ldt.validate()?;
        c.ldt_s.validate()?;
        c.offload.validate()?;
        c.eval.validate()?;
        c.sr.validate()?;
        c.data.validate()?;
        c.augment.validate()?;
        c.checkpoint.validate()?;
        c.model.validate()?;
        check(
            c.threads <= MAX_THREADS,
            "threads",
            &format!("must be at most {MAX_THREADS} (0 = all cores)"),
        )?;
        check(
            c.offload.params != ParamsPlacement::Stream || c.train.recompute != Recompute::None,
            "offload.params",
            "streamed weights are fetched block by block: set train.recompute = \"blocks\" \
             (or \"auto\")",
        )?;
        let device = DeviceSpec::parse(&c.device);
        check(
            device.is_some(),
            "device",
            "must be `cpu` or `cuda:N` (N = the GPU's index, e.g. `cuda:0`)",
        )?;
        check(
            c.offload.ema == EmaPlacement::Host || matches!(device, Some(DeviceSpec::Cuda(_))),
            "offload.ema",
            "`device` and `mapped` fold with a GPU kernel: they need `device = \"cuda:N\"` (use `host` on the CPU)",
        )?;
        if let Some(s) = c
            .snapshots
            .at_steps
            .iter()
            .find(|&&s| s == 0 || s > c.train.steps)
        {
            bail!(
                "config key `snapshots.at_steps`: step {s} is outside the run's steps 1..={} \
                 (`train.steps`); remove it or raise `train.steps`",
                c.train.steps
            );
        }
        if c.stage1.searching() {
            let key = match c.stage1.unstable_ratio {
                RatioChoice::Auto(_) => "stage1.unstable_ratio",
                RatioChoice::Fixed(_) => "stage1.criterion",
            };
            check(
                matches!(c.train.method, Method::Ldt | Method::LdtS),
                key,
                &format!(
                    "`auto` chooses the partition of ldt and ldt-s; {} has none (set a fixed value)",
                    c.train.method.name()
                ),
            )?;
            check(
                c.data.val_fraction > 0.0,
                "data.val_fraction",
                &format!(
                    "`{key} = \"auto\"` scores its candidates on held-out source examples \
                     (never on a target domain): set data.val_fraction, e.g. 0.1"
                ),
            )?;
            let cycle = c.ldt_s.p_steps + c.ldt_s.a_steps;
            check(
                c.train.method != Method::LdtS || c.ldt_s.repeat_batch || c.stage1.probe_steps >= cycle,
                "stage1.probe_steps",
                &format!(
                    "a probe shorter than one LDT-S cycle (ldt_s.p_steps + ldt_s.a_steps = {cycle}) \
                     never trains the unstable set: make it at least {cycle}"
                ),
            )?;
            check(
                c.stage1.probe_steps <= c.train.steps,
                "stage1.probe_steps",
                &format!(
                    "a probe is the run's first steps with one candidate: at most train.steps ({})",
                    c.train.steps
                ),
            )?;
        }
        check(
            !(c.train.method == Method::LdtS
                && c.ldt_s.repeat_batch
                && c.ldt_s.p_steps != c.ldt_s.a_steps),
            "ldt_s.repeat_batch",
            &format!(
                "phase A replays phase P's batches, so `ldt_s.p_steps` ({}) must equal \
                 `ldt_s.a_steps` ({}); make them equal or set `ldt_s.repeat_batch = false`",
                c.ldt_s.p_steps, c.ldt_s.a_steps
            ),
        )?;
        self.check_repartition()
    }

    /// `stage1.repartition_every` where a re-partition has a meaning: the scored sets of
    /// `ldt` and `ldt-s` (not a partition file's or the `names` criterion's sets), D2
    /// from the seeded split (not `data.schedule`), and for `ldt-s` at the end of a
    /// cycle of phases, where no phase is half done.
    fn check_repartition(&self) -> Result<()> {
        let (c, n, key) = (
            self,
            self.stage1.repartition_every,
            "stage1.repartition_every",
        );
        if n == 0 {
            return Ok(());
        }
        let method = c.train.method;
        check(
            matches!(method, Method::Ldt | Method::LdtS),
            key,
            &format!(
                "a re-partition moves layers between LDT's stable and unstable sets, which \
                 only `ldt` and `ldt-s` have (`train.method` = \"{}\"); set it to 0",
                method.name()
            ),
        )?;
        check(
            c.stage1.partition.is_none(),
            key,
            "the sets come from the file `stage1.partition`, which a re-partition would \
             replace with computed ones; remove `stage1.partition` or set this to 0",
        )?;
        check(
            c.stage1.criterion != CriterionChoice::Fixed(Criterion::Names),
            key,
            "the `names` criterion fixes the sets by name, so a re-partition cannot move a \
             layer; choose a scored `stage1.criterion` or set this to 0",
        )?;
        check(
            c.data.schedule.is_none(),
            key,
            "a re-partition draws fresh batches from the seeded statistics split D2, which \
             `data.schedule` replaces by its own batches; remove `data.schedule` or set this to 0",
        )?;
        if method != Method::LdtS {
            return Ok(());
        }
        let (p, a) = (c.ldt_s.p_steps, c.ldt_s.a_steps);
        let (cycle, what) = match c.ldt_s.repeat_batch {
            true => (
                p,
                format!("`ldt_s.p_steps` ({p}) with `ldt_s.repeat_batch`"),
            ),
            false => (
                p + a,
                format!("`ldt_s.p_steps` + `ldt_s.a_steps` ({p} + {a})"),
            ),
        };
        check(
            n.is_multiple_of(cycle),
            key,
            &format!(
                "ldt-s re-partitions at the end of a cycle of phases, so {n} must be a \
                 multiple of the cycle, {what}; e.g. {}",
                cycle * n.div_ceil(cycle)
            ),
        )
    }

    /// The resolved configuration as TOML (written into every run directory).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a Config always serializes")
    }
}

/// A config file as its relative paths see it.
struct ConfigFile<'a> {
    /// Its name in errors.
    name: &'a str,
    /// Its directory, canonical.
    dir: &'a Path,
    /// Its table as written, before the overrides.
    written: &'a toml::Table,
    /// The `--set` overrides.
    overrides: &'a [String],
}

impl ConfigFile<'_> {
    /// Whether the file itself sets `key` (`a.b`) and no `--set` replaces it (or its
    /// section).
    fn sets(&self, key: &str) -> bool {
        let replaced = self.overrides.iter().any(|o| {
            let k = o.split_once('=').map_or(o.as_str(), |(k, _)| k).trim();
            key == k
                || key
                    .strip_prefix(k)
                    .is_some_and(|rest| rest.starts_with('.'))
        });
        let mut parts = key.split('.').peekable();
        let mut table = self.written;
        while let Some(p) = parts.next() {
            match (table.get(p), parts.peek()) {
                (Some(_), None) => return !replaced,
                (Some(toml::Value::Table(t)), Some(_)) => table = t,
                _ => return false,
            }
        }
        false
    }

    /// Relative `path` of `key` against the file's directory; an error when it does not
    /// exist there but does against the working directory `cwd` (where such paths used
    /// to resolve), naming the key, the file and the path to write instead.
    fn resolve(&self, key: &str, path: &Path, cwd: &Path) -> Result<PathBuf> {
        let here = join_relative(self.dir, path);
        let there = join_relative(cwd, path);
        if !here.exists() && there.exists() && here != there {
            bail!(
                "config {}: config key `{key}`: `{}` does not exist relative to the config                  file's directory {}, but does relative to the working directory; paths in                  a config file resolve against the file's directory: write it as `{}`                  (relative to the config file) or as an absolute path",
                self.name,
                path.display(),
                self.dir.display(),
                relative_path(&there, self.dir).display()
            );
        }
        Ok(here)
    }
}

/// `base` (absolute, without symlinks) joined with the relative `rel`, each leading
/// `.` dropped and each leading `..` taken off `base` (what the OS does with them, since
/// `base` holds no symlink).
fn join_relative(base: &Path, rel: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = base.to_path_buf();
    let mut rest = rel.components().peekable();
    while let Some(c) = rest.peek() {
        match c {
            Component::CurDir => {}
            Component::ParentDir if out.parent().is_some() => {
                out.pop();
            }
            _ => break,
        }
        rest.next();
    }
    out.extend(rest);
    out
}

/// `target` relative to the directory `base` (both absolute; `base` without symlinks).
fn relative_path(target: &Path, base: &Path) -> PathBuf {
    let t: Vec<_> = target.components().collect();
    let b: Vec<_> = base.components().collect();
    let common = t.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut out = PathBuf::new();
    for _ in common..b.len() {
        out.push("..");
    }
    out.extend(&t[common..]);
    out
}

/// The first override that, applied after the ones before it, makes `text` fail to
/// deserialize, with that error (`text` itself deserializes).
fn first_bad_override<'a>(
    text: &str,
    overrides: &'a [String],
) -> Option<(&'a str, toml::de::Error)> {
    let mut table: toml::Table = toml::from_str(text).ok()?;
    for o in overrides {
        apply_override(&mut table, o).ok()?;
        let merged = toml::to_string(&table).ok()?;
        if let Err(e) = toml::from_str::<Config>(&merged) {
            return Some((o.as_str(), e));
        }
    }
    None
}

/// Applies one `a.b.c=value` override to a TOML table.
fn apply_override(table: &mut toml::Table, spec: &str) -> Result<()> {
    let Some((key, raw)) = spec.split_once('=') else {
        bail!("--set `{spec}`: expected key=value, e.g. --set train.steps=100");
    };
    let key = key.trim();
    let raw = raw.trim();
    if key.is_empty() {
        bail!("--set `{spec}`: empty key");
    }
    let value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").expect("parsed a table with key v"),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let parts: Vec<&str> = key.split('.').collect();
    let mut cur = table;
    for p in &parts[..parts.len() - 1] {
        let entry = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = match entry {
            toml::Value::Table(t) => t,
            _ => bail!("--set `{spec}`: `{p}` is a value, not a section"),
        };
    }
    cur.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_authors_settings() {
        let c = Config::default();
        assert_eq!(c.optim.betas[0], 0.0);
        assert_eq!(c.optim.betas[1], 0.99f64.powf(0.8));
        assert_eq!(c.optim.lr, 1e-4);
        assert_eq!(c.ldt.ema_every, 10);
        assert_eq!(c.stage1.unstable_ratio, RatioChoice::Fixed(0.5));
        c.validate().unwrap();
    }

    #[test]
    fn devices_are_cpu_or_cuda_n() {
        assert_eq!(DeviceSpec::parse("cpu"), Some(DeviceSpec::Cpu));
        assert_eq!(DeviceSpec::parse("cuda:0"), Some(DeviceSpec::Cuda(0)));
        assert_eq!(DeviceSpec::parse("cuda:12"), Some(DeviceSpec::Cuda(12)));
        for bad in [
            "cuda", "cuda:", "cuda:-1", "cuda:+1", "cuda:1x", "gpu:0", "CPU", "",
        ] {
            assert_eq!(DeviceSpec::parse(bad), None, "{bad}");
            let e = Config::from_toml("", "t", &[format!("device=\"{bad}\"")]).unwrap_err();
            assert!(format!("{e:#}").contains("`cuda:N`"), "{e:#}");
        }
    }

    #[test]
    fn gpu_folds_need_a_gpu() {
        for ema in ["device", "mapped"] {
            let set = |dev: &str| {
                vec![
                    format!("offload.ema=\"{ema}\""),
                    format!("device=\"{dev}\""),
                ]
            };
            let e = Config::from_toml("", "t", &set("cpu")).unwrap_err();
            assert!(format!("{e:#}").contains("offload.ema"), "{e:#}");
            let c = Config::from_toml("", "t", &set("cuda:1")).unwrap();
            assert_eq!(
                c.offload.ema,
                if ema == "device" {
                    EmaPlacement::Device
                } else {
                    EmaPlacement::Mapped
                }
            );
        }
        let e = Config::from_toml("", "t", &["offload.ema=\"gpu\"".into()]).unwrap_err();
        assert!(format!("{e:#}").contains("ema"), "{e:#}");
    }

    #[test]
    fn overrides_apply_and_unknown_keys_fail() {
        let c = Config::from_toml(
            "",
            "t",
            &["train.steps=7".into(), "train.method=ldt".into()],
        )
        .unwrap();
        assert_eq!(c.train.steps, 7);
        assert_eq!(c.train.method, Method::Ldt);
        let e = Config::from_toml("", "t", &["train.stepz=7".into()]).unwrap_err();
        assert!(format!("{e:#}").contains("stepz"), "{e:#}");
        let e = Config::from_toml("[train]\nsteps = \"x\"\n", "t", &[]).unwrap_err();
        assert!(format!("{e:#}").contains("steps"), "{e:#}");
        let e = Config::from_toml("", "t", &["stage1.unstable_ratio=1.5".into()]).unwrap_err();
        assert!(format!("{e:#}").contains("stage1.unstable_ratio"), "{e:#}");
    }
}
