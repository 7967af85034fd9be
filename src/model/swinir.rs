//! `swinir`: BasicSR's `SwinIR` (super-resolution by shifted-window attention) in its
//! lightweight form, with BasicSR's parameter and buffer names, order and layouts.
//!
//! The form: `upsampler = 'pixelshuffledirect'`, `resi_connection = '1conv'`,
//! `img_range = 1`, the DIV2K `rgb_mean`, `patch_size = 1`, `patch_norm = True`,
//! `ape = False`, qkv bias, no dropout and no drop-path (what the network computes in
//! eval mode; BasicSR's default `drop_path_rate` of 0.1 is left out, dropout rates are 0).
//!
//! `x - rgb_mean` -> `conv_first` (3x3) = `f` -> tokens `[N, H*W, D]` ->
//! `patch_embed.norm` -> for each residual group `layers.{i}` (RSTB): its Swin blocks
//! `residual_group.blocks.{j}` (`t + W-MSA(norm1(t))`, then `t + mlp(norm2(t))`, the MLP
//! `fc1` -> exact GELU -> `fc2`), the image of the result through `layers.{i}.conv`
//! (3x3) back to tokens, plus the group's input -> `norm` -> image -> `conv_after_body`
//! (3x3), plus `f` (the long skip) -> `upsample.0` (3x3 to `3*scale^2`) ->
//! PixelShuffle(scale) (the head) -> `+ rgb_mean`. LayerNorms have eps 1e-5.
//!
//! Window attention: the tokens as an `[H, W]` grid, on odd blocks cyclically shifted
//! by `-window_size/2` on both axes (`torch.roll`), cut into `window_size^2`-token
//! windows; per window and head `softmax(q k^T / sqrt(d) + B + M) v`, with `B` the
//! relative position bias, `attn.relative_position_bias_table[relative_position_index]`
//! (the index an int64 buffer), and on shifted blocks `M` the `attn_mask` buffer (-100
//! between tokens the shift brought together from different regions, 0 within one);
//! the windows put back and the shift undone. As in BasicSR, a window of the size of
//! the smaller input side or larger becomes that side, without shift (and without a
//! mask).
//!
//! Input size: the network is built for the data's `[3, H, W]`: BasicSR's `img_size`.
//! The sides must be multiples of the window (`model.window_size`; an error names it
//! otherwise): BasicSR's SwinIR network does not pad (its `SwinIRModel.test`
//! reflect-pads the input to a multiple of the window and crops the output; the original
//! SwinIR's network does so in `check_image_size`). Each shifted block's mask is
//! the buffer computed for that size, as BasicSR's `attn_mask` for `img_size`; BasicSR
//! recomputes it for an input of another size, this network refuses such an input (its
//! inputs are the data's, all of one size).
//!
//! Buffers: BasicSR registers `attn.relative_position_index` in every block and
//! `attn_mask` in the shifted ones (persistent: both are in its `state_dict()`;
//! unshifted blocks register `None`, which is not). Their initial values are computed
//! ([`Init::Table`]); a loaded checkpoint's are used as they are.
//!
//! Init (BasicSR's `_init_weights` and `WindowAttention`): Linear weights and the
//! relative position bias tables `trunc_normal_(std=.02)` ([`Init::Normal`]; cut at
//! +-2, 100 standard deviations), Linear biases zeros, LayerNorms ones and zeros, every
//! convolution PyTorch's default ([`Init::FanIn`]).
//!
//! Blocks for block-wise recompute: `conv_first` with the mean shift | the body, from
//! `patch_embed.norm` to `conv_after_body` and the long skip | the upsampler with the
//! shift back. The long skip spans the body, so the body is made of segments carrying
//! several tensors ([`Network::segments`]).

use super::edsr::RGB_MEAN;
use super::{layers, BlockSpec, BufferSpec, Init, Mode, Network, Segment, TensorSpec};
use crate::config::check_swinir_shape;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use std::ops::Range;

/// PyTorch's `nn.LayerNorm` epsilon, which BasicSR's SwinIR keeps.
pub const LN_EPS: f64 = 1e-5;

/// The value of `attn_mask` between tokens of different regions (BasicSR's).
pub const MASKED: f32 = -100.0;

