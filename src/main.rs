//! The `ldt` command line. Exit codes: 0 success, 1 the run failed, 2 bad command line
//! or configuration, 3 stopped by SIGTERM/SIGINT/SIGUSR1 after writing a checkpoint (requeue
//! with --resume), 4 a second signal exited at once.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use ldt::config::Config;
use ldt::train::compare::Variant;
use ldt::train::{run_method, RunContext};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Layer-Decomposition Training: rank layers by gradient variance, train stable and
/// unstable layers in cross-frozen branches, keep one composite network.
#[derive(Parser)]
#[command(name = "ldt", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train with a config file; outputs go to the run directory.
    Train {
        /// TOML config (see configs/reference.toml for every key).
        config: PathBuf,
        /// Override a config key, e.g. --set train.steps=100 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Run directory (default: runs/<config name>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Continue from the newest complete checkpoint in the run directory
        /// (same as --set checkpoint.resume="auto").
        #[arg(long)]
        resume: bool,
        /// Replace another run's outputs in the run directory (same as
        /// --set checkpoint.overwrite=true); without it such a directory is refused.
        #[arg(long)]
        overwrite: bool,
    },
    /// Evaluate a weights file on every domain of the config's benchmark.
    Eval {
        /// TOML config naming the model and the data.
        config: PathBuf,
        /// Weights with PyTorch names: safetensors, or a PyTorch checkpoint (.pth).
        #[arg(long)]
        weights: PathBuf,
        /// Override a config key (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Print the report as JSON alone (for scripts) instead of one line per domain.
        #[arg(long)]
        json: bool,
    },
    /// Stage 1 alone: warm-up, statistics, partition report (partition.json, .svg, .png);
    /// with `auto` settings also the search (search.json), whose partition
    /// `stage1.partition` can then reuse.
    Stats {
        /// TOML config.
        config: PathBuf,
        /// Override a config key (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Run directory (default: runs/<config name>-stats).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Run several methods over several seeds and print the comparison tables.
    Compare {
        /// TOML config shared by every run.
        config: PathBuf,
        /// Comma-separated methods: erm, lp-ft, deft, ldt, ldt-s; deft, ldt and ldt-s may
        /// carry a DPU warm-up, e.g. ldt+ratio (= ldt with ldt.dpu_warmup = "ratio"), ldt+timm;
        /// ldt and ldt-s an unstable ratio, e.g. ldt-s@0.3 (= stage1.unstable_ratio = 0.3)
        /// or ldt-s+auto (chosen by the search on source validation data).
        #[arg(long, value_delimiter = ',', default_value = "erm,lp-ft,deft,ldt", value_parser = parse_variant)]
        methods: Vec<Variant>,
        /// Comma-separated seeds.
        #[arg(long, value_delimiter = ',', default_value = "0,1,2")]
        seeds: Vec<u64>,
        /// Comma-separated evaluation steps for the by-step table (target accuracy and
        /// paired difference to erm), e.g. 500,1000,3000: multiples of eval.every or the
        /// last step (default: the last step).
        #[arg(long, value_delimiter = ',')]
        at: Vec<usize>,
        /// Override a config key (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Directory for the runs and the table (default: runs/<config name>-compare).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Replace the runs an earlier comparison left in that directory (same as
        /// --set checkpoint.overwrite=true).
        #[arg(long)]
        overwrite: bool,
    },
    /// Check a run directory's checkpoints and exported weights against their recorded
    /// checksums (exit 1 if anything is damaged).
    VerifyCheckpoint {
        /// Run directory (the --out of `ldt train`).
        dir: PathBuf,
    },
    /// Redraw partition.svg / partition.png of a run directory.
    Plot {
        /// Run directory.
        dir: PathBuf,
    },
    /// Side-by-side step time and memory of erm / ldt resident / ldt swap / ldt-s, and
    /// EMA throughput against memcpy.
    Bench {
        /// Steps per cnn run (the 11.6M-parameter mlp runs a fifth of it).
        #[arg(long, default_value_t = 100)]
        steps: usize,
        /// CPU threads (0 = all cores).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Directory for the benchmark runs.
        #[arg(long, default_value = "runs/bench")]
        out: PathBuf,
        /// Instead: the memory table (backbone x method x optimizer placement: device
        /// peak planned and measured, process peak, step time).
        #[arg(long)]
        memory: bool,
        /// `--memory`: the backbones, on the bundled data.
        #[arg(long, value_delimiter = ',', default_value = "cnn,resnet18,vit")]
        archs: Vec<String>,
        /// `--memory`: examples per batch.
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// `--memory`: random images of this shape (e.g. 3x224x224) instead of the
        /// bundled data.
        #[arg(long)]
        input: Option<String>,
        /// `--memory`: `adam` (the authors': beta1 = 0, one moment) or `adamw` (betas
        /// 0.9/0.999, weight decay 0.05: two moments), lr 1e-3.
        #[arg(long, default_value = "adam")]
        optim: String,
        /// `--memory`: the device (`cpu`, `cuda:0`).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// `--memory`: also erm and ldt-s in bf16 with the optimizer on the host (bf16
        /// working weights on the device, f32 masters on the host).
        #[arg(long)]
        bf16: bool,
        /// `--memory`: also rows with block-wise recompute (`train.recompute = "blocks"`).
        #[arg(long)]
        recompute: bool,
        /// `--memory`: also erm and ldt-s with block-wise recompute and streamed weights
        /// (`offload.params = "stream"`: with the optimizer on the host every layer, with
        /// it on the device the frozen set).
        #[arg(long)]
        stream: bool,
        /// Instead: the training step of each backbone (`--archs`, also `vit-tiny`,
        /// `vit-small`) and method (`--methods`) on random images of `--input`, as JSON
        /// rows (ms/step, parameters, stable set): what `scripts/torch-compare.py` sets
        /// beside PyTorch's step.
        #[arg(long)]
        step: bool,
        /// `--step`: the methods (erm, ldt, ldt-s).
        #[arg(long, value_delimiter = ',', default_value = "erm,ldt,ldt-s")]
        methods: Vec<String>,
    },
    /// Print version, device (with `--features cuda`: driver, PTX ISA, every GPU), threads
    /// and allocator.
    Info,
    /// Check a network against reference outputs: eval and train logits, train loss,
    /// every gradient and the BatchNorm running statistics after one train forward.
    VerifyModel {
        /// Architecture (`model.arch`), e.g. resnet18 or vit.
        #[arg(long)]
        arch: String,
        /// Override a model key, e.g. --set model.depth=3 (repeatable).
        #[arg(long = "set", value_name = "model.KEY=VALUE")]
        set: Vec<String>,
        /// Safetensors weights with PyTorch names (state_dict).
        #[arg(long)]
        weights: PathBuf,
        /// Safetensors with `input` [B,C,H,W] and `labels` [B], plus any reference
        /// outputs (`logits_eval`, `logits_train`, `loss_train`, `grad.*`,
        /// `after_train_forward.*`) to compare with.
        #[arg(long)]
        input: PathBuf,
        /// Safetensors file for the computed outputs (the same key names).
        #[arg(long)]
        out: PathBuf,
    },
}

