//! Polling with a deadline, for conditions on API objects and files.
//!
//! Watches would be faster to react, but a poll every 200 ms is simple,
//! survives API server restarts without resync logic and is far below the
//! timeouts the suite uses; latency measurements use watches instead.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

/// How often conditions are re-checked.
pub const POLL: Duration = Duration::from_millis(200);

/// Polls `check` until it returns `Ok(true)`; an `Err` is retried too (the
/// API server may be briefly unavailable) and reported if time runs out.
pub async fn until<F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    value(timeout, what, || {
        let fut = check();
        async move { Ok(fut.await?.then_some(())) }
    })
    .await
}

/// Polls `get` until it returns `Some`, and returns that value; errors are
/// retried like [`until`]'s.
pub async fn value<T, F, Fut>(timeout: Duration, what: &str, mut get: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match get().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(err) => last_err = Some(err),
        }
        if Instant::now() >= deadline {
            match last_err {
                Some(err) => {
                    bail!("timed out after {timeout:?} waiting for {what}; last error: {err:#}")
                }
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        tokio::time::sleep(POLL).await;
    }
}