/// The size settings of a SwinIR (`model.scale`, `embed_dim`, `depths`, `num_heads`,
/// `window_size`, `mlp_ratio`).
#[derive(Clone, Debug, PartialEq)]
pub struct SwinirShape {
    /// Upscaling factor: 2, 3 or 4 ([`crate::config::SWINIR_SCALES`]).
    pub scale: usize,
    /// Embedding width D.
    pub embed_dim: usize,
    /// Swin blocks of each residual group.
    pub depths: Vec<usize>,
    /// Attention heads of each residual group (each divides D).
    pub num_heads: Vec<usize>,
    /// Window side asked for (the smaller input side when that is not larger).
    pub window_size: usize,
    /// MLP hidden width = `int(D * mlp_ratio)`.
    pub mlp_ratio: f64,
}

/// What a segment of the body computes.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// `patch_embed.norm` over the tokens of `f`: `[f] -> [t, f]`.
    Embed,
    /// A Swin block's attention half (`norm1`, `attn`, the residual add):
    /// `[t, f] -> [t', t, f]` (the group's first block: `t` is the group's input) or
    /// `[t, r, f] -> [t', r, f]`.
    Attn { heads: usize, shifted: bool },
    /// A Swin block's MLP half (`norm2`, `mlp`, the residual add): `[t, r, f] -> [t', r, f]`.
    Mlp,
    /// A group's convolution and its residual add: `[t, r, f] -> [conv(t) + r, f]`.
    Conv,
    /// `norm`, `conv_after_body` and the long skip: `[t, f] -> [conv(norm(t)) + f]`.
    Tail,
}

/// One segment of the body: its kind and its parameter and buffer ranges (relative to
/// the body block's).
#[derive(Clone, Debug)]
struct Part {
    kind: Kind,
    params: Range<usize>,
    buffers: Range<usize>,
}

/// How a buffer's initial values are computed ([`Init::Table`]).
#[derive(Clone, Copy, Debug)]
enum Table {
    /// `attn.relative_position_index`.
    Index,
    /// `attn_mask` (shifted blocks).
    Mask,
}

/// BasicSR's SwinIR (lightweight form) over `[3, H, W]` low-resolution inputs.
pub struct Swinir {
    input: [usize; 3],
    shape: SwinirShape,
    /// The window side used: `window_size`, or the smaller input side when that is not
    /// larger.
    window: usize,
    /// The shift of odd blocks: `window / 2`, or 0 when the window was cut to the input.
    shift: usize,
    params: Vec<TensorSpec>,
    buffers: Vec<BufferSpec>,
    /// Per buffer, how its values are made.
    tables: Vec<Table>,
    /// The body's segments, in order.
    parts: Vec<Part>,
    /// `conv_first` | the body | the upsampler.
    blocks: Vec<BlockSpec>,
}

/// `name.weight` `[out, inp, 3, 3]` and `name.bias` at PyTorch's default init.
fn conv(params: &mut Vec<TensorSpec>, name: &str, out: usize, inp: usize) {
    let init = Init::FanIn(inp * 9);
    params.push(TensorSpec {
        name: format!("{name}.weight"),
        shape: vec![out, inp, 3, 3],
        init,
    });
    params.push(TensorSpec {
        name: format!("{name}.bias"),
        shape: vec![out],
        init,
    });
}

/// `name.weight` `[out, inp]` (trunc-normal, std 0.02) and a zero `name.bias`.
fn linear(params: &mut Vec<TensorSpec>, name: &str, out: usize, inp: usize) {
    params.push(TensorSpec {
        name: format!("{name}.weight"),
        shape: vec![out, inp],
        init: Init::Normal(0.02),
    });
    params.push(TensorSpec {
        name: format!("{name}.bias"),
        shape: vec![out],
        init: Init::Zeros,
    });
}

/// A LayerNorm's `name.weight` (ones) and `name.bias` (zeros) over `dim`.
fn norm(params: &mut Vec<TensorSpec>, name: &str, dim: usize) {
    params.push(TensorSpec {
        name: format!("{name}.weight"),
        shape: vec![dim],
        init: Init::Ones,
    });
    params.push(TensorSpec {
        name: format!("{name}.bias"),
        shape: vec![dim],
        init: Init::Zeros,
    });
}

/// A 3x3 convolution, padding 1, with its bias.
fn conv3(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    layers::conv2d(&x.contiguous()?, w, Some(b), 1, 1)
}

