//! Captures tracing output per test thread. One global subscriber is installed once and writes
//! each event into the buffer of the thread that emitted it: thread-local subscribers
//! (`set_default`) race with tracing's per-callsite interest cache when tests run in parallel,
//! and then lose events.

use std::cell::RefCell;
use std::io::Write;
use std::sync::Once;

thread_local! {
    static BUFFER: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
}

struct ThreadWriter;

impl Write for ThreadWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        BUFFER.with(|b| {
            if let Some(out) = b.borrow_mut().as_mut() {
                out.extend_from_slice(buf);
            }
        });
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs `f` on this thread (use a current-thread runtime) and returns every event it logged,
/// at any level, as text.
pub async fn capture<F: std::future::Future<Output = ()>>(f: F) -> String {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(|| ThreadWriter)
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one global subscriber");
    });
    BUFFER.with(|b| *b.borrow_mut() = Some(Vec::new()));
    f.await;
    let out = BUFFER.with(|b| b.borrow_mut().take()).unwrap_or_default();
    String::from_utf8_lossy(&out).into_owned()
}
