//! Delivering events to a webhook: `POST` of the event as JSON, bounded retries with doubling
//! backoff, from a task fed by a bounded queue so a slow or dead receiver never holds up the
//! engine. A delivery that fails after every retry is logged and counted, never fatal.

use super::engine::Event;
use super::http::{self, HttpError, HttpUrl, Limits};
use super::metrics::EventsMetrics;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Longest wait between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Where and how to deliver.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// The receiver.
    pub url: HttpUrl,
    /// Deadline of one attempt.
    pub timeout: Duration,
    /// Attempts after the first.
    pub retries: u32,
    /// Wait before the first retry; doubles per retry up to [`MAX_BACKOFF`].
    pub backoff: Duration,
    /// Events waiting for delivery; more are dropped (and counted).
    pub queue: usize,
}

impl WebhookConfig {
    /// Defaults for a receiver: 5 s per attempt, 3 retries from 500 ms, 256 queued events.
    pub fn new(url: HttpUrl) -> Self {
        Self {
            url,
            timeout: Duration::from_secs(5),
            retries: 3,
            backoff: Duration::from_millis(500),
            queue: 256,
        }
    }
}

/// A failed delivery.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The last attempt could not talk to the receiver.
    #[error("webhook {url} failed after {attempts} attempts: {source}")]
    Http {
        /// The receiver.
        url: String,
        /// Attempts made.
        attempts: u32,
        /// The last error.
        source: HttpError,
    },
    /// The last attempt got a non-2xx answer.
    #[error("webhook {url} answered HTTP {status} after {attempts} attempts")]
    Status {
        /// The receiver.
        url: String,
        /// Attempts made.
        attempts: u32,
        /// The last status.
        status: u16,
    },
    /// The event could not be encoded.
    #[error("encoding the event: {0}")]
    Encode(#[from] serde_json::Error),
    /// The notifier was started outside a tokio runtime.
    #[error("the webhook notifier needs a tokio runtime")]
    NoRuntime,
}

/// Posts one event, retrying; returns the number of attempts it took.
pub async fn deliver(cfg: &WebhookConfig, event: &Event) -> Result<u32, WebhookError> {
    let body = serde_json::to_vec(event)?;
    let limits = Limits {
        timeout: cfg.timeout,
        connect_timeout: super::http::CONNECT_TIMEOUT,
        max_body_bytes: 64 * 1024,
    };
    let mut backoff = cfg.backoff;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let err = match http::post_json(&cfg.url, &body, limits).await {
            Ok(r) if r.is_success() => return Ok(attempt),
            Ok(r) => WebhookError::Status {
                url: cfg.url.to_string(),
                attempts: attempt,
                status: r.status,
            },
            Err(source) => WebhookError::Http {
                url: cfg.url.to_string(),
                attempts: attempt,
                source,
            },
        };
        if attempt > cfg.retries {
            return Err(err);
        }
        tracing::debug!(error = %err, attempt, "webhook attempt failed; retrying");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// A background task delivering events in order.
#[derive(Debug)]
pub struct Notifier {
    tx: mpsc::Sender<Event>,
    task: JoinHandle<()>,
    metrics: Option<EventsMetrics>,
}

impl Notifier {
    /// Starts the delivery task on the current tokio runtime.
    pub fn spawn(cfg: WebhookConfig, metrics: Option<EventsMetrics>) -> Result<Self, WebhookError> {
        let handle = tokio::runtime::Handle::try_current().map_err(|_| WebhookError::NoRuntime)?;
        let (tx, mut rx) = mpsc::channel::<Event>(cfg.queue.max(1));
        let m = metrics.clone();
        let task = handle.spawn(async move {
            while let Some(ev) = rx.recv().await {
                let result = match deliver(&cfg, &ev).await {
                    Ok(attempts) => {
                        tracing::debug!(url = %cfg.url, attempts, "event delivered to the webhook");
                        "ok"
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, a = %ev.a.key, b = %ev.b.key, "event not delivered to the webhook");
                        "failed"
                    }
                };
                if let Some(m) = &m {
                    m.webhook.with_label_values(&[result]).inc();
                }
            }
        });
        Ok(Self { tx, task, metrics })
    }

    /// Queues an event; `false` (logged and counted) when the queue is full.
    pub fn notify(&self, event: &Event) -> bool {
        match self.tx.try_send(event.clone()) {
            Ok(()) => true,
            Err(_) => {
                tracing::warn!(a = %event.a.key, b = %event.b.key, "webhook queue full; event not delivered");
                if let Some(m) = &self.metrics {
                    m.webhook.with_label_values(&["dropped"]).inc();
                }
                false
            }
        }
    }

    /// Stops taking events and waits up to `grace` for the queued ones to be delivered; the
    /// rest are abandoned.
    pub async fn close(self, grace: Duration) {
        drop(self.tx);
        let mut task = self.task;
        if tokio::time::timeout(grace, &mut task).await.is_err() {
            tracing::warn!(
                ?grace,
                "webhook deliveries still pending at shutdown; abandoning them"
            );
            task.abort();
        }
    }
}