/// `torch.roll(x, (s, s), dims=(1, 2))` of `[N, H, W, C]`: element `i` of each axis
/// moves to `i + s` (mod the side).
fn roll(x: &Tensor, s: isize) -> Result<Tensor> {
    let mut x = x.clone();
    for dim in [1, 2] {
        let n = x.dim(dim)?;
        let s = s.rem_euclid(n as isize) as usize;
        if s != 0 {
            x = Tensor::cat(&[&x.narrow(dim, n - s, s)?, &x.narrow(dim, 0, n - s)?], dim)?;
        }
    }
    Ok(x)
}

impl Swinir {
    /// A SwinIR for `input` `[3, H, W]`, `H` and `W` multiples of the window.
    pub fn new(input: [usize; 3], shape: SwinirShape) -> Result<Self> {
        let [c, h, w] = input;
        if c != 3 {
            bail!(
                "config key `model.arch`: swinir takes RGB images (3 channels), the data has {c}"
            );
        }
        if h == 0 || w == 0 {
            bail!("swinir: empty {h}x{w} input");
        }
        if !crate::config::SWINIR_SCALES.contains(&shape.scale) {
            bail!(
                "config key `model.scale`: swinir upscales by 2, 3 or 4, not {}",
                shape.scale
            );
        }
        let d = shape.embed_dim;
        check_swinir_shape(
            d,
            &shape.depths,
            &shape.num_heads,
            shape.window_size,
            shape.mlp_ratio,
        )?;
        // BasicSR's SwinTransformerBlock: no partition (one window, no shift) when the
        // image is not larger than a window.
        let (window, shift) = match h.min(w) {
            side if side <= shape.window_size => (side, 0),
            _ => (shape.window_size, shape.window_size / 2),
        };
        if !h.is_multiple_of(window) || !w.is_multiple_of(window) {
            bail!(
                "config key `model.window_size`: the {h}x{w} inputs are not a whole number of \
                 {window}x{window} windows (swinir does not pad, as BasicSR's)"
            );
        }
        let hidden = (d as f64 * shape.mlp_ratio) as usize;
        let n = window * window;
        let windows = (h / window) * (w / window);
        let mut params = Vec::new();
        let mut buffers = Vec::new();
        let mut tables = Vec::new();
        let mut parts = Vec::new();
        conv(&mut params, "conv_first", d, 3);
        // The body's ranges are relative to its first parameter.
        let body = params.len();
        let part = |parts: &mut Vec<Part>, kind, p: Range<usize>, b: Range<usize>| {
            parts.push(Part {
                kind,
                params: p.start - body..p.end - body,
                buffers: b,
            })
        };
        norm(&mut params, "patch_embed.norm", d);
        part(&mut parts, Kind::Embed, body..params.len(), 0..0);
        for (i, (&depth, &heads)) in shape.depths.iter().zip(&shape.num_heads).enumerate() {
            for j in 0..depth {
                let p = format!("layers.{i}.residual_group.blocks.{j}");
                let shifted = j % 2 == 1 && shift > 0;
                let (at, bt) = (params.len(), buffers.len());
                if shifted {
                    buffers.push(BufferSpec {
                        name: format!("{p}.attn_mask"),
                        shape: vec![windows, n, n],
                        dtype: DType::F32,
                        init: Init::Table,
                    });
                    tables.push(Table::Mask);
                }
                buffers.push(BufferSpec {
                    name: format!("{p}.attn.relative_position_index"),
                    shape: vec![n, n],
                    dtype: DType::I64,
                    init: Init::Table,
                });
                tables.push(Table::Index);
                norm(&mut params, &format!("{p}.norm1"), d);
                params.push(TensorSpec {
                    name: format!("{p}.attn.relative_position_bias_table"),
                    shape: vec![(2 * window - 1) * (2 * window - 1), heads],
                    init: Init::Normal(0.02),
                });
                linear(&mut params, &format!("{p}.attn.qkv"), 3 * d, d);
                linear(&mut params, &format!("{p}.attn.proj"), d, d);
                let kind = Kind::Attn { heads, shifted };
                part(&mut parts, kind, at..params.len(), bt..buffers.len());
                let at = params.len();
                norm(&mut params, &format!("{p}.norm2"), d);
                linear(&mut params, &format!("{p}.mlp.fc1"), hidden, d);
                linear(&mut params, &format!("{p}.mlp.fc2"), d, hidden);
                let b = buffers.len();
                part(&mut parts, Kind::Mlp, at..params.len(), b..b);
            }
            let at = params.len();
            conv(&mut params, &format!("layers.{i}.conv"), d, d);
            let b = buffers.len();
            part(&mut parts, Kind::Conv, at..params.len(), b..b);
        }
        let at = params.len();
        norm(&mut params, "norm", d);
        conv(&mut params, "conv_after_body", d, d);
        let b = buffers.len();
        part(&mut parts, Kind::Tail, at..params.len(), b..b);
        let tail = params.len();
        conv(&mut params, "upsample.0", 3 * shape.scale * shape.scale, d);
        let blocks = vec![
            BlockSpec {
                params: 0..body,
                buffers: 0..0,
            },
            BlockSpec {
                params: body..tail,
                buffers: 0..buffers.len(),
            },
            BlockSpec {
                params: tail..params.len(),
                buffers: buffers.len()..buffers.len(),
            },
        ];
        Ok(Swinir {
            input,
            shape,
            window,
            shift,
            params,
            buffers,
            tables,
            parts,
            blocks,
        })
    }

