//! `edsr`: BasicSR's `EDSR` (super-resolution, "Enhanced Deep Residual Networks") with
//! BasicSR's parameter names, order and layouts.
//!
//! `x = (x - rgb_mean) * 255` -> `conv_first` -> `body.{i}` (ResidualBlockNoBN: `conv1`
//! -> ReLU -> `conv2`, `identity + out * res_scale`) -> `conv_after_body`, plus the
//! output of `conv_first` (the global skip) -> `upsample` (scale 2^n: n times
//! [`upsample.{2i}` conv to 4F channels, PixelShuffle(2)]; scale 3: [`upsample.0` conv to
//! 9F, PixelShuffle(3)]) -> `conv_last` (the head) -> `x / 255 + rgb_mean`. Every
//! convolution is 3x3, padding 1, with a bias. The mean and the range are constants, as
//! in BasicSR (`self.mean` is a plain attribute there, not in its `state_dict`): EDSR has
//! no buffers.
//!
//! Init: PyTorch's default for every convolution (kaiming-uniform `a = sqrt(5)`, bias
//! `U(+-1/sqrt(fan_in))`): BasicSR's EDSR builds its residual blocks with
//! `pytorch_init=True` (so `default_init_weights` is not applied) and its other layers
//! are plain `nn.Conv2d`s it never re-initializes.

use super::{layers, BlockSpec, BufferSpec, Init, Mode, Network, Segment, TensorSpec};
use anyhow::{bail, Result};
use candle_core::Tensor;

/// BasicSR's `rgb_mean` default (the DIV2K mean, RGB).
pub const RGB_MEAN: [f32; 3] = [0.4488, 0.4371, 0.4040];

/// BasicSR's `img_range` default: inputs in [0, 1] are worked on in [0, 255].
pub const IMG_RANGE: f32 = 255.0;

/// The size settings of an EDSR (`model.scale`, `num_feat`, `num_block`, `res_scale`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EdsrShape {
    /// Upscaling factor: 2, 3 or 4 ([`crate::config::EDSR_SCALES`]).
    pub scale: usize,
    /// Feature channels F.
    pub num_feat: usize,
    /// Residual blocks of the body.
    pub num_block: usize,
    /// Factor on each residual branch before its add.
    pub res_scale: f64,
}

/// BasicSR's EDSR over `[3, H, W]` low-resolution inputs.
pub struct Edsr {
    input: [usize; 3],
    shape: EdsrShape,
    /// The PixelShuffle factor of each upsampling stage.
    stages: Vec<usize>,
    params: Vec<TensorSpec>,
    /// The forward's blocks: `conv_first` (with the mean shift), the body, each
    /// upsampling stage, `conv_last` (with the shift back).
    blocks: Vec<BlockSpec>,
}

/// Appends the specs of a 3x3 convolution `[out, inp, 3, 3]` with a bias, both at
/// PyTorch's default init.
fn conv(params: &mut Vec<TensorSpec>, name: &str, out: usize, inp: usize) {
    let fan_in = inp * 9;
    params.push(TensorSpec {
        name: format!("{name}.weight"),
        shape: vec![out, inp, 3, 3],
        init: Init::FanIn(fan_in),
    });
    params.push(TensorSpec {
        name: format!("{name}.bias"),
        shape: vec![out],
        init: Init::FanIn(fan_in),
    });
}

/// A 3x3 convolution, padding 1, with its bias.
fn conv3(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    layers::conv2d(x, w, Some(b), 1, 1)
}

impl Edsr {
    /// An EDSR for `input` `[3, H, W]` (any positive size: every layer is convolutional).
    pub fn new(input: [usize; 3], shape: EdsrShape) -> Result<Self> {
        let EdsrShape {
            scale,
            num_feat: f,
            num_block,
            res_scale,
        } = shape;
        if input[0] != 3 {
            bail!(
                "config key `model.arch`: edsr takes RGB images (3 channels), the data has {}",
                input[0]
            );
        }
        if input[1] == 0 || input[2] == 0 {
            bail!("edsr: empty {}x{} input", input[1], input[2]);
        }
        let stages = match scale {
            2 => vec![2],
            3 => vec![3],
            4 => vec![2, 2],
            _ => bail!("config key `model.scale`: edsr upscales by 2, 3 or 4, not {scale}"),
        };
        if f == 0 {
            bail!("config key `model.num_feat`: must be at least 1");
        }
        if !res_scale.is_finite() {
            bail!("config key `model.res_scale`: must be a finite number, got {res_scale}");
        }
        let mut params = Vec::new();
        let mut blocks = Vec::new();
        let mut block = |params: &[TensorSpec], at: usize| {
            blocks.push(BlockSpec {
                params: at..params.len(),
                buffers: 0..0,
            })
        };
        conv(&mut params, "conv_first", f, 3);
        block(&params, 0);
        for i in 0..num_block {
            conv(&mut params, &format!("body.{i}.conv1"), f, f);
            conv(&mut params, &format!("body.{i}.conv2"), f, f);
        }
        conv(&mut params, "conv_after_body", f, f);
        block(&params, 2);
        // BasicSR's `Upsample` is an nn.Sequential of [conv, PixelShuffle] pairs: the
        // convolutions are its entries 0, 2, ...
        for (i, &r) in stages.iter().enumerate() {
            let at = params.len();
            conv(&mut params, &format!("upsample.{}", 2 * i), r * r * f, f);
            block(&params, at);
        }
        let at = params.len();
        conv(&mut params, "conv_last", 3, f);
        block(&params, at);
        Ok(Edsr {
            input,
            shape,
            stages,
            params,
            blocks,
        })
    }