/// `ldt verify-checkpoint`: one line per checkpoint and file; an error if any is damaged.
fn verify_checkpoint(dir: &Path) -> Result<()> {
    let verdicts = ldt::checkpoint::verify_run(dir)?;
    let mut damaged = 0;
    for v in &verdicts {
        match &v.result {
            Ok(what) => println!("ok       {}: {what}", v.path.display()),
            Err(e) => {
                damaged += 1;
                println!("DAMAGED  {}: {e:#}", v.path.display());
            }
        }
    }
    match (verdicts.len(), damaged) {
        (0, _) => anyhow::bail!(
            "{} holds no checkpoint and no safetensors file",
            dir.display()
        ),
        (n, 0) => {
            println!("{n} checked, all intact");
            Ok(())
        }
        (n, d) => anyhow::bail!("{d} of {n} damaged in {}", dir.display()),
    }
}

/// A configuration or command-line problem (exit code 2).
struct UsageError(anyhow::Error);

fn load(config: &Path, set: &[String]) -> std::result::Result<Config, UsageError> {
    Config::load(config, set).map_err(UsageError)
}

fn default_out(config: &Path) -> PathBuf {
    let stem = config.file_stem().and_then(|s| s.to_str()).unwrap_or("run");
    PathBuf::from("runs").join(stem)
}

