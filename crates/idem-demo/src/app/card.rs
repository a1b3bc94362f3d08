//! The service's client of the card network (`--card-network URL`; see
//! [`card_network`](crate::card_network)).

use std::time::Duration;

use crate::DemoError;
use crate::card_network::{ChargeAnswer, ChargeRequest};

/// How long one charge request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The first pause between two attempts of a charge (doubled each time).
const FIRST_BACKOFF: Duration = Duration::from_millis(10);

/// Why a charge did not produce a charge id.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CardError {
    /// Every attempt failed with a 5xx or a connection error: whether the
    /// network charged is not known; the next attempt with the same key
    /// finds out.
    #[error("the card network is unavailable after {attempts} attempts: {last}")]
    Unavailable {
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// The network refused the charge (a 4xx): retrying does not help.
    #[error("the card network refused the charge ({status}): {body}")]
    Refused {
        /// Its status.
        status: u16,
        /// Its body.
        body: String,
    },
}

/// A client of the card network's `POST /charges`.
#[derive(Clone, Debug)]
pub struct CardNetworkClient {
    http: reqwest::Client,
    charges: String,
}

impl CardNetworkClient {
    /// A client of the network at `base` (`http://HOST:PORT`).
    pub fn new(base: &str) -> Result<Self, DemoError> {
        let base = base.trim_end_matches('/');
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(DemoError::InvalidOption(format!(
                "--card-network must be an http:// or https:// URL, not {base:?}"
            )));
        }
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()?;
        Ok(Self {
            http,
            charges: format!("{base}/charges"),
        })
    }

    /// Charges `amount_cents` for `order` under the idempotency key `key`,
    /// retrying a 5xx or a connection error up to `attempts` times in all
    /// (with the same key, so the network charges at most once).
    ///
    /// # Behavior
    /// `Ok(charge id)` on a 2xx, [`CardError::Refused`] on a 4xx,
    /// [`CardError::Unavailable`] once the attempts are spent.
    pub async fn charge(
        &self,
        key: &str,
        order: &str,
        amount_cents: u64,
        attempts: u32,
    ) -> Result<String, CardError> {
        let request = ChargeRequest {
            order: order.to_string(),
            amount_cents,
        };
        let attempts = attempts.max(1);
        let mut backoff = FIRST_BACKOFF;
        let mut last = String::new();
        for attempt in 1..=attempts {
            let sent = self
                .http
                .post(&self.charges)
                .header("Idempotency-Key", key)
                .json(&request)
                .send()
                .await;
            match sent {
                Ok(response) if response.status().is_success() => {
                    match response.json::<ChargeAnswer>().await {
                        Ok(answer) => return Ok(answer.charge_id),
                        Err(e) => last = format!("unreadable answer: {e}"),
                    }
                }
                Ok(response) if response.status().is_client_error() => {
                    let status = response.status().as_u16();
                    let body = response.text().await.unwrap_or_default();
                    return Err(CardError::Refused { status, body });
                }
                Ok(response) => last = format!("status {}", response.status()),
                Err(e) => last = e.to_string(),
            }
            if attempt < attempts {
                tokio::time::sleep(backoff).await;
                backoff = backoff.saturating_mul(2);
            }
        }
        Err(CardError::Unavailable { attempts, last })
    }
}