    /// `(x - mean) * range` or, with `back`, `x / range + mean`, mean per channel (in
    /// the dtype of `x`, as BasicSR's `self.mean.type_as(x)`).
    fn shift(x: &Tensor, back: bool) -> Result<Tensor> {
        let mean = Tensor::from_slice(&RGB_MEAN, (1, 3, 1, 1), x.device())?.to_dtype(x.dtype())?;
        if back {
            // A division, as in PyTorch (`x * (1/255)` would round differently).
            let range = Tensor::new(IMG_RANGE, x.device())?.to_dtype(x.dtype())?;
            return Ok(x.broadcast_div(&range)?.broadcast_add(&mean)?);
        }
        Ok((x.broadcast_sub(&mean)? * IMG_RANGE as f64)?)
    }
}

impl Network for Edsr {
    fn arch(&self) -> &str {
        "edsr"
    }
    fn params(&self) -> &[TensorSpec] {
        &self.params
    }
    fn buffers(&self) -> &[BufferSpec] {
        &[]
    }
    /// `conv_last`: the reconstruction layer, features to RGB — the layer whose role a
    /// classifier's last layer plays, and the same shape at every scale. The upsampler
    /// is not in it: it is most of the network's tail at 4x (two 4F-channel
    /// convolutions) and learns features, not the output's colour mapping.
    fn head_prefixes(&self) -> Vec<String> {
        vec!["conv_last.".into()]
    }
    /// The low-resolution input `[3, H, W]`.
    fn input_shape(&self) -> [usize; 3] {
        self.input
    }
    /// 0: not a classifier.
    fn num_classes(&self) -> usize {
        0
    }
    /// `[3, s*H, s*W]`.
    fn output_shape(&self) -> Vec<usize> {
        let s = self.shape.scale;
        vec![3, s * self.input[1], s * self.input[2]]
    }
    fn blocks(&self) -> &[BlockSpec] {
        &self.blocks
    }
    fn forward_block(
        &self,
        k: usize,
        p: &[Tensor],
        b: &mut [Tensor],
        x: &Tensor,
        mode: Mode,
    ) -> Result<Tensor> {
        let last = self.blocks.len() - 1;
        match k {
            0 => conv3(&Self::shift(x, false)?, &p[0], &p[1]),
            1 => super::fold_segments(self, k, p, b, x, mode),
            k if k == last => Self::shift(&conv3(x, &p[0], &p[1])?, true),
            k => layers::pixel_shuffle(&conv3(x, &p[0], &p[1])?, self.stages[k - 2]),
        }
    }

    /// The body (block 1) is one segment per residual block and a last one for
    /// `conv_after_body` and the global skip: the skip spans the body, so its segments
    /// carry `[h, x]` — the running features, then the body's input — and the last
    /// returns `[conv_after_body(h) + x]`. (That order makes the body's input collect
    /// its three gradients — the skip's, the first residual add's, the first
    /// convolution's — in the order of one backward through the whole graph, so a
    /// recomputed backward gives the same bits.) Every other block is one segment.
    fn segments(&self, k: usize) -> Vec<Segment> {
        if k != 1 {
            return vec![Segment::whole(&self.blocks[k])];
        }
        let seg = |params| Segment {
            params,
            buffers: 0..0,
        };
        let n = self.shape.num_block;
        (0..n)
            .map(|i| seg(4 * i..4 * i + 4))
            .chain([seg(4 * n..4 * n + 2)])
            .collect()
    }

    fn forward_segment(
        &self,
        k: usize,
        j: usize,
        p: &[Tensor],
        b: &mut [Tensor],
        carried: &[Tensor],
        mode: Mode,
    ) -> Result<Vec<Tensor>> {
        if k != 1 {
            return match (j, carried) {
                (0, [x]) => Ok(vec![self.forward_block(k, p, b, x, mode)?]),
                _ => bail!(
                    "edsr: block {k} has no segment {j} of {} tensors",
                    carried.len()
                ),
            };
        }
        let n = self.shape.num_block;
        // The running features and the body's input.
        let (h, x) = match carried {
            [x] if j == 0 => (x, x),
            [h, x] if j > 0 && j <= n => (h, x),
            _ => bail!(
                "edsr: the body has no segment {j} of {} tensors",
                carried.len()
            ),
        };
        if j == n {
            return Ok(vec![(conv3(h, &p[0], &p[1])? + x)?]);
        }
        let r = conv3(&layers::relu(&conv3(h, &p[0], &p[1])?)?, &p[2], &p[3])?;
        // `out * res_scale` (BasicSR): by 1 it is the identity, and left out.
        let s = self.shape.res_scale;
        let r = if s == 1.0 { r } else { (r * s)? };
        Ok(vec![(h + r)?, x.clone()])
    }
}
