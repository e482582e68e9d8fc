//! The `ringmq` binary: a thin entry point over `ringmq::cli`.

use clap::Parser;

fn main() {
    let cli = ringmq::cli::Cli::parse();
    if let Err(e) = ringmq::cli::run(cli) {
        eprintln!("ringmq: error: {e}");
        std::process::exit(1);
    }
}