fn train(config: &Path, set: &[String], out: Option<PathBuf>) -> Result<()> {
    let cfg = load(config, set).map_err(|e| e.0)?;
    ldt::init_threads(cfg.threads);
    let dir = out.unwrap_or_else(|| default_out(config));
    let mut ctx = RunContext::open(cfg, &dir)?;
    ctx.signals = Some(ldt::checkpoint::Signals::install()?);
    println!(
        "ldt {}: {} on {} ({} parameters), run directory {}",
        env!("CARGO_PKG_VERSION"),
        ctx.cfg.train.method.name(),
        ctx.net.arch(),
        ctx.net.numel(),
        dir.display()
    );
    run_method(&mut ctx)?;
    for (name, r) in &ctx.summary.eval {
        println!("{name:>10}: {}", r.line());
    }
    if let (Some(p), Some(m)) = (&ctx.summary.memory, &ctx.summary.measured_memory) {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        println!(
            "device memory (MiB): planned {:.1} (weights {:.1}, gradients {:.1}, optimizer {:.1}, \
             staging {:.1}, activations {:.1}); measured in training {:.1}",
            mib(p.device_peak),
            mib(p.live_weights),
            mib(p.gradients),
            mib(p.optimizer),
            mib(p.staging),
            mib(p.activations),
            mib(m.device("train").unwrap_or(0))
        );
    }
    if let Some(m) = &ctx.summary.measured_memory {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        let stages: Vec<String> = m
            .stages
            .iter()
            .map(|(k, v)| format!("{k} {:.1}", mib(*v)))
            .collect();
        println!(
            "heap peaks (MiB): {}; host arena {:.1}; host baseline {:.1} (data, logs)",
            stages.join(", "),
            mib(m.host_arena_peak),
            mib(m.baseline)
        );
        if !m.device_used.is_empty() {
            let used: Vec<String> = m
                .device_used
                .iter()
                .map(|(k, v)| format!("{k} {:.1}", mib(*v)))
                .collect();
            println!(
                "device memory used, driver (MiB of {:.1}): {}",
                mib(m.device_total),
                used.join(", ")
            );
        }
    }
    println!("outputs in {}", dir.display());
    Ok(())
}

/// `CxHxW` (e.g. `3x224x224`) as a shape.
fn parse_shape(s: &str) -> Result<[usize; 3]> {
    let v: Vec<usize> = s
        .split('x')
        .map(|d| d.parse::<usize>().ok().filter(|&d| d > 0))
        .collect::<Option<_>>()
        .with_context(|| {
            format!("--input `{s}`: expected CxHxW with positive sizes, e.g. 3x224x224")
        })?;
    match v[..] {
        [c, h, w] => Ok([c, h, w]),
        _ => anyhow::bail!("--input `{s}`: expected three sizes CxHxW, e.g. 3x224x224"),
    }
}

fn eval(config: &Path, weights: &Path, set: &[String], json: bool) -> Result<()> {
    let mut cfg = load(config, set).map_err(|e| e.0)?;
    ldt::init_threads(cfg.threads);
    let device = ldt::device(&cfg)?;
    // The input the weights were trained with (size, normalization) wins over the config's.
    let meta = ldt::model::io::file_metadata(weights).context("--weights")?;
    let w = weights.display().to_string();
    let bench = match ldt::data::prep::InputSpec::from_metadata(&meta, &w)? {
        Some(spec) => {
            let (bench, changes) = ldt::data::Benchmark::open_as_recorded(&cfg, &spec, &w)?;
            for change in changes {
                eprintln!("{w} was trained with {change}: evaluating with it");
            }
            bench
        }
        None => ldt::data::Benchmark::open(&cfg)?,
    };
    bench.settle(&mut cfg)?;
    let net = ldt::model::build(&cfg.model, bench.shape(), bench.num_classes())?;
    let state = ldt::model::io::load_state(net.as_ref(), weights, &device).context("--weights")?;
    let r = ldt::train::eval::evaluate(
        net.as_ref(),
        &ldt::model::Weights::of(state.frozen_view()),
        &state.buffers,
        &bench,
        (
            cfg.eval.batch_size,
            &ldt::task::Scoring::of(&cfg, bench.task, bench.scale),
        ),
        &device,
    )?;
    match json {
        true => println!("{}", serde_json::to_string_pretty(&r)?),
        false => println!("{}", r.line()),
    }
    Ok(())
}

