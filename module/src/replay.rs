//! An allow's changes to the request, as the memo keeps them: every name and value in one
//! buffer and the changes in one array. Writing a remembered allow again then reads a few cache
//! lines, not one per string; with many tokens most entries have left the CPU's caches by the
//! time their token comes back, and each line is a wait.
//!
//! A fresh [`Pass`] and a [`Replay`] both hand out [`Change`]s, so one writer applies either.

use crate::translate::Pass;

/// One change an allow makes to the request, borrowed from a [`Pass`] or a [`Replay`], in the
/// order they are written: headers, removals, then the dynamic metadata.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Change<'a> {
    Header {
        name: &'a str,
        value: &'a str,
        replace: bool,
    },
    Remove(&'a str),
    MetadataString(&'a str, &'a str),
    MetadataNumber(&'a str, f64),
    MetadataBool(&'a str, bool),
    /// The values no single setter carries (lists, objects, null), as a serialized Struct.
    MetadataStruct(&'a [u8]),
}

impl Pass {
    /// The changes to the request (its response headers are written later, on the response).
    pub fn changes(&self) -> impl Iterator<Item = Change<'_>> {
        let metadata = &self.metadata;
        let headers = self.request_headers.iter().map(|h| Change::Header {
            name: &h.name,
            value: &h.value,
            replace: h.replace,
        });
        let removals = self.remove.iter().map(|name| Change::Remove(name));
        let strings = (metadata.strings.iter()).map(|(k, v)| Change::MetadataString(k, v));
        let numbers = (metadata.numbers.iter()).map(|(k, n)| Change::MetadataNumber(k, *n));
        let bools = (metadata.bools.iter()).map(|(k, b)| Change::MetadataBool(k, *b));
        let rest = metadata.rest.as_deref().map(Change::MetadataStruct);
        headers
            .chain(removals)
            .chain(strings)
            .chain(numbers)
            .chain(bools)
            .chain(rest)
    }
}

/// Changes packed for writing again: spans into one text, the Struct bytes beside it.
#[derive(Debug)]
pub struct Replay {
    text: Box<str>,
    changes: Box<[Packed]>,
    metadata_struct: Option<Box<[u8]>>,
}

/// Where a string sits in [`Replay::text`].
#[derive(Debug, Clone, Copy)]
struct Span {
    at: u32,
    len: u32,
}

#[derive(Debug, Clone, Copy)]
enum Packed {
    Header {
        name: Span,
        value: Span,
        replace: bool,
    },
    Remove(Span),
    MetadataString(Span, Span),
    MetadataNumber(Span, f64),
    MetadataBool(Span, bool),
    MetadataStruct,
}

impl Replay {
    /// The changes, packed; `None` past 4 GiB of text (nothing Envoy would hold).
    pub fn new<'a>(changes: impl Iterator<Item = Change<'a>>) -> Option<Replay> {
        let mut text = String::new();
        let mut span = |s: &str| {
            let at = u32::try_from(text.len()).ok()?;
            let len = u32::try_from(s.len()).ok()?;
            text.push_str(s);
            Some(Span { at, len })
        };
        let mut packed = Vec::new();
        let mut metadata_struct = None;
        for change in changes {
            packed.push(match change {
                Change::Header {
                    name,
                    value,
                    replace,
                } => Packed::Header {
                    name: span(name)?,
                    value: span(value)?,
                    replace,
                },
                Change::Remove(name) => Packed::Remove(span(name)?),
                Change::MetadataString(k, v) => Packed::MetadataString(span(k)?, span(v)?),
                Change::MetadataNumber(k, n) => Packed::MetadataNumber(span(k)?, n),
                Change::MetadataBool(k, b) => Packed::MetadataBool(span(k)?, b),
                Change::MetadataStruct(bytes) => {
                    metadata_struct = Some(bytes.into());
                    Packed::MetadataStruct
                }
            });
        }
        Some(Replay {
            text: text.into(),
            changes: packed.into(),
            metadata_struct,
        })
    }

    pub fn changes(&self) -> impl Iterator<Item = Change<'_>> {
        let text = |s: Span| {
            let at = s.at as usize;
            self.text.get(at..at + s.len as usize).unwrap_or_default()
        };
        self.changes.iter().map(move |packed| match *packed {
            Packed::Header {
                name,
                value,
                replace,
            } => Change::Header {
                name: text(name),
                value: text(value),
                replace,
            },
            Packed::Remove(name) => Change::Remove(text(name)),
            Packed::MetadataString(k, v) => Change::MetadataString(text(k), text(v)),
            Packed::MetadataNumber(k, n) => Change::MetadataNumber(text(k), n),
            Packed::MetadataBool(k, b) => Change::MetadataBool(text(k), b),
            Packed::MetadataStruct => {
                Change::MetadataStruct(self.metadata_struct.as_deref().unwrap_or_default())
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::{HeaderWrite, Metadata};

    #[test]
    fn a_replay_gives_back_the_changes_it_packed_in_their_order() {
        let header = |name: &str, value: &str, replace| HeaderWrite {
            name: name.into(),
            value: value.into(),
            replace,
        };
        let pass = Pass {
            request_headers: vec![header("x-jwt-sub", "alice", true), header("x-a", "", false)],
            remove: vec!["authorization".into()],
            response_headers: vec![header("ratelimit", "not replayed", true)],
            metadata: Metadata {
                strings: vec![("sub".into(), "alice".into()), ("iss".into(), "é".into())],
                numbers: vec![("exp".into(), 1.5)],
                bools: vec![("admin".into(), false)],
                rest: Some(vec![1, 2, 3]),
            },
        };
        let replay = Replay::new(pass.changes()).unwrap();
        let replayed: Vec<_> = replay.changes().collect();
        assert_eq!(replayed, pass.changes().collect::<Vec<_>>());
        assert_eq!(replayed.len(), 8, "{replayed:?}");
        assert_eq!(
            replayed[0],
            Change::Header {
                name: "x-jwt-sub",
                value: "alice",
                replace: true
            }
        );
        assert_eq!(replayed[7], Change::MetadataStruct(&[1, 2, 3]));
        let empty = Replay::new(Pass::default().changes()).unwrap();
        assert_eq!(empty.changes().count(), 0);
    }
}
