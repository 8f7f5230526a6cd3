//! The `wgdelta` command line: `info`, `run`, `bench`, and (with no arguments) a demo.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