fn stats(config: &Path, set: &[String], out: Option<PathBuf>) -> Result<()> {
    let cfg = load(config, set).map_err(|e| e.0)?;
    ldt::init_threads(cfg.threads);
    let dir =
        out.unwrap_or_else(|| PathBuf::from(format!("{}-stats", default_out(config).display())));
    let mut ctx = RunContext::open(cfg, &dir)?;
    // `auto` settings are chosen by probes of training: the search runs them.
    let p = if ctx.cfg.stage1.searching() {
        ctx.decide_memory()?;
        ldt::train::search::run(&mut ctx)?.partition
    } else {
        let mut state = ctx.start_state(ctx.stage1_resume.as_ref())?;
        ldt::train::stage1::run(&mut ctx, &mut state)?
    };
    println!(
        "{:<40} {:>10} {:>12} {:>9} {:>10}",
        "layer", "numel", "score", "set", "w"
    );
    for l in &p.layers {
        println!(
            "{:<40} {:>10} {:>12.4e} {:>9} {:>10.6}",
            l.name,
            l.numel,
            l.score,
            format!("{:?}", l.set).to_lowercase(),
            l.coefficient
        );
    }
    ldt::train::report::draw(&dir)?;
    println!(
        "partition report in {}",
        dir.join("partition.json").display()
    );
    if let Some(b) = ldt::metrics::peak_rss_bytes() {
        println!("peak RSS {b} bytes");
    }
    Ok(())
}

/// `--methods` values (clap reports a bad one as a usage error, exit 2).
fn parse_variant(s: &str) -> std::result::Result<Variant, String> {
    Variant::parse(s.trim()).map_err(|e| format!("{e:#}"))
}

fn compare(
    config: &Path,
    methods: &[Variant],
    seeds: &[u64],
    at: &[usize],
    set: &[String],
    out: Option<PathBuf>,
) -> Result<()> {
    let cfg = load(config, set).map_err(|e| e.0)?;
    ldt::init_threads(cfg.threads);
    let dir =
        out.unwrap_or_else(|| PathBuf::from(format!("{}-compare", default_out(config).display())));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let md = ldt::train::compare::compare(&cfg, methods, seeds, at, &dir)?;
    println!("{md}");
    println!(
        "table in {} and {}",
        dir.join("compare.md").display(),
        dir.join("compare.csv").display()
    );
    Ok(())
}

fn info() {
    println!("ldt {}", env!("CARGO_PKG_VERSION"));
    #[cfg(not(feature = "cuda"))]
    println!("device: cpu (build without the `cuda` feature)");
    #[cfg(feature = "cuda")]
    print!(
        "device: cpu, or cuda:N (build with the `cuda` feature)\n{}",
        ldt::offload::cuda::info()
    );
    println!("collective engines: {}", ldt::dist::engines().join(", "));
    println!("threads: {}", candle_core::utils::get_num_threads());
    println!("allocator: mimalloc");
    println!(
        "simd: avx {} neon {} f16c {}",
        candle_core::utils::with_avx(),
        candle_core::utils::with_neon(),
        candle_core::utils::with_f16c()
    );
}

