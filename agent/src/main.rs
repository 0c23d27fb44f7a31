//! The `pmem-agent` daemon.

use clap::Parser;
use pmem_agent::config::{Args, Config};

fn main() -> std::process::ExitCode {
    let cfg = match Config::load(Args::parse()) {
        Ok(c) => c,
        Err(e) => {
            pmem_agent::logging::eprint_line(format_args!("pmem-agent: {e}"));
            return std::process::ExitCode::from(2);
        }
    };
    pmem_agent::logging::init(cfg.log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            pmem_agent::logging::eprint_line(format_args!("pmem-agent: start runtime: {e}"));
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(pmem_agent::server::run(cfg)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            pmem_agent::logging::eprint_line(format_args!("pmem-agent: {e:#}"));
            std::process::ExitCode::FAILURE
        }
    }
}
