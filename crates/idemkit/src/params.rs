//! Query strings: splitting, percent-decoding, and the value syntaxes
//! (durations, sizes, booleans, names).

use std::time::Duration;

use percent_encoding::percent_decode_str;

use crate::StoreUrlError;

/// One `name=value` of a query string: decoded, and the raw text (passed on
/// to the driver unchanged when the parameter is the driver's).
#[derive(Debug)]
pub(crate) struct Param {
    pub(crate) name: String,
    pub(crate) value: String,
    pub(crate) raw: String,
}

/// Builds errors that name the URL (password redacted).
#[derive(Debug)]
pub(crate) struct Ctx {
    pub(crate) url: String,
}

impl Ctx {
    pub(crate) fn new(url: &str) -> Self {
        Self {
            url: crate::url::redact(url),
        }
    }

    pub(crate) fn invalid(&self, name: &str, reason: impl Into<String>) -> StoreUrlError {
        StoreUrlError::InvalidParameter {
            url: self.url.clone(),
            name: name.to_string(),
            reason: reason.into(),
        }
    }

    pub(crate) fn malformed(&self, reason: impl Into<String>) -> StoreUrlError {
        StoreUrlError::Malformed {
            url: self.url.clone(),
            reason: reason.into(),
        }
    }

    pub(crate) fn unknown(
        &self,
        backend: &'static str,
        name: &str,
        known: &'static str,
    ) -> StoreUrlError {
        StoreUrlError::UnknownParameter {
            url: self.url.clone(),
            backend,
            name: name.to_string(),
            known,
        }
    }

    /// Fails if `slot` is already set (a parameter given twice).
    pub(crate) fn once<T>(&self, slot: &Option<T>, name: &str) -> Result<(), StoreUrlError> {
        match slot {
            Some(_) => Err(StoreUrlError::DuplicateParameter {
                url: self.url.clone(),
                name: name.to_string(),
            }),
            None => Ok(()),
        }
    }

    /// Sets `slot` to what `parse` gives, failing if it is already set (a
    /// parameter given twice) or `parse` fails.
    pub(crate) fn set<T>(
        &self,
        slot: &mut Option<T>,
        name: &str,
        parse: impl FnOnce() -> Result<T, StoreUrlError>,
    ) -> Result<(), StoreUrlError> {
        self.once(slot, name)?;
        *slot = Some(parse()?);
        Ok(())
    }

    /// The decoded parameters of `query` (the text after `?`), in order.
    pub(crate) fn split(&self, query: &str) -> Result<Vec<Param>, StoreUrlError> {
        query
            .split('&')
            .filter(|raw| !raw.is_empty())
            .map(|raw| {
                let (name, value) = raw.split_once('=').unwrap_or((raw, ""));
                let decode = |text: &str, what: &str| {
                    percent_decode_str(&text.replace('+', " "))
                        .decode_utf8()
                        .map(|s| s.into_owned())
                        .map_err(|_| {
                            self.invalid(name, format!("the {what} is not UTF-8 once decoded"))
                        })
                };
                Ok(Param {
                    name: decode(name, "name")?,
                    value: decode(value, "value")?,
                    raw: raw.to_string(),
                })
            })
            .collect()
    }

    /// A duration: `250ms`, `3s`, `2m` or `1h` (a whole number and a unit).
    pub(crate) fn duration(&self, name: &str, value: &str) -> Result<Duration, StoreUrlError> {
        let value = value.trim();
        let digits = value
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(value.len());
        let (number, unit) = value.split_at(digits);
        let expected = || {
            self.invalid(
                name,
                format!(
                    "`{value}` is not a duration: expected a whole number and a unit, such as 250ms, 3s, 2m or 1h"
                ),
            )
        };
        let n: u64 = number.parse().map_err(|_| expected())?;
        let seconds = |factor: u64| {
            n.checked_mul(factor)
                .map(Duration::from_secs)
                .ok_or_else(expected)
        };
        match unit {
            "ms" => Ok(Duration::from_millis(n)),
            "s" => seconds(1),
            "m" => seconds(60),
            "h" => seconds(3600),
            _ => Err(expected()),
        }
    }

    /// A whole number of at least `min`.
    pub(crate) fn number<T>(&self, name: &str, value: &str, min: T) -> Result<T, StoreUrlError>
    where
        T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
    {
        match value.trim().parse::<T>() {
            Ok(n) if n >= min => Ok(n),
            Ok(_) => Err(self.invalid(name, format!("`{value}` is below the minimum, {min}"))),
            Err(_) => Err(self.invalid(name, format!("`{value}` is not a whole number"))),
        }
    }

    /// `true`/`false` (also `1`/`0`, `yes`/`no`, `on`/`off`).
    pub(crate) fn boolean(&self, name: &str, value: &str) -> Result<bool, StoreUrlError> {
        match value.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            _ => Err(self.invalid(name, format!("`{value}` is not true or false"))),
        }
    }

    /// A non-empty name (the store validates it further when it opens).
    pub(crate) fn name(&self, name: &str, value: &str) -> Result<String, StoreUrlError> {
        if value.is_empty() {
            Err(self.invalid(name, "the name is empty"))
        } else {
            Ok(value.to_string())
        }
    }

    /// One of `choices` (`(spelling, value)` pairs; `-` and `_` are the same).
    pub(crate) fn choice<T: Copy>(
        &self,
        name: &str,
        value: &str,
        choices: &[(&str, T)],
    ) -> Result<T, StoreUrlError> {
        let wanted = value.trim().to_ascii_lowercase().replace('_', "-");
        choices
            .iter()
            .find(|(spelling, _)| *spelling == wanted)
            .map(|(_, v)| *v)
            .ok_or_else(|| {
                let names: Vec<&str> = choices.iter().map(|(s, _)| *s).collect();
                self.invalid(
                    name,
                    format!("`{value}` is not one of {}", names.join(", ")),
                )
            })
    }
}

/// A duration in the syntax [`Ctx::duration`] reads (the shortest exact
/// unit).
pub(crate) fn show_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(3_600_000) && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// `value` percent-encoded for a query string.
pub(crate) fn encode(value: &str) -> String {
    use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
    const QUERY: &AsciiSet = &CONTROLS
        .add(b' ')
        .add(b'"')
        .add(b'#')
        .add(b'%')
        .add(b'&')
        .add(b'+')
        .add(b'<')
        .add(b'=')
        .add(b'>')
        .add(b'?');
    utf8_percent_encode(value, QUERY).to_string()
}
