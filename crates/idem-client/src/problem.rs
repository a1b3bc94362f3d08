//! The idempotency layer's problem types, and which answers are final.

use std::time::Duration;

use http::{HeaderMap, StatusCode};

/// The problem types an idempotency layer answers with by itself
/// (`application/problem+json`, `type` = `https://idem.dev/problems/…`; the
/// table in docs/http-contract.md, "What each answer means"): the server's
/// own [`idem_http::ProblemType`], so that client and server cannot
/// disagree on a URI, a status, or whether to re-send
/// ([`is_retryable`](idem_http::ProblemType::is_retryable)).
///
/// # Behavior
/// The middleware recognises a problem only when the response's content type
/// is `application/problem+json`, its (buffered) body's `type` is one of these
/// URIs, and its status is the problem's
/// [`status`](idem_http::ProblemType::status): an API's own problem types are
/// never mistaken for the layer's.
pub use idem_http::ProblemType as Problem;

/// The problem a response announces: its content type must be
/// `application/problem+json`, its body a JSON object whose `type` is a
/// known URI, and its status that problem's.
pub(crate) fn of_response(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Option<Problem> {
    let content_type = headers.get(http::header::CONTENT_TYPE)?.to_str().ok()?;
    let media = content_type.split(';').next().unwrap_or_default().trim();
    if !media.eq_ignore_ascii_case("application/problem+json") {
        return None;
    }
    #[derive(serde::Deserialize)]
    struct Typed<'a> {
        #[serde(rename = "type", borrow)]
        kind: std::borrow::Cow<'a, str>,
    }
    let typed: Typed<'_> = serde_json::from_slice(body).ok()?;
    Problem::from_uri(&typed.kind).filter(|p| p.status() == status)
}

/// What to do after one attempt's response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The answer for this key: hand it to the caller.
    Final,
    /// No answer yet: re-send (after at least `retry_after`, if given).
    Retry,
}

/// Whether a response is final, following docs/http-contract.md ("When to
/// reuse a key", "What each answer means", and its retry loop):
///
/// 1. A replayed response (`Idempotent-Replayed: true`) is the key's stored
///    answer: final, whatever its status (a replayed 4xx is final for the
///    key; a replayed 500 `response-not-stored` means "executed, do not
///    retry").
/// 2. A recognised [`Problem`] decides by [`Problem::is_retryable`].
/// 3. Otherwise by status: 409 is re-sent only with `Retry-After` (an API's
///    own 409 conflict is an answer); 429, 500, 502, 503 and 504 are re-sent;
///    everything else (2xx, 3xx, other 4xx, 501, 505 and up) is final.
pub(crate) fn verdict(
    status: StatusCode,
    replayed: bool,
    problem: Option<Problem>,
    retry_after: Option<Duration>,
) -> Verdict {
    if replayed {
        return Verdict::Final;
    }
    if let Some(problem) = problem {
        return if problem.is_retryable() {
            Verdict::Retry
        } else {
            Verdict::Final
        };
    }
    match status {
        StatusCode::CONFLICT if retry_after.is_some() => Verdict::Retry,
        StatusCode::TOO_MANY_REQUESTS
        | StatusCode::INTERNAL_SERVER_ERROR
        | StatusCode::BAD_GATEWAY
        | StatusCode::SERVICE_UNAVAILABLE
        | StatusCode::GATEWAY_TIMEOUT => Verdict::Retry,
        _ => Verdict::Final,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http::HeaderValue;

    fn problem_headers(content_type: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_str(content_type).unwrap(),
        );
        h
    }

    fn body(uri: &str) -> Vec<u8> {
        format!(r#"{{"type":"{uri}","title":"t","status":422,"detail":"d"}}"#).into_bytes()
    }

    #[test]
    fn uris_round_trip() {
        for p in Problem::ALL {
            assert_eq!(Problem::from_uri(p.uri()), Some(p));
        }
        assert_eq!(Problem::from_uri("https://idem.dev/problems/nope"), None);
    }

    #[test]
    fn problems_are_recognised_only_when_everything_agrees() {
        let json = problem_headers("application/problem+json");
        let reused = body(Problem::KeyReused.uri());
        let s422 = StatusCode::UNPROCESSABLE_ENTITY;
        assert_eq!(of_response(s422, &json, &reused), Some(Problem::KeyReused));
        assert_eq!(
            of_response(
                s422,
                &problem_headers("Application/Problem+JSON; charset=utf-8"),
                &reused
            ),
            Some(Problem::KeyReused)
        );
        // Wrong status, wrong media type, an API's own type, not JSON.
        assert_eq!(of_response(StatusCode::OK, &json, &reused), None);
        assert_eq!(
            of_response(s422, &problem_headers("application/json"), &reused),
            None
        );
        assert_eq!(
            of_response(s422, &json, &body("https://example.com/invalid-payment")),
            None
        );
        assert_eq!(of_response(s422, &json, b"not json"), None);
        assert_eq!(of_response(s422, &HeaderMap::new(), &reused), None);
    }

    #[test]
    fn verdicts() {
        use Verdict::{Final, Retry};
        let s = |code: u16| StatusCode::from_u16(code).unwrap();
        let after = Some(Duration::from_secs(1));
        // Status alone.
        for (code, want) in [
            (200, Final),
            (201, Final),
            (302, Final),
            (400, Final),
            (404, Final),
            (408, Final),
            (409, Final),
            (422, Final),
            (429, Retry),
            (500, Retry),
            (501, Final),
            (502, Retry),
            (503, Retry),
            (504, Retry),
            (505, Final),
        ] {
            assert_eq!(verdict(s(code), false, None, None), want, "{code}");
        }
        assert_eq!(verdict(s(409), false, None, after), Retry);
        // Replays are final, whatever their status.
        for code in [409, 429, 500, 503] {
            assert_eq!(verdict(s(code), true, None, after), Final, "{code}");
        }
        // Problems decide over the status.
        for p in Problem::ALL {
            let want = if p.is_retryable() { Retry } else { Final };
            assert_eq!(verdict(p.status(), false, Some(p), None), want, "{p:?}");
        }
        assert_eq!(
            verdict(s(500), false, Some(Problem::OutcomeUnknown), None),
            Final
        );
        assert_eq!(
            verdict(s(400), false, Some(Problem::BodyUnreadable), None),
            Retry
        );
    }
}
