//! Command-line front end. Parses arguments and prints; all computing is in the library.

mod bench;
mod demo;
mod info;

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;
use wgdelta::case::{run_case, RunFlags};
use wgdelta::{Algorithm, Engine, TensorFile};

#[derive(Parser)]
#[command(name = "wgdelta", version, about = "Gated delta rule on any GPU (wgpu). With no command: a demo.")]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum AlgoArg {
    Auto,
    Recurrent,
    Chunked,
}

impl AlgoArg {
    pub fn resolve(self, chunk: u32) -> Algorithm {
        match self {
            AlgoArg::Auto => Algorithm::Auto,
            AlgoArg::Recurrent => Algorithm::Recurrent,
            AlgoArg::Chunked => Algorithm::Chunked { chunk },
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the adapters, the chosen one's backend, driver, granted features and key limits.
    Info,
    /// Compute a case file (see CASES.md) and write the results.
    Run {
        /// Input case (.safetensors).
        case: PathBuf,
        /// Output file (.safetensors).
        #[arg(short, long)]
        output: PathBuf,
        #[arg(long, value_enum, default_value = "auto")]
        algorithm: AlgoArg,
        /// Chunk size of the chunked algorithm (16, 32 or 64).
        #[arg(long, default_value_t = 64)]
        chunk: u32,
        /// Accumulate without atomics: two runs give byte-identical files.
        #[arg(long)]
        deterministic: bool,
    },
    /// Time forward and decode calls with GPU timestamps; print a table (and JSON with --json).
    Bench(bench::BenchArgs),
    /// The demo that runs with no arguments.
    Demo(demo::DemoArgs),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        None => demo::run(&demo::DemoArgs::default()),
        Some(Cmd::Demo(a)) => demo::run(&a),
        Some(Cmd::Info) => info::run(),
        Some(Cmd::Bench(a)) => bench::run(&a),
        Some(Cmd::Run { case, output, algorithm, chunk, deterministic }) => {
            run(&case, &output, algorithm, chunk, deterministic)
        }
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wgdelta: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(case: &std::path::Path, output: &std::path::Path, algo: AlgoArg, chunk: u32, det: bool) -> wgdelta::Result<()> {
    let file = TensorFile::read(case)?;
    let eng = Engine::new()?;
    let info = eng.gpu().adapter_info();
    eprintln!("wgdelta: {} on {} ({:?})", case.display(), info.name, info.backend);
    let t0 = std::time::Instant::now();
    let res = run_case(&eng, &file, &RunFlags { algorithm: algo.resolve(chunk), deterministic: det })?;
    res.write(output)?;
    let mut names: Vec<&String> = res.tensors.keys().collect();
    names.sort();
    eprintln!("wgdelta: wrote {names:?} to {} in {:.1} ms", output.display(), t0.elapsed().as_secs_f64() * 1e3);
    Ok(())
}