    /// `x - mean` or, with `back`, `x + mean`, per channel in the dtype of `x` (the
    /// range is 1: BasicSR's `* img_range` and `/ img_range` change nothing).
    fn shift_mean(x: &Tensor, back: bool) -> Result<Tensor> {
        let mean = Tensor::from_slice(&RGB_MEAN, (1, 3, 1, 1), x.device())?.to_dtype(x.dtype())?;
        Ok(match back {
            true => x.broadcast_add(&mean)?,
            false => x.broadcast_sub(&mean)?,
        })
    }

    /// `[N, C, H, W] -> [N, H*W, C]` (BasicSR's `PatchEmbed` without its norm).
    fn tokens(x: &Tensor) -> Result<Tensor> {
        Ok(x.flatten_from(2)?.transpose(1, 2)?.contiguous()?)
    }

    /// `[N, H*W, C] -> [N, C, H, W]` (BasicSR's `PatchUnEmbed`).
    fn image(&self, t: &Tensor) -> Result<Tensor> {
        let (n, _, c) = t.dims3()?;
        Ok(t.transpose(1, 2)?
            .contiguous()?
            .reshape((n, c, self.input[1], self.input[2]))?)
    }

    /// `[N, H, W, C] -> [N * windows, window^2, C]`, windows row by row.
    fn partition(&self, x: &Tensor) -> Result<Tensor> {
        let (n, h, w, c) = x.dims4()?;
        let s = self.window;
        Ok(x.reshape(vec![n, h / s, s, w / s, s, c])?
            .permute((0, 1, 3, 2, 4, 5))?
            .reshape((n * (h / s) * (w / s), s * s, c))?)
    }

    /// The inverse of [`Swinir::partition`]: `-> [N, H, W, C]`.
    fn unpartition(&self, x: &Tensor) -> Result<Tensor> {
        let (s, [_, h, w]) = (self.window, self.input);
        let c = x.dim(2)?;
        let n = x.dim(0)? / ((h / s) * (w / s));
        Ok(x.reshape(vec![n, h / s, w / s, s, s, c])?
            .permute((0, 1, 3, 2, 4, 5))?
            .reshape((n, h, w, c))?)
    }