fn verify_model(
    cfg: &ldt::config::ModelConfig,
    weights: &Path,
    input: &Path,
    out: &Path,
) -> Result<()> {
    let report = ldt::verify::run(cfg, weights, input, out)?;
    println!(
        "{} outputs written to {}; deviations from {} (scaled = max|a-ref| / max|ref|):",
        report.outputs.len(),
        out.display(),
        input.display()
    );
    print!("{}", report.table());
    if !report.problems.is_empty() {
        anyhow::bail!(
            "the model's outputs do not match the reference's keys:\n  {}",
            report.problems.join("\n  ")
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    ldt::heap::keep_freed_pages();
    let cli = Cli::parse();
    // The process group of a data-parallel launch; dropped (MPI_Finalize) after the
    // command, before the exit code is returned.
    let _group = match ldt::dist::init() {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    if !ldt::dist::is_main() {
        ldt::dist::silence_stdout();
    }
    let res = match cli.cmd {
        Cmd::Train {
            config,
            mut set,
            out,
            resume,
            overwrite,
        } => {
            if resume {
                set.push("checkpoint.resume=\"auto\"".into());
            }
            if overwrite {
                set.push("checkpoint.overwrite=true".into());
            }
            match load(&config, &set) {
                Err(e) => Err(e),
                Ok(_) => Ok(train(&config, &set, out)),
            }
        }
        Cmd::Eval {
            config,
            weights,
            set,
            json,
        } => match load(&config, &set) {
            Err(e) => Err(e),
            Ok(_) => Ok(eval(&config, &weights, &set, json)),
        },
        Cmd::Stats { config, set, out } => match load(&config, &set) {
            Err(e) => Err(e),
            Ok(_) => Ok(stats(&config, &set, out)),
        },
        Cmd::Compare {
            config,
            methods,
            seeds,
            at,
            mut set,
            out,
            overwrite,
        } => match {
            if overwrite {
                set.push("checkpoint.overwrite=true".into());
            }
            load(&config, &set)
        }
        .and_then(|c| ldt::train::compare::check_steps(&c, &at).map_err(UsageError))
        {
            Err(e) => Err(e),
            Ok(()) => Ok(compare(&config, &methods, &seeds, &at, &set, out)),
        },
        Cmd::Plot { dir } => Ok(ldt::train::report::draw(&dir)),
        Cmd::Bench {
            steps,
            threads,
            out,
            memory,
            archs,
            batch,
            input,
            optim,
            device,
            bf16,
            recompute,
            stream,
            step,
            methods,
        } => Ok((|| -> Result<()> {
            ldt::init_threads(threads);
            let t = if threads == 0 {
                candle_core::utils::get_num_threads()
            } else {
                threads
            };
            if step {
                let b = ldt::bench::StepBench {
                    archs,
                    methods: methods
                        .iter()
                        .map(|m| ldt::config::Method::parse(m))
                        .collect::<Result<_>>()
                        .context("--methods")?,
                    input: parse_shape(input.as_deref().unwrap_or("1x28x28"))?,
                    batch,
                    steps,
                    threads: t,
                    precision: match bf16 {
                        true => ldt::config::Precision::Bf16,
                        false => ldt::config::Precision::F32,
                    },
                };
                let rows = ldt::bench::steps(&out, &b)?;
                let json = serde_json::to_string_pretty(&rows)?;
                std::fs::write(out.join("steps.json"), &json)?;
                println!("{json}");
                return Ok(());
            }
            let (md, file) = if memory {
                let input = input.as_deref().map(parse_shape).transpose()?;
                let mut o = ldt::config::OptimConfig {
                    lr: 1e-3,
                    ..Default::default()
                };
                match optim.as_str() {
                    "adam" => {}
                    "adamw" => {
                        o.name = ldt::config::OptimName::Adamw;
                        o.betas = [0.9, 0.999];
                        o.weight_decay = 0.05;
                    }
                    other => anyhow::bail!("--optim `{other}`: expected adam or adamw"),
                }
                (
                    ldt::bench::memory(
                        &out,
                        &ldt::bench::MemoryBench {
                            archs,
                            steps,
                            batch,
                            input,
                            optim: o,
                            device,
                            threads: t,
                            bf16,
                            recompute,
                            stream,
                        },
                    )?,
                    "memory.md",
                )
            } else {
                (ldt::bench::run(&out, steps, t)?, "bench.md")
            };
            println!("{md}");
            std::fs::write(out.join(file), &md)?;
            Ok(())
        })()),
        Cmd::Info => {
            info();
            Ok(Ok(()))
        }
        Cmd::VerifyCheckpoint { dir } => Ok(verify_checkpoint(&dir)),
        Cmd::VerifyModel {
            arch,
            set,
            weights,
            input,
            out,
        } => match ldt::verify::model_config(&arch, &set) {
            Err(e) => Err(UsageError(e)),
            Ok(cfg) => Ok(verify_model(&cfg, &weights, &input, &out)),
        },
    };
    match res {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            if let Some(i) = e.downcast_ref::<ldt::checkpoint::Interrupted>() {
                eprintln!("{i}");
                return ExitCode::from(ldt::checkpoint::EXIT_CHECKPOINTED);
            }
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
        Err(UsageError(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
