//! `pmem-allocd`: the allocator (ledger and device backends) as its own
//! daemon, for nodes where the CSI plugin runs in a container but the ledger
//! and device work stay on the host. `pmem-agent --allocator unix://PATH`
//! uses it. Takes the same flags and config file as pmem-agent; `--allocator`
//! is the socket it serves (default unix:///run/pmem-agent/allocator.sock).

use clap::Parser;
use pmem_agent::config::{Args, Config};

fn main() -> std::process::ExitCode {
    let cfg = match Config::load(Args::parse()) {
        Ok(c) => c,
        Err(e) => {
            pmem_agent::logging::eprint_line(format_args!("pmem-allocd: {e}"));
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
            pmem_agent::logging::eprint_line(format_args!("pmem-allocd: start runtime: {e}"));
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(pmem_agent::server::run_allocd(cfg)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            pmem_agent::logging::eprint_line(format_args!("pmem-allocd: {e:#}"));
            std::process::ExitCode::FAILURE
        }
    }
}