    /// BasicSR's `WindowAttention` on windows `[B, n, D]`: `q = qkv(x)` split into
    /// `heads`, `q * d^-0.5` (d the head width), `q k^T`, plus the bias `table[index]`
    /// `[heads, n, n]`, plus `mask` `[windows, n, n]` per window (shifted blocks),
    /// softmax, times `v`, heads concatenated, `proj`. `p`: `relative_position_bias_table`,
    /// `qkv.weight`, `qkv.bias`, `proj.weight`, `proj.bias`.
    fn attention(
        x: &Tensor,
        p: &[Tensor],
        index: &Tensor,
        mask: Option<&Tensor>,
        heads: usize,
    ) -> Result<Tensor> {
        let (bw, n, d) = x.dims3()?;
        let hd = d / heads;
        let qkv = layers::linear_rows(x, &p[1], Some(&p[2]))?
            .reshape(vec![bw, n, 3, heads, hd])?
            .permute((2, 0, 3, 1, 4))?;
        let q = (qkv.get(0)? * (hd as f64).powf(-0.5))?;
        let (k, v) = (qkv.get(1)?, qkv.get(2)?);
        let a = q.contiguous()?.matmul(&k.contiguous()?.t()?)?;
        let bias = p[0]
            .index_select(&index.flatten_all()?, 0)?
            .reshape((n, n, heads))?
            .permute((2, 0, 1))?;
        let a = a.broadcast_add(&bias.unsqueeze(0)?)?;
        let a = match mask {
            Some(m) => {
                let nw = m.dim(0)?;
                let m = m.to_dtype(a.dtype())?.unsqueeze(1)?.unsqueeze(0)?;
                a.reshape(vec![bw / nw, nw, heads, n, n])?
                    .broadcast_add(&m)?
                    .reshape((bw, heads, n, n))?
            }
            None => a,
        };
        let o = layers::softmax_last_dim(&a)?.matmul(&v.contiguous()?)?;
        layers::linear_rows(&o.transpose(1, 2)?.reshape((bw, n, d))?, &p[3], Some(&p[4]))
    }

    /// A Swin block's attention half on tokens `t` `[N, H*W, D]`: `t + W-MSA(norm1(t))`,
    /// the grid rolled by `-shift` before and back after on shifted blocks. `p`: `norm1`
    /// and the attention's parameters; `b`: `[attn_mask,] relative_position_index`.
    fn attention_half(
        &self,
        t: &Tensor,
        p: &[Tensor],
        b: &[Tensor],
        heads: usize,
        shifted: bool,
    ) -> Result<Tensor> {
        let (n, l, d) = t.dims3()?;
        let [_, h, w] = self.input;
        let y = layers::layer_norm(t, &p[0], &p[1], LN_EPS)?.reshape((n, h, w, d))?;
        let (mask, index) = match (shifted, b) {
            (true, [m, i]) => (Some(m), i),
            (false, [i]) => (None, i),
            _ => bail!("swinir: a block's attention takes its own buffers"),
        };
        let s = self.shift as isize;
        let y = if shifted { roll(&y, -s)? } else { y };
        let a = Self::attention(&self.partition(&y)?, &p[2..7], index, mask, heads)?;
        let y = self.unpartition(&a)?;
        let y = if shifted { roll(&y, s)? } else { y };
        Ok((t + y.reshape((n, l, d))?)?)
    }

    /// The values of buffer `i`: `relative_position_index[i][j]` of window tokens
    /// `i = (y, x)`, `j = (y', x')` is `(y - y' + s - 1) * (2s - 1) + x - x' + s - 1`;
    /// `attn_mask[k][i][j]` is -100 where tokens `i` and `j` of window `k` of the rolled
    /// grid lie in different regions (each axis cut at `-s` and `-shift`), else 0.
    fn table_values(&self, i: usize, device: &Device) -> Result<Tensor> {
        let s = self.window;
        let n = s * s;
        match self.tables[i] {
            Table::Index => {
                let mut v = Vec::with_capacity(n * n);
                for a in 0..n {
                    for b in 0..n {
                        let dy = (a / s + s - 1 - b / s) as i64;
                        let dx = (a % s + s - 1 - b % s) as i64;
                        v.push(dy * (2 * s as i64 - 1) + dx);
                    }
                }
                Ok(Tensor::from_vec(v, (n, n), device)?)
            }
            Table::Mask => {
                let [_, h, w] = self.input;
                let region = |p: usize, side: usize| match p {
                    p if p < side - s => 0,
                    p if p < side - self.shift => 1,
                    _ => 2,
                };
                let mut v = Vec::new();
                for wy in 0..h / s {
                    for wx in 0..w / s {
                        let label =
                            |k: usize| 3 * region(wy * s + k / s, h) + region(wx * s + k % s, w);
                        for a in 0..n {
                            for b in 0..n {
                                v.push(if label(a) == label(b) { 0.0 } else { MASKED });
                            }
                        }
                    }
                }
                Ok(Tensor::from_vec(v, ((h / s) * (w / s), n, n), device)?)
            }
        }
    }
}

