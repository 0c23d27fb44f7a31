//! Logging setup: human-readable by default, JSON with `--log-format json`.
//! `RUST_LOG` overrides the default `info` filter.
//!
//! Logging never takes the daemon down. tracing-subscriber's fmt layer
//! reports a failed write with `eprintln!`, which panics when stderr is a
//! closed pipe (EPIPE): the panic killed the connection task of the RPC that
//! logged ("h2 protocol error" at the client) and, at SIGTERM, the main
//! thread (exit 101). So events go through [`DroppingWriter`]: a write the
//! sink refuses is dropped and counted (`pmem_agent_log_write_errors_total`),
//! and internal error reporting is off.

use std::io::{self, Write};
use std::sync::LazyLock;

use prometheus_client::metrics::counter::Counter;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use crate::config::LogFormat;

/// Log events the sink refused, process-wide (the metric shares it).
static WRITE_ERRORS: LazyLock<Counter> = LazyLock::new(Counter::default);

/// The counter of dropped log events, for the metrics registry.
pub fn write_errors() -> Counter {
    WRITE_ERRORS.clone()
}

/// Makes writers to `make()` that drop and count what cannot be written.
#[derive(Debug, Clone)]
pub struct DroppingWriter<F> {
    make: F,
    errors: Counter,
}

impl<F, W> DroppingWriter<F>
where
    F: Fn() -> W,
    W: Write,
{
    pub fn new(make: F, errors: Counter) -> Self {
        DroppingWriter { make, errors }
    }
}

impl<'a, F, W> MakeWriter<'a> for DroppingWriter<F>
where
    F: Fn() -> W + 'a,
    W: Write,
{
    type Writer = Dropping<'a, W>;

    fn make_writer(&'a self) -> Self::Writer {
        Dropping {
            inner: (self.make)(),
            errors: &self.errors,
            failed: false,
        }
    }
}

/// One event's writer: the fmt layer writes the whole formatted event with
/// one `write_all`; if the sink fails, the rest of it is dropped and the
/// event counts once.
#[derive(Debug)]
pub struct Dropping<'a, W> {
    inner: W,
    errors: &'a Counter,
    failed: bool,
}

impl<W: Write> Write for Dropping<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !self.failed && self.inner.write_all(buf).is_err() {
            self.failed = true;
            self.errors.inc();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.failed && self.inner.flush().is_err() {
            self.failed = true;
            self.errors.inc();
        }
        Ok(())
    }
}

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .log_internal_errors(false)
        .with_writer(DroppingWriter::new(io::stderr, write_errors()));
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// `eprintln!` that cannot panic: for the last words of a process whose
/// stderr may be gone.
pub fn eprint_line(line: std::fmt::Arguments<'_>) {
    let mut err = io::stderr().lock();
    if writeln!(err, "{line}").is_err() {
        WRITE_ERRORS.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that refuses every write, like a pipe whose reader is gone.
    struct Closed;

    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
    }

    #[test]
    fn a_refused_write_is_dropped_and_counted_not_a_panic() {
        let errors = Counter::default();
        let sub = tracing_subscriber::fmt()
            .log_internal_errors(false)
            .with_writer(DroppingWriter::new(|| Closed, errors.clone()))
            .finish();
        tracing::subscriber::with_default(sub, || {
            tracing::info!(volume = "v1", "first");
            tracing::warn!("second");
        });
        assert_eq!(errors.get(), 2);
    }

    #[test]
    fn a_working_sink_gets_every_event_and_counts_nothing() {
        let errors = Counter::default();
        let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
        struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let o = std::sync::Arc::clone(&out);
        let sub = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(DroppingWriter::new(
                move || Shared(std::sync::Arc::clone(&o)),
                errors.clone(),
            ))
            .finish();
        tracing::subscriber::with_default(sub, || tracing::info!("hello sink"));
        assert_eq!(errors.get(), 0);
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        assert!(text.contains("hello sink"), "{text}");
    }

    #[test]
    fn closed_stderr_pipe_is_counted() {
        // A real pipe with its read end closed: EPIPE (SIGPIPE is ignored
        // by the Rust runtime, as in the daemon).
        let (r, w) = nix::unistd::pipe().unwrap();
        drop(r);
        let file = std::fs::File::from(w);
        let errors = Counter::default();
        let sub = tracing_subscriber::fmt()
            .log_internal_errors(false)
            .with_writer(DroppingWriter::new(
                move || file.try_clone().unwrap(),
                errors.clone(),
            ))
            .finish();
        tracing::subscriber::with_default(sub, || tracing::error!("nobody reads this"));
        assert_eq!(errors.get(), 1);
    }
}
