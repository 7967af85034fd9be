//! The `ldt` command line. Exit codes: 0 success, 1 the run failed, 2 bad command line
//! or configuration.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use ldt::config::Config;
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
    },
    /// Evaluate a weights file on every domain of the config's benchmark.
    Eval {
        /// TOML config naming the model and the data.
        config: PathBuf,
        /// Safetensors weights with PyTorch names.
        #[arg(long)]
        weights: PathBuf,
        /// Override a config key (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Print version, device, threads and allocator.
    Info,
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
    println!("outputs in {}", dir.display());
    Ok(())
}

fn eval(config: &Path, weights: &Path, set: &[String]) -> Result<()> {
    let cfg = load(config, set).map_err(|e| e.0)?;
    ldt::init_threads(cfg.threads);
    let device = ldt::device(&cfg)?;
    let bench = ldt::data::Benchmark::open(&cfg.data.manifest)?;
    let net = ldt::model::build(&cfg.model, bench.manifest.image_shape, bench.manifest.num_classes)?;
    let state = ldt::model::io::load_state(net.as_ref(), weights, &device).context("--weights")?;
    let r = ldt::train::eval::evaluate(net.as_ref(), &state.frozen_view(), &state.buffers, &bench, cfg.eval.batch_size, &device)?;
    println!("{}", r.line());
    println!("{}", serde_json::to_string_pretty(&r)?);
    Ok(())
}

fn info() {
    println!("ldt {}", env!("CARGO_PKG_VERSION"));
    println!("device: cpu (build without the `cuda` feature)");
    println!("threads: {}", candle_core::utils::get_num_threads());
    println!("allocator: mimalloc");
    println!("simd: avx {} neon {} f16c {}", candle_core::utils::with_avx(), candle_core::utils::with_neon(), candle_core::utils::with_f16c());
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Train { config, set, out } => {
            match load(&config, &set) {
                Err(e) => Err(e),
                Ok(_) => Ok(train(&config, &set, out)),
            }
        }
        Cmd::Eval { config, weights, set } => match load(&config, &set) {
            Err(e) => Err(e),
            Ok(_) => Ok(eval(&config, &weights, &set)),
        },
        Cmd::Info => {
            info();
            Ok(Ok(()))
        }
    };
    match res {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
        Err(UsageError(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