impl Network for Swinir {
    fn arch(&self) -> &str {
        "swinir"
    }
    fn params(&self) -> &[TensorSpec] {
        &self.params
    }
    /// Per Swin block, BasicSR's `named_buffers()` order: `attn_mask` (shifted blocks),
    /// then `attn.relative_position_index`.
    fn buffers(&self) -> &[BufferSpec] {
        &self.buffers
    }
    /// `upsample.`: the reconstruction layer (one convolution to `3 * scale^2`
    /// channels, then PixelShuffle), features to RGB — the layer whose role a
    /// classifier's last layer plays.
    fn head_prefixes(&self) -> Vec<String> {
        vec!["upsample.".into()]
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
    fn table(&self, i: usize, device: &Device) -> Result<Tensor> {
        self.table_values(i, device)
    }
    fn forward_block(
        &self,
        k: usize,
        p: &[Tensor],
        b: &mut [Tensor],
        x: &Tensor,
        mode: Mode,
    ) -> Result<Tensor> {
        match k {
            0 => {
                let (_, c, h, w) = x.dims4()?;
                if [c, h, w] != self.input {
                    bail!(
                        "swinir: built for [3, {}, {}] inputs (its attention masks are that \
                         size's), given [{c}, {h}, {w}]",
                        self.input[1],
                        self.input[2]
                    );
                }
                conv3(&Self::shift_mean(x, false)?, &p[0], &p[1])
            }
            1 => super::fold_segments(self, k, p, b, x, mode),
            2 => Self::shift_mean(
                &layers::pixel_shuffle(&conv3(x, &p[0], &p[1])?, self.shape.scale)?,
                true,
            ),
            _ => bail!("swinir has 3 blocks, not block {k}"),
        }
    }

    /// The body (block 1) is a segment for `patch_embed.norm`, per Swin block one for
    /// its attention half and one for its MLP half, per residual group one for its
    /// convolution and residual add, and a last one for `norm`, `conv_after_body` and
    /// the long skip. The skip spans the body and each group's residual spans the
    /// group, so the segments carry `[t, f]` between groups and `[t, r, f]` inside one:
    /// the running tokens, the group's input tokens, the output `f` of `conv_first`.
    /// The other blocks are one segment each.
    fn segments(&self, k: usize) -> Vec<Segment> {
        if k != 1 {
            return vec![Segment::whole(&self.blocks[k])];
        }
        self.parts
            .iter()
            .map(|p| Segment {
                params: p.params.clone(),
                buffers: p.buffers.clone(),
            })
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
        let wrong = || {
            anyhow::anyhow!(
                "swinir: block {k} has no segment {j} of {} tensors",
                carried.len()
            )
        };
        if k != 1 {
            return match (j, carried) {
                (0, [x]) => Ok(vec![self.forward_block(k, p, b, x, mode)?]),
                _ => Err(wrong()),
            };
        }
        let kind = self.parts.get(j).ok_or_else(wrong)?.kind;
        Ok(match (kind, carried) {
            (Kind::Embed, [f]) => {
                let t = layers::layer_norm(&Self::tokens(f)?, &p[0], &p[1], LN_EPS)?;
                vec![t, f.clone()]
            }
            (Kind::Attn { heads, shifted }, [t, f]) => {
                vec![
                    self.attention_half(t, p, b, heads, shifted)?,
                    t.clone(),
                    f.clone(),
                ]
            }
            (Kind::Attn { heads, shifted }, [t, r, f]) => {
                vec![
                    self.attention_half(t, p, b, heads, shifted)?,
                    r.clone(),
                    f.clone(),
                ]
            }
            (Kind::Mlp, [t, r, f]) => {
                let m = layers::layer_norm(t, &p[0], &p[1], LN_EPS)?;
                let m = layers::gelu_erf(&layers::linear_rows(&m, &p[2], Some(&p[3]))?)?;
                vec![
                    (t + layers::linear_rows(&m, &p[4], Some(&p[5]))?)?,
                    r.clone(),
                    f.clone(),
                ]
            }
            (Kind::Conv, [t, r, f]) => {
                let c = conv3(&self.image(t)?, &p[0], &p[1])?;
                vec![(Self::tokens(&c)? + r)?, f.clone()]
            }
            (Kind::Tail, [t, f]) => {
                let t = layers::layer_norm(t, &p[0], &p[1], LN_EPS)?;
                vec![(conv3(&self.image(&t)?, &p[2], &p[3])? + f)?]
            }
            _ => return Err(wrong()),
        })
    }
}
