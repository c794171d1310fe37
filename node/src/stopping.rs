//! A flag that says a part of the node is to stop: set once by whoever
//! holds its sender, awaited by any number of tasks.

use tokio::sync::watch;

/// Whether stopping has begun. `serve` sets one for the HTTP API at the
/// signal (responses with no end of their own, the cluster feed, end on
/// it) and `Engine::shutdown` one for the request coordinator.
#[derive(Clone, Debug)]
pub struct Stopping(watch::Receiver<bool>);

impl Stopping {
    /// The flag and the sender that sets it (`send_replace(true)`).
    pub fn new() -> (watch::Sender<bool>, Self) {
        let (set, flag) = watch::channel(false);
        (set, Self(flag))
    }

    /// A flag nothing sets: an API without a server that stops it.
    pub fn never() -> Self {
        Self(watch::channel(false).1)
    }

    /// Resolves once stopping has begun (at once, if it has); never, if
    /// the flag was not set before its sender went away. Cancel-safe.
    pub async fn wait(&mut self) {
        if self.0.wait_for(|stopping| *stopping).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
