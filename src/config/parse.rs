//! Value parsers for settings, and the adapter that lets clap run them without stopping at the
//! first bad one. A leaf: it knows nothing of the components.
//!
//! Each setting's parser sits in its clap attribute (`value_parser = check(...)`), beside its
//! env var and default. clap stops at the first value its parser refuses; `check` never
//! refuses, it keeps the refusal in a [`Checked`] value instead, so the builder can collect
//! every problem and report them together (exit 64).

use std::ffi::OsStr;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::time::Duration;

/// A setting as its parser left it: the value, or why it was refused (naming the setting).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked<T>(Result<T, String>);

impl<T> Checked<T> {
    /// The value, for code that runs only on valid settings (tests, tools).
    pub fn ok(&self) -> Option<&T> {
        self.0.as_ref().ok()
    }
}

/// clap's value parser for a setting: runs `parse` on the trimmed text and never fails.
pub fn check<T, F>(parse: F) -> Check<T, F>
where
    F: Fn(&str) -> Result<T, String>,
{
    Check(parse, PhantomData)
}

#[derive(Clone)]
pub struct Check<T, F>(F, PhantomData<fn() -> T>);

impl<T, F> clap::builder::TypedValueParser for Check<T, F>
where
    T: Clone + Send + Sync + 'static,
    F: Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static,
{
    type Value = Checked<T>;

    fn parse_ref(
        &self,
        _command: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<Checked<T>, clap::Error> {
        let text = value.to_string_lossy();
        let name = arg
            .and_then(|arg| arg.get_env())
            .map(|env| env.to_string_lossy().into_owned())
            .or_else(|| arg.map(|arg| arg.get_id().to_string()))
            .unwrap_or_default();
        Ok(Checked(
            (self.0)(text.trim()).map_err(|why| format!("{name}={text:?}: {why}")),
        ))
    }
}

/// Every refused setting, collected while the components' settings are built.
#[derive(Debug, Default)]
pub struct Problems(pub Vec<String>);

impl Problems {
    /// The value of a setting, or (when it was refused) a stand-in after noting the problem:
    /// nothing is built from a stand-in, since any problem fails the whole configuration.
    pub fn take<T: Clone + Default>(&mut self, setting: &Checked<T>) -> T {
        self.get(setting).unwrap_or_default()
    }

    /// As [`Problems::take`], for types without a stand-in.
    pub fn get<T: Clone>(&mut self, setting: &Checked<T>) -> Option<T> {
        match &setting.0 {
            Ok(value) => Some(value.clone()),
            Err(problem) => {
                self.add(problem.clone());
                None
            }
        }
    }

    pub fn add(&mut self, problem: impl Into<String>) {
        self.0.push(problem.into());
    }

    /// Notes the problem of a result, if any, and passes its value on.
    pub fn note<T>(&mut self, result: Result<T, String>) -> Option<T> {
        result.map_err(|problem| self.add(problem)).ok()
    }
}

/// `250ms`, `10s`, `5m`, `24h`; a bare number is seconds.
pub fn duration(value: &str) -> Result<Duration, String> {
    let value = value.trim();
    let split = value
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| "expected a duration such as 250ms, 10s, 5m or 24h".to_string())?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "" | "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        other => return Err(format!("unknown unit {other:?}: use ms, s, m or h")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| "duration out of range".to_string())
}

/// A duration of at least `min`.
pub fn duration_from(min: Duration) -> impl Fn(&str) -> Result<Duration, String> + Clone {
    move |value| {
        let d = duration(value)?;
        if d < min {
            return Err(format!("must be at least {min:?}"));
        }
        Ok(d)
    }
}

/// A duration within `min..=max`.
pub fn duration_within(
    min: Duration,
    max: Duration,
) -> impl Fn(&str) -> Result<Duration, String> + Clone {
    move |value| {
        let d = duration(value)?;
        if d < min || d > max {
            return Err(format!("must be between {min:?} and {max:?}"));
        }
        Ok(d)
    }
}

/// A whole number within `min..=max`.
pub fn in_range<T>(min: T, max: T) -> impl Fn(&str) -> Result<T, String> + Clone
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
{
    move |value| {
        let n: T = value
            .parse()
            .map_err(|_| "expected a whole number".to_string())?;
        if n < min || n > max {
            return Err(format!("must be between {min} and {max}"));
        }
        Ok(n)
    }
}

pub fn boolean(value: &str) -> Result<bool, String> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err("expected true or false".into()),
    }
}

pub fn socket_addr(value: &str) -> Result<SocketAddr, String> {
    value
        .parse()
        .map_err(|_| "expected host:port, e.g. 0.0.0.0:9191".into())
}

/// A socket address, or empty for none.
pub fn optional_socket_addr(value: &str) -> Result<Option<SocketAddr>, String> {
    if value.is_empty() {
        return Ok(None);
    }
    socket_addr(value).map(Some)
}

/// Comma-separated, trimmed, empty items dropped.
pub fn list(value: &str) -> Result<Vec<String>, String> {
    Ok(split_list(value))
}

pub fn split_list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Any text (never refused); for settings checked against others by the builder.
pub fn text(value: &str) -> Result<String, String> {
    Ok(value.to_owned())
}

/// One of `choices`, by name.
pub fn one_of<T: Copy>(
    choices: &'static [(&'static str, T)],
) -> impl Fn(&str) -> Result<T, String> + Clone {
    move |value| {
        choices
            .iter()
            .find(|(name, _)| *name == value)
            .map(|(_, choice)| *choice)
            .ok_or_else(|| {
                let names: Vec<&str> = choices.iter().map(|(name, _)| *name).collect();
                format!("not one of: {}", names.join(", "))
            })
    }
}

pub fn header_name(name: &str) -> Result<String, String> {
    let token_char = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || !name.chars().all(token_char) {
        return Err(format!("{name:?} is not a valid HTTP header name"));
    }
    Ok(name.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(duration("24h"), Ok(Duration::from_secs(86400)));
        assert!(duration("5d").is_err());
        assert!(duration("soon").is_err());
        assert!(duration("").is_err());
    }

    #[test]
    fn problems_are_collected_not_raised() {
        let mut problems = Problems::default();
        let good = Checked(Ok(5u32));
        let bad: Checked<u32> = Checked(Err("X=\"y\": no".into()));
        assert_eq!(problems.take(&good), 5);
        assert_eq!(problems.take(&bad), 0);
        assert_eq!(problems.get(&bad), None);
        assert_eq!(problems.0, ["X=\"y\": no", "X=\"y\": no"]);
    }
}
